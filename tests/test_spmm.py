"""The sparse CHW 1x1 kernel and the CHW depthwise kernel against numpy, on sweeps around their tiles."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess

import numpy as np
import pytest
import tvm

import compiler.artifact  # noqa: F401  (registers the "shrinkc" TIR pipeline: tiles stay on the stack)
import targets
from schedules.chw_rows import HSWISH, RowConv, aligned_plane, pixel_runs
from schedules.f32_conv2d_dwconv2d_chw import conv2d_dwconv2d_chw
from schedules.f32_dwconv2d_chw import dwconv2d_chw
from schedules.f32_spmm_chw import block_fill, chunked_pixel_tile, decode_bsr, default_k_chunk, default_pixel_tile, \
    default_tile_tasks, encode_bsr, spmm_chw
from schedules.f32_spmm_dwconv2d_chw import spmm_dwconv2d_chw, split_input

SPEC = targets.x86_host()


def _run(func, arrays, out_shape):
    ex = tvm.compile(tvm.IRModule({"main": func}), target=SPEC.tvm_target(), tir_pipeline="shrinkc")
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)]
    ex[str(func.attrs["global_symbol"])](*args)
    return args[-1].numpy()


def _weights(rng, cout, cin, sparsity, block):
    w = rng.standard_normal((cout, cin)).astype(np.float32)
    keep = rng.random((cout // block, cin)) >= sparsity
    return w * np.repeat(keep, block, axis=0)


@pytest.mark.parametrize("pixels_hw", [(1, 5), (2, 8), (4, 8), (5, 7), (7, 7), (9, 9)])   # below/at/above tile 32
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_spmm_matches_numpy(pixels_hw, sparsity, block):
    rng = np.random.default_rng(hash((pixels_hw, sparsity, block)) % 2**32)
    h, w = pixels_hw
    cin, cout = 13, 8 * 3        # odd input channels
    wt = _weights(rng, cout, cin, sparsity, block)
    wt[:block] = 0               # an empty output-channel block
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    rp, col, val = encode_bsr(wt, block)
    out = _run(spmm_chw(cin, cout, h, w, block, len(col), pixel_tile=32, lanes=SPEC.vector_lanes,
                        col_dtype=str(col.dtype)),
               [x, rp, col, val, bias], (1, cout, h, w))
    ref = (wt @ x.reshape(cin, -1) + bias[:, None]).reshape(1, cout, h, w)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile,col_dtype", [(16, "int16"), (64, "int32")])
def test_spmm_epilogue_clip_and_residual(tile, col_dtype):
    rng = np.random.default_rng(1)
    cin, cout, h, w = 24, 20, 6, 11
    wt = _weights(rng, cout, cin, 0.8, 2)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    res = rng.standard_normal((1, cout, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    rp, col, val = encode_bsr(wt, 2)
    col = col.astype(col_dtype)               # int16 where the input channels fit; the kernel reads either
    func = spmm_chw(cin, cout, h, w, 2, len(col), clip=(0.0, 6.0), residual=True, pixel_tile=tile,
                    lanes=SPEC.vector_lanes, col_dtype=col_dtype)
    out = _run(func, [x, rp, col, val, bias, res], (1, cout, h, w))
    ref = np.clip(wt @ x.reshape(cin, -1) + bias[:, None], 0, 6).reshape(1, cout, h, w) + res
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block,tile,hw", [(1, 256, (28, 28)), (1, 256, (9, 30)), (2, 128, (17, 19)), (4, 64, (5, 40))])
def test_spmm_wide_tiles(block, tile, hw):
    """Tiles of 16 accumulator vectors (block x pixel vectors), as default_pixel_tile gives project convs on
    large planes where the target sets spmm_accumulators: planes of several such tiles, and ones that end in a
    partial vector."""
    rng = np.random.default_rng(block)
    (h, w), cin, cout = hw, 40, 8 * block
    wt = _weights(rng, cout, cin, 0.85, block)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    res = rng.standard_normal((1, cout, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    rp, col, val = encode_bsr(wt, block)
    func = spmm_chw(cin, cout, h, w, block, len(col), clip=(0.0, 6.0), residual=True, pixel_tile=tile, lanes=16,
                    col_dtype=str(col.dtype))
    out = _run(func, [x, rp, col, val, bias, res], (1, cout, h, w))
    ref = np.clip(wt @ x.reshape(cin, -1) + bias[:, None], 0, 6).reshape(1, cout, h, w) + res
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_default_pixel_tile_follows_the_accumulator_budget():
    """With spmm_accumulators = 16: block x vectors = 16 for project convs (cin >= cout) on planes of at least
    two such tiles; expand convs, smaller planes and targets without it: a third of the registers as before."""
    wide = dataclasses.replace(SPEC, isa="avx512", vector_lanes=16, vector_registers=32,
                               kernel_defaults={**SPEC.kernel_defaults, "spmm_accumulators": 16})
    assert [default_pixel_tile(56 * 56, b, wide, 144, 24) for b in (1, 2, 4, 8)] == [256, 128, 64, 32]
    assert [default_pixel_tile(56 * 56, b, wide, 24, 144) for b in (1, 2, 4, 8)] == [128, 64, 32, 16]
    assert [default_pixel_tile(14 * 14, b, wide, 384, 64) for b in (1, 2, 4)] == [128, 64, 64]
    assert default_pixel_tile(7 * 7, 1, wide, 960, 160) == 64
    plain = dataclasses.replace(wide, kernel_defaults={k: v for k, v in wide.kernel_defaults.items()
                                                       if k != "spmm_accumulators"})
    assert [default_pixel_tile(56 * 56, b, plain, 144, 24) for b in (1, 2, 4)] == [128, 64, 32]


def test_bsr_encoding_and_fill():
    w = np.zeros((8, 5), np.float32)
    w[0:4, 1] = 1.0              # one full 4x1 block
    w[4, 3] = 2.0                # one block a quarter full
    rp, col, val = encode_bsr(w, 4)
    assert rp.tolist() == [0, 1, 2] and col.tolist() == [1, 3] and col.dtype == np.int16
    assert val.tolist() == [[1, 1, 1, 1], [2, 0, 0, 0]]
    assert block_fill(w, 4) == pytest.approx(5 / 8) and block_fill(w, 1) == 1.0
    assert encode_bsr(np.zeros((4, 3), np.float32), 2)[0].tolist() == [0, 0, 0]


def _dw_ref(x, w, b, s, p, clip):
    _, c, h, wd = x.shape
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
    oh, ow = (h + p[0] + p[2] - k) // s + 1, (wd + p[1] + p[3] - k) // s + 1
    out = np.zeros((1, c, oh, ow), np.float32)
    for i in range(k):
        for j in range(k):
            out += xp[:, :, i:i + s * oh:s, j:j + s * ow:s][:, :, :oh, :ow] * w[None, :, 0, i, j, None, None]
    out += b[None, :, None, None]
    return np.clip(out, *clip) if clip else out


@pytest.mark.parametrize("c,h,w,k,s", [(8, 7, 7, 3, 1), (5, 9, 20, 3, 2), (3, 17, 33, 5, 1), (4, 6, 5, 5, 2),
                                       (2, 3, 40, 3, 1), (3, 9, 56, 3, 1), (2, 6, 28, 5, 1), (2, 4, 3, 5, 1),
                                       (2, 5, 64, 5, 1), (4, 6, 5, 3, 1), (3, 2, 7, 3, 1), (2, 9, 3, 3, 1)])
@pytest.mark.parametrize("clip", [None, (0.0, 6.0)])
def test_dwconv_chw_matches_numpy(c, h, w, k, s, clip):
    rng = np.random.default_rng(c * h + w)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    pads = [k // 2] * 4
    ref = _dw_ref(x, wt, b, s, pads, clip)
    out = _run(dwconv2d_chw(c, h, w, k, s, pads, clip=clip, lanes=SPEC.vector_lanes), [x, wt, b], ref.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_zero_taps_on_stride1_rows_that_end_in_a_partial_vector():
    """The rule (the padding lanes of a tap are zeros, no masked FMA): stride 1, a row that is not whole vectors.
    test_dwconv_chw_matches_numpy and test_dwconv_chw_stays_inside_its_buffers run both kinds against numpy."""
    assert all(RowConv(8, w, 3, 1, [1] * 4).zero_taps for w in (14, 28, 56, 33))
    assert RowConv(8, 28, 5, 1, [2] * 4).zero_taps
    assert not RowConv(8, 112, 3, 1, [1] * 4).zero_taps and not RowConv(8, 64, 5, 1, [2] * 4).zero_taps
    assert not RowConv(8, 28, 3, 2, [1] * 4).zero_taps                 # stride 2 keeps its masked taps


@pytest.mark.parametrize("lanes,h,w", [(16, 7, 7), (16, 8, 3), (8, 5, 3), (4, 4, 1)])
def test_dwconv_chw_two_rows_per_vector(lanes, h, w):
    """Rows narrower than half a vector go two to a vector (RowConv.paired_planes, named `p2`), for every
    vector width: equal to numpy, and to the kernel that takes the rows one at a time."""
    rng = np.random.default_rng(lanes + w)
    c = 3
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    ref = _dw_ref(x, wt, b, 1, [1] * 4, (0.0, 6.0))
    func = dwconv2d_chw(c, h, w, 3, 1, [1] * 4, clip=(0.0, 6.0), lanes=lanes)
    assert str(func.attrs["global_symbol"]).endswith(f"_{lanes}p2")
    np.testing.assert_allclose(_run(func, [x, wt, b], ref.shape), ref, rtol=1e-5, atol=1e-5)


def test_paired_rows_leave_no_row_knob_to_tune():
    """Where rows go two to a vector there are no row steps: the tuning space times one rows setting."""
    from schedules import handwritten
    from schedules.chw_rows import ROWS
    args = {"c": 8, "h": 7, "w": 7, "k": 3, "stride": 1, "pads": [1, 1, 1, 1], "clip": None, "lanes": 16,
            "out_plane": None}
    assert {k["rows"] for k in handwritten.BUILDERS["dwconv2d_chw"].space(args, SPEC)} == {ROWS}
    wide = {**args, "h": 14, "w": 14}
    assert {k["rows"] for k in handwritten.BUILDERS["dwconv2d_chw"].space(wide, SPEC)} == {1, 2, 3, 4}


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-objdump") is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="aarch64 binutils/g++ not installed (apt-get install g++-aarch64-linux-gnu)")
def test_spmm_is_neon_fma_on_rpi4(tmp_path):
    """The sparse kernel's inner loop is NEON vector FMA (fmla on .4s lanes) when built for rpi4."""
    spec = targets.resolve("rpi4")
    func = spmm_chw(32, 16, 8, 8, 1, 64, pixel_tile=16, lanes=spec.vector_lanes)
    with spec.tvm_target():
        ex = tvm.compile(tvm.IRModule({"main": func}), target=spec.tvm_target(), tir_pipeline="shrinkc")
    so = str(tmp_path / "spmm.so")
    ex.export_library(so, fcompile=compiler.artifact._fcompile(spec))
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", so], capture_output=True, text=True, check=True).stdout
    body = [blk for blk in dis.split("\n\n") if "f32_spmm_chw" in blk.split("\n", 1)[0]]
    assert body and sum(blk.count("fmla\tv") for blk in body) >= 4 and ".4s" in "".join(body)


