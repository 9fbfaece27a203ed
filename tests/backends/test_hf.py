import torch
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor, SiglipModel

from fsclip.backends import load_model

TEXTS = ["a photo of a cat.", "dog", "a blurry photo of a very large and extremely fluffy dog, outdoors."]


def test_clip_matches_get_features(tiny_hf_clip_dir, rgb_images):
    ours = load_model(str(tiny_hf_clip_dir), device="cpu")
    assert ours.name == "transformers" and ours.exact_short_text and ours.loss_kind == "softmax"
    ref = CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()
    proc = CLIPProcessor.from_pretrained(tiny_hf_clip_dir)
    with torch.no_grad():
        inputs = proc(text=TEXTS, images=rgb_images, return_tensors="pt", padding="max_length", max_length=77)
        ref_img = ref.get_image_features(pixel_values=inputs["pixel_values"])
        ref_txt = ref.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    ref_img = getattr(ref_img, "pooler_output", ref_img)
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
    img = ours.encode_images(torch.stack([ours.preprocess(im) for im in rgb_images]))
    txt = ours.encode_texts(TEXTS)
    assert (img - torch.nn.functional.normalize(ref_img, dim=-1)).abs().max() <= 1e-5
    # ours pads to the longest text only; identical to max-length padding for CLIP's causal tower
    assert (txt - torch.nn.functional.normalize(ref_txt, dim=-1)).abs().max() <= 1e-5
    assert ours.tokenize(["dog"])["input_ids"].shape[1] == 3
    assert abs(ours.logit_scale - ref.logit_scale.exp().item()) < 1e-6


def test_siglip_padding_matters_so_it_pads_to_max_length(tiny_hf_siglip_dir):
    ours = load_model(f"hf:{tiny_hf_siglip_dir}", device="cpu")
    assert not ours.exact_short_text and ours.loss_kind == "sigmoid" and ours.logit_bias is not None
    ref = SiglipModel.from_pretrained(tiny_hf_siglip_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_hf_siglip_dir)
    with torch.no_grad():
        ids = tok(TEXTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")["input_ids"]
        full = ref.get_text_features(input_ids=ids)
        short = ref.get_text_features(input_ids=tok(TEXTS, padding="longest", return_tensors="pt")["input_ids"])
    full = torch.nn.functional.normalize(getattr(full, "pooler_output", full), dim=-1)
    short = torch.nn.functional.normalize(getattr(short, "pooler_output", short), dim=-1)
    # the bidirectional tower sees its padding: the short-padding trick would be wrong here ...
    assert (full - short).abs().max() > 1e-3
    # ... so the backend keeps max-length padding and matches the reference exactly
    assert (ours.encode_texts(TEXTS) - full).abs().max() <= 1e-5
