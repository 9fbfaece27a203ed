"""Export a backend's towers to ONNX: normalised features out, dynamic batch (and causal length).

Each tower is wrapped so the graph ends exactly where `Backend.forward_*` ends (projection, then L2
normalisation), captured with `torch.export` and translated by `torch.onnx`. A causal text tower gets a
dynamic sequence length, so the trimmed batches `Backend.tokenize` makes run through the same graph.
An image-only model has no text tower to export. Where its own classification head is one linear layer
on the pooled features (`Backend.own_head_linear`), the image graph also outputs those features
(`pooled`), and the runtime applies the head to them; any other head runs in torch.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fsclip.backends.base import Backend
from fsclip.errors import ModelLoadError

__all__ = ["OPSET", "ExportError", "export_towers"]

logger = logging.getLogger(__name__)

OPSET = 18
IMAGE_FILE, TEXT_FILE = "image.onnx", "text.onnx"
_EXTERNAL_FROM = 1 << 30  # bytes of weights above which they go to a side file (protobuf stops at 2 GiB)
_SAMPLE_TEXTS = ("a photo of a dog.", "a small red circle on a grey background, seen from above.")


class ExportError(ModelLoadError):
    """A tower that torch.onnx cannot translate; the message names the op and the layer."""


class _ImageTower(nn.Module):
    def __init__(self, backend: Backend):
        super().__init__()
        self.model = backend.model  # registered, so its weights export as initializers
        self._forward = backend.forward_images

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._forward(pixels)


class _PooledImageTower(nn.Module):
    """Normalised features and the pooled features they come from, in one graph."""

    def __init__(self, backend: Backend):
        super().__init__()
        self.model = backend.model
        self._pooled = backend.forward_pooled

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self._pooled(pixels)
        return F.normalize(pooled, dim=-1), pooled


class _TextTower(nn.Module):
    def __init__(self, backend: Backend, names: tuple[str, ...]):
        super().__init__()
        self.model = backend.model
        self._forward = backend.forward_texts
        self.names = names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return self._forward(inputs)


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _export(module: nn.Module, args: tuple, names: list[str], dynamic: dict, path: Path, what: str,
            outputs: tuple[str, ...] = ("features",)) -> None:
    with warnings.catch_warnings():  # the exporter's advice is for exporter developers, not our users
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False,
                                           prefer_deferred_runtime_asserts_over_guards=True)
        except Exception as e:  # any capture failure becomes one line
            layer = _failing_layer(e, module)
            raise ExportError(f"cannot capture the {what} tower for ONNX: {_first_line(e)}"
                              + (f" (layer {layer})" if layer else "")) from e
        try:
            onnx_program = torch.onnx.export(program, args, input_names=names, output_names=list(outputs),
                                             opset_version=OPSET, dynamo=True, verbose=False, optimize=True)
        except Exception as e:
            raise ExportError(f"cannot export the {what} tower to ONNX: {_describe(e, program)}") from e
        onnx_program.save(str(path), external_data=_weight_bytes(module) > _EXTERNAL_FROM)


def export_towers(backend: Backend, folder: Path) -> list[str]:
    """Write `image.onnx` and (where the model has a text tower) `text.onnx` for `backend` (CPU, fp32) into
    `folder`; returns the file names."""
    if backend.device.type != "cpu" or backend.dtype != torch.float32:
        raise ValueError(f"export needs the model on the CPU in fp32, not {backend.device} {backend.dtype}")
    batch = torch.export.Dim("batch", min=1, max=4096)
    size = backend.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    logger.info("exporting the image tower of %s to ONNX", backend.spec)
    backend.model.eval()
    if _pooled_head(backend, pixels):
        tower, outputs = _PooledImageTower(backend), ("features", "pooled")
    else:
        tower, outputs = _ImageTower(backend), ("features",)
    _export(tower, (pixels,), ["pixels"], {"pixels": {0: batch}}, folder / IMAGE_FILE, "image", outputs)
    if backend.has_text:
        _export_text(backend, folder, batch)
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def _pooled_head(backend: Backend, pixels: torch.Tensor) -> bool:
    """True where the own head is a linear layer that reads `forward_pooled`, and `forward_images` is those
    features normalised: checked in torch on `pixels`, so a backend's claim cannot change the answers."""
    head = backend.own_head_linear()
    if head is None:
        return False
    with torch.inference_mode():
        pooled = backend.forward_pooled(pixels)
        logits = backend.forward_own_head(pixels)
        features = backend.forward_images(pixels)
        tol = 1e-5 * max(1.0, float(logits.abs().max()))
        same = ((head(pooled) - logits).abs().max() <= tol
                and (F.normalize(pooled, dim=-1) - features).abs().max() <= 1e-6)
    if not same:
        logger.info("the own head of %s is not a linear layer on its pooled features; it runs in torch",
                    backend.spec)
    return bool(same)


def _export_text(backend: Backend, folder: Path, batch) -> None:
    inputs = backend.tokenize(list(_SAMPLE_TEXTS))
    names = tuple(k for k in ("input_ids", "attention_mask") if k in inputs)
    unknown = set(inputs) - set(names)
    if unknown:
        raise ExportError(f"cannot export the text tower: unexpected tokenizer outputs {sorted(unknown)}")
    if backend.exact_short_text:  # trimmed batches: the length varies, up to the context length
        length = torch.export.Dim("length", min=2, max=max(3, _context_length(backend)))
        dims = {0: batch, 1: length}
    else:
        dims = {0: batch}
    dynamic = {k: dims for k in names}
    args = tuple(inputs[k] for k in names)
    logger.info("exporting the text tower of %s to ONNX", backend.spec)
    _export(_TextTower(backend, names), args, list(names), dynamic, folder / TEXT_FILE, "text")


def _context_length(backend: Backend) -> int:
    # the longest sequence tokenize() can produce: a text far over any context, trimmed or not
    return int(backend.tokenize(["x " * 1000])["input_ids"].shape[1])


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _failing_layer(err: BaseException, root: nn.Module) -> str | None:
    """The innermost module of `root` whose forward was running when `err` was raised."""
    names = {id(m): name for name, m in root.named_modules()}
    found, tb = None, err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and names.get(id(owner)):
            found = names[id(owner)]
        tb = tb.tb_next
    return None if found is None else found.removeprefix("model.")


_OP = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")
_TARGET = re.compile(r"target=([\w.]+)")


def _describe(err: BaseException, program) -> str:
    """'op X in layer Y' from a translation failure, where the exporter says which node failed."""
    text = "\n".join(str(e) for e in (err, err.__cause__, err.__context__) if e is not None)
    op = None
    if m := _OP.search(text):
        op = m.group(1)
    elif m := _TARGET.search(text):
        op = m.group(1).removeprefix("torch.ops.")
    if op is None:
        return _first_line(err)
    layer = None
    for node in program.graph.nodes:
        if node.op == "call_function" and str(node.target).removeprefix("torch.ops.").startswith(op):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path = list(stack.values())[-1][0]
                layer = path.removeprefix("L['self'].").removeprefix("model.") or None
            break
    return f"op {op} has no ONNX translation" + (f" (layer {layer})" if layer else "")
