"""Quantized constants read as float32, for the importers (TFLite quantized tensors, ONNX integer weights)."""
from __future__ import annotations

import numpy as np


def dequantize(values: np.ndarray, scale, zero, axis: int, block: int = 0) -> np.ndarray:
    """float32 (values - zero) * scale; scale and zero (None: 0) one value, or one per index of `axis`, or (block)
    arrays of values' rank with one per `block` indices along `axis` (ONNX's blocked quantization)."""
    def along_axis(v) -> np.ndarray:
        v = np.asarray(v, np.float32)
        if block and v.ndim == values.ndim:
            return np.repeat(v, block, axis=axis).take(range(values.shape[axis]), axis=axis)
        v = v.reshape(-1)
        shape = [1] * values.ndim
        if v.size > 1:
            shape[axis] = v.size
        return v.reshape(shape)

    zero = along_axis(0 if zero is None else zero)
    return ((values.astype(np.float32) - zero) * along_axis(scale)).astype(np.float32)
