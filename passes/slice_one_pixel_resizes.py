"""SliceOnePixelResizes: an align_corners resize to one pixel along H or W takes that axis' first pixel.

align_corners maps output index x to input coordinate x * (in - 1) / (out - 1), which has no value for out == 1;
ONNX Runtime reads the first pixel (tests/test_resize.py). TVM's topi divides by out - 1 anyway, and since that is
a constant zero the division fails while the op is legalized (already in phase 1's FoldConstant): the model did
not compile (an internal-error line). Rewritten with ordinary
ops, exact for every method (nearest, linear, cubic all return the pixel at an integer coordinate):

    resize(x -> [1, 1])   =>  x[.., 0:1, 0:1]
    resize(x -> [1, OW])  =>  resize(concat(x[.., 0:1, :] twice along H) -> [2, OW])[.., 0:1, :]
                              (topi also divides by zero on an axis that stays at one pixel; along an axis of
                              two pixels align_corners is the identity)
    and the same with H and W swapped.

NOTE: phase 1, before the first FoldConstant.
"""
from __future__ import annotations

import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, op_name, resize2d_like, rewrite_main, rewriter, static_shape

NAME = "SliceOnePixelResizes"


def first(x, axis: int) -> relax.Expr:
    """x[..., 0:1, ...] along `axis`."""
    return relax.op.strided_slice(x, [axis], [0], [1])


@rewriter
class _Rewrite(BindingRewriter):
    def rewrite(self, var, value):
        if op_name(value) != "relax.image.resize2d":
            return None
        a = value.attrs
        layout = str(a.layout)
        x = value.args[0]
        shape, out = static_shape(x), static_shape(var)
        if str(a.coordinate_transformation_mode) != "align_corners" or shape is None or out is None \
                or "H" not in layout or "W" not in layout or len(layout) != len(shape):
            return None
        h, w = layout.index("H"), layout.index("W")
        ones = [axis for axis in (h, w) if out[axis] == 1]
        if not ones:
            return None
        changelog.record(NAME, "resize", var.name, size=[out[h], out[w]])
        for axis in ones:
            x = first(x, axis)
        if len(ones) == 2:
            return x
        one = ones[0]
        pair = relax.op.concat([x, x], axis=one)
        size = [2 if axis == one else out[axis] for axis in (h, w)]
        return first(resize2d_like(value, pair, size), one)


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class SliceOnePixelResizes:
    """Resize with align_corners to one pixel along H or W as a slice of that axis' first pixel."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Rewrite)[0]
