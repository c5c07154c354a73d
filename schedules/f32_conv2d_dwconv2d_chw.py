"""A network's first conv fused with the depthwise conv that reads its output, in CHW (batch 1 NCHW).

MobileNetV2's first conv (3 -> 32 channels, 3x3 stride 2) writes 32 planes of 112 x 112 floats (1.6 MB)
that block 0's depthwise conv reads straight back. Fused, each parallel task computes `out_block` channels
of the first conv into a buffer of its own (chw_rows.RowConv over every input plane, bias and clip fused,
loading each input row tap once per task and row for all the task's channels) and runs the depthwise
conv on those planes while they are still in cache, so the first conv's output never goes to memory.
The region then starts at the model's input: the kernel reads the NCHW input and writes CHW. A stride-2
first conv first splits the input's rows into their even and odd columns (one parallel pass, into a buffer
the tasks share), so that its taps are plain loads in every task rather than shuffles redone per task
(MobileNetV2's pair ran a little faster so, alone, in ad-hoc interleaved timings on Zen 5).
Parameters: x [1, cin, h, w], w1 [c, cin, k1, k1], bias1 [c], w [c, 1, k, k], bias2 [c], out.
"""
from __future__ import annotations

from tvm import tirx
from tvm.tirx.script.builder import ir as I

from schedules.chw_rows import F32, ROWS, RowConv, output_planes, planes_shape, scheduled_kernel
from schedules.f32_conv2d_chw import channel_block, input_planes
from schedules.f32_dwconv2d_chw import channel_planes

MAX_CIN = 4       # first-conv input channels covered: every input plane's taps are reloaded per task
OUT_BLOCK = 8     # first-conv output channels per task (timed 2, 4, 8; targets may set 4)


def kernel_name(k1: int, stride1: int, k: int, stride: int, tile: str, block: int) -> str:
    return f"f32_conv{k1}x{k1}s{stride1}_dwconv{k}x{k}s{stride}_chw_{tile}x{block}"


def conv2d_dwconv2d_chw(cin: int, c: int, h: int, w: int, k1: int, stride1: int, pads1, k: int, stride: int, pads,
                        *, clip1=None, clip=None, lanes: int = 16, out_block: int = OUT_BLOCK, rows: int = ROWS,
                        out_plane: int | None = None) -> tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`). out: [1, c, oh, ow], or [1, c, out_plane] with
    out_plane set (chw_rows.output_planes). Knobs: `out_block` (first-conv channels per task; 2 or 1 where it
    does not divide c), `rows` (the depthwise step, chw_rows.RowConv)."""
    block = next(b for b in (out_block, 2, 1) if c % b == 0)
    split = stride1 == 2
    first = RowConv(h, w, k1, stride1, pads1, clip=clip1, lanes=lanes, rows=1, split=split)
    dw = RowConv(first.oh, first.ow, k, stride, pads, clip=clip, lanes=lanes, rows=rows)

    def body(x, w1, bias1, wt, bias, out):
        out = output_planes(out, c, dw.oh, dw.ow, out_plane)
        src = input_planes(x, cin, h, w, lanes, split)
        with I.parallel(0, c // block) as b:
            plane = I.alloc_buffer((block, first.oh, first.ow), F32, scope="global")
            first.planes(channel_block(src, [(plane, [o]) for o in range(block)], w1, bias1, b * block))
            for o in range(block):
                dw.planes(channel_planes(plane, [o], wt, bias, out, b * block + o))

    return scheduled_kernel(kernel_name(k1, stride1, k, stride, dw.tile(), block),
                            [("x", (1, cin, h, w), F32), ("w1", (c, cin, k1, k1), F32), ("bias1", (c,), F32),
                             ("w", (c, 1, k, k), F32), ("bias2", (c,), F32),
                             ("out", planes_shape(c, dw.oh, dw.ow, out_plane), F32)], body)
