"""int8 versions of an exported tower: weights of the linear layers (MatMul/Gemm with a constant weight).

`dynamic` (the one fsclip uses) stores int8 weights and quantises each activation on the fly with its own
range, so it needs no calibration data and cannot be mis-calibrated by an unusual first batch. `static`
fixes activation ranges from a calibration set (QDQ format) and is kept for the benchmark's comparison;
see the README, "CPU inference with ONNX Runtime", for the measurements behind the choice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = ["INT8_METHOD", "quantize"]

logger = logging.getLogger(__name__)

INT8_METHOD: Literal["dynamic", "static"] = "dynamic"
_OPS = ["MatMul", "Gemm"]
_EXTERNAL_FROM = 1 << 30  # bytes of the source model above which the output keeps its weights aside


@contextlib.contextmanager
def _quiet_root_logger():
    # onnxruntime.quantization advises "run pre-processing" through the root logger on every call
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(f"{path.name}*"))


def quantize(src: Path, dst: Path, method: Literal["dynamic", "static"] = INT8_METHOD,
             calibration: Iterable[dict[str, np.ndarray]] | None = None) -> None:
    """Write the int8 model of `src` to `dst`.

    Args:
        src: an fp32 tower from `export_towers`.
        dst: where the int8 model goes.
        method: `dynamic` or `static` (QDQ; needs `calibration`).
        calibration: for `static`, feeds for the model (input name -> array), e.g. a few batches.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    graph = onnx.load(src, load_external_data=False).graph
    if not any(node.op_type in _OPS for node in graph.node):
        # convolutions stay fp32: ORT's dynamic ConvInteger has no fast CPU kernel (several times slower
        # than fp32 Conv on shapes-resnet in a rough check); CNNs would need static quantisation
        logger.warning("%s has no linear layers to quantise (a CNN?): it runs in fp32 under onnx-int8", src.name)
    external = _size(src) > _EXTERNAL_FROM
    with _quiet_root_logger():
        if method == "dynamic":
            quantize_dynamic(src, dst, op_types_to_quantize=_OPS, weight_type=QuantType.QInt8,
                             use_external_data_format=external)
        elif method == "static":
            if calibration is None:
                raise ValueError("static quantisation needs calibration feeds")
            quantize_static(src, dst, _Reader(calibration), quant_format=QuantFormat.QDQ, op_types_to_quantize=_OPS,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            use_external_data_format=external, extra_options={"MatMulConstBOnly": True})
        else:
            raise ValueError(f"unknown quantisation method {method!r}; choose dynamic or static")
    logger.info("quantised %s (%s) -> %s", src.name, method, dst.name)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an iterable of feeds."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)
