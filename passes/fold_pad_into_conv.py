"""FoldPadIntoConv: merge an explicit zero Pad on H and W into the padding of the conv that reads it."""
from __future__ import annotations

import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, rewriter, op_name, rewrite_main

NAME = "FoldPadIntoConv"


@rewriter
class _PadFolder(BindingRewriter):
    # conv2d(pad(x, [0,0,0,0,t,b,l,r]), W, padding=p)  =>  conv2d(x, W, padding=p+[t,l,b,r])
    def rewrite(self, var, value):
        if op_name(value) != "relax.nn.conv2d" or str(value.attrs.data_layout) != "NCHW":
            return None
        pad = self.producer(value.args[0])
        if op_name(pad) != "relax.nn.pad":
            return None
        why = self._why_not(pad)
        if why:
            changelog.skip(NAME, var.name, why)
            return None
        w = [int(v) for v in pad.attrs.pad_width]  # (before, after) per axis, NCHW
        top, bottom, left, right = w[4], w[5], w[6], w[7]
        p = [int(v) for v in value.attrs.padding]  # top, left, bottom, right
        padding = [p[0] + top, p[1] + left, p[2] + bottom, p[3] + right]
        a = value.attrs
        changelog.record(NAME, "folded_pad", var.name, pad=[top, left, bottom, right])
        return relax.op.nn.conv2d(pad.args[0], value.args[1], strides=a.strides, padding=padding,
                                  dilation=a.dilation, groups=int(a.groups), data_layout="NCHW",
                                  kernel_layout=str(a.kernel_layout), out_layout=str(a.out_layout))

    @staticmethod
    def _why_not(pad) -> str:
        if str(pad.attrs.pad_mode) != "constant":
            return f"pad mode {pad.attrs.pad_mode} is not zero padding"
        if float(pad.attrs.pad_value) != 0.0:
            return f"pad value {float(pad.attrs.pad_value)} is not zero"
        w = [int(v) for v in pad.attrs.pad_width]
        if len(w) != 8 or any(w[:4]) or min(w) < 0:
            return "pads batch or channels, or crops"
        return ""


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class FoldPadIntoConv:
    """Merge an explicit zero Pad on H and W into the padding of the conv that reads it."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _PadFolder)[0]
