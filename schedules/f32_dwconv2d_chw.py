"""Depthwise kxk convolutions in CHW (batch 1 NCHW), vectorised along the width, bias and clip fused.

For the CHW regions around sparse 1x1 convs. Each parallel task is one channel, computed by
chw_rows.RowConv (rows two at a time, direct and masked loads, no padded copy).
"""
from __future__ import annotations

from tvm import tirx
from tvm.tirx.script.builder import ir as I

from schedules.chw_rows import F32, ROWS, Planes, RowConv, output_planes, planes_shape, scheduled_kernel


def kernel_name(k: int, stride: int, tile: str) -> str:
    return f"f32_dwconv{k}x{k}s{stride}_chw_{tile}"


def channel_planes(src, lead: list, wt, bias, out, ch) -> Planes:
    """Channel ch of a depthwise conv: src[*lead] -> out[0, ch] with weights wt[ch, 0] and bias[ch]."""
    return Planes([(src, lead)], [(out, [0, ch])], lambda o, i, kh, kw: tirx.BufferLoad(wt, [ch, 0, kh, kw]),
                  lambda o: tirx.BufferLoad(bias, [ch]))


def dwconv2d_chw(c: int, h: int, w: int, k: int, stride: int, pads, *, clip=None, lanes: int = 16,
                 rows: int = ROWS, out_plane: int | None = None) -> tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`). Parameters: x, w [c,1,k,k], bias [c], out
    ([1, c, oh, ow]; [1, c, out_plane] with out_plane set, see chw_rows.output_planes)."""
    conv = RowConv(h, w, k, stride, pads, clip=clip, lanes=lanes, rows=rows)

    def body(x, wt, bias, out):
        out = output_planes(out, c, conv.oh, conv.ow, out_plane)
        with I.parallel(0, c) as ch:
            conv.planes(channel_planes(x, [0, ch], wt, bias, out, ch))

    return scheduled_kernel(kernel_name(k, stride, conv.tile()),
                            [("x", (1, c, h, w), F32), ("w", (c, 1, k, k), F32), ("bias", (c,), F32),
                             ("out", planes_shape(c, conv.oh, conv.ow, out_plane), F32)], body)
