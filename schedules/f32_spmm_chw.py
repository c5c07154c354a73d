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
Knobs: `pixel_tile` (at most this many pixels per task, a multiple of the vector lanes; a plane's tiles are
sized evenly), `block`.
Tasks are (channel block x pixel tile) fused into one parallel loop, so a 7x7 layer with one
pixel tile still spreads its channel blocks over the cores. With `k_chunk` (default_k_chunk: 7x7 layers with
many input channels, where the target names an L1 share) a task takes a group of channel blocks and walks
them once per chunk of input channels, so that the chunk's tile of x stays in L1.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

from schedules.chw_rows import NAMED_CLIPS, clipped, pixel_runs, planes_shape
from schedules.rule import SCHEDULED_ATTR

KIND = "spmm_chw"
BLOCKS = (8, 4, 2, 1)
MAX_PIXEL_TILE = 256
INT16_MAX_COLUMNS = 32768      # int16 column indices when the input channel count is below this
CHUNK_TASKS = 4                # chunked kernels: at least this many parallel tasks (pixel tiles x output-block groups)


def kernel_name(pixel_tile: int, block: int, k_chunk: int | None = None, tile_tasks: bool = False) -> str:
    """f32_spmm_chw_64x1; f32_spmm_chw_64x1_k128 walking its input channels in chunks of 128;
    f32_spmm_chw_64x1_bytile with one task per pixel tile (tile_tasks)."""
    by_tile = "_bytile" if tile_tasks and not k_chunk else ""
    return f"f32_spmm_chw_{pixel_tile}x{block}" + (f"_k{k_chunk}" if k_chunk else "") + by_tile


def index_dtype(columns: int) -> str:
    """The narrowest index type that holds column numbers 0 .. columns-1 (int16 or int32)."""
    return "int16" if columns < INT16_MAX_COLUMNS else "int32"


