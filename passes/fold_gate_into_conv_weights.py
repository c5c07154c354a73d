"""FoldGateIntoConvWeights: a 1x1 conv of a gated map scales its weights by the gate, not the map.

conv2d_1x1(multiply(x, g), W)  =>  conv2d_1x1(x, call_tir(f32_scale_weights_ohwi{b}o, W, g))
g is a runtime per-channel vector ([1, C/b, 1, 1, b]: a squeeze-and-excitation gate); W (g x) = (W g) x, so
the map is never multiplied: the gate's multiply, otherwise one pass that reads and writes the whole map,
becomes a product of the weights, Cout x Cin multiplies (schedules/f32_scale_weights.py). Applies to blocked
(NCHW{b}c / OHWI{b}o) batch-1 1x1 convs with constant weights and groups 1, where the multiply has no other
reader and the weights are at most MAX_WEIGHT_SHARE of the map's size (Cout <= H x W x MAX_WEIGHT_SHARE: early
and middle layers; a 7x7 layer's weights are larger than its map; folding those too made a torch.onnx
EfficientNet-B0 slower, folding only these faster, in ad-hoc interleaved timings). The sparse 1x1 kernels take the gate themselves
(f32_spmm_chw's `scale`).
NOTE: runs after ConvertToBlockedLayout (the weights are blocked constants) and before LegalizeOps.
"""
from __future__ import annotations

import math

import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, is_const, op_name, per_channel_factors, rewrite_main, rewriter, \
    shape_of, static_shape
from passes.sparsify_conv1x1 import add_kernel
from schedules.f32_scale_weights import scale_weights

NAME = "FoldGateIntoConvWeights"
MAX_WEIGHT_SHARE = 0.5     # fold where the weights' size is at most this share of the gated map's


def gated_input(multiply) -> tuple | None:
    """(x, g) where `multiply` is x * g with g a runtime per-channel vector of x's blocked shape over a plane."""
    return next(((x, g) for x, g in per_channel_factors(multiply)
                 if len(shape_of(x)) == 5 and math.prod(shape_of(x)[2:4]) > 1 and not is_const(g)
                 and x.ty.dtype == g.ty.dtype == "float32"), None)


def layer_name(conv, x) -> str:
    """The conv as the log names it ("conv1x1 672->192 @7x7"): its variable is a generated one by now."""
    _, cb, h, w, b = shape_of(x)
    cob, kh, kw, _, bo = shape_of(conv.args[1])
    return f"conv{kh}x{kw} {cb * b}->{cob * bo} @{h}x{w}"


@rewriter
class _GateFolder(BindingRewriter):
    # conv2d_1x1(multiply(x, g), W)  =>  conv2d_1x1(x, W * g)
    def rewrite(self, var, value):
        if op_name(value) != "relax.nn.conv2d":
            return None
        found = gated_input(self.producer(value.args[0]))
        if found is None:
            return None
        x, g = found
        why = self._why_not(value, x)
        if why:
            changelog.skip(NAME, layer_name(value, x), why)
            return None
        w = value.args[1]
        cob, _, _, cin, bo = shape_of(w)
        gv, func = add_kernel(self, scale_weights(cob, cin, bo, shape_of(x)[4]))
        scaled = self.emit(relax.call_tir(gv, [w, g], relax.TensorType(shape_of(w), "float32")), "gated_weights")
        changelog.record(NAME, "folded_gate", layer_name(value, x), kernel=str(func.attrs["global_symbol"]))
        return relax.Call(value.op, [x, scaled], value.attrs, value.ty_args)

    def _why_not(self, value, x) -> str:
        a = value.attrs
        w = value.args[1]
        if not is_const(w) or int(a.groups) != 1 or not str(a.kernel_layout).startswith("OHWI") \
                or len(static_shape(w) or []) != 5:
            return "not a blocked groups-1 conv with constant weights"
        cob, kh, kw, cin, bo = shape_of(w)
        xs = shape_of(x)
        if (kh, kw) != (1, 1) or xs[0] != 1 or cin != xs[1] * xs[4]:
            return "not a batch-1 1x1 conv over the gated map's channels"
        if self.only_user(self.bound_var(value.args[0])) is None:
            return "the gated map has other readers"
        if cob * bo > xs[2] * xs[3] * MAX_WEIGHT_SHARE:
            return f"weights {cob * bo}x{cin} larger than {MAX_WEIGHT_SHARE} of the {xs[2]}x{xs[3]} map"
        return ""

    def bound_var(self, new_var):
        """The input function's variable that `new_var` (a remapped argument) stands for."""
        return self._old_of_new.get(new_var, new_var)


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class FoldGateIntoConvWeights:
    """A 1x1 conv of a gated map scales its weights by the gate, not the map."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _GateFolder)[0]
