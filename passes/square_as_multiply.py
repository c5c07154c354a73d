"""SquareAsMultiply: x ** 2 becomes x * x.

Exporters write a LayerNorm's variance as Pow(x - mean, 2) (torch.onnx for ConvNeXt's channels-last LayerNorm).
TVM computes it with powf per element, a library call: in a ConvNeXt-T the squares alone took over a tenth of the
time (ad-hoc per-kernel profile). x * x is one multiply, vectorised, and the same number: powf(x, 2) is x * x
correctly rounded, which is what one float multiply gives.

    power(x, 2)  =>  multiply(x, x)        (float32 x; the exponent a constant 2)

NOTE: phase 1, before CancelLayoutPermutes and the blocked layout, which keep multiplies blocked.
"""
from __future__ import annotations

import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, op_name, rewrite_main, rewriter, scalar_value, static_shape

NAME = "SquareAsMultiply"


@rewriter
class _Rewrite(BindingRewriter):
    def rewrite(self, var, value):
        if op_name(value) != "relax.power":
            return None
        x, exponent = value.args
        if scalar_value(exponent) != 2.0 or getattr(x.ty, "dtype", None) != "float32" \
                or static_shape(var) is None or static_shape(var) != static_shape(x):
            return None         # NOTE: an exponent with more axes than x would broadcast x
        changelog.record(NAME, "square", var.name)
        return relax.op.multiply(x, x)


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class SquareAsMultiply:
    """Compute x ** 2 as x * x."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Rewrite)[0]
