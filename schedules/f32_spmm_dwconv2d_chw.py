"""A sparse 1x1 conv fused with the depthwise kxk conv that reads its output, in CHW (batch 1).

An inverted residual block expands with a 1x1 conv and then runs a depthwise conv over every expanded
channel. Unfused, the expanded tensor (96 x 112 x 112 floats in MobileNetV2, 4.8 MB) is written to
memory by the sparse kernel and read back by the depthwise one. Fused, each parallel task takes one
block of expanded channels, computes their planes into a buffer of its own (the 1x1 part: the block's
non-zero weights walked over tiles of pixels held in registers, bias and clip fused, as
f32_spmm_chw), and runs the depthwise conv on them while they are still in cache
(chw_rows.RowConv, as f32_dwconv2d_chw); at stride 2 on inputs whose output rows are one vector wide,
from input rows split into even and odd columns first (split_input). Parameters: x, row_ptr, col, val,
bias1 (the 1x1 conv's, BSR as encode_bsr writes it), w [C,1,k,k], bias2, out.
"""
from __future__ import annotations

from tvm import tirx
from tvm.tirx.script.builder import ir as I

from schedules.chw_rows import ACCUMULATORS, F32, ROWS, RowConv, clipped, lanes_inside, output_planes, planes_shape, \
    scheduled_kernel, split_planes, store
from schedules.f32_dwconv2d_chw import channel_planes


def kernel_name(k: int, stride: int, tile: str, block: int, channels: int = 1) -> str:
    """channels: expanded channels per task, named where more than one block (`_c8`)."""
    return f"f32_spmm{block}x1_dwconv{k}x{k}s{stride}_chw_{tile}" + (f"_c{channels}" if channels > block else "")


def split_input(w: int, k: int, stride: int, pads, lanes: int) -> bool:
    """Whether a stride-2 kernel splits its input's rows into even and odd columns first (one parallel pass over
    the cin input planes, not the c expanded ones; the 1x1 conv does not care in which order it meets the
    pixels, so the expanded planes come out split and the depthwise taps are loads, not two shuffles per pair
    of vectors): where an output row is one full-width vector. Ad-hoc interleaved timings of single kernels
    on Zen 5 (85% zeros): clearly faster on 28- to 32-wide inputs (3x3 and 5x5), the same or a little slower on
    56- and 112-wide ones, slower on 14-wide ones (7-wide output rows in 8-lane vectors); inside 85%-sparse
    MobileNetV2 its 28x28 stride-2 kernel ran a little faster, the whole model the same."""
    ow = (w + int(pads[1]) + int(pads[3]) - k) // stride + 1
    return stride == 2 and w % 2 == 0 and lanes // 2 < ow <= lanes


