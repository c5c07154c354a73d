"""Depthwise kxk convolutions in CHW (batch 1 NCHW), vectorised along the width, bias and clip fused.

For the CHW regions around sparse 1x1 convs: each parallel task is one channel; it pads its plane
once (in cache, wide enough that a row's last vector reads no further checks), then accumulates
each output row in registers, the k*k taps unrolled, and writes it back with bias and clip.
"""
from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

from schedules.rule import SCHEDULED_ATTR



STRIDES = (1, 2)


def kernel_name(k: int, stride: int, lanes: int) -> str:
    return f"f32_dwconv{k}x{k}s{stride}_chw_{lanes}"


def row_vector(ow: int, lanes: int) -> int:
    """Vector width for output rows of `ow` pixels: the fewest vectors per row, then the least
    padding (7 -> 8 of 16 lanes, 14 -> 16, 56 -> 4 x 16, 112 -> 7 x 16)."""
    options = [v for v in (lanes, lanes // 2, lanes // 4) if v >= 1]
    return min(options, key=lambda v: (-(-ow // v), -(-ow // v) * v))


def dwconv2d_chw(c: int, h: int, w: int, k: int, stride: int, pads, *, clip=None, lanes: int = 16) -> tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`). Parameters: x, w [c,1,k,k], bias [c], out.

    Each task is one channel. It builds the channel's zero-padded plane split by column phase,
    plane[y, r, q] = padded[y, q * stride + r], so every tap of a strided conv reads contiguous
    vectors; then it accumulates each output row in registers (nv vectors of vec pixels, the k*k
    taps unrolled, bias as the initial value) and writes it back clipped."""
    top, left, bottom, right = (int(p) for p in pads)
    s = stride
    oh = (h + top + bottom - k) // s + 1
    ow = (w + left + right - k) // s + 1
    vec = row_vector(ow, lanes)
    nv = -(-ow // vec)
    full, tail = ow // vec, ow % vec
    hp, wq = h + top + bottom, nv * vec + (k - 1) // s
    # per phase r: the plane columns q holding input columns (q * s + r - left in [0, w))
    spans = []
    assert s in STRIDES, s
    for r in range(s):
        q0 = max(0, -(-(left - r) // s))
        q1 = min(wq, (w + left - r + s - 1) // s)
        spans.append((r, q0, max(0, q1 - q0)))
    lo = T.float32(-3.4e38 if clip is None else clip[0])
    hi = T.float32(3.4e38 if clip is None else clip[1])

    @T.macro
    def copy_phase(x, plane, ch, r, q0, n):
        for y in range(h):
            for q in T.vectorized(n):
                plane[y + top, r, q0 + q] = x[0, ch, y, (q0 + q) * s + r - left]

    # stride 2: one scalar loop writing both phases from consecutive input pairs, which LLVM's loop
    # vectoriser turns into wide loads and shuffles (TVM would emit a gather per element)
    both0 = max(spans[0][1], spans[1][1]) if s == 2 else 0
    both1 = max(both0, min(spans[0][1] + spans[0][2], spans[1][1] + spans[1][2])) if s == 2 else 0
    if s == 1:
        spans.append((1, 0, 0))

    @T.macro
    def copy_two_phases(x, plane, ch):
        for y in range(h):
            for q in range(both0, both1):
                plane[y + top, 0, q] = x[0, ch, y, q * 2 - left]
                plane[y + top, 1, q] = x[0, ch, y, q * 2 + 1 - left]
            for q in range(spans[0][1], both0):                 # the phases' ends outside the pair loop
                plane[y + top, 0, q] = x[0, ch, y, q * 2 - left]
            for q in range(both1, spans[0][1] + spans[0][2]):
                plane[y + top, 0, q] = x[0, ch, y, q * 2 - left]
            for q in range(spans[1][1], both0):
                plane[y + top, 1, q] = x[0, ch, y, q * 2 + 1 - left]
            for q in range(both1, spans[1][1] + spans[1][2]):
                plane[y + top, 1, q] = x[0, ch, y, q * 2 + 1 - left]

    @T.macro
    def store(acc, out, ch, y, v0, n):
        for p in T.vectorized(n):
            out[0, ch, y, v0 + p] = T.min(T.max(acc[v0 + p], lo), hi)

    @T.prim_func
    def func(x: T.Buffer((1, c, h, w), "float32"), wt: T.Buffer((c, 1, k, k), "float32"),
             bias: T.Buffer((c,), "float32"), out: T.Buffer((1, c, oh, ow), "float32")):
        T.func_attr({"tirx.noalias": True})
        for ch in T.parallel(c):
            plane = T.alloc_buffer((hp, s, wq), "float32", scope="global")
            for y, r in T.grid(hp, s):
                for q in T.vectorized(wq):
                    plane[y, r, q] = T.float32(0)
            if s == 1:
                copy_phase(x, plane, ch, 0, spans[0][1], spans[0][2])
            else:
                copy_two_phases(x, plane, ch)
            for y in range(oh):
                acc = T.alloc_buffer((nv * vec,), "float32", scope="global")
                for v in T.unroll(nv):
                    for p in T.vectorized(vec):
                        acc[v * vec + p] = bias[ch]
                for kh in T.unroll(k):
                    for kw in T.unroll(k):
                        for v in T.unroll(nv):
                            for p in T.vectorized(vec):
                                acc[v * vec + p] = acc[v * vec + p] + wt[ch, 0, kh, kw] * \
                                    plane[y * s + kh, kw % s, v * vec + p + kw // s]
                for v in T.unroll(full):
                    store(acc, out, ch, y, v * vec, vec)
                if tail > 0:
                    store(acc, out, ch, y, full * vec, tail)

    name = kernel_name(k, stride, nv * vec)
    return func.with_attr("global_symbol", name).with_attr(SCHEDULED_ATTR, 1).with_attr("op_pattern", 8)