def encode_bsr(w: np.ndarray, block: int, k_chunk: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[Cout, Cin] dense weights -> (row_ptr [Cout/block + 1] int32, col [nnzb], val [nnzb, block]).

    A block (input channel, `block` consecutive output channels) is kept when any of its weights
    is non-zero. Output channels must be a multiple of `block`. col is int16 where Cin fits
    (index_dtype), else int32.
    k_chunk: the blocks ordered by (input channels // k_chunk, output block), and row_ptr
    [chunks x Cout/block + 1]: chunk q of output block b is row_ptr[q*nb + b] .. row_ptr[q*nb + b + 1]."""
    cout, cin = w.shape
    assert cout % block == 0, (cout, block)
    nb, chunk = cout // block, k_chunk or cin
    chunks = -(-cin // chunk)
    blocks = w.reshape(nb, block, cin).transpose(0, 2, 1)                 # [nb, cin, block]
    keep = np.any(blocks != 0, axis=2)                                     # [nb, cin]
    keep = np.pad(keep, ((0, 0), (0, chunks * chunk - cin))).reshape(nb, chunks, chunk).transpose(1, 0, 2)
    row_ptr = np.zeros(chunks * nb + 1, np.int32)
    row_ptr[1:] = np.cumsum(keep.sum(axis=2).reshape(-1))
    q, rows, cols = np.nonzero(keep)                                       # (chunk, block, column in chunk) order
    cols = cols + q * chunk
    val = blocks[rows, cols].astype(np.float32).reshape(-1, block)
    if len(cols) == 0:   # an all-zero weight still needs buffers of positive size
        return row_ptr, np.zeros(1, index_dtype(cin)), np.zeros((1, block), np.float32)
    return row_ptr, cols.astype(index_dtype(cin)), np.ascontiguousarray(val)


def decode_bsr(row_ptr: np.ndarray, col: np.ndarray, val: np.ndarray, cout: int, cin: int) -> np.ndarray:
    """The [Cout, Cin] dense weights of encode_bsr's arrays, chunked or not (row_ptr's length tells)."""
    block = val.shape[1]
    nb = cout // block
    w = np.zeros((nb, cin, block), np.float32)
    rows = np.repeat(np.arange(len(row_ptr) - 1) % nb, np.diff(row_ptr))
    w[rows, col[:len(rows)].astype(np.int64)] = val[:len(rows)]
    return w.transpose(0, 2, 1).reshape(cout, cin)


def default_k_chunk(cin: int, cout: int, pixels: int, block: int, spec) -> int | None:
    """Input channels per chunk for a layer, or None (unchunked). A task's tile of x (cin rows of its pixels)
    is re-read from cache for every output block; where it is larger than the L1 share the target names
    (`kernel_defaults["spmm_chunk_bytes"]`), chunks of that size stay in L1 across the blocks, at the cost of
    storing and reloading the partial sums once per chunk. Used where that paid on Zen 5 (ad-hoc single-layer
    timings, 85% zeros): layers of one pixel tile (7x7) with at least 2 chunks and partial sums of at most 4 x
    that share. MobileNetV2's 7x7 project convs (576-960 input channels) ran faster chunked; 320 -> 1280
    (large partial sums) and the 14x14-56x56 layers of several tiles (chunks of 64-72) did not (the
    per-layer table of benchmarks/RESULTS-sparse.md has the 7x7 layers' figures). A target may allow layers
    of up to `kernel_defaults["spmm_chunk_tiles"]` pixel tiles (default 1), and name the pixel tile of chunked
    layers (`spmm_chunk_pixels`, chunked_pixel_tile): on Zen 4 the 14x14 project convs with 384-576 input
    channels ran faster in tiles of 64 pixels and chunks of 192 channels than in tiles of 128 and chunks of
    104, or unchunked; the 28x28 and 56x56 ones not chunked (ad-hoc interleaved single-kernel timings).
    A one-tile layer with more input channels than a chunk but fewer than two takes two halves, and a target
    may let the partial sums take more than 4 shares (`spmm_chunk_sums`): on Zen 4, 85% zeros, 320 -> 1280 at
    7x7 (ReLU6) ran clearly faster at 1 and 2 threads in two chunks of 160 than unchunked, and a little faster
    than in chunks of 112 or 80 (ad-hoc interleaved single-kernel timings)."""
    budget = spec.kernel_defaults.get("spmm_chunk_bytes")
    if not budget:
        return None
    lanes = spec.vector_lanes
    runs = pixel_runs(pixels, chunked_pixel_tile(pixels, block, spec, cin, cout) // lanes, lanes)
    if sum(count for _, count, _, _ in runs) > spec.kernel_defaults.get("spmm_chunk_tiles", 1):
        return None
    tile_bytes = max(nv + (ns > 0) for _, _, nv, ns in runs) * lanes * 4   # whole vectors: the lines its loads touch
    chunk = budget // tile_bytes // 8 * 8
    halves = len(runs) == 1 and runs[0][1] == 1 and chunk < cin < 2 * chunk
    if halves:
        chunk = -(-cin // 16) * 8     # one tile: two halves (rounded up to 8) rather than a chunk and a part
    sums = spec.kernel_defaults.get("spmm_chunk_sums", 4)
    if chunk < 16 or (cin < 2 * chunk and not halves) or cout * tile_bytes > sums * budget:
        return None
    return chunk


def chunked_pixel_tile(pixels: int, block: int, spec, cin: int, cout: int) -> int:
    """The pixel tile of a layer whose input channels are walked in chunks: the target's
    `spmm_chunk_pixels` (no more than the plane), else default_pixel_tile's."""
    tile = spec.kernel_defaults.get("spmm_chunk_pixels")
    if not tile:
        return default_pixel_tile(pixels, block, spec, cin, cout)
    lanes = spec.vector_lanes
    return max(lanes, min(tile, -(-pixels // lanes) * lanes))


def block_fill(w: np.ndarray, block: int) -> float:
    """Share of non-zero weights inside the kept blocks (1.0: blocks are full; 1.0 if all zero)."""
    cout, cin = w.shape
    if cout % block:
        return 0.0
    nz = int(np.count_nonzero(w))
    kept = int(np.any(w.reshape(cout // block, block, cin) != 0, axis=1).sum())
    return nz / (kept * block) if kept else 1.0


def default_pixel_tile(pixels: int, block: int, spec, cin: int, cout: int) -> int:
    """Pixels per task: as many accumulator vectors as a third of the registers hold, a power of two, no more
    than the layer has (rounded up to whole vectors).
    Where the target sets `spmm_accumulators`, a layer with at least as many input as output channels (a
    project conv) takes that many accumulators instead, on planes of at least two such tiles: on Zen 5,
    16-vector tiles ran clearly faster than 8-vector ones on MobileNetV2's 28x28-112x112 project convs (fewer
    column-index and weight loads per FMA) and slower on its expand convs (2-5 non-zeros per output channel),
    and a 14x14 plane in one tile was no faster; ad-hoc interleaved timings of single kernels."""
    lanes, wide = spec.vector_lanes, spec.kernel_defaults.get("spmm_accumulators")
    budget = max(1, spec.vector_registers // 3 + (2 if spec.vector_registers >= 32 else 0))
    if wide and cin >= cout and -(-pixels // lanes) >= 2 * max(1, wide // block):
        budget = wide
    vectors = max(1, budget // block)
    vectors = 1 << (vectors.bit_length() - 1)                         # a power of two
    tile = min(MAX_PIXEL_TILE, lanes * vectors)
    return max(lanes, min(tile, -(-pixels // lanes) * lanes))


def tile_count(pixels: int, pixel_tile: int) -> int:
    """How many tiles a plane splits into (pixel_runs' count, for a tile of whole vectors)."""
    return -(-pixels // pixel_tile)


def default_tile_tasks(cin: int, cout: int, pixels: int, pixel_tile: int, spec, k_chunk: int | None = None) -> bool:
    """Whether a layer's tasks are whole pixel tiles, each walking every output block (tile_tasks), rather than
    one (output block, pixel tile) each: on a target that names it (`kernel_defaults["spmm_tile_tasks"]`, Zen 4:
    where it was measured; elsewhere a knob that `shrinkc tune` may pick), for unchunked expand convs (more output
    than input channels: a few non-zeros per output channel, so the work around each block's loop weighs most) on
    planes of at least two tiles, two so that two threads share them. On Zen 4, 85% zeros, MobileNetV2's expand
    shapes 16->96 @ 112x112 to 96->576 @ 14x14 ran clearly faster at 1 thread and faster at 2 (ad-hoc interleaved
    single-kernel timings); its project convs only a little faster at 1 thread and faster or slower at 2 (seven
    tiles on 28x28 do not share evenly), so they keep one task per block. Splitting the blocks of a tile over two
    or more tasks lost the gain. The per-layer page (benchmarks/RESULTS-sparse-layers.md) has the measured
    figures."""
    if k_chunk or not spec.kernel_defaults.get("spmm_tile_tasks"):
        return False
    return cout > cin and tile_count(pixels, pixel_tile) >= 2


CLIP_ATTR = "shrinkc.clip"    # the epilogue's (lo, hi), HSWISH or SILU, for passes that fuse the kernel with its consumer


def spmm_chw(cin: int, cout: int, h: int, w: int, block: int, nnzb: int, *, clip=None, residual: bool = False,
             pixel_tile: int = 32, lanes: int = 16, col_dtype: str = "int32",
             name: str | None = None, in_plane: int | None = None, scale: bool = False,
             k_chunk: int | None = None, out_plane: int | None = None,
             res_plane: int | None = None, clip2=None, res_channels: int | None = None,
             tile_tasks: bool = False) -> tvm.tirx.PrimFunc:
    """The scheduled kernel (marked `shrinkc.scheduled`, so ApplySchedules leaves it alone).

    Parameters in order: x [1,cin,h,w], row_ptr, col (col_dtype), val, bias [cout], (scale [1,cin,1,1]),
    (residual [1,cout,h,w]), out.
    clip: (lo, hi) applied after the bias, before the residual add; chw_rows.HSWISH / SILU for hard swish / SiLU; None
    for none. clip2: (lo, hi) applied after the residual add (a ReLU after a block's add), or None.
    res_channels: the residual has this many channels (< cout), the rest count as zeros: a block whose shortcut
    appends zero channels (BlazeFace) reads the shortcut as it is, not a padded copy.
    in_plane: x is [1, cin, in_plane], channel planes in_plane floats apart (a depthwise kernel wrote it
    with chw_rows.output_planes so that each plane starts on a vector boundary: no load splits a line).
    k_chunk: the weights as encode_bsr(w, block, k_chunk) writes them; each task walks its output blocks once
    per chunk of k_chunk input channels (whose pixel tile then stays in L1 across the blocks), keeping
    partial sums in `out` in between and applying the epilogue after the last chunk.
    out_plane / res_plane: out / the residual are [1, cout, plane] likewise (PadChannelPlanes: this kernel's
    readers take padded planes too), their pixels past h * w never written or read.
    tile_tasks (unchunked only): one task per pixel tile, walking every output block (default_tile_tasks)."""
    pixels = h * w
    x_shape, x_row = planes_shape(cin, h, w, in_plane), in_plane or pixels
    lanes = min(lanes, pixel_tile)
    # tasks: tiles of at most pixel_tile pixels, sized evenly, in 1-3 runs of equal tiles (chw_rows.pixel_runs)
    runs = pixel_runs(pixels, pixel_tile // lanes, lanes)
    ntiles = sum(count for _, count, _, _ in runs)
    nb = cout // block
    nnzb = max(1, nnzb)
    chunks = -(-cin // k_chunk) if k_chunk else 1
    # tasks are (pixel tile x group of output blocks): unchunked one block each, or (tile_tasks) all of them;
    # chunked at least CHUNK_TASKS tasks to share out
    groups = next((g for g in range(-(-CHUNK_TASKS // ntiles), nb + 1) if nb % g == 0), nb) if k_chunk else nb
    if tile_tasks and not k_chunk:
        groups = 1
    gsz = nb // groups
    def act(value):      # the epilogue's activation, the one the CHW kernels apply (chw_rows.clipped)
        return value if clip is None else clipped(value, clip, 0)

    def act2(value):     # the clip after the residual add
        return value if clip2 is None else clipped(value, clip2, 0)

    @T.macro
    def finish(value, res, out, co, px, with_res):
        if with_res:
            out[co, px] = act2(act(value) + res[co, px])
        else:
            out[co, px] = act2(act(value))

    @T.macro
    def finish_vector(acc, k, a0, res, out, co, p0, n):
        # out[co, p0 : p0 + n] = the epilogue of acc[k, a0 : a0 + n]
        if residual and res_channels is not None:
            if co < res_channels:
                for p in T.vectorized(n):
                    finish(acc[k, a0 + p], res, out, co, p0 + p, True)
            else:
                for p in T.vectorized(n):
                    finish(acc[k, a0 + p], res, out, co, p0 + p, False)
        else:
            for p in T.vectorized(n):
                finish(acc[k, a0 + p], res, out, co, p0 + p, residual)

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
    def store(acc, res, out, b, p0, nv, ns, last):
        # the tile to out: through the epilogue (last) or as partial sums
        for k in T.unroll(block):
            if nv > 0:
                for v in T.unroll(nv):
                    if last:
                        finish_vector(acc, k, v * lanes, res, out, b * block + k, p0 + v * lanes, lanes)
                    else:
                        for p in T.vectorized(lanes):
                            out[b * block + k, p0 + v * lanes + p] = acc[k, v * lanes + p]
            if ns > 0:
                if last:
                    finish_vector(acc, k, nv * lanes, res, out, b * block + k, p0 + nv * lanes, ns)
                else:
                    for p in T.vectorized(ns):
                        out[b * block + k, p0 + nv * lanes + p] = acc[k, nv * lanes + p]

    def start(bias, out, co, px, q):
        # an accumulator's start: the bias, or (chunked, past the first chunk) the partial sum left in out
        return bias[co] if chunks == 1 else T.if_then_else(q == 0, bias[co], out[co, px])

    @T.macro
    def task(x, rp, col, val, bias, sc, res, out, b, q, p0, nv, ns):
        # output channels b*block .. +block; pixels p0 .. p0 + nv*lanes (whole vectors) + ns (< lanes); input
        # channel chunk q (0 unchunked), which ends with the epilogue (the last chunk) or leaves partial sums in out
        # NOTE: nv and ns are Python ints: the `if`s below are decided when the kernel is built
        acc = T.alloc_buffer((block, nv * lanes + ns), "float32", scope="global")
        for k in T.unroll(block):
            if nv > 0:
                for v in T.unroll(nv):
                    for p in T.vectorized(lanes):
                        acc[k, v * lanes + p] = start(bias, out, b * block + k, p0 + v * lanes + p, q)
            if ns > 0:
                for p in T.vectorized(ns):
                    acc[k, nv * lanes + p] = start(bias, out, b * block + k, p0 + nv * lanes + p, q)
        for j in T.serial(rp[q * nb + b], rp[q * nb + b + 1]):
            c = T.Cast("int32", col[j])     # NOTE: one widening load per block, read by every FMA below
            for k in T.unroll(block):
                if scale:
                    fma(acc, x, val[j, k] * sc[0, c, 0, 0], c, k, p0, nv, ns)
                else:
                    fma(acc, x, val[j, k], c, k, p0, nv, ns)
        if chunks == 1:
            store(acc, res, out, b, p0, nv, ns, True)
        elif q == chunks - 1:
            store(acc, res, out, b, p0, nv, ns, True)
        else:
            store(acc, res, out, b, p0, nv, ns, False)

    @T.macro
    def tile(x, rp, col, val, bias, sc, res, out, g, p0, nv, ns):
        # the output blocks of group g on one pixel tile, chunk after chunk
        for q in T.serial(chunks):
            for r in T.serial(gsz):
                task(x, rp, col, val, bias, sc, res, out, g * gsz + r, q, p0, nv, ns)

    assert len(runs) < 3 or runs[2][1] == 1, runs            # a third run is the one tile with a partial vector
    (p_a, n_a, nv_a, ns_a), (p_b, n_b, nv_b, ns_b), (p_c, _, nv_c, ns_c) = (runs * 3)[:3]

    @T.macro
    def body(x, rp, col, val, bias, sc, res, out):
        # NOTE: pixel tile outer, output blocks inner: one tile of x stays in cache for every block. The tiles
        # come in 1-3 runs of equal tiles, a branch each (how many is known here: no code for absent runs)
        for i in T.parallel(groups * ntiles):
            if len(runs) == 1:
                tile(x, rp, col, val, bias, sc, res, out, i % groups, p_a + i // groups * (nv_a * lanes), nv_a, ns_a)
            elif len(runs) == 2:
                if i // groups < n_a:
                    tile(x, rp, col, val, bias, sc, res, out, i % groups, p_a + i // groups * (nv_a * lanes), nv_a,
                         ns_a)
                else:
                    tile(x, rp, col, val, bias, sc, res, out, i % groups, p_b + (i // groups - n_a) * (nv_b * lanes),
                         nv_b, ns_b)
            else:
                if i // groups < n_a:
                    tile(x, rp, col, val, bias, sc, res, out, i % groups, p_a + i // groups * (nv_a * lanes), nv_a,
                         ns_a)
                elif i // groups < n_a + n_b:
                    tile(x, rp, col, val, bias, sc, res, out, i % groups, p_b + (i // groups - n_a) * (nv_b * lanes),
                         nv_b, ns_b)
                else:
                    tile(x, rp, col, val, bias, sc, res, out, i % groups, p_c, nv_c, ns_c)

    x_t, rp_t = T.Buffer(x_shape, "float32"), T.Buffer((chunks * nb + 1,), "int32")
    col_t, val_t = T.Buffer((nnzb,), col_dtype), T.Buffer((nnzb, block), "float32")
    vec_t, sc_t = T.Buffer((cout,), "float32"), T.Buffer((1, cin, 1, 1), "float32")
    res_c = res_channels or cout
    o_shape, r_shape = planes_shape(cout, h, w, out_plane), planes_shape(res_c, h, w, res_plane)
    @T.macro
    def main(x4, rp, col, val, bias, sc, r4, o4):
        T.func_attr({"tirx.noalias": True})
        x = T.decl_buffer((cin, x_row), "float32", data=x4.data)
        res = T.decl_buffer((res_c, res_plane or pixels), "float32", data=r4.data)
        out = T.decl_buffer((cout, out_plane or pixels), "float32", data=o4.data)
        body(x, rp, col, val, bias, sc, res, out)

    # NOTE: one signature per optional input (scale, residual); an absent one is never read
    if residual and scale:
        @T.prim_func
        def func(x4: x_t, rp: rp_t, col: col_t, val: val_t, bias: vec_t, sc: sc_t,
                 r4: T.Buffer(r_shape, "float32"), o4: T.Buffer(o_shape, "float32")):
            main(x4, rp, col, val, bias, sc, r4, o4)
    elif residual:
        @T.prim_func
        def func(x4: x_t, rp: rp_t, col: col_t, val: val_t, bias: vec_t,
                 r4: T.Buffer(r_shape, "float32"), o4: T.Buffer(o_shape, "float32")):
            main(x4, rp, col, val, bias, bias, r4, o4)
    elif scale:
        @T.prim_func
        def func(x4: x_t, rp: rp_t, col: col_t, val: val_t, bias: vec_t, sc: sc_t, o4: T.Buffer(o_shape, "float32")):
            main(x4, rp, col, val, bias, sc, o4, o4)
    else:
        @T.prim_func
        def func(x4: x_t, rp: rp_t, col: col_t, val: val_t, bias: vec_t, o4: T.Buffer(o_shape, "float32")):
            main(x4, rp, col, val, bias, bias, o4, o4)

    name = name or kernel_name(pixel_tile, block, k_chunk, tile_tasks)
    func = func.with_attr("global_symbol", name).with_attr(SCHEDULED_ATTR, 1)
    if clip is None:
        return func
    return func.with_attr(CLIP_ATTR, clip if clip in NAMED_CLIPS else [float(clip[0]), float(clip[1])])


def kernel_clip(func) -> list | str | None:
    """The epilogue clip a spmm kernel was built with: [lo, hi], HSWISH, SILU or None."""
    if CLIP_ATTR not in func.attrs:
        return None
    v = func.attrs[CLIP_ATTR]
    return str(v) if str(v) in NAMED_CLIPS else [float(x) for x in v]