@pytest.mark.skipif(SPEC.isa == "sse", reason="checks the x86-64 AVX code")
def test_spmm_reads_int16_columns_with_one_widening_load():
    """int16 column indices cost no extra work: each is one sign-extending 16-bit load, and the kernel has
    as many FMAs and no more instructions than with int32 columns."""
    def asm(col_dtype):
        func = spmm_chw(96, 64, 14, 14, 1, 800, pixel_tile=64, lanes=SPEC.vector_lanes, col_dtype=col_dtype)
        ex = tvm.compile(tvm.IRModule({"main": func}), target=SPEC.tvm_target(), tir_pipeline="shrinkc")
        text = (ex.mod.imports[0] if ex.mod.imports else ex.mod).inspect_source("asm")
        return [ln for ln in text.splitlines() if ln.startswith("\t") and not ln.startswith("\t.")]
    short, wide = asm("int16"), asm("int32")
    assert any(ln.startswith("\tmovsw") for ln in short)
    assert sum("vfmadd" in ln for ln in short) == sum("vfmadd" in ln for ln in wide)
    assert len(short) <= len(wide)


@pytest.mark.parametrize("h,w,k,pads", [(9, 112, 3, (1, 1, 1, 1)), (8, 112, 3, (0, 0, 1, 1)), (5, 70, 3, (1, 1, 1, 1)),
                                        (7, 67, 5, (2, 2, 2, 2)), (6, 64, 5, (1, 1, 2, 2)), (4, 33, 3, (0, 0, 0, 0))])
