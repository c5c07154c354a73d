"""Depthwise kxk convolutions in CHW (batch 1 NCHW), vectorised along the width, bias and clip fused.

For the CHW regions around sparse 1x1 convs: each parallel task is one channel; it pads its plane
once (in cache, wide enough that a row's last vector reads no further checks), then accumulates
each output row in registers, the k*k taps unrolled, and writes it back with bias and clip.
"""
from __future__ import annotations

import tvm
from tvm import s_tir, te, tirx



def kernel_name(k: int, stride: int, lanes: int) -> str:
    return f"f32_dwconv{k}x{k}s{stride}_chw_{lanes}"


def row_vector(ow: int, lanes: int) -> int:
    """Vector width for output rows of `ow` pixels: the widest of lanes, lanes/2, lanes/4 that pads the
    row least (7 -> 8 of 16 lanes, 14 -> 16, 56 -> 64, 112 -> 112)."""
    options = [v for v in (lanes, lanes // 2, lanes // 4) if v >= 1]
    return min(options, key=lambda v: (-(-ow // v) * v, -v))


def _compute(c, h, w, k, stride, pads, clip, vec):
    top, left, bottom, right = pads
    oh = (h + top + bottom - k) // stride + 1
    ow = (w + left + right - k) // stride + 1
    ow_pad = -(-ow // vec) * vec               # rows computed in whole vectors, then cut to ow
    x = te.placeholder((1, c, h, w), "float32", name="x")
    wt = te.placeholder((c, 1, k, k), "float32", name="w")
    bias = te.placeholder((c,), "float32", name="bias")
    # the padded plane split by column phase: plane[y, r, q] = padded[y, q * stride + r], so every
    # tap of a strided conv reads whole contiguous vectors (no gathers)
    hp, wq = h + top + bottom, ow_pad + (k - 1) // stride

    def padded(n, ch, y, r, q):
        xx = q * stride + r
        return tirx.if_then_else(tirx.all(y >= top, y < h + top, xx >= left, xx < w + left),
                                 x[n, ch, y - top, xx - left], tirx.const(0.0, "float32"))
    pad = te.compute((1, c, hp, stride, wq), padded, name="pad")
    kh = te.reduce_axis((0, k), "kh")
    kw = te.reduce_axis((0, k), "kw")
    conv = te.compute((1, c, oh, ow_pad), lambda n, ch, y, xx: te.sum(
        pad[n, ch, y * stride + kh, kw % stride, xx + kw // stride] * wt[ch, 0, kh, kw], axis=[kh, kw]),
        name="conv")

    def epilogue(n, ch, y, xx):
        v = conv[n, ch, y, xx] + bias[ch]
        if clip is not None:
            v = tirx.min(tirx.max(v, tirx.const(float(clip[0]), "float32")), tirx.const(float(clip[1]), "float32"))
        return v
    out = te.compute((1, c, oh, ow), epilogue, name="out")
    return [x, wt, bias, out], ow_pad


def dwconv2d_chw(c: int, h: int, w: int, k: int, stride: int, pads, *, clip=None, lanes: int = 16) -> tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`). Parameters: x, w [c,1,k,k], bias [c], out.

    Each task is one channel: its zero-padded plane is built once (in cache), then every output row
    is accumulated in registers (ceil(ow / vec) vectors, the k*k taps unrolled) and written back
    with bias and clip."""
    vec = row_vector((w + pads[1] + pads[3] - k) // stride + 1, lanes)
    args, ow_pad = _compute(c, h, w, k, stride, list(pads), clip, vec)
    sch = s_tir.Schedule(te.create_prim_func(args))
    pad, conv, out = sch.get_sblock("pad"), sch.get_sblock("conv"), sch.get_sblock("out")
    n, ch, y, x = sch.get_loops(out)
    task = sch.fuse(n, ch)
    sch.parallel(task)
    sch.vectorize(x)
    sch.compute_at(conv, y)
    sch.compute_at(pad, task)
    *_, cx, kh, kw = sch.get_loops(conv)
    xv, xi = sch.split(cx, [None, vec])
    sch.reorder(kh, kw, xv, xi)
    sch.unroll(kh)
    sch.unroll(kw)
    sch.unroll(xv)
    sch.vectorize(xi)
    pl = sch.get_loops(pad)[-1]
    sch.vectorize(sch.split(pl, [None, vec])[1] if int(sch.get(pl).extent) % vec == 0 else pl)
    sch.decompose_reduction(conv, kh)
    name = kernel_name(k, stride, ow_pad)
    return sch.mod["main"].with_attr("global_symbol", name).with_attr("shrinkc.scheduled", 1) \
        .with_attr("op_pattern", 8)
