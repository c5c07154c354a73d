"""Dense kxk convolutions with few input channels in CHW (batch 1 NCHW), bias and clip fused.

For a network's first conv (3 input channels, 3x3 stride 2 in MobileNetV2) when the CHW region starts
right after it: it reads the model's NCHW input and writes CHW, so no layout transform sits between it
and the region. Each parallel task computes OUT_BLOCK output channels with chw_rows.RowConv: every
input row tap is loaded (stride 2: split into even and odd columns) once per task and row, and feeds
the FMAs of all the task's output channels.
"""
from __future__ import annotations

from tvm import tirx
from tvm.tirx.script.builder import ir as I

from schedules.chw_rows import F32, Planes, RowConv, scheduled_kernel

MAX_CIN = 4       # input channels covered: every input plane's taps are reloaded per task
OUT_BLOCK = 8     # output channels per task (x 2 vectors of pixels = the 16 accumulators; timed 2, 4, 8)


def kernel_name(k: int, stride: int, tile: str, block: int) -> str:
    return f"f32_conv{k}x{k}s{stride}_chw_{tile}x{block}"


def conv2d_chw(cin: int, cout: int, h: int, w: int, k: int, stride: int, pads, *, clip=None,
               lanes: int = 16, out_block: int = OUT_BLOCK) -> tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`). Parameters: x [1,cin,h,w], w [cout,cin,k,k],
    bias [cout], out [1,cout,oh,ow]. Knob: `out_block` (output channels per task; 2 or 1 where it does not
    divide cout)."""
    block = next(b for b in (out_block, 2, 1) if cout % b == 0)
    conv = RowConv(h, w, k, stride, pads, clip=clip, lanes=lanes, rows=1)

    def body(x, wt, bias, out):
        with I.parallel(0, cout // block) as b:
            conv.planes(Planes([(x, [0, i]) for i in range(cin)],
                               [(out, [0, b * block + o]) for o in range(block)],
                               lambda o, i, kh, kw: tirx.BufferLoad(wt, [b * block + o, i, kh, kw]),
                               lambda o: tirx.BufferLoad(bias, [b * block + o])))

    return scheduled_kernel(kernel_name(k, stride, conv.tile(), block),
                            [("x", (1, cin, h, w), F32), ("w", (cout, cin, k, k), F32), ("bias", (cout,), F32),
                             ("out", (1, cout, conv.oh, conv.ow), F32)], body)