def test_dwconv_chw_stride2_wide_rows(h, w, k, pads):
    """Stride 2 on rows as wide as MobileNetV2's (112) and odd widths, with symmetric, TF-'same' and
    no padding: the even/odd column split of the padded plane must match numpy."""
    rng = np.random.default_rng(w + k)
    c = 3
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    ref = _dw_ref(x, wt, b, 2, list(pads), (0.0, 6.0))
    out = _run(dwconv2d_chw(c, h, w, k, 2, list(pads), clip=(0.0, 6.0), lanes=SPEC.vector_lanes), [x, wt, b], ref.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


class _GuardedArray:
    """A float32 array placed against a page the process may not touch (PROT_NONE), before or after it: a
    kernel that touches memory outside the array faults (after: the array starts 64-byte aligned, so up to
    60 bytes of slack may lie between its end and the guard when its size is not a multiple of 64)."""

    PAGE = 4096

    def __init__(self, values: np.ndarray, guard: str):
        import ctypes
        import mmap
        nbytes = values.nbytes
        pages = -(-nbytes // self.PAGE) + 2
        self.map = mmap.mmap(-1, pages * self.PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None)
        if guard == "after":
            libc.mprotect(ctypes.c_void_p(base + (pages - 1) * self.PAGE), self.PAGE, 0)
            start = (base + (pages - 1) * self.PAGE - nbytes) // 64 * 64
        else:
            libc.mprotect(ctypes.c_void_p(base), self.PAGE, 0)
            start = base + self.PAGE
        self.array = np.frombuffer((ctypes.c_char * nbytes).from_address(start), np.float32).reshape(values.shape)
        self.array[...] = values


def _run_guarded(func, arrays, guarded: set, out_shape, guard: str):
    """_run with arrays[i] for i in `guarded`, and the output, each against an inaccessible page."""
    ex = tvm.compile(tvm.IRModule({"main": func}), target=SPEC.tvm_target(), tir_pipeline="shrinkc")
    dev = tvm.cpu()
    kept = [_GuardedArray(a, guard) if i in guarded else a for i, a in enumerate(arrays)]
    out = _GuardedArray(np.zeros(out_shape, np.float32), guard)
    ex[str(func.attrs["global_symbol"])](*(tvm.runtime.from_dlpack(a.array) if isinstance(a, _GuardedArray)
                                           else tvm.runtime.tensor(a, dev) for a in kept),
                                         tvm.runtime.from_dlpack(out.array))
    return out.array.copy()      # NOTE: the guarded pages go with `out`


@pytest.mark.parametrize("c,h,w,k,s,pads", [(4, 14, 14, 3, 1, (1, 1, 1, 1)), (4, 14, 14, 3, 2, (0, 0, 1, 1)),
                                            (16, 7, 7, 3, 1, (1, 1, 1, 1)), (4, 16, 16, 5, 2, (2, 2, 2, 2)),
                                            (4, 28, 28, 5, 1, (2, 2, 2, 2)), (2, 56, 56, 3, 2, (1, 1, 1, 1)),
                                            (2, 8, 112, 3, 1, (1, 1, 1, 1)), (2, 6, 56, 3, 1, (1, 1, 1, 1)),
                                            (2, 5, 3, 5, 1, (2, 2, 2, 2)), (3, 4, 6, 3, 1, (1, 1, 1, 1))])
@pytest.mark.parametrize("guard", ["before", "after"])
def test_dwconv_chw_stays_inside_its_buffers(c, h, w, k, s, pads, guard):
    """The row ends are masked loads and stores, never a full vector that reaches past the tensor: with the
    input and the output each flush against an inaccessible page, the kernel runs and matches numpy.
    (A select of zeros around a masked load once let LLVM turn it into a plain load here.)"""
    rng = np.random.default_rng(c * w + k)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    ref = _dw_ref(x, wt, b, s, list(pads), (0.0, 6.0))
    func = dwconv2d_chw(c, h, w, k, s, list(pads), clip=(0.0, 6.0), lanes=SPEC.vector_lanes)
    out = _run_guarded(func, [x, wt, b], {0}, ref.shape, guard)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block,tile,hw,res_channels", [(1, 128, (28, 28), None), (2, 32, (9, 9), None),
                                                       (4, 16, (5, 7), 12), (8, 64, (14, 14), None),
                                                       (1, 16, (2, 8), None)])
