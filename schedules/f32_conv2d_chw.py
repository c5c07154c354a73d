"""A network's first conv alone in CHW (batch 1 NCHW in, CHW planes out), where its output has more than one
reader in a CHW region (BlazeFace's 5x5 stride-2 stem feeds a depthwise conv and the block's shortcut).

Each parallel task computes `out_block` output channels over every input plane (chw_rows.RowConv: each input
row tap loaded once per step for all the task's channels, bias and clip fused) and writes their planes. A
stride-2 conv first splits the input's rows into their even and odd columns (one parallel pass into a buffer
the tasks share), as f32_conv2d_dwconv2d_chw does. Unlike the blocked NCHW{16}c conv it replaces it writes no
padding channels (24 of 24, not 32) and needs no layout transform to the region's CHW.
Parameters: x [1, cin, h, w], w [c, cin, k, k], bias [c], out [1, c, oh, ow] (or [1, c, out_plane]).
"""
from __future__ import annotations

from tvm import tirx

from schedules.chw_rows import F32, Planes, RowConv, output_planes, planes_shape, scheduled_kernel, split_planes
from tvm.tirx.script.builder import ir as I

OUT_BLOCK = 4     # output channels per task (4 x a 64-wide row: 16 accumulators)


def kernel_name(k: int, stride: int, tile: str, block: int) -> str:
    return f"f32_conv{k}x{k}s{stride}_chw_{tile}x{block}"


def input_planes(x, cin: int, h: int, w: int, lanes: int, split: bool) -> list:
    """The conv's input planes as RowConv reads them: x's own, or (split) its rows' even and odd columns in a
    buffer filled once for all tasks (the stride-2 taps are then loads, not shuffles redone per task)."""
    if not split:
        return [(x, [0, i]) for i in range(cin)]
    halves = split_planes(x, [0], cin, h, w, lanes)
    return [(halves, [i]) for i in range(cin)]


def channel_block(src: list, outs: list, wt, bias, c0) -> Planes:
    """Output channels c0 .. c0 + len(outs) - 1 of the conv over every input plane, into the planes outs."""
    return Planes(src, outs, lambda o, i, kh, kw: tirx.BufferLoad(wt, [c0 + o, i, kh, kw]),
                  lambda o: tirx.BufferLoad(bias, [c0 + o]))


def conv2d_chw(cin: int, c: int, h: int, w: int, k: int, stride: int, pads, *, clip=None, lanes: int = 16,
               out_block: int = OUT_BLOCK, out_plane: int | None = None) -> tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`). Knob: `out_block` (output channels per task; the
    largest of it, 2 and 1 that divides c)."""
    block = next(b for b in (out_block, 2, 1) if c % b == 0)
    split = stride == 2
    conv = RowConv(h, w, k, stride, pads, clip=clip, lanes=lanes, rows=1, split=split)

    def body(x, wt, bias, out):
        out = output_planes(out, c, conv.oh, conv.ow, out_plane)
        src = input_planes(x, cin, h, w, lanes, split)
        with I.parallel(0, c // block) as b:
            conv.planes(channel_block(src, [(out, [0, b * block + o]) for o in range(block)], wt, bias, b * block))

    return scheduled_kernel(kernel_name(k, stride, conv.tile(), block),
                            [("x", (1, cin, h, w), F32), ("w", (c, cin, k, k), F32), ("bias", (c,), F32),
                             ("out", planes_shape(c, conv.oh, conv.ow, out_plane), F32)], body)
