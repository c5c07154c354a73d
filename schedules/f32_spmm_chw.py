"""Sparse 1x1 convolutions in CHW (batch 1 NCHW): block-sparse weights times a pixel tile in registers.

out[co, p] = epilogue(bias[co] + sum_j val[j] * x[col[j], p]) with the weights compressed as BSR over
output channels: `row_ptr[b]..row_ptr[b+1]` index the non-zero blocks of output-channel block b
(`block` = 1, 2, 4 or 8 channels that are non-zero together), `col[j]` is the input channel of
block j and `val[j, 0:block]` its weights. For each (channel block, pixel tile) task the kernel
keeps block x pixel_tile accumulators in vector registers, walks the block's non-zero input
channels (a loop whose bounds are read from row_ptr), broadcasts each weight and FMAs it into the
tile, then writes the tile back through the fused epilogue (clip, residual add).
With `scale`, x arrives multiplied per input channel by a runtime vector (a squeeze-and-excitation gate,
[1, cin, 1, 1]): out = W (scale * x) = (W scale) x, so each weight is multiplied by its column's scale
as it is broadcast, and the scaled x is never written.
Knobs: `pixel_tile` (pixels per task, a multiple of the vector lanes), `block`.
Tasks are (channel block x pixel tile) fused into one parallel loop, so a 7x7 layer with one
pixel tile still spreads its channel blocks over the cores.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from schedules.chw_rows import HSWISH, clipped, planes_shape
from schedules.rule import SCHEDULED_ATTR

KIND = "spmm_chw"
BLOCKS = (8, 4, 2, 1)
MAX_PIXEL_TILE = 128
INT16_MAX_COLUMNS = 32768      # int16 column indices when the input channel count is below this


def kernel_name(pixel_tile: int, block: int) -> str:
    return f"f32_spmm_chw_{pixel_tile}x{block}"


def index_dtype(columns: int) -> str:
    """The narrowest index type that holds column numbers 0 .. columns-1 (int16 or int32)."""
    return "int16" if columns < INT16_MAX_COLUMNS else "int32"


def encode_bsr(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[Cout, Cin] dense weights -> (row_ptr [Cout/block + 1] int32, col [nnzb], val [nnzb, block]).

    A block (input channel, `block` consecutive output channels) is kept when any of its weights
    is non-zero. Output channels must be a multiple of `block`. col is int16 where Cin fits
    (index_dtype), else int32."""
    cout, cin = w.shape
    assert cout % block == 0, (cout, block)
    blocks = w.reshape(cout // block, block, cin).transpose(0, 2, 1)      # [nb, cin, block]
    keep = np.any(blocks != 0, axis=2)                                     # [nb, cin]
    row_ptr = np.zeros(cout // block + 1, np.int32)
    row_ptr[1:] = np.cumsum(keep.sum(axis=1))
    rows, cols = np.nonzero(keep)
    val = blocks[rows, cols].astype(np.float32).reshape(-1, block)
    if len(cols) == 0:   # an all-zero weight still needs buffers of positive size
        return row_ptr, np.zeros(1, index_dtype(cin)), np.zeros((1, block), np.float32)
    return row_ptr, cols.astype(index_dtype(cin)), np.ascontiguousarray(val)


def block_fill(w: np.ndarray, block: int) -> float:
    """Share of non-zero weights inside the kept blocks (1.0: blocks are full; 1.0 if all zero)."""
    cout, cin = w.shape
    if cout % block:
        return 0.0
    nz = int(np.count_nonzero(w))
    kept = int(np.any(w.reshape(cout // block, block, cin) != 0, axis=1).sum())
    return nz / (kept * block) if kept else 1.0


def default_pixel_tile(pixels: int, block: int, spec) -> int:
    """Pixels per task: as many accumulator vectors as a third of the registers hold, <= 64 pixels,
    no more than the layer has (rounded up to whole vectors)."""
    lanes = spec.vector_lanes
    budget = max(1, spec.vector_registers // 3 + (2 if spec.vector_registers >= 32 else 0))
    vectors = max(1, budget // block)
    tile = min(MAX_PIXEL_TILE, lanes * vectors)
    tile = max(lanes, 1 << (tile.bit_length() - 1))                  # a power of two
    return max(lanes, min(tile, -(-pixels // lanes) * lanes))


CLIP_ATTR = "shrinkc.clip"    # the epilogue's (lo, hi) or HSWISH, for passes that fuse the kernel with its consumer


def spmm_chw(cin: int, cout: int, h: int, w: int, block: int, nnzb: int, *, clip=None, residual: bool = False,
             pixel_tile: int = 32, lanes: int = 16, col_dtype: str = "int32",
             name: str | None = None, in_plane: int | None = None, scale: bool = False) -> tvm.tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`, so ApplySchedules leaves it alone).

    Parameters in order: x [1,cin,h,w], row_ptr, col (col_dtype), val, bias [cout], (scale [1,cin,1,1]),
    (residual [1,cout,h,w]), out.
    clip: (lo, hi) applied after the bias, before the residual add; chw_rows.HSWISH for hard swish; None
    for none.
    in_plane: x is [1, cin, in_plane], channel planes in_plane floats apart (a depthwise kernel wrote it
    with chw_rows.output_planes so that each plane starts on a vector boundary: no load splits a line)."""
    pixels = h * w
    x_shape, x_row = planes_shape(cin, h, w, in_plane), in_plane or pixels
    tile_n = pixel_tile
    lanes = min(lanes, tile_n)
    # tasks: full tiles, then one with the rest (whole vectors and a partial one)
    nfull, rem = divmod(pixels, tile_n)
    rest_v, rest_s = rem // lanes * lanes, rem % lanes
    ntiles = nfull + (1 if rem else 0)
    nb = cout // block
    nnzb = max(1, nnzb)
    def act(value):      # the epilogue's activation, the one the CHW kernels apply (chw_rows.clipped)
        return value if clip is None else clipped(value, clip, 0)

    @T.macro
    def finish(value, res, out, co, px):
        if residual:
            out[co, px] = act(value) + res[co, px]
        else:
            out[co, px] = act(value)

    @T.macro
    def fma(acc, x, wk, c, k, p0, nv, ns):
        # acc[k, :] += wk * x[c, p0 : p0 + nv * lanes + ns]
        if nv > 0:
            for v in T.unroll(nv):
                for p in T.vectorized(lanes):
                    acc[k, v * lanes + p] = acc[k, v * lanes + p] + wk * x[c, p0 + v * lanes + p]
        if ns > 0:
            for p in T.vectorized(ns):
                acc[k, nv * lanes + p] = acc[k, nv * lanes + p] + wk * x[c, p0 + nv * lanes + p]

    @T.macro
    def task(x, rp, col, val, bias, sc, res, out, b, p0, nv, ns):
        # output channels b*block .. +block; pixels p0 .. p0 + nv*lanes (whole vectors) + ns (< lanes)
        # NOTE: nv and ns are Python ints: the `if`s below are decided when the kernel is built
        acc = T.alloc_buffer((block, nv * lanes + ns), "float32", scope="global")
        for k in T.unroll(block):
            if nv > 0:
                for v in T.unroll(nv):
                    for p in T.vectorized(lanes):
                        acc[k, v * lanes + p] = bias[b * block + k]
            if ns > 0:
                for p in T.vectorized(ns):
                    acc[k, nv * lanes + p] = bias[b * block + k]
        for j in T.serial(rp[b], rp[b + 1]):
            c = T.Cast("int32", col[j])     # NOTE: one widening load per block, read by every FMA below
            for k in T.unroll(block):
                if scale:
                    fma(acc, x, val[j, k] * sc[0, c, 0, 0], c, k, p0, nv, ns)
                else:
                    fma(acc, x, val[j, k], c, k, p0, nv, ns)
        for k in T.unroll(block):
            if nv > 0:
                for v in T.unroll(nv):
                    for p in T.vectorized(lanes):
                        finish(acc[k, v * lanes + p], res, out, b * block + k, p0 + v * lanes + p)
            if ns > 0:
                for p in T.vectorized(ns):
                    finish(acc[k, nv * lanes + p], res, out, b * block + k, p0 + nv * lanes + p)

    @T.macro
    def body(x, rp, col, val, bias, sc, res, out):
        # NOTE: pixel tile outer, channel block inner: one tile of x stays in cache for every block
        for i in T.parallel(nb * ntiles):
            if i // nb < nfull:
                task(x, rp, col, val, bias, sc, res, out, i % nb, i // nb * tile_n, tile_n // lanes, 0)
            else:
                task(x, rp, col, val, bias, sc, res, out, i % nb, nfull * tile_n, rest_v // lanes, rest_s)

    x_t, rp_t = T.Buffer(x_shape, "float32"), T.Buffer((nb + 1,), "int32")
    col_t, val_t = T.Buffer((nnzb,), col_dtype), T.Buffer((nnzb, block), "float32")
    vec_t, sc_t, o_shape = T.Buffer((cout,), "float32"), T.Buffer((1, cin, 1, 1), "float32"), (1, cout, h, w)
    @T.macro
    def main(x4, rp, col, val, bias, sc, r4, o4):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((cin, x_row), "float32", data=x4.data)
        res = T.decl_buffer((cout, pixels), "float32", data=r4.data)
        out = T.decl_buffer((cout, pixels), "float32", data=o4.data)
        body(x, rp, col, val, bias, sc, res, out)

    # NOTE: one signature per optional input (scale, residual); an absent one is never read
    if residual and scale:
        @T.prim_func
        def func(x4: x_t, rp: rp_t, col: col_t, val: val_t, bias: vec_t, sc: sc_t,
                 r4: T.Buffer(o_shape, "float32"), o4: T.Buffer(o_shape, "float32")):
            main(x4, rp, col, val, bias, sc, r4, o4)
    elif residual:
        @T.prim_func
        def func(x4: x_t, rp: rp_t, col: col_t, val: val_t, bias: vec_t,
                 r4: T.Buffer(o_shape, "float32"), o4: T.Buffer(o_shape, "float32")):
            main(x4, rp, col, val, bias, bias, r4, o4)
    elif scale:
        @T.prim_func
        def func(x4: x_t, rp: rp_t, col: col_t, val: val_t, bias: vec_t, sc: sc_t, o4: T.Buffer(o_shape, "float32")):
            main(x4, rp, col, val, bias, sc, o4, o4)
    else:
        @T.prim_func
        def func(x4: x_t, rp: rp_t, col: col_t, val: val_t, bias: vec_t, o4: T.Buffer(o_shape, "float32")):
            main(x4, rp, col, val, bias, bias, o4, o4)

    name = name or kernel_name(pixel_tile, block)
    func = func.with_attr("global_symbol", name).with_attr(SCHEDULED_ATTR, 1)
    if clip is None:
        return func
    return func.with_attr(CLIP_ATTR, HSWISH if clip == HSWISH else [float(clip[0]), float(clip[1])])


def kernel_clip(func) -> list | str | None:
    """The epilogue clip a spmm kernel was built with: [lo, hi], HSWISH or None."""
    if CLIP_ATTR not in func.attrs:
        return None
    v = func.attrs[CLIP_ATTR]
    return HSWISH if str(v) == HSWISH else [float(x) for x in v]