def test_spmm_tile_tasks_match_numpy(block, tile, hw, res_channels):
    """tile_tasks (one task per pixel tile, walking every output block): tiles in one, two and three runs (a
    partial vector), an empty output block, ReLU6 and a residual, one with fewer channels than the output."""
    rng = np.random.default_rng(block * tile)
    (h, w), cin, cout = hw, 11, 8 * block
    wt = _weights(rng, cout, cin, 0.85, block)
    wt[:block] = 0
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    res = rng.standard_normal((1, res_channels or cout, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    rp, col, val = encode_bsr(wt, block)
    func = spmm_chw(cin, cout, h, w, block, len(col), clip=(0.0, 6.0), residual=True, pixel_tile=tile,
                    lanes=SPEC.vector_lanes, col_dtype=str(col.dtype), res_channels=res_channels, tile_tasks=True)
    assert str(func.attrs["global_symbol"]).endswith("_bytile")
    out = _run(func, [x, rp, col, val, bias, res], (1, cout, h, w))
    ref = np.clip(wt @ x.reshape(cin, -1) + bias[:, None], 0, 6).reshape(1, cout, h, w)
    ref[:, :res.shape[1]] += res
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_tile_tasks_for_unchunked_expand_convs_of_two_or_more_tiles():
    """default_tile_tasks, on a target that names it: MobileNetV2's expand shapes on 14x14 planes and up, not its
    project convs, not a 7x7 plane (one tile), not a chunked layer; the built-in kernel takes the knob (and its
    name says so). A target that does not name it keeps one task per block, and may tune the knob."""
    from schedules import handwritten
    zen4 = dataclasses.replace(SPEC, vector_lanes=16, vector_registers=32, kernel_defaults={"spmm_tile_tasks": True})
    for cin, cout, pixels in ((16, 96, 12544), (24, 144, 3136), (32, 192, 784), (64, 384, 196), (96, 576, 196)):
        assert default_tile_tasks(cin, cout, pixels, default_pixel_tile(pixels, 1, zen4, cin, cout), zen4)
    for cin, cout, pixels in ((96, 24, 3136), (192, 32, 784), (192, 64, 196), (160, 960, 49), (320, 1280, 49)):
        assert not default_tile_tasks(cin, cout, pixels, default_pixel_tile(pixels, 1, zen4, cin, cout), zen4)
    assert not default_tile_tasks(64, 384, 196, default_pixel_tile(196, 1, zen4, 64, 384), zen4, k_chunk=32)
    args = {"cin": 32, "cout": 192, "h": 28, "w": 28, "block": 1, "nnzb": 900, "clip": [0.0, 6.0],
            "residual": False, "lanes": 16, "col_dtype": "int16", "in_plane": None}
    knobs = handwritten.BUILDERS["spmm_chw"].defaults(args, zen4)
    assert knobs == {"pixel_tile": 128, "tile_tasks": True}
    assert str(handwritten.BUILDERS["spmm_chw"].build(args, knobs).attrs["global_symbol"]) == \
        "f32_spmm_chw_128x1_bytile"
    space = handwritten.BUILDERS["spmm_chw"].space(args, zen4)
    assert knobs in space and {"pixel_tile": 128} in space
    assert "tile_tasks" not in handwritten.BUILDERS["spmm_chw"].defaults({**args, "cin": 192, "cout": 32}, zen4)
    other = dataclasses.replace(zen4, kernel_defaults={})
    assert not default_tile_tasks(32, 192, 784, 128, other)
    assert handwritten.BUILDERS["spmm_chw"].defaults(args, other) == {"pixel_tile": 128}
    assert knobs in handwritten.BUILDERS["spmm_chw"].space(args, other)


@pytest.mark.parametrize("hw,tile", [((7, 7), 16), ((14, 14), 64), ((5, 7), 32), ((28, 28), 64)])
@pytest.mark.parametrize("guard", ["before", "after"])
@pytest.mark.parametrize("tile_tasks", [False, True])
def test_spmm_stays_inside_its_buffers(hw, tile, guard, tile_tasks):
    """The sparse kernel's pixel tails, with the input, residual and output each against an inaccessible page."""
    rng = np.random.default_rng(hw[0] * tile)
    cin, cout, block = 24, 16, 2
    h, w = hw
    wt = _weights(rng, cout, cin, 0.7, block)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    res = rng.standard_normal((1, cout, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    rp, col, val = encode_bsr(wt, block)
    func = spmm_chw(cin, cout, h, w, block, len(col), clip=(0.0, 6.0), residual=True, pixel_tile=tile,
                    lanes=SPEC.vector_lanes, col_dtype=str(col.dtype), tile_tasks=tile_tasks)
    out = _run_guarded(func, [x, rp, col, val, bias, res], {0, 5}, (1, cout, h, w), guard)
    ref = np.clip(wt @ x.reshape(cin, -1) + bias[:, None], 0, 6).reshape(1, cout, h, w) + res
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pixels,max_vectors", [(49, 4), (196, 8), (784, 8), (3136, 8), (4, 8), (16, 1), (17, 1),
                                                (200, 4), (208, 8), (12544, 8)])
def test_pixel_runs_cover_the_plane_in_even_tiles(pixels, max_vectors):
    """Tiles in order cover every pixel once, each at most max_vectors vectors, their vector counts (a partial
    vector counted) within one of each other, in as few tiles as can hold the plane; a partial vector ends the plane."""
    lanes = 16
    runs = pixel_runs(pixels, max_vectors, lanes)
    tiles = [(p0 + i * nv * lanes, nv, ns) for p0, count, nv, ns in runs for i in range(count)]
    start, shares = 0, []
    for p0, nv, ns in tiles:
        assert p0 == start and nv * lanes + ns > 0
        start += nv * lanes + ns
        shares.append(nv + (ns > 0))
    assert start == pixels and max(shares) <= max_vectors and max(shares) - min(shares) <= 1
    assert len(tiles) == -(-(-(-pixels // lanes)) // max_vectors)
    assert all(ns == 0 for _, _, ns in tiles[:-1]) and tiles[-1][2] == pixels % lanes


@pytest.mark.parametrize("block,chunk", [(1, 16), (2, 32), (4, 40), (8, 64), (1, 200)])
def test_chunked_bsr_encoding_orders_blocks_by_chunk(block, chunk):
    """encode_bsr(w, block, chunk): the blocks of input-channel chunk q and output block b are row_ptr[q*nb + b] ..
    row_ptr[q*nb + b + 1], their columns inside the chunk; decode_bsr gives w back, chunked or not."""
    rng = np.random.default_rng(block * chunk)
    cout, cin = 8 * 3, 150
    wt = _weights(rng, cout, cin, 0.8, block)
    rp, col, val = encode_bsr(wt, block, chunk)
    nb, chunks = cout // block, -(-cin // chunk)
    assert len(rp) == chunks * nb + 1 and rp[-1] == len(col) == encode_bsr(wt, block)[0][-1]
    for q in range(chunks):
        for b in range(nb):
            cols = col[rp[q * nb + b]:rp[q * nb + b + 1]]
            assert list(cols) == sorted(cols) and all(q * chunk <= c < (q + 1) * chunk for c in cols)
    np.testing.assert_array_equal(decode_bsr(rp, col, val, cout, cin), wt)
    np.testing.assert_array_equal(decode_bsr(*encode_bsr(wt, block), cout, cin), wt)


@pytest.mark.parametrize("h,w,tile,block,chunk,residual,scale", [
    (7, 7, 64, 1, 32, False, False), (7, 7, 64, 2, 48, True, False), (5, 9, 16, 4, 40, True, True),
    (14, 14, 128, 8, 16, False, True), (3, 3, 16, 1, 160, True, False)])
def test_chunked_spmm_matches_numpy(h, w, tile, block, chunk, residual, scale):
    """Walking the input channels in chunks (partial sums kept in `out`, the epilogue after the last chunk) computes
    the unchunked kernel's result: several tiles and a partial vector, every block, residual and gate, a chunk
    larger than the input channels (one chunk) and a last chunk shorter than the others."""
    rng = np.random.default_rng(h * tile + chunk)
    cin, cout = 150, 8 * 4
    wt = _weights(rng, cout, cin, 0.8, block)
    wt[:block] = 0                                   # an empty output block
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    gate = rng.random((1, cin, 1, 1)).astype(np.float32)
    res = rng.standard_normal((1, cout, h, w)).astype(np.float32)
    rp, col, val = encode_bsr(wt, block, chunk)
    func = spmm_chw(cin, cout, h, w, block, len(col), clip=(0.0, 6.0), residual=residual, scale=scale,
                    pixel_tile=tile, lanes=SPEC.vector_lanes, col_dtype=str(col.dtype), k_chunk=chunk)
    out = _run(func, [x, rp, col, val, bias] + ([gate] if scale else []) + ([res] if residual else []),
               (1, cout, h, w))
    xs = x * gate if scale else x
    ref = np.clip(wt @ xs.reshape(cin, -1) + bias[:, None], 0, 6).reshape(1, cout, h, w) + (res if residual else 0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guard", ["before", "after"])
def test_chunked_spmm_stays_inside_its_buffers(guard):
    rng = np.random.default_rng(7)
    cin, cout, h, w, block = 96, 16, 7, 7, 2
    wt = _weights(rng, cout, cin, 0.7, block)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    res = rng.standard_normal((1, cout, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    rp, col, val = encode_bsr(wt, block, 32)
    func = spmm_chw(cin, cout, h, w, block, len(col), clip=(0.0, 6.0), residual=True, pixel_tile=64,
                    lanes=SPEC.vector_lanes, col_dtype=str(col.dtype), k_chunk=32)
    out = _run_guarded(func, [x, rp, col, val, bias, res], {0, 5}, (1, cout, h, w), guard)
    ref = np.clip(wt @ x.reshape(cin, -1) + bias[:, None], 0, 6).reshape(1, cout, h, w) + res
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_k_chunk_only_where_the_target_names_an_l1_share():
    """Chunked: one-tile layers (7x7) with many input channels and small partial sums, on a target that names
    `spmm_chunk_bytes`; never on one that does not, nor for layers of several tiles or large partial sums."""
    zen5 = dataclasses.replace(SPEC, vector_lanes=16, kernel_defaults={"spmm_chunk_bytes": 32768})
    assert default_k_chunk(960, 320, 49, 1, zen5) == 128          # 32 KiB / (64 floats x 4 bytes)
    assert default_k_chunk(576, 160, 49, 2, zen5) == 128
    assert default_k_chunk(320, 1280, 49, 1, zen5) is None        # partial sums 320 KiB
    assert default_k_chunk(160, 960, 49, 1, zen5) is None         # one chunk and a bit
    assert default_k_chunk(576, 96, 196, 1, zen5) is None         # two pixel tiles
    plain = dataclasses.replace(SPEC, vector_lanes=16, kernel_defaults={})
    assert default_k_chunk(960, 320, 49, 1, plain) is None
    two = dataclasses.replace(SPEC, vector_lanes=16, kernel_defaults={"spmm_chunk_bytes": 49152,
                                                                      "spmm_chunk_tiles": 2})
    assert default_k_chunk(960, 320, 49, 1, two) == 192           # 48 KiB / (64 floats x 4 bytes)
    assert default_k_chunk(576, 96, 196, 1, two) == 104           # two tiles of 7 and 5 + a part vectors: 448 B
    assert default_k_chunk(192, 64, 196, 1, two) is None          # one chunk and a bit
    assert default_k_chunk(192, 32, 784, 1, two) is None          # seven pixel tiles
    zen4 = dataclasses.replace(SPEC, vector_lanes=16, kernel_defaults={
        "spmm_chunk_bytes": 49152, "spmm_chunk_tiles": 4, "spmm_chunk_pixels": 64})
    assert default_k_chunk(576, 96, 196, 1, zen4) == 192          # four 64-pixel tiles: 256 B
    assert default_k_chunk(960, 320, 49, 1, zen4) == 192
    assert default_k_chunk(192, 64, 196, 1, zen4) is None
    assert default_k_chunk(192, 32, 784, 1, zen4) is None         # 13 tiles of 64
    assert default_k_chunk(320, 1280, 49, 1, zen4) is None        # partial sums 320 KiB > 4 x 48 KiB
    zen4_sums = dataclasses.replace(zen4, kernel_defaults={**zen4.kernel_defaults, "spmm_chunk_sums": 8})
    assert default_k_chunk(320, 1280, 49, 1, zen4_sums) == 160    # one tile: two halves, not 192 + 128
    assert default_k_chunk(200, 64, 49, 1, zen4_sums) == 104      # halves rounded up to 8
    assert default_k_chunk(960, 320, 49, 1, zen4_sums) == 192     # five whole chunks, as before
    assert default_k_chunk(320, 64, 196, 1, zen4_sums) is None    # four tiles: no halves, and not two whole chunks
    assert default_k_chunk(160, 960, 49, 1, zen4_sums) is None    # within one chunk
    assert chunked_pixel_tile(196, 1, zen4, 576, 96) == 64 and chunked_pixel_tile(9, 1, zen4, 576, 96) == 16
    assert chunked_pixel_tile(196, 1, two, 576, 96) == default_pixel_tile(196, 1, two, 576, 96)


def _expand_dw_case(rng, cin, c, h, w, k, block, sparsity=0.8):
    wt1 = _weights(rng, c, cin, sparsity, block)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    b1 = rng.standard_normal(c).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b2 = rng.standard_normal(c).astype(np.float32)
    return wt1, x, b1, wt, b2


@pytest.mark.parametrize("cin,c,h,w,k,s,block,pads,clip1", [
    (16, 96, 20, 20, 3, 2, 1, (1, 1, 1, 1), (0.0, 6.0)), (24, 48, 14, 14, 3, 1, 2, (1, 1, 1, 1), (0.0, 6.0)),
    (8, 12, 7, 9, 5, 2, 4, (0, 0, 2, 2), None), (5, 6, 3, 37, 3, 1, 1, (1, 1, 1, 1), (0.0, 6.0)),
    (7, 16, 11, 5, 5, 1, 8, (2, 2, 2, 2), None), (3, 4, 2, 2, 3, 2, 2, (1, 1, 1, 1), (0.0, 6.0))])
def test_spmm_dwconv_matches_the_two_kernels_composed(cin, c, h, w, k, s, block, pads, clip1):
    """Expand (sparse 1x1, bias, clip) fused with the depthwise conv over its output equals numpy's 1x1 then
    depthwise: pixel counts below, at and above the tile, every block shape, strides 1/2, k 3/5, odd widths."""
    _check_spmm_dwconv(cin, c, h, w, k, s, block, pads, clip1)


@pytest.mark.parametrize("cin,c,h,w,k,s,block,rows,group", [
    (16, 96, 20, 20, 3, 2, 1, 3, 4), (24, 48, 14, 14, 3, 1, 2, 1, 8), (7, 16, 11, 5, 5, 1, 8, 4, 2),
    (10, 64, 7, 7, 3, 1, 4, 2, 16)])
def test_spmm_dwconv_knobs_compute_the_same(cin, c, h, w, k, s, block, rows, group):
    """The fused kernel's knobs (schedules/handwritten.py: rows per depthwise step, channel blocks per task)
    change how it runs, never what it computes; the name says how many channels a task takes."""
    func = _check_spmm_dwconv(cin, c, h, w, k, s, block, [k // 2] * 4, (0.0, 6.0), rows=rows, group=group)
    paired = k == 3 and s == 1 and w < SPEC.vector_lanes // 2       # two rows per vector: no row steps
    tile = f"{SPEC.vector_lanes}p2" if paired else f"x{rows}"
    assert str(func.attrs["global_symbol"]).endswith(f"{tile}_c{block * group}")


@pytest.mark.parametrize("cin,c,h,w,k,block,pads,split", [
    (32, 48, 28, 28, 3, 1, (1, 1, 1, 1), None), (8, 16, 12, 30, 5, 2, (2, 2, 2, 2), None),
    (6, 8, 9, 10, 3, 4, (0, 0, 1, 1), True), (16, 32, 56, 56, 3, 1, (1, 1, 1, 1), True),
    (16, 32, 20, 20, 5, 1, (2, 2, 2, 2), True), (5, 16, 4, 2, 3, 8, (1, 1, 1, 1), True)])
def test_stride2_kernels_that_split_their_input_compute_the_same(cin, c, h, w, k, block, pads, split):
    """A stride-2 fused kernel whose input rows are split into even and odd columns first (by the rule where
    an output row is one full vector, or asked to) equals numpy, as the unsplit kernel does: TF-'same' and
    symmetric padding, odd heights, 3x3 and 5x5, every block shape."""
    if split is None:
        assert split_input(w, k, 2, pads, SPEC.vector_lanes) == (SPEC.vector_lanes // 2 < w // 2 <= SPEC.vector_lanes)
    for flag in (split, False):
        _check_spmm_dwconv(cin, c, h, w, k, 2, block, pads, (0.0, 6.0), split=flag)


def test_split_input_only_where_an_output_row_is_one_full_vector():
    """The rule: stride 2, an even width, an output row of more than half and at most one vector."""
    assert split_input(28, 3, 2, [1] * 4, 16) and split_input(32, 5, 2, [2] * 4, 16)
    assert not split_input(56, 3, 2, [1] * 4, 16)          # two vectors a row: no faster split
    assert not split_input(14, 3, 2, [1] * 4, 16)          # 7-wide output rows take 8-lane vectors
    assert not split_input(27, 3, 2, [1] * 4, 16)          # odd width
    assert not split_input(28, 3, 1, [1] * 4, 16)          # stride 1
    assert split_input(14, 3, 2, [1] * 4, 8)               # 8-lane targets: 7 of 8 lanes


@pytest.mark.parametrize("guard", ["before", "after"])
@pytest.mark.parametrize("in_plane", [None, 800])
def test_split_input_stays_inside_its_buffers(guard, in_plane):
    """The split pass reads x's rows (planes padded to in_plane floats or not) up to their last pixel and no
    further; NaN in the padding never reaches the output."""
    _guarded_expand_dw(guard, 6, 16, 28, 28, 2, in_plane, split=True)


def _check_spmm_dwconv(cin, c, h, w, k, s, block, pads, clip1, **knobs):
    rng = np.random.default_rng(c * h + w)
    wt1, x, b1, wt, b2 = _expand_dw_case(rng, cin, c, h, w, k, block)
    wt1[:block] = 0                                        # an expanded channel block with no weights
    rp, col, val = encode_bsr(wt1, block)
    mid = (wt1 @ x.reshape(cin, -1) + b1[:, None]).reshape(1, c, h, w)
    mid = np.clip(mid, *clip1) if clip1 else mid
    ref = _dw_ref(mid, wt, b2, s, list(pads), (0.0, 6.0))
    func = spmm_dwconv2d_chw(cin, c, h, w, block, len(col), k, s, list(pads), clip1=clip1, clip=(0.0, 6.0),
                             lanes=SPEC.vector_lanes, col_dtype=str(col.dtype), **knobs)
    out = _run(func, [x, rp, col, val, b1, wt, b2], ref.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    return func


def _guarded_expand_dw(guard, cin, c, h, w, s, in_plane=None, **knobs):
    """A fused expand + 3x3 depthwise kernel run with x (its planes padded to in_plane floats with NaN, or not)
    and the output each against an inaccessible page; checked against numpy."""
    rng = np.random.default_rng(7 + s)
    wt1, x, b1, wt, b2 = _expand_dw_case(rng, cin, c, h, w, 3, 1)
    rp, col, val = encode_bsr(wt1, 1)
    mid = np.clip(wt1 @ x.reshape(cin, -1) + b1[:, None], 0, 6).reshape(1, c, h, w)
    ref = _dw_ref(mid, wt, b2, s, [1] * 4, (0.0, 6.0))
    if in_plane:
        x = np.concatenate([x.reshape(1, cin, -1), np.full((1, cin, in_plane - h * w), np.nan, np.float32)], axis=2)
    func = spmm_dwconv2d_chw(cin, c, h, w, 1, len(col), 3, s, [1] * 4, clip1=(0.0, 6.0), clip=(0.0, 6.0),
                             lanes=SPEC.vector_lanes, col_dtype=str(col.dtype), in_plane=in_plane, **knobs)
    out = _run_guarded(func, [x, rp, col, val, b1, wt, b2], {0}, ref.shape, guard)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guard", ["before", "after"])
def test_spmm_dwconv_stays_inside_its_buffers(guard):
    _guarded_expand_dw(guard, 24, 32, 14, 14, 1)


def _stem_dw_case(seed: int, c: int, h: int, w: int):
    """([x, w1, bias1, w, bias2], reference) for a 3-channel 3x3 stride-2 first conv (TF-'same' padding, ReLU6)
    into a 3x3 stride-1 depthwise conv (ReLU6), c channels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 3, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    w2 = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    b2 = rng.standard_normal(c).astype(np.float32)
    first = np.clip(_conv_ref(x, wt, b, 2, (0, 0, 1, 1)), 0, 6).astype(np.float32)
    return [x, wt, b, w2, b2], _dw_ref(first, w2, b2, 1, [1] * 4, (0.0, 6.0))


@pytest.mark.parametrize("guard", ["before", "after"])
def test_first_conv_dwconv_stays_inside_its_buffers(guard):
    """The fused first conv + depthwise kernel with the model's input and its output each against an
    inaccessible page (TF-'same' padding of the first conv, 2 x 112 input columns, odd rows)."""
    arrays, ref = _stem_dw_case(11, 8, 9, 224)
    func = conv2d_dwconv2d_chw(3, 8, 9, 224, 3, 2, [0, 0, 1, 1], 3, 1, [1] * 4, clip1=(0.0, 6.0), clip=(0.0, 6.0),
                               lanes=SPEC.vector_lanes, out_block=4, rows=4)
    out = _run_guarded(func, arrays, {0}, ref.shape, guard)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_first_conv_dwconv_writes_padded_planes():
    """With out_plane (its reader a sparse 1x1) the fused first conv + depthwise kernel writes each 5 x 15
    plane into 80 floats: pixels 0-74 the result, 75-79 untouched (their NaN fill stays)."""
    c = 8
    arrays, ref = _stem_dw_case(12, c, 11, 30)
    ref = ref.reshape(1, c, 75)
    plane = aligned_plane(75, SPEC.vector_lanes)
    func = conv2d_dwconv2d_chw(3, c, 11, 30, 3, 2, [0, 0, 1, 1], 3, 1, [1] * 4, clip1=(0.0, 6.0), clip=(0.0, 6.0),
                               lanes=SPEC.vector_lanes, out_plane=plane)
    ex = tvm.compile(tvm.IRModule({"main": func}), target=SPEC.tvm_target(), tir_pipeline="shrinkc")
    out = tvm.runtime.tensor(np.full((1, c, plane), np.nan, np.float32))
    ex[str(func.attrs["global_symbol"])](*(tvm.runtime.tensor(a) for a in arrays), out)
    got = out.numpy()
    np.testing.assert_allclose(got[:, :, :75], ref, rtol=1e-5, atol=1e-5)
    assert plane > 75 and np.isnan(got[:, :, 75:]).all()


@pytest.mark.parametrize("h,w,s", [(14, 14, 1), (7, 7, 1), (28, 28, 2), (5, 7, 1)])
def test_padded_planes_from_depthwise_to_spmm(h, w, s):
    """A depthwise kernel (plain and fused with its expand) writing planes padded to whole vectors
    (out_plane) and a sparse 1x1 reading them (in_plane): the pixels past each plane's end are never
    written (they keep the output's NaN fill) and never read (NaN there would reach the result)."""
    rng = np.random.default_rng(h * w + s)
    cin, c, cout, lanes = 8, 32, 24, SPEC.vector_lanes
    wt1, x, b1, wt, b2 = _expand_dw_case(rng, cin, c, h, w, 3, 2)
    rp1, col1, val1 = encode_bsr(wt1, 2)
    mid = np.clip(wt1 @ x.reshape(cin, -1) + b1[:, None], 0, 6).reshape(1, c, h, w)
    dw_ref = _dw_ref(mid, wt, b2, s, [1] * 4, (0.0, 6.0))
    oh, ow = dw_ref.shape[2:]
    plane = aligned_plane(oh * ow, lanes)
    assert plane is not None and plane % lanes == 0 and oh * ow < plane < oh * ow + lanes

    def run_filled(func, arrays, shape):
        ex = tvm.compile(tvm.IRModule({"main": func}), target=SPEC.tvm_target(), tir_pipeline="shrinkc")
        out = tvm.runtime.tensor(np.full(shape, np.nan, np.float32), tvm.cpu())
        ex[str(func.attrs["global_symbol"])](*[tvm.runtime.tensor(a, tvm.cpu()) for a in arrays], out)
        return out.numpy()

    fused = run_filled(spmm_dwconv2d_chw(cin, c, h, w, 2, len(col1), 3, s, [1] * 4, clip1=(0.0, 6.0),
                                         clip=(0.0, 6.0), lanes=lanes, col_dtype=str(col1.dtype), out_plane=plane),
                       [x, rp1, col1, val1, b1, wt, b2], (1, c, plane))
    plain = run_filled(dwconv2d_chw(c, h, w, 3, s, [1] * 4, clip=(0.0, 6.0), lanes=lanes, out_plane=plane),
                       [mid, wt, b2], (1, c, plane))
    for got in (fused, plain):
        np.testing.assert_allclose(got[:, :, :oh * ow].reshape(dw_ref.shape), dw_ref, rtol=1e-5, atol=1e-5)
        assert np.isnan(got[:, :, oh * ow:]).all()
    wt2 = _weights(rng, cout, c, 0.8, 1)
    rp2, col2, val2 = encode_bsr(wt2, 1)
    bias = rng.standard_normal(cout).astype(np.float32)
    out = _run(spmm_chw(c, cout, oh, ow, 1, len(col2), pixel_tile=64, lanes=lanes, col_dtype=str(col2.dtype),
                        in_plane=plane), [plain, rp2, col2, val2, bias], (1, cout, oh, ow))
    ref = (wt2 @ dw_ref.reshape(c, -1) + bias[:, None]).reshape(1, cout, oh, ow)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _conv_ref(x, wt, b, s, pads):
    """Dense conv of NCHW x with OIHW wt, stride s, pads (top, left, bottom, right), plus bias."""
    k = wt.shape[2]
    top, left, bottom, right = pads
    _, _, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh, ow = (h + top + bottom - k) // s + 1, (w + left + right - k) // s + 1
    return sum(np.einsum("oc,nchw->nohw", wt[:, :, i, j], xp[:, :, i:i + s * oh:s, j:j + s * ow:s][:, :, :oh, :ow])
               for i in range(k) for j in range(k)) + b[None, :, None, None]


@pytest.mark.parametrize("cin,cout,h,w,k,s,pads", [(3, 32, 30, 30, 3, 2, (0, 0, 1, 1)), (3, 16, 9, 20, 3, 2, (1, 1, 1, 1)),
                                                  (1, 8, 7, 7, 3, 1, (1, 1, 1, 1)), (2, 6, 13, 11, 5, 2, (2, 2, 2, 2)),
                                                  (4, 5, 6, 37, 5, 1, (2, 2, 2, 2)), (3, 48, 8, 224, 3, 2, (0, 0, 1, 1)),
                                                  (3, 24, 7, 61, 3, 2, (1, 1, 1, 1))])
@pytest.mark.parametrize("clip,out_block,k2,s2,rows", [(None, 16, 3, 1, 2), ((0.0, 6.0), 8, 5, 2, 1),
                                                       ((0.0, 6.0), 4, 3, 2, 4)])
def test_first_conv_fused_with_depthwise_matches_numpy(cin, cout, h, w, k, s, pads, clip, out_block, k2, s2, rows):
    """The network's first conv (few input channels) fused with the depthwise conv that reads it: output
    channels a multiple of the first conv's block (out_block, a knob) or not, strides 1/2 and k 3/5 for
    both, TF-'same' and symmetric padding, odd widths, rows of one vector and of several column chunks
    (MobileNetV2's 224-wide input), depthwise rows per step 1/2/4."""
    rng = np.random.default_rng(cin * w + k)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    wt = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    w2 = rng.standard_normal((cout, 1, k2, k2)).astype(np.float32)
    b2 = rng.standard_normal(cout).astype(np.float32)
    first = _conv_ref(x, wt, b, s, pads)
    first = np.clip(first, *clip) if clip else first
    pads2 = [k2 // 2] * 4
    ref = _dw_ref(first.astype(np.float32), w2, b2, s2, pads2, clip)
    func = conv2d_dwconv2d_chw(cin, cout, h, w, k, s, list(pads), k2, s2, pads2, clip1=clip, clip=clip,
                               lanes=SPEC.vector_lanes, out_block=out_block, rows=rows)
    out = _run(func, [x, wt, b, w2, b2], ref.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def _hard_swish(y):
    return y * (np.clip(y + 3, 0, 6) / 6)


def test_hard_swish_epilogue_in_every_chw_kernel():
    """HSWISH as the epilogue (MobileNetV3's x * clip(x + 3, 0, 6) / 6) of the spmm (with and without the
    residual add after it), the CHW depthwise conv, both epilogues of the fused expand + depthwise kernel, and
    both epilogues of the fused first conv + depthwise kernel; inputs scaled so values fall on both sides of -3 and 3."""
    rng = np.random.default_rng(7)
    lanes = SPEC.vector_lanes
    cin, cout, h, w = 12, 16, 5, 9
    wt = _weights(rng, cout, cin, 0.7, 1)
    x = 3 * rng.standard_normal((1, cin, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    res = rng.standard_normal((1, cout, h, w)).astype(np.float32)
    rp, col, val = encode_bsr(wt, 1)
    y = (wt @ x.reshape(cin, -1) + bias[:, None]).reshape(1, cout, h, w)
    out = _run(spmm_chw(cin, cout, h, w, 1, len(col), clip=HSWISH, pixel_tile=32, lanes=lanes,
                        col_dtype=str(col.dtype)), [x, rp, col, val, bias], y.shape)
    np.testing.assert_allclose(out, _hard_swish(y), rtol=1e-5, atol=1e-5)
    out = _run(spmm_chw(cin, cout, h, w, 1, len(col), clip=HSWISH, residual=True, pixel_tile=32, lanes=lanes,
                        col_dtype=str(col.dtype)), [x, rp, col, val, bias, res], y.shape)
    np.testing.assert_allclose(out, _hard_swish(y) + res, rtol=1e-5, atol=1e-5)

    wd = 2 * rng.standard_normal((cin, 1, 3, 3)).astype(np.float32)
    bd = rng.standard_normal(cin).astype(np.float32)
    ref = _hard_swish(_dw_ref(x, wd, bd, 2, [1] * 4, None))
    out = _run(dwconv2d_chw(cin, h, w, 3, 2, [1] * 4, clip=HSWISH, lanes=lanes), [x, wd, bd], ref.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    w5 = rng.standard_normal((cout, 1, 5, 5)).astype(np.float32)
    ref = _hard_swish(_dw_ref(_hard_swish(y), w5, bias, 1, [2] * 4, None))
    func = spmm_dwconv2d_chw(cin, cout, h, w, 1, len(col), 5, 1, [2] * 4, clip1=HSWISH, clip=HSWISH, lanes=lanes,
                             col_dtype=str(col.dtype))
    out = _run(func, [x, rp, col, val, bias, w5, bias], ref.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    w3 = rng.standard_normal((cout, 3, 3, 3)).astype(np.float32)
    ref = _hard_swish(_dw_ref(_hard_swish(_conv_ref(x[:, :3], w3, bias, 1, [1] * 4)).astype(np.float32),
                              w5, bias, 1, [2] * 4, None))
    out = _run(conv2d_dwconv2d_chw(3, cout, h, w, 3, 1, [1] * 4, 5, 1, [2] * 4, clip1=HSWISH, clip=HSWISH,
                                   lanes=lanes), [x[:, :3].copy(), w3, bias, w5, bias], ref.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block,residual", [(1, False), (4, True)])
def test_spmm_scales_its_input_channels(block, residual):
    """With `scale` the spmm reads x and a per-input-channel gate [1, cin, 1, 1] and computes W (gate * x): a
    squeeze-and-excitation product fused into the 1x1 conv after it."""
    rng = np.random.default_rng(block)
    cin, cout, h, w = 13, 16, 5, 7
    wt = _weights(rng, cout, cin, 0.7, block)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    gate = rng.random((1, cin, 1, 1)).astype(np.float32)
    res = rng.standard_normal((1, cout, h, w)).astype(np.float32)
    rp, col, val = encode_bsr(wt, block)
    func = spmm_chw(cin, cout, h, w, block, len(col), residual=residual, scale=True, lanes=SPEC.vector_lanes,
                    col_dtype=str(col.dtype))
    out = _run(func, [x, rp, col, val, bias, gate] + ([res] if residual else []), (1, cout, h, w))
    ref = (wt @ (x * gate).reshape(cin, -1) + bias[:, None]).reshape(1, cout, h, w) + (res if residual else 0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _padded(a: np.ndarray, plane: int) -> np.ndarray:
    """[1, c, h, w] as [1, c, plane] planes, NaN past each plane's pixels (NaN read would reach the result)."""
    c, pixels = a.shape[1], a.shape[2] * a.shape[3]
    out = np.full((1, c, plane), np.nan, np.float32)
    out[:, :, :pixels] = a.reshape(1, c, pixels)
    return out


@pytest.mark.parametrize("h,w,block,chunk", [(14, 14, 1, None), (7, 7, 2, None), (7, 7, 1, 32), (14, 14, 2, 16),
                                              (5, 7, 4, None)])
def test_spmm_reads_and_writes_padded_block_outputs(h, w, block, chunk):
    """PadChannelPlanes' kernels: a sparse 1x1 writing its output as padded planes (out_plane) and reading its
    residual (res_plane) and input (in_plane) so, chunked or not, and a fused expand + depthwise reading such an
    output: equal to numpy; the pixels past each plane are never written (the NaN fill stays) nor read."""
    rng = np.random.default_rng(h * w + block)
    cin, cout, c, lanes = 40, 24, 32, SPEC.vector_lanes
    plane = aligned_plane(h * w, lanes)
    wt = _weights(rng, cout, cin, 0.8, block)
    x = rng.standard_normal((1, cin, h, w)).astype(np.float32)
    res = rng.standard_normal((1, cout, h, w)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    rp, col, val = encode_bsr(wt, block, chunk)
    func = spmm_chw(cin, cout, h, w, block, len(col), residual=True, pixel_tile=64, lanes=lanes,
                    col_dtype=str(col.dtype), k_chunk=chunk, in_plane=plane, out_plane=plane, res_plane=plane)
    ex = tvm.compile(tvm.IRModule({"main": func}), target=SPEC.tvm_target(), tir_pipeline="shrinkc")
    out = tvm.runtime.tensor(np.full((1, cout, plane), np.nan, np.float32))
    ex[str(func.attrs["global_symbol"])](*(tvm.runtime.tensor(a) for a in (
        _padded(x, plane), rp, col, val, bias, _padded(res, plane))), out)
    got = out.numpy()
    ref = (wt @ x.reshape(cin, -1) + bias[:, None]).reshape(1, cout, h, w) + res
    np.testing.assert_allclose(got[:, :, :h * w].reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    assert np.isnan(got[:, :, h * w:]).all()
    # the block output read by the next block's fused expand + depthwise, as padded planes
    wt1, _, b1, wdw, b2 = _expand_dw_case(rng, cout, c, h, w, 3, 2)
    rp1, col1, val1 = encode_bsr(wt1, 2)
    fused = spmm_dwconv2d_chw(cout, c, h, w, 2, len(col1), 3, 1, [1] * 4, clip1=(0.0, 6.0), clip=(0.0, 6.0),
                              lanes=lanes, col_dtype=str(col1.dtype), in_plane=plane)
    mid = np.clip(wt1 @ ref.reshape(cout, -1) + b1[:, None], 0, 6).reshape(1, c, h, w)
    np.testing.assert_allclose(_run(fused, [got, rp1, col1, val1, b1, wdw, b2], (1, c, h, w)),
                               _dw_ref(mid, wdw, b2, 1, [1] * 4, (0.0, 6.0)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("c,h,w,k,s", [(3, 64, 64, 2, 2), (2, 32, 32, 2, 2), (5, 16, 16, 2, 2), (3, 13, 11, 3, 2),
                                       (2, 9, 20, 3, 1), (3, 7, 7, 2, 1), (2, 15, 40, 2, 2), (2, 3, 3, 3, 2)])
@pytest.mark.parametrize("guard", ["before", "after"])
def test_maxpool_chw_matches_numpy_inside_its_buffers(c, h, w, k, s, guard):
    """f32_maxpool2d_chw: windows 2 and 3, strides 1 and 2, rows of whole and partial vectors (8- and 16-lane),
    odd sizes (floor): equal to numpy to the bit, with input and output flush against an inaccessible page."""
    from schedules.f32_maxpool2d_chw import maxpool2d_chw
    x = np.random.default_rng(c * w + k).standard_normal((1, c, h, w)).astype(np.float32)
    ref = np.lib.stride_tricks.sliding_window_view(x[0], (k, k), axis=(1, 2))[:, ::s, ::s].max(axis=(3, 4))[None]
    out = _run_guarded(maxpool2d_chw(c, h, w, k, s, lanes=SPEC.vector_lanes), [x], {0}, ref.shape, guard)
    np.testing.assert_array_equal(out, ref)
