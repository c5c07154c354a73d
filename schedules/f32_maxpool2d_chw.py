"""Max pooling in CHW (batch 1 NCHW), for a pool inside a sparse region (BlazeFace's stride-2 shortcut).

TVM's own NCHW max pool walks one output pixel at a time. Here each parallel task takes one output row of
one channel and builds it a vector of output pixels at a time from the k input rows it covers: the window's
taps are chw_rows' row vectors (stride 2: the rows' even and odd columns, split by two shuffles per pair of
vectors), maxed together, and the row stored (masked where it ends in a partial vector). No padding
(a padded window would need -inf lanes); the output rows floor(h - k) / s + 1 as ONNX's default.
Parameters: x [1, c, h, w], out [1, c, oh, ow].
"""
from __future__ import annotations

from tvm import tirx
from tvm.tirx.script.builder import ir as I

from schedules.chw_rows import F32, STRIDES, _Row, row_vector, scheduled_kernel, store

KERNELS = (2, 3)     # window sizes covered (square)


def kernel_name(k: int, stride: int, vec: int) -> str:
    return f"f32_maxpool{k}x{k}s{stride}_chw_{vec}"


def maxpool2d_chw(c: int, h: int, w: int, k: int, stride: int, *, lanes: int = 16) -> tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`)."""
    assert k in KERNELS and stride in STRIDES and h >= k and w >= k, (k, stride, h, w)
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    vec = row_vector(ow, lanes)
    nv = -(-ow // vec)

    def body(x, out):
        # NOTE: in a root block: relax's RewriteDataflowReshape asks every one-input kernel whether it is a
        # reshape, and that check fails on a PrimFunc whose body is not a block
        with I.sblock("root"), I.parallel(0, c * oh) as i:
            ch, oy = i // oh, i % oh
            rows = [_Row(x, [0, ch], oy * stride + dy, w, vec, stride) for dy in range(k)]
            for v in range(nv):
                best = None
                for row in rows:
                    for dx in range(k):
                        tap = row.tap(v * vec, dx)
                        best = tap if best is None else tirx.Max(best, tap)
                store(out, I.Bind(best), [0, ch, oy], v * vec, min(vec, ow - v * vec), vec)

    return scheduled_kernel(kernel_name(k, stride, vec), [("x", (1, c, h, w), F32), ("out", (1, c, oh, ow), F32)],
                            body)