def spmm_dwconv2d_chw(cin: int, c: int, h: int, w: int, block: int, nnzb: int, k: int, stride: int, pads, *,
                      clip1=None, clip=None, lanes: int = 16, col_dtype: str = "int32",
                      out_plane: int | None = None, in_plane: int | None = None, rows: int = ROWS,
                      group: int = 1, split: bool | None = None) -> tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`); c = the expanded channels (a multiple of block).
    out_plane: write out as [1, c, out_plane] (chw_rows.output_planes); in_plane: read x as [1, cin, in_plane]
    (a depthwise kernel before it wrote it so). Knobs: `rows` (the depthwise step, chw_rows.RowConv),
    `group` (channel blocks per task). split: stride 2, split x's rows into even and odd columns first (None:
    where split_input says so)."""
    assert c % (block * group) == 0, (c, block, group)
    split = split_input(w, k, stride, pads, lanes) if split is None else split
    assert not split or (stride == 2 and w % 2 == 0), (split, stride, w)
    dw = RowConv(h, w, k, stride, pads, clip=clip, lanes=lanes, rows=rows, split=split)
    nb, pixels = c // block, h * w
    tile = max(1, ACCUMULATORS // block)             # vectors of pixels per 1x1 tile and channel
    nfull = pixels // (tile * lanes)

    def expand(xf, rp, col, val, bias1, plane, b, p0, n_pixels: int, row0):
        """plane[row0 + j, p0 : p0 + n_pixels] for the block's channels j (n_pixels at most tile * lanes)."""
        nvec = -(-n_pixels // lanes)
        acc = I.alloc_buffer((block * nvec * lanes,), F32, scope="global")

        def at(j, v):
            return [tirx.Ramp((j * nvec + v) * lanes, 1, lanes)]

        for j in range(block):
            for v in range(nvec):
                I.buffer_store(acc, tirx.Broadcast(tirx.BufferLoad(bias1, [b * block + j]), lanes), at(j, v))
        with I.serial(tirx.BufferLoad(rp, [b]), tirx.BufferLoad(rp, [b + 1])) as e:
            ci = I.Bind(tirx.Cast("int32", tirx.BufferLoad(col, [e])))
            for v in range(nvec):
                n = min(lanes, n_pixels - v * lanes)
                idx = tirx.Ramp(p0 + v * lanes, 1, lanes)
                if n == lanes:
                    xv = I.Bind(tirx.BufferLoad(xf, [ci, idx]))
                else:     # the last pixels: a masked load (its other lanes are never stored)
                    xv = I.Bind(tirx.call_intrin(f"float32x{lanes}", "tirx.masked_load", xf, ci, idx,
                                                 lanes_inside(0, 1, lanes, n)))
                for j in range(block):
                    wv = tirx.Broadcast(tirx.BufferLoad(val, [e, j]), lanes)
                    I.buffer_store(acc, tirx.op.fma(wv, xv, tirx.BufferLoad(acc, at(j, v))), at(j, v))
        for j in range(block):
            for v in range(nvec):
                store(plane, clipped(tirx.BufferLoad(acc, at(j, v)), clip1, lanes), [row0 + j], p0 + v * lanes,
                      min(lanes, n_pixels - v * lanes), lanes)

    def body(x, rp, col, val, bias1, wt, bias, out):
        xf = I.decl_buffer((cin, in_plane or pixels), F32, data=x.data)
        out = output_planes(out, c, dw.oh, dw.ow, out_plane)
        if split:
            # NOTE: x's rows split into their even and odd columns once, for all tasks; a 1x1 conv does not
            # care in which order it meets the pixels, so the expanded planes come out split too
            rows_x = I.decl_buffer((cin, h, w), F32, data=x.data, strides=[in_plane or pixels, w, 1])
            xf = I.decl_buffer((cin, pixels), F32, data=split_planes(rows_x, [], cin, h, w, lanes).data)
        # NOTE: a task expands `group` channel blocks one pixel tile at a time, so the tile's input columns
        # (cin x tile floats) are read from L1 by every block of the group, then runs their depthwise convs
        with I.parallel(0, nb // group) as g:
            flat = I.alloc_buffer((group * block, pixels), F32, scope="global")
            plane = I.decl_buffer((group * block, 2, h, w // 2) if split else (group * block, h, w), F32,
                                  data=flat.data)

            def expand_group(p0, n_pixels: int):
                with I.serial(0, group) as q:
                    expand(xf, rp, col, val, bias1, flat, g * group + q, p0, n_pixels, q * block)

            if nfull:
                with I.serial(0, nfull) as i:
                    expand_group(i * tile * lanes, tile * lanes)
            for p0 in range(nfull * tile * lanes, pixels, tile * lanes):
                expand_group(p0, min(tile * lanes, pixels - p0))
            with I.serial(0, group) as q:
                for j in range(block):
                    dw.planes(channel_planes(plane, [q * block + j], wt, bias, out, (g * group + q) * block + j))

    return scheduled_kernel(kernel_name(k, stride, dw.tile(), block, group * block),
                            [("x", planes_shape(cin, h, w, in_plane), F32), ("row_ptr", (nb + 1,), "int32"),
                             ("col", (nnzb,), col_dtype),
                             ("val", (nnzb, block), F32), ("bias1", (c,), F32), ("w", (c, 1, k, k), F32),
                             ("bias2", (c,), F32), ("out", planes_shape(c, dw.oh, dw.ow, out_plane), F32)], body)
