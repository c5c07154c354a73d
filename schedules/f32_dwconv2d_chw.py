"""Depthwise kxk convolutions in CHW (batch 1 NCHW), vectorised along the width, bias and clip fused.

For the CHW regions around sparse 1x1 convs: each parallel task is one channel; it pads its plane
once (in cache), then for each output row computes `vectors` x lanes pixels at a time in
registers, the k*k taps unrolled. Knobs: `vectors` (accumulator vectors per row tile).
"""
from __future__ import annotations

import tvm
from tvm import s_tir, te, tirx

from schedules.rule import inline_epilogue


def kernel_name(k: int, stride: int, lanes: int) -> str:
    return f"f32_dwconv{k}x{k}s{stride}_chw_{lanes}"


def _compute(c, h, w, k, stride, pads, clip):
    top, left, bottom, right = pads
    oh = (h + top + bottom - k) // stride + 1
    ow = (w + left + right - k) // stride + 1
    x = te.placeholder((1, c, h, w), "float32", name="x")
    wt = te.placeholder((c, 1, k, k), "float32", name="w")
    bias = te.placeholder((c,), "float32", name="bias")
    hp, wp = h + top + bottom, w + left + right
    pad = te.compute((1, c, hp, wp), lambda n, ch, y, xx: tirx.if_then_else(
        tirx.all(y >= top, y < h + top, xx >= left, xx < w + left), x[n, ch, y - top, xx - left],
        tirx.const(0.0, "float32")), name="pad")
    kh = te.reduce_axis((0, k), "kh")
    kw = te.reduce_axis((0, k), "kw")
    conv = te.compute((1, c, oh, ow), lambda n, ch, y, xx: te.sum(
        pad[n, ch, y * stride + kh, xx * stride + kw] * wt[ch, 0, kh, kw], axis=[kh, kw]), name="conv")
    out = te.compute((1, c, oh, ow), lambda n, ch, y, xx: conv[n, ch, y, xx] + bias[ch], name="bias_add")
    if clip is not None:
        lo, hi = (tirx.const(float(v), "float32") for v in clip)
        out = te.compute((1, c, oh, ow), lambda n, ch, y, xx: tirx.min(tirx.max(out[n, ch, y, xx], lo), hi),
                         name="clip")
    return [x, wt, bias, out], ow


def dwconv2d_chw(c: int, h: int, w: int, k: int, stride: int, pads, *, clip=None, lanes: int = 16,
                 vectors: int = 2) -> tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`). Parameters: x, w [c,1,k,k], bias [c], out."""
    args, ow = _compute(c, h, w, k, stride, list(pads), clip)
    sch = s_tir.Schedule(te.create_prim_func(args))
    pad, conv = sch.get_sblock("pad"), sch.get_sblock("conv")
    n, ch, y, x, kh, kw = sch.get_loops(conv)
    vec = lanes if ow >= lanes else max(1, 1 << (ow.bit_length() - 1))
    nv = max(1, min(vectors, ow // vec))
    xo, xv, xi = sch.split(x, [None, nv, vec])
    sch.reorder(n, ch, y, xo, kh, kw, xv, xi)
    task = sch.fuse(n, ch)
    sch.parallel(task)
    wb = sch.cache_write(conv, 0, "global")
    sch.reverse_compute_at(wb, xo)
    inline_epilogue(sch, wb, xo)
    sch.compute_at(pad, task)
    pl = sch.get_loops(pad)[-1]
    sch.vectorize(sch.split(pl, [None, vec])[1])
    sch.unroll(kh)
    sch.unroll(kw)
    sch.unroll(xv)
    sch.vectorize(xi)
    wl = sch.get_loops(wb)
    sch.vectorize(sch.split(wl[-1], [None, vec])[1])
    sch.decompose_reduction(conv, kh)
    name = kernel_name(k, stride, vec * nv)
    return sch.mod["main"].with_attr("global_symbol", name).with_attr("shrinkc.scheduled", 1) \
        .with_attr("op_pattern", 8)
