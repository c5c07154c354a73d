"""A QDQ copy of an ONNX model through ONNX Runtime's static quantization, as users quantize for int8 runtimes."""
from __future__ import annotations

import numpy as np


def quantize_qdq(src: str, dst: str, shape: tuple, images: int, rng: np.random.Generator,
                 input_name: str = "input", quant_format=None, activation_type=None, weight_type=None,
                 per_channel: bool = True) -> None:
    """dst: src with int8 per-channel weights and int8 activations as QuantizeLinear / DequantizeLinear pairs,
    calibrated on `images` standard-normal inputs of `shape` drawn from rng. quant_format / activation_type /
    weight_type: another of ONNX Runtime's formats (QuantFormat.QOperator: QLinearConv, ...), activation or weight
    type (QuantType.QUInt8: asymmetric uint8; QInt4); per_channel False: one scale and zero point per tensor."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{input_name: rng.standard_normal(shape).astype(np.float32)} for _ in range(images)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(src, dst, Images(), quant_format=quant_format or QuantFormat.QDQ,
                    weight_type=weight_type or QuantType.QInt8, activation_type=activation_type or QuantType.QInt8,
                    per_channel=per_channel)
