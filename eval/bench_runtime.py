"""CPU runtimes: torch fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8 (and OpenVINO), ViT-B/32 architecture.

    python -m eval.bench_runtime [--images 256] [--prompts 1000] [--batch-size 32]
    python -m eval.bench_runtime --quick      # the shapes model and a few images: checks that it all runs
    python -m eval.bench_runtime --accuracy-only   # the shapes-world accuracy table alone (no timings)

Speed on open_clip's `ViT-B-32` with random weights (no pretrained tag; speed does not depend on the
weights), accuracy on the shapes world (the bundled shapes model). Prints Markdown tables of ratios
measured in this one run:
- image forward on ready tensors: img/s of each runtime and its ratio to torch fp32 (target: int8 >= 2.5x);
  int8 by dynamic and by static (QDQ) quantisation, and OpenVINO on the same ONNX export;
- end to end on JPEGs 3000x2000 through fsclip's loader (decode overlapped with the model): img/s and ratio
  to torch end to end (target: int8 >= 2x); decoding alone (the loader, no model) shows whether decoding
  becomes the limit, and int8 with ORT's thread spinning on shows what fsclip's default (off) buys;
- text: 1,000 prompts through `encode_texts` (exact short sequences) per runtime;
- the accuracy gates on the shapes world, and zero-shot top-1 on shapes-compositional renders per runtime
  (target: within 0.5 point of torch).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from eval._timing import markdown_table, median_time
from eval.bench_encode import _prompts, _write_jpegs


def _backend(arch: str):
    if arch == "shapes":
        from fsclip.backends import load_model

        return load_model("shapes", device="cpu")
    import open_clip

    from fsclip.backends.openclip import OpenClipBackend

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(arch)  # random weights
    return OpenClipBackend(arch, model.eval(), torch.device("cpu"), torch.float32, preprocess,
                           open_clip.get_tokenizer(arch))


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float()).min())


class _OpenVino:
    """OpenVINO's CPU plugin on an ONNX image tower, behind `encode_images` (fp32 inference precision)."""

    def __init__(self, onnx_path: Path, threads: int):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU",
                                           {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})

    def encode_images(self, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        out = [torch.from_numpy(self.compiled(pixels[i : i + batch_size].numpy())[0].copy())
               for i in range(0, len(pixels), batch_size)]
        return torch.cat(out)


def bench_exports(backend) -> tuple[dict, list[list]]:
    """Export and quantise into a fresh cache; the runtimes (ungated: speed is measured on random weights)."""
    from fsclip.runtime import export_models
    from fsclip.runtime.ort_backend import OrtBackend
    from fsclip.runtime.quantize import quantize

    rows, runtimes = [], {}
    for runtime in ("onnx", "onnx-int8"):
        t0 = time.perf_counter()
        folder = export_models(backend, runtime)
        rows.append([f"export {runtime}", f"{time.perf_counter() - t0:.1f}", "one-off, then cached"])
        runtimes[runtime] = OrtBackend(backend, runtime, folder)
    # static quantisation of the image tower, calibrated on 4 batches of the benchmark's own inputs
    static = Path(tempfile.mkdtemp(prefix="fsclip-static-"))
    src = runtimes["onnx"].folder
    g = torch.Generator().manual_seed(1)
    feeds = [{"pixels": torch.randn(8, 3, backend.image_size, backend.image_size, generator=g).numpy()}
             for _ in range(4)]
    t0 = time.perf_counter()
    quantize(src / "image.onnx", static / "image.onnx", "static", calibration=feeds)
    (static / "text.onnx").symlink_to(runtimes["onnx-int8"].folder / "text.onnx")
    rows.append(["quantise image tower, static (QDQ, 32 calibration images)", f"{time.perf_counter() - t0:.1f}",
                 "for comparison"])
    runtimes["onnx-int8 static"] = OrtBackend(backend, "onnx-int8", static)
    return runtimes, rows


def bench_forward(backend, runtimes: dict, n: int, batch_size: int, repeats: int) -> list[list]:
    pixels = torch.randn(n, 3, backend.image_size, backend.image_size, generator=torch.Generator().manual_seed(0))
    ref = backend.encode_images(pixels, batch_size=batch_size)
    t_ref = median_time(lambda: backend.encode_images(pixels, batch_size=batch_size), repeats=repeats)
    rows = [["image forward", "torch fp32", f"{n / t_ref:.1f} img/s", "torch fp32", f"{n / t_ref:.1f} img/s",
             "1.00x", "baseline"]]
    candidates = dict(runtimes)
    for name, source in (("openvino fp32", "onnx"), ("openvino on the int8 model", "onnx-int8")):
        candidates[name] = lambda source=source: _OpenVino(runtimes[source].folder / "image.onnx",
                                                           torch.get_num_threads())
    from fsclip.runtime import session

    flipped = f"onnx-int8, ORT thread spinning {'off' if session.ALLOW_SPINNING else 'on'} (not the default)"
    candidates[flipped] = lambda: _spinning(runtimes["onnx-int8"])
    for name, rt in candidates.items():
        try:  # OpenVINO is optional: missing or failing, it becomes a note
            rt = rt() if callable(rt) else rt
            got = rt.encode_images(pixels, batch_size=batch_size)
            t = median_time(lambda rt=rt: rt.encode_images(pixels, batch_size=batch_size), repeats=repeats)
        except Exception as e:
            rows.append(["image forward", name, "–", "torch fp32", "–", "–",
                         f"failed: {(str(e).strip().splitlines() or [type(e).__name__])[0][:120]}"])
            continue
        rows.append(["image forward", name, f"{n / t:.1f} img/s", "torch fp32", f"{n / t_ref:.1f} img/s",
                     f"**{t_ref / t:.2f}x**", f"cosine to torch >= {_min_cos(got, ref):.4f}"])
    return rows


def _spinning(ort_backend):
    """The same int8 model with ORT's thread spinning flipped from fsclip's default."""
    from fsclip.runtime import session
    from fsclip.runtime.ort_backend import OrtBackend

    default = session.ALLOW_SPINNING
    session.ALLOW_SPINNING = not default
    try:
        return OrtBackend(ort_backend.base, ort_backend.runtime, ort_backend.folder)
    finally:
        session.ALLOW_SPINNING = default


def bench_end_to_end(backend, runtimes: dict, paths: list[Path], batch_size: int) -> list[list]:
    from fsclip.encode import iter_encoded
    from fsclip.images import iter_batches
    from fsclip.runtime import session

    n = len(paths)

    def run(b) -> float:
        t0 = time.perf_counter()
        got = sum(len(x.indices) for x in iter_encoded(b, paths, batch_size=batch_size))
        assert got == n
        return time.perf_counter() - t0

    def decode_only() -> float:
        t0 = time.perf_counter()
        for _ in iter_batches(paths, backend.preprocess, batch_size, None, backend.image_size):
            pass
        return time.perf_counter() - t0

    backend.encode_images(torch.zeros(2, 3, backend.image_size, backend.image_size))  # warm-up
    t_ref = run(backend)
    rows = [["end to end", "torch fp32", f"{n / t_ref:.1f} img/s", "torch fp32", f"{n / t_ref:.1f} img/s", "1.00x",
             "baseline"]]
    t = decode_only()
    rows.append(["end to end", "decode + preprocess only (no model)", f"{n / t:.1f} img/s", "torch fp32",
                 f"{n / t_ref:.1f} img/s", f"{t_ref / t:.2f}x", f"fsclip loader, {os.cpu_count()} CPUs"])
    for name in ("onnx", "onnx-int8"):
        t = run(runtimes[name])
        rows.append(["end to end", name, f"{n / t:.1f} img/s", "torch fp32", f"{n / t_ref:.1f} img/s",
                     f"**{t_ref / t:.2f}x**", f"ORT thread spinning {'on' if session.ALLOW_SPINNING else 'off'}"])
    t = run(_spinning(runtimes["onnx-int8"]))
    rows.append(["end to end", "onnx-int8", f"{n / t:.1f} img/s", "torch fp32", f"{n / t_ref:.1f} img/s",
                 f"{t_ref / t:.2f}x", f"ORT thread spinning {'off' if session.ALLOW_SPINNING else 'on'} "
                                      "(not the default)"])
    return rows


def bench_text(backend, runtimes: dict, n: int) -> list[list]:
    prompts = _prompts(n)
    backend.encode_texts(prompts[:64])
    t0 = time.perf_counter()
    ref = backend.encode_texts(prompts)
    t_ref = time.perf_counter() - t0
    rows = [["text", "torch fp32", f"{n / t_ref:.0f} prompts/s", "torch fp32", f"{n / t_ref:.0f} prompts/s", "1.00x",
             "baseline; exact short sequences"]]
    for name in ("onnx", "onnx-int8"):
        rt = runtimes[name]
        rt.encode_texts(prompts[:64])
        t0 = time.perf_counter()
        got = rt.encode_texts(prompts)
        t = time.perf_counter() - t0
        rows.append(["text", name, f"{n / t:.0f} prompts/s", "torch fp32", f"{n / t_ref:.0f} prompts/s",
                     f"**{t_ref / t:.2f}x**", f"cosine to torch >= {_min_cos(got, ref):.4f}"])
    return rows


def bench_accuracy(per_class: int) -> list[list]:
    """Gates and zero-shot top-1 of each runtime of the shapes model, on shapes-compositional renders."""
    from fsclip.backends import load_model
    from fsclip.data import load_image_folder
    from fsclip.encode import encode_images
    from fsclip.evaluation.shapes import write_compositional
    from fsclip.zeroshot import ZeroShotClassifier

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_compositional(Path(tmp), per_class=per_class, seed=5)
        data = load_image_folder(Path(tmp) / "test")
        targets = torch.tensor(data.targets)
        top1 = {}
        backends = {runtime: load_model("shapes", device="cpu", runtime=runtime)
                    for runtime in ("torch", "onnx", "onnx-int8")}
        backends["onnx-int8 static"] = _static_int8(backends["torch"], backends["onnx-int8"], Path(tmp))
        for runtime, backend in backends.items():
            clf = ZeroShotClassifier(backend, list(data.classes), "shapes", use_cache=False)
            feats, idx, _ = encode_images(backend, list(data.paths))
            top1[runtime] = float((clf.predict_proba(feats).argmax(1) == targets[idx]).float().mean())
            gate = getattr(backend, "gate", None)
            figures = "reference" if gate is None else _gate_text(gate)
            rows.append([runtime, figures, f"{100 * top1[runtime]:.2f}%", "torch", f"{100 * top1['torch']:.2f}%",
                         f"{100 * (top1[runtime] - top1['torch']):+.2f}", f"{len(idx)} images, 48 classes"])
    return rows


def _static_int8(torch_backend, dynamic, folder: Path):
    """The shapes model with a statically quantised image tower (calibrated on 32 renders), gated like the others."""
    from fsclip.runtime import export_models
    from fsclip.runtime.gates import _shapes_renders, calibration_pixels, run_gates
    from fsclip.runtime.ort_backend import OrtBackend
    from fsclip.runtime.quantize import quantize

    calib = torch.stack([torch_backend.preprocess(im) for im in _shapes_renders(32, seed=1)])
    out = folder / "static"
    out.mkdir()
    quantize(export_models(torch_backend, "onnx") / "image.onnx", out / "image.onnx", "static",
             calibration=[{"pixels": calib[i : i + 8].numpy()} for i in range(0, 32, 8)])
    (out / "text.onnx").symlink_to(dynamic.folder / "text.onnx")
    static = OrtBackend(torch_backend, "onnx-int8", out)
    pixels, source = calibration_pixels(torch_backend)
    static.gate = run_gates(torch_backend, static, "onnx-int8", pixels, source).to_dict()
    return static


def _gate_text(gate: dict) -> str:
    if gate["runtime"] == "onnx":
        return f"passed: max abs {max(gate['image_max_abs'], gate['text_max_abs']):.1e} (limit 1e-4)"
    return (f"{'passed' if gate['passed'] else 'refused'}: cosine >= "
            f"{min(gate['image_min_cosine'], gate['text_min_cosine']):.4f} (limit 0.99), top-1 agreement "
            f"{100 * gate['top1_agreement']:.1f}% (limit 99%), {gate['calibration']}")


def run(arch: str = "ViT-B-32", n_images: int = 256, n_prompts: int = 1000, batch_size: int = 32,
        repeats: int = 3, per_class: int = 10) -> str:
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: exports are measured, not reused
        old = os.environ.get("FSCLIP_CACHE")
        os.environ["FSCLIP_CACHE"] = cache
        try:
            backend = _backend(arch)
            runtimes, export_rows = bench_exports(backend)
            head = ["workload", "runtime", "rate", "baseline", "baseline rate", "speed-up", "note"]
            out = [f"## Image forward on tensors ({arch}, batch {batch_size}, {n_images} images)",
                   markdown_table(head, bench_forward(backend, runtimes, n_images, batch_size, repeats))]
            with tempfile.TemporaryDirectory() as tmp:
                paths = _write_jpegs(Path(tmp), n_images)
                out += [f"## End to end on {n_images} JPEGs 3000x2000 ({arch}, batch {batch_size})",
                        markdown_table(head, bench_end_to_end(backend, runtimes, paths, batch_size))]
            out += [f"## Text encoding ({arch}, {n_prompts} prompts)",
                    markdown_table(head, bench_text(backend, runtimes, n_prompts))]
            out += ["## Accuracy on the shapes world (gates, and zero-shot on shapes-compositional renders)",
                    markdown_table(["runtime", "gate", "zero-shot top-1", "baseline", "baseline top-1",
                                    "difference vs torch (points)", "note"], bench_accuracy(per_class))]
            out += ["## One-off costs", markdown_table(["step", "seconds", "note"], export_rows)]
        finally:
            if old is None:
                os.environ.pop("FSCLIP_CACHE", None)
            else:
                os.environ["FSCLIP_CACHE"] = old
    import onnxruntime

    out.append(f"(torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {torch.get_num_threads()} "
               f"threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)")
    return "\n\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture, random weights (default: ViT-B-32)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--prompts", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the shapes model, 16 images, 100 prompts, 1 repeat")
    p.add_argument("--accuracy-only", action="store_true",
                   help="only the shapes-world accuracy table (no timings: fine on a busy machine)")
    args = p.parse_args(argv)
    if args.accuracy_only:
        head = ["runtime", "gate", "zero-shot top-1", "baseline", "baseline top-1", "difference vs torch (points)",
                "note"]
        with tempfile.TemporaryDirectory() as cache:
            os.environ["FSCLIP_CACHE"] = cache
            print(markdown_table(head, bench_accuracy(2 if args.quick else 10)))
        return 0
    if args.quick:
        args.arch, args.images, args.prompts, args.repeats, per_class = "shapes", 16, 100, 1, 2
    else:
        per_class = 10
    print(run(args.arch, args.images, args.prompts, args.batch_size, args.repeats, per_class))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
