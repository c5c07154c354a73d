"""PReluAsMinMax: PReLU with constant slopes becomes max(x, 0) + slope * min(x, 0), elementwise ops like any other.

Face models (MobileFaceNet, BlazeFace) put a PReLU after most convs. TVM's `nn.prelu` takes one slope per index
of one axis, so it has no channel-blocked form: every PReLU went back to NCHW and ran TVM's own kernel on the
fallback schedule (a MobileFaceNet-style network at 0.80x ONNX Runtime's speed, benchmarks/REAL-EXPORTS-face-before.md).
As max / min / multiply / add it stays blocked and fuses into the conv before it. Exact: one of the two terms is
zero.

    prelu(x, a, axis)                                    =>  max(x, 0) + a' * min(x, 0)   (a' along `axis`)
    reshape(prelu(reshape(x, [-1]), a_full, 0), shape)   =>  the same on x, where a_full repeats one slope vector
                                                             along x's last axis (TFLite's PRELU, NHWC)

NOTE: phase 1 before CancelLayoutPermutes, which moves the ops of a TFLite model's PReLU to NCHW.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, const_np, is_const, op_name, rewrite_main, rewriter, static_shape

NAME = "PReluAsMinMax"


def min_max_prelu(x, slope: np.ndarray) -> relax.Expr:
    """max(x, 0) + slope * min(x, 0), slope broadcasting against x."""
    zero = relax.const(np.zeros((), np.float32))
    return relax.op.add(relax.op.maximum(x, zero),
                        relax.op.multiply(relax.const(slope.astype(np.float32)), relax.op.minimum(x, zero)))


@rewriter
class _Rewrite(BindingRewriter):
    def rewrite(self, var, value):
        name = op_name(value)
        if name == "relax.nn.prelu":
            return self.per_axis(var, value)
        if name == "relax.reshape":
            return self.flattened(var, value)
        return None

    def per_axis(self, var, value):
        x, a = value.args
        shape = static_shape(x)
        if shape is None or len(shape) < 2 or not is_const(a) or x.ty.dtype != "float32":
            return None        # NOTE: a 1-D one is TFLite's flattened PRELU: the reshape after it is rewritten
        axis = int(value.attrs.axis) % len(shape)
        slope = const_np(a).reshape(-1)
        if slope.size not in (1, shape[axis]):
            return None
        changelog.record(NAME, "prelu", var.name, axis=axis)
        return min_max_prelu(x, slope.reshape([-1 if i == axis else 1 for i in range(len(shape))]))

    def flattened(self, var, value):
        """TFLite's PRELU: reshape(prelu(reshape(x, [-1]), slopes of every element, 0), x's shape)."""
        prelu = self.producer(value.args[0])
        if op_name(prelu) != "relax.nn.prelu" or not is_const(prelu.args[1]) or int(prelu.attrs.axis) != 0:
            return None
        flat = self.producer(prelu.args[0])
        if op_name(flat) != "relax.reshape":
            return None
        x = flat.args[0]
        shape = static_shape(x)
        if shape is None or shape != static_shape(var) or x.ty.dtype != "float32":
            return None
        full = const_np(prelu.args[1])
        if full.size != int(np.prod(shape)):
            return None
        full = full.reshape(shape)
        slope = full.reshape(-1, shape[-1])[0]
        if not np.array_equal(full, np.broadcast_to(slope, shape)):
            return None        # slopes that vary along other axes: left to TVM
        changelog.record(NAME, "prelu", var.name, axis=len(shape) - 1)
        return min_max_prelu(x, slope.reshape([1] * (len(shape) - 1) + [-1]))


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class PReluAsMinMax:
    """Compute PReLU with constant slopes as max(x, 0) + slope * min(x, 0)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Rewrite)[0]
