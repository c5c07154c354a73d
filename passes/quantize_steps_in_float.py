"""QuantizeStepsInFloat: an activation's quantize -> (int clips) -> dequantize becomes float ops of the same values.

A quantized model (QDQ ONNX, integer TFLite as TVM imports it) rounds each activation to an int8 step and
reads it back as float: dequantize(clip(quantize(x, s, z), lo, hi), s2, z2). The int8 tensor between them
has no layout-free elementwise ops, so blocked-layout kernels converted every conv output back to NCHW for it
(MobileNetV2 QDQ: most of the run in layout transforms). With a scalar scale and zero point the same values are

    y = (clip(round(x * (1 / s)), lo - z, hi - z) + (z - z2)) * s2

(lo, hi: the int range of the quantized type, narrowed by the clips between; integers are exact in float32, so
the shift by z moves into the clip bounds), four elementwise float ops that stay in any layout and fuse into the
conv before them. round is ties-to-even, as ONNX's QuantizeLinear and TVM's own quantize lowering round.
x / s is computed as x times the float32 reciprocal of s: a vector division costs several multiplies (on Zen 4 the
divisions were a large part of the time of EfficientNet-B0's quantized depthwise convs, whose steps follow a SiLU
and do not fold into a conv; an ad-hoc per-kernel profile). The two agree bit for bit where s is a power of two and
otherwise differ by at most one float32 ulp, so only where x / s lies within about an ulp of a half step can the
step differ by one (in numpy, 0.2 to 23 in a million normal values of standard deviation 3 at scales 0.1 to 0.002:
the larger x / s, the coarser its ulp). A step right after a conv already differs by as much, since
FoldScaleIntoConv folds its 1 / s into the conv's weights, and the reference runtimes' integer kernels requantize
with a multiplier too.
Reshapes of the int tensor (ONNX Runtime's QOperator models flatten it before the classifier) are walked
through: the float step is computed before them and reshaped after.
Per-channel activation scales (none seen in real models) are left as they are.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, is_const, op_name, rewrite_main, rewriter, scalar_value, static_shape

NAME = "QuantizeStepsInFloat"
_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535)}


@rewriter
class _InFloat(BindingRewriter):
    # dequantize(clip*(quantize(x, s, z)), s2, z2)  =>
    #     multiply(add?(clip(round(multiply(x, 1 / s)), lo - z, hi - z)), s2)
    def quantize_step(self, value):
        """(x, s, z, lo, hi, reshaped) of the quantize and the int clips and reshapes under a dequantize's input,
        or None; reshaped: a reshape is among them (the float step then ends with one to the dequantize's input
        shape: elementwise steps commute with it)."""
        lo, hi, reshaped = -np.inf, np.inf, False
        cur = value.args[0]
        while True:
            src = self.producer(cur)
            if src is None or not isinstance(src, relax.Call):
                return None
            if op_name(src) == "relax.clip":
                lo, hi = max(lo, float(src.args[1].value)), min(hi, float(src.args[2].value))
                cur = src.args[0]
                continue
            if op_name(src) == "relax.reshape":     # ONNX Runtime's QOperator models flatten the int8 tensor
                reshaped, cur = True, src.args[0]
                continue
            if op_name(src) != "relax.quantize" or str(src.attrs.out_dtype) not in _RANGES:
                return None
            s, z = scalar_value(src.args[1]), scalar_value(src.args[2])
            if s is None or z is None or is_const(src.args[0]):
                return None
            qlo, qhi = _RANGES[str(src.attrs.out_dtype)]
            return src.args[0], s, z, max(lo, qlo), min(hi, qhi), reshaped

    def rewrite(self, var, value):
        if op_name(value) != "relax.dequantize" or str(value.attrs.out_dtype) != "float32":
            return None
        step = self.quantize_step(value)
        s2, z2 = scalar_value(value.args[1]), scalar_value(value.args[2])
        if step is None or s2 is None or z2 is None:
            return None
        x, s, z, lo, hi, reshaped = step
        if x.ty.dtype != "float32":
            return None
        shape = static_shape(value.args[0]) if reshaped else None
        if reshaped and shape is None:
            return None
        inverse = np.float32(1.0) / np.float32(s)       # float32 division: the correctly rounded 1 / s
        q = self.emit(relax.op.round(self.emit(relax.op.multiply(x, relax.const(inverse, "float32")))))
        q = self.emit(relax.op.clip(q, lo - z, hi - z))
        if z != z2:
            q = self.emit(relax.op.add(q, relax.const(z - z2, "float32")))
        changelog.record(NAME, "in_float", var.name)
        y = relax.op.multiply(q, relax.const(s2, "float32"))
        return relax.op.reshape(self.emit(y), shape) if reshaped else y


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class QuantizeStepsInFloat:
    """An activation's quantize -> (int clips) -> dequantize becomes float ops of the same values."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _InFloat)[0]
