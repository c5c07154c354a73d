"""CancelLayoutPermutes: elementwise ops between NHWC convs run in NCHW, so the transposes around them cancel.

A TFLite model is NHWC. ConvertConvsToNCHW puts each conv in NCHW between two transposes, and leaves
the ops after it (bias add, activation, residual add, mean) in NHWC:
  y = permute_dims(conv(..), [0, 2, 3, 1]); z = clip(y + b, 0, 6); x = permute_dims(z, [0, 3, 1, 2]); conv(x)
Every such op then costs two full transposes, and the later passes (scale folding, sparse epilogues, CHW
regions) never see a conv next to its bias and activation. This pass moves the first transpose below
elementwise ops, spatial means (kept dims or not) and reductions over channels with kept dims (a LayerNorm's mean and
variance) whose other operands broadcast along channels only (constants of shape [C], [1, 1, 1, C] or scalars, turned
into [1, C, 1, 1]; or other transposed tensors, a channel reduction's [N, H, W, 1] too):
  y' = conv(..) + b'; z' = clip(y', 0, 6)          (NCHW)
  z = permute_dims(z', [0, 2, 3, 1])                (kept for any NHWC reader; dropped when none is left)
and a transpose back to NCHW of such a tensor becomes its NCHW source, x = z'.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.convert_to_blocked_layout import BINARY, REDUCE, UNARY, UNPADDED
from passes.rewriting import BindingRewriter, const, const_np, is_const, op_name, rewrite_main, rewriter

NAME = "CancelLayoutPermutes"
TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _axes(value) -> list[int] | None:
    axes = value.attrs.axes
    return None if axes is None else [int(a) for a in axes]


def _rank(expr) -> int:
    shape = getattr(expr.ty, "shape", None)
    return -1 if shape is None or not hasattr(shape, "values") else len(shape.values)


def _hw_mean(value) -> bool:
    """A mean over a 4-D NHWC tensor's H and W (axes 1 and 2), dims kept or not."""
    return op_name(value) == "relax.mean" and value.attrs.axis is not None and _rank(value.args[0]) == 4 \
        and sorted(int(a) % 4 for a in value.attrs.axis) == [1, 2]


def _channel_reduce(value) -> bool:
    """A reduction over a 4-D NHWC tensor's channels (axis 3), dims kept: a LayerNorm's mean and variance."""
    return op_name(value) in REDUCE and value.attrs.axis is not None and _rank(value.args[0]) == 4 \
        and [int(a) % 4 for a in value.attrs.axis] == [3] and bool(value.attrs.keepdims)


def _channel_const(expr, channels: int) -> np.ndarray | None:
    """An NHWC constant that broadcasts along channels only, as [1, C, 1, 1] (or [1, 1, 1, 1])."""
    if not is_const(expr):
        return None
    v = const_np(expr)
    if v.ndim > 4 or any(d != 1 for d in v.shape[:-1]) or (v.ndim and v.shape[-1] not in (1, channels)):
        return None
    return v.reshape(1, -1, 1, 1) if v.ndim else v


@rewriter
class _Permutes(BindingRewriter):
    def __init__(self, mod, func):
        super().__init__(mod, func)
        self.nchw: dict = {}      # new NHWC var -> the NCHW var it transposes
        self.pending = None

    def rewrite(self, var, value):
        self.pending = None
        if not isinstance(value, relax.Call):
            return None
        name = op_name(value)
        if name == "relax.permute_dims" and _rank(value.args[0]) == 4:
            src = value.args[0]
            if _axes(value) == TO_NHWC:
                self.pending = src
            elif _axes(value) == TO_NCHW and src in self.nchw:
                return self.nchw[src]
            return None
        if _hw_mean(value) and not value.attrs.keepdims and value.args[0] in self.nchw:
            # a spatial mean to [N, C] (a TFLite squeeze-and-excite): the same numbers from the NCHW source,
            # with kept dims (the blocked layout's channel-block mean) and reshaped
            changelog.record(NAME, "nchw", var.name, op="mean")
            kept = self.emit(relax.op.mean(self.nchw[value.args[0]], axis=[2, 3], keepdims=True), var.name)
            return relax.op.reshape(kept, [int(d) for d in var.ty.shape.values])
        if _rank(var) != 4 or not any(isinstance(a, relax.Var) and a in self.nchw for a in value.args):
            return None
        channels = int(var.ty.shape.values[3])
        if name in UNARY or name in BINARY or name in UNPADDED:
            args = []
            for a in value.args:
                if isinstance(a, relax.Var) and a in self.nchw:
                    args.append(self.nchw[a])
                elif not isinstance(a.ty, relax.TensorType):
                    args.append(a)              # clip bounds and other non-tensor arguments
                elif (c := _channel_const(a, channels)) is not None:
                    args.append(const(c))
                else:
                    return None
            out = self.emit(relax.Call(value.op, args, value.attrs), var.name)
        elif _hw_mean(value) and value.attrs.keepdims:
            out = self.emit(relax.op.mean(self.nchw[value.args[0]], axis=[2, 3], keepdims=True), var.name)
        elif _channel_reduce(value):
            out = self.emit(REDUCE[name](self.nchw[value.args[0]], axis=[1], keepdims=True), var.name)
        else:
            return None
        self.pending = out
        changelog.record(NAME, "nchw", var.name, op=name.split(".")[-1])
        return relax.op.permute_dims(out, TO_NHWC)

    def visit_var_binding_(self, binding):
        super().visit_var_binding_(binding)
        if self.pending is not None:
            self.nchw[self.get_var_remap(binding.var)] = self.pending
            self.pending = None


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class CancelLayoutPermutes:
    """Elementwise ops between NHWC convs run in NCHW, so the transposes around them cancel."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Permutes)[0]
