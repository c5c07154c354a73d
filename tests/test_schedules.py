"""Every CPU kernel against ONNX Runtime on shape sweeps around its tile and vector width."""
from __future__ import annotations

import numpy as np
import pytest

import compiler
from conftest import assert_matches_ort, compile_with_kernel_defaults, single_conv_model


def _check(model, kernel_prefix: str, tiles: str = "target"):
    """Compile for this machine, with its own kernel defaults or (tiles="generic") with none: the
    tiles and padding the ARM targets get, so the x86 run checks them numerically too."""
    if tiles == "generic":
        import dataclasses

        import targets
        generic = dataclasses.replace(targets.resolve(None), kernel_defaults={})
        targets.NAMED["_generic_tiles"] = lambda: generic
        try:
            cm = compiler.compile_model(model, "_generic_tiles")
        finally:
            del targets.NAMED["_generic_tiles"]
    else:
        cm = compiler.compile_model(model)
    results = cm.verify(tolerance=1e-4)
    assert all(r.ok for r in results), [r.line() for r in results]
    assert any(k.startswith(kernel_prefix) for k in cm.report["kernels"]), cm.report["kernels"]
    return cm


# channels: multiples of 16, of 8 only, and odd; pixels: below, at and above the 7/8/14 tiles, odd
@pytest.mark.parametrize("cin,cout,h", [(16, 32, 7), (32, 16, 8), (24, 40, 9), (8, 24, 14), (40, 24, 13),
                                        (3, 16, 5), (17, 33, 6), (64, 96, 1), (48, 48, 28)])
@pytest.mark.parametrize("tiles", ["target", "generic"])
def test_conv1x1(cin, cout, h, tiles):
    _check(single_conv_model(cin, cout, h, k=1), "f32_conv1x1_", tiles)


@pytest.mark.parametrize("cin,cout,h,k,stride", [(3, 32, 32, 3, 2), (3, 16, 17, 3, 2), (16, 32, 15, 3, 1),
                                                 (24, 40, 10, 5, 2), (40, 24, 9, 5, 1), (32, 32, 7, 3, 2)])
@pytest.mark.parametrize("tiles", ["target", "generic"])
def test_dense_kxk(cin, cout, h, k, stride, tiles):
    _check(single_conv_model(cin, cout, h, k=k, stride=stride), f"f32_conv{k}x{k}_", tiles)


@pytest.mark.parametrize("c,h,k,stride", [(16, 14, 3, 1), (32, 15, 3, 2), (24, 9, 3, 1), (40, 11, 5, 2),
                                          (8, 7, 5, 1), (96, 28, 3, 2), (20, 6, 3, 1)])
def test_depthwise(c, h, k, stride):
    _check(single_conv_model(c, c, h, k=k, stride=stride, groups=c), f"f32_dwconv{k}x{k}s{stride}_")


def test_residual_epilogue():
    _check(single_conv_model(24, 24, 10, k=1, residual=True), "f32_conv1x1_")


def test_valid_padding_and_relu():
    _check(single_conv_model(16, 16, 12, k=3, pad=0, act="relu"), "f32_conv3x3_")


def test_two_threads_match_one(tmp_path):
    """The parallel split gives the same numbers (it must not change the reduction order)."""
    import subprocess
    import sys
    code = ("import os, sys, numpy as np; os.environ['TVM_NUM_THREADS']=sys.argv[1]; sys.path.insert(0,'tests');"
            "import compiler; from conftest import single_conv_model;"
            "cm=compiler.compile_model(single_conv_model(32,48,19,k=3,stride=1));"
            "x={'x': np.random.default_rng(3).standard_normal((1,32,19,19)).astype(np.float32)};"
            f"np.save(r'{tmp_path}/o'+sys.argv[1]+'.npy', cm.run(x)[0])")
    for n in ("1", "2"):
        subprocess.run([sys.executable, "-c", code, n], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "o1.npy"), np.load(tmp_path / "o2.npy"))


def test_register_tile_stays_off_the_heap():
    """Regression: TVM 0.27 heap-allocated (and memset) every 1344-byte register tile per task;
    KeepTilesOnStack must leave no workspace allocation in a 7x48 conv kernel."""
    import dataclasses

    import targets
    spec = targets.resolve(None)
    if spec.isa != "avx512":
        pytest.skip("tile sizes below are for AVX-512")
    tuned = dataclasses.replace(spec, kernel_defaults={"conv2d_nchwc": {"pixel_tile": 7, "oc_blocks": 3}})
    targets.NAMED["_tile_test"] = lambda: tuned
    try:
        cm = compiler.compile_model(single_conv_model(48, 48, 14, k=1), "_tile_test")
    finally:
        del targets.NAMED["_tile_test"]
    assert "f32_conv1x1_nchw16c_7x48" in cm.report["kernels"]
    asm = cm.executable.mod.imports[0].inspect_source("asm")
    assert "TVMBackendAllocWorkspace@GOTPCREL" not in asm
    assert all(r.ok for r in cm.verify(tolerance=1e-4))


@pytest.mark.parametrize("hw", [9, 4, 2])
def test_mean_in_plain_nchw(hw):
    """An NCHW mean (a grouped conv's output stays NCHW) sums each contiguous plane a vector at a time: planes
    of 81 (vectors and a masked tail), 16 (whole vectors) and 4 pixels (the tail alone). Regression: an
    earlier schedule vectorised the write-back over the channel loop that also held the reduction."""
    from onnx import helper, numpy_helper
    w = np.random.default_rng(0).standard_normal((12, 3, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1] * 4, group=4),
                           helper.make_node("GlobalAveragePool", ["y"], ["z"])], "g",
                          [helper.make_tensor_value_info("x", 1, [1, 12, hw, hw])],
                          [helper.make_tensor_value_info("z", 1, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    _check(model, "f32_mean_hw_chw")


def test_mean_of_a_batch_keeps_the_general_schedule():
    """The plane-summing NCHW mean serves batch 1 only; a batch of 2 keeps the general schedule and its
    second image's means are right."""
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=1)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 3, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 1, 1])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    _check(model, "f32_mean_hw_nchw")


def test_register_tile_caps_from_the_target():
    """A target's max_oc_blocks / max_pixel_tile bound the default tile; without caps the tile with
    the fewest loads per FMA wins (7 pixels x 3 blocks for 7-wide rows and 9 blocks)."""
    from schedules.f32_conv2d_nchwc import register_tile
    assert register_tile(7, 7, 9, 21) == (7, 3)
    assert register_tile(7, 7, 9, 21, max_oc_blocks=1) == (7, 1)
    assert register_tile(56, 56, 2, 21, max_oc_blocks=1, max_pixels=8) == (8, 1)
    assert register_tile(56, 56, 2, 21, max_oc_blocks=1) == (14, 1)
    # rows of a prime width above the cap: 1-pixel tiles only under it, so the cap is dropped (SqueezeNet's 13x13)
    assert register_tile(5, 5, 2, 21, max_oc_blocks=1, max_pixels=4) == (5, 1)
    assert register_tile(13, 13, 64, 21, max_pixels=8) == (13, 1)
    assert register_tile(13, 13, 64, 12, max_pixels=8) == (1, 4)                # 13 pixels over the budget


def test_avx512_default_tile_is_one_channel_block():
    """x86 with AVX-512 (measured on Zen 4): a 960->320 1x1 conv on 7x7 gets a 7 x 16 tile, not 7 x 32;
    on Zen 5 a 7 x 32 one."""
    import targets
    from schedules.f32_conv2d_nchwc import Conv2dNCHWc
    spec = targets._x86_from_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})
    assert spec.kernel_defaults["max_oc_blocks"] == 1 and spec.kernel_defaults["padded_copy"] is False
    knobs = Conv2dNCHWc().default_knobs({"oh": 7, "ow": 7, "cob": 20, "bo": 16, "kh": 1, "stride": 1}, spec)
    assert (knobs["pixel_tile"], knobs["oc_blocks"]) == (7, 1)
    # 5x5 convs (merged EfficientNet-Lite blocks) loop over a block's input channels: unrolled under the 25 taps
    # LLVM took seconds to build each and they ran no faster; other sizes unroll them
    for kh, kw, unrolled in ((5, 5, False), (3, 3, True), (5, 1, True), (7, 7, True)):
        info = {"oh": 14, "ow": 14, "cob": 5, "bo": 16, "kh": kh, "kw": kw, "stride": 1}
        assert Conv2dNCHWc().default_knobs(info, spec)["unroll_ci"] is unrolled, (kh, kw)
    arm = targets.resolve("rpi4")
    assert "max_oc_blocks" not in arm.kernel_defaults
    # Zen 5 (full-width AVX-512, chosen from `shrinkc tune` there): 1x1 convs 2 blocks, no input-channel
    # unrolling; kxk convs and Winograd keep the Zen 4 choice
    zen5 = targets._x86_from_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver5"})
    knobs = Conv2dNCHWc().default_knobs({"oh": 7, "ow": 7, "cob": 20, "bo": 16, "kh": 1, "stride": 1}, zen5)
    assert (knobs["pixel_tile"], knobs["oc_blocks"], knobs["unroll_ci"]) == (7, 2, False)
    knobs = Conv2dNCHWc().default_knobs({"oh": 7, "ow": 7, "cob": 20, "bo": 16, "kh": 3, "stride": 2}, zen5)
    assert (knobs["pixel_tile"], knobs["oc_blocks"], knobs["unroll_ci"]) == (7, 1, True)
    from schedules.f32_conv2d_winograd_nchwc import Conv2dWinogradNCHWc
    assert Conv2dWinogradNCHWc().default_knobs({"nty": 7, "ntx": 7, "cob": 20, "bo": 16}, zen5)["oc_blocks"] == 1
    # the CHW first conv + depthwise of sparse models (a kernel a pass builds, schedules/handwritten.py):
    # 4 first-conv channels a task, 4 depthwise rows a step
    from schedules import handwritten
    stem = {"cin": 3, "c": 32, "h": 32, "w": 32, "k1": 3, "stride1": 2, "pads1": [0, 0, 1, 1], "clip1": [0.0, 6.0],
            "k": 3, "stride": 1, "pads": [1] * 4, "clip": [0.0, 6.0], "lanes": 16, "out_plane": None}
    assert handwritten.recipe(handwritten.build("conv2d_dwconv2d_chw", stem, zen5))["knobs"] == \
        {"out_block": 4, "rows": 4}
    zen4 = targets._x86_from_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})
    assert handwritten.recipe(handwritten.build("conv2d_dwconv2d_chw", stem, zen4))["knobs"] == \
        {"out_block": 8, "rows": 2}
    # the fused expand + depthwise kernel: 3 rows a step, 2 channel blocks a task (1 where the blocks are odd)
    fused = {"cin": 8, "c": 24, "h": 14, "w": 14, "block": 1, "nnzb": 20, "k": 3, "stride": 1, "pads": [1] * 4,
             "clip1": [0.0, 6.0], "clip": [0.0, 6.0], "lanes": 16, "col_dtype": "int16", "out_plane": None,
             "in_plane": None}
    for spec, c, name in ((zen5, 24, "f32_spmm1x1_dwconv3x3s1_chw_16x3_c2"), (zen5, 21, "f32_spmm1x1_dwconv3x3s1_chw_16x3"),
                          (zen4, 24, "f32_spmm1x1_dwconv3x3s1_chw_16x2")):
        assert str(handwritten.build("spmm_dwconv2d_chw", {**fused, "c": c}, spec).attrs["global_symbol"]) == name


def test_padded_copy_is_a_target_default():
    """A stride-1 3x3 conv on 14x14 pads through a copy by default, and through guarded loads where the
    target says `padded_copy: False` (x86 AVX-512)."""
    import dataclasses

    import targets
    from schedules.f32_conv2d_nchwc import Conv2dNCHWc
    info = {"oh": 14, "ow": 14, "cob": 6, "bo": 16, "kh": 3, "stride": 1}
    generic = dataclasses.replace(targets.resolve("x86"), kernel_defaults={})
    assert Conv2dNCHWc().default_knobs(info, generic)["inline_pad"] is False
    avx512 = dataclasses.replace(generic, kernel_defaults={"padded_copy": False})
    assert Conv2dNCHWc().default_knobs(info, avx512)["inline_pad"] is True


@pytest.mark.parametrize("side", [3, 5])
def test_winograd_transforms_compute_a_correlation(side):
    """F(2, 3) and F(4, 5) in one dimension: A^T [(G g) * (B^T d)] is the valid correlation of m + r - 1 inputs
    with r taps, and transform_weights applies G on both kernel axes."""
    from schedules.f32_conv2d_winograd_nchwc import TRANSFORMS, transform_weights
    f = TRANSFORMS[side]
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal(f.n), rng.standard_normal(side)
    np.testing.assert_allclose(f.at @ ((f.g @ g) * (f.bt @ d)), np.correlate(d, g, "valid"), rtol=1e-12)
    k = rng.standard_normal((2, side, side, 5, 16))
    u = transform_weights(k)
    assert u.shape == (f.n, f.n, 2, 5, 16)
    np.testing.assert_allclose(u[:, :, 1, 3, 7], f.g @ k[1, :, :, 3, 7] @ f.g.T, rtol=1e-6)


def test_cook_toom_gives_lavin_f2_3():
    """The generator's F(2, 3) from points 0, +-1 computes what the literal matrices do (up to the sign of the
    point at infinity, which cancels)."""
    from schedules.f32_conv2d_winograd_nchwc import F2_3, cook_toom
    f = cook_toom(2, 3, (0, 1, -1))
    np.testing.assert_array_equal(f.g, F2_3.g)
    np.testing.assert_array_equal(np.abs(f.bt), np.abs(F2_3.bt))
    d, g = np.random.default_rng(1).standard_normal(4), np.random.default_rng(2).standard_normal(3)
    np.testing.assert_allclose(f.at @ ((f.g @ g) * (f.bt @ d)), F2_3.at @ ((F2_3.g @ g) * (F2_3.bt @ d)), rtol=1e-12)


# channels: at the 16 threshold, not multiples of 16, wide; outputs: odd (a half tile at the border),
# even, 1x1; padding same, valid (pad 0) and wider than the kernel needs
@pytest.mark.parametrize("cin,cout,h,pad", [(16, 16, 7, 1), (24, 40, 9, 1), (48, 32, 14, 1), (32, 48, 10, 0),
                                            (40, 24, 13, 2), (16, 32, 3, 0), (64, 96, 6, 1)])
def test_winograd_conv3x3(cin, cout, h, pad):
    model = single_conv_model(cin, cout, h, k=3, pad=pad, act="relu6")
    cm = compile_with_kernel_defaults(model, winograd_min_channels=16)
    assert all(r.ok for r in cm.verify(tolerance=1e-4)), [r.line() for r in cm.verify(tolerance=1e-4)]
    assert any("_winograd2x2_" in k for k in cm.report["kernels"]), cm.report["kernels"]


def test_winograd_residual_and_knobs():
    """The residual add fuses into the output transform; a tuned tile (4 tiles x 2 blocks) still verifies."""
    cm = compile_with_kernel_defaults(single_conv_model(32, 32, 11, k=3, residual=True), winograd_min_channels=16,
                                      conv2d_winograd_nchwc={"pixel_tile": 2, "oc_blocks": 2})
    assert all(r.ok for r in cm.verify(tolerance=1e-4))
    assert "f32_conv3x3_winograd2x2_nchw16c_2x32" in cm.report["kernels"], cm.report["kernels"]


# 5x5: outputs of 1 (one tile, mostly padding), odd (part of a 4x4 tile), 4k; channels at the threshold, not
# multiples of 16, wide; no activation, so F(4x4, 5x5) applies (ComputeConvsByWinograd)
@pytest.mark.parametrize("cin,cout,h,pad", [(16, 16, 7, 2), (24, 40, 9, 2), (48, 32, 16, 2), (32, 48, 10, 0),
                                            (40, 24, 13, 3), (16, 32, 5, 0), (112, 112, 14, 2)])
def test_winograd_conv5x5(cin, cout, h, pad):
    cm = compile_with_kernel_defaults(single_conv_model(cin, cout, h, k=5, pad=pad, act=None), winograd_min_channels=16)
    assert all(r.ok for r in cm.verify(tolerance=1e-4)), [r.line() for r in cm.verify(tolerance=1e-4)]
    assert any(k.startswith("f32_conv5x5_winograd4x4_") for k in cm.report["kernels"]), cm.report["kernels"]


def test_winograd_conv5x5_residual_and_knobs():
    """A residual add stays linear (F(4x4, 5x5) applies) and fuses into the output transform; a tuned tile verifies."""
    model = single_conv_model(32, 32, 11, k=5, residual=True, act=None)
    cm = compile_with_kernel_defaults(model, winograd_min_channels=16,
                                      conv2d_winograd_nchwc={"pixel_tile": 3, "oc_blocks": 2})
    assert all(r.ok for r in cm.verify(tolerance=1e-4))
    assert "f32_conv5x5_winograd4x4_nchw16c_3x32" in cm.report["kernels"], cm.report["kernels"]


@pytest.mark.parametrize("cin,cout,k,stride", [(16, 48, 3, 1), (32, 32, 3, 2), (32, 32, 5, 2), (32, 32, 1, 1),
                                               (16, 48, 5, 1)])
def test_winograd_does_not_fire(cin, cout, k, stride):
    """Too few channels (16 in, 32 needed), stride 2 and 1x1 convs keep the direct kernel."""
    model = single_conv_model(cin, cout, 12, k=k, stride=stride, act=None)
    cm = compile_with_kernel_defaults(model, winograd_min_channels=32)
    assert not any("winograd" in name for name in cm.report["kernels"]), cm.report["kernels"]
    assert any(name.startswith(f"f32_conv{k}x{k}_nchw") for name in cm.report["kernels"]), cm.report["kernels"]
    assert all(r.ok for r in cm.verify(tolerance=1e-4))


def test_winograd_is_a_target_default():
    """x86 with AVX-512 uses Winograd from 16 channels; targets not measured with it (ARM) do not."""
    import targets
    spec = targets._x86_from_target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "znver4"})
    assert spec.kernel_defaults["winograd_min_channels"] == 16
    assert "winograd_min_channels" not in targets.resolve("rpi4").kernel_defaults


def _fallback_op(shape, op, out_shape, src):
    """Relax `op` on one float tensor of `shape`, legalized and scheduled by the fallback rule alone: the
    scheduled PrimFunc's schedule (to inspect its loops) and its output on `src`."""
    import tvm
    from tvm import relax, s_tir, tirx

    import targets
    from schedules.f32_fallback import Fallback
    spec = targets.resolve(None)
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(op(x))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    func = next(f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc))
    scheduled = Fallback().apply(func, spec).func
    with spec.tvm_target():
        lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")})).jit()
    dst = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    lib["main"](tvm.runtime.tensor(src), dst)
    return s_tir.Schedule(scheduled), dst.numpy()


@pytest.mark.parametrize("to_blocked", [False, True])
def test_layout_transforms_walk_their_output_in_memory_order(to_blocked):
    """The fallback walks an elementwise nest in its output's memory order: blocked -> NCHW (a CHW region's
    border) reads lanes with a stride and writes whole rows of a plane, the innermost loop vectorised over
    the row; NCHW -> blocked already runs in its output's order and keeps the general schedule. Both give
    the source back exactly."""
    from tvm import relax

    import targets
    from schedules.rule import top_blocks
    lanes = targets.resolve(None).vector_lanes
    shape, out_shape = [1, 32, 8, 32], [1, 2, 8, 32, 16]
    if not to_blocked:
        shape, out_shape = out_shape, shape
    index_map = (lambda n, c, h, w: (n, c // 16, h, w, c % 16)) if to_blocked else \
        (lambda n, cb, h, w, c: (n, cb * 16 + c, h, w))
    src = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sch, back = _fallback_op(shape, lambda x: relax.op.layout_transform(x, index_map=index_map), out_shape, src)
    loops = [sch.get(lp) for lp in sch.get_loops(top_blocks(sch)[0])]      # outermost first
    kinds = [{0: "SERIAL", 1: "PARALLEL", 2: "VECTORIZED"}[int(lp.kind)] for lp in loops]
    if to_blocked:             # the general schedule: the outer loops fused, the innermost (w) split by the lanes
        assert kinds == ["PARALLEL", "SERIAL", "VECTORIZED"]
        assert [int(lp.extent) for lp in loops] == [32 * 8, 32 // lanes, lanes]
    else:                                     # (n, cb, lane, h) fused and parallel, w split by the lanes
        assert kinds == ["PARALLEL", "SERIAL", "VECTORIZED"]
        assert [int(lp.extent) for lp in loops] == [32 * 8, 32 // lanes, lanes]
    if to_blocked:
        back = back.transpose(0, 1, 4, 2, 3).reshape(shape)
    else:
        src = src.transpose(0, 1, 4, 2, 3).reshape(back.shape)
    np.testing.assert_array_equal(back, src)


@pytest.mark.parametrize("hw", [14, 16])
def test_channel_shuffle_is_one_copy_per_plane(hw):
    """ShuffleNetV2's shuffle as torch.onnx writes it (two channel slices, concat, reshape, transpose, reshape),
    fused into one PrimFunc: the fallback inlines the intermediates (one loop nest, not one per op), copies
    each output plane in one inner loop (vectorised where the plane is whole vectors, 16x16; 14x14 left to
    LLVM) with the choice of source a branch per plane, channels in parallel; same result as numpy."""
    import tvm
    from tvm import relax, s_tir, tirx

    import targets
    from schedules.f32_fallback import Fallback
    from schedules.rule import top_blocks
    spec = targets.resolve(None)
    c = 48
    a = relax.Var("a", relax.TensorType([1, c, hw, hw], "float32"))
    b = relax.Var("b", relax.TensorType([1, 32, hw, hw], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [a, b]):
        with bb.dataflow():
            cat = bb.emit(relax.op.concat([relax.op.strided_slice(a, [1], [0], [c // 2]),
                                           relax.op.strided_slice(b, [1], [0], [c // 2])], axis=1))
            perm = relax.op.permute_dims(relax.op.reshape(cat, [1, 2, c // 2, hw, hw]), [0, 2, 1, 3, 4])
            out = bb.emit_output(relax.op.reshape(perm, [1, c, hw, hw]))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(mod)))
    func = next(f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc))
    assert len(top_blocks(s_tir.Schedule(func))) == 6       # two slices, concat, reshape, transpose, reshape
    scheduled = Fallback().apply(func, spec).func
    sch = s_tir.Schedule(scheduled)
    assert len(top_blocks(sch)) == 1
    loops = [sch.get(lp) for lp in sch.get_loops(top_blocks(sch)[0])]
    kinds = [{0: "SERIAL", 1: "PARALLEL", 2: "VECTORIZED"}[int(lp.kind)] for lp in loops]
    lanes = spec.vector_lanes
    if hw * hw % lanes:
        assert kinds == ["PARALLEL", "SERIAL"] and [int(lp.extent) for lp in loops] == [c, hw * hw]
    else:
        assert kinds == ["PARALLEL", "SERIAL", "VECTORIZED"]
        assert [int(lp.extent) for lp in loops] == [c, hw * hw // lanes, lanes]
    assert "if " in scheduled.script()        # the concat's choice of source is a branch, not a select
    rng = np.random.default_rng(0)
    xa = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    xb = rng.standard_normal((1, 32, hw, hw)).astype(np.float32)
    with spec.tvm_target():
        lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")})).jit()
    dst = tvm.runtime.tensor(np.zeros((1, c, hw, hw), np.float32))
    lib["main"](tvm.runtime.tensor(xa), tvm.runtime.tensor(xb), dst)
    ref = np.concatenate([xa[:, :c // 2], xb[:, :c // 2]], 1).reshape(1, 2, c // 2, hw, hw)
    np.testing.assert_array_equal(dst.numpy(), ref.transpose(0, 2, 1, 3, 4).reshape(1, c, hw, hw))


def test_blocked_pool_vectorises_its_lanes_inside_the_window():
    """A max pool over a channel-blocked tensor (no rule of its own): the fallback puts the 16 lanes inside
    the window loops, vectorised, and the output pixels in parallel; same result as numpy."""
    from tvm import relax

    from schedules.rule import top_blocks
    src = np.random.default_rng(0).standard_normal([1, 2, 8, 8, 16]).astype(np.float32)
    sch, got = _fallback_op([1, 2, 8, 8, 16], lambda x: relax.op.nn.max_pool2d(
        x, [3, 3], [2, 2], [1, 1, 1, 1], layout="NCHW16c"), [1, 2, 4, 4, 16], src)
    pool = [b for b in top_blocks(sch) if "update" in sch.get(b).name_hint]
    assert pool, sch.mod["main"].script()
    kinds = [int(sch.get(lp).kind) for lp in sch.get_loops(pool[0])]
    assert kinds == [1, 0, 0, 2] and int(sch.get(sch.get_loops(pool[0])[-1]).extent) == 16     # par, rh, rw, lanes
    padded = np.pad(src, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    want = np.max([padded[:, :, i:i + 7:2, j:j + 7:2] for i in range(3) for j in range(3)], axis=0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("cin,cout,groups,stride", [(64, 64, 4, 1), (64, 128, 4, 2), (48, 96, 3, 1)])
def test_grouped_conv_of_whole_channel_blocks_runs_the_blocked_kernel(cin, cout, groups, stride):
    """A grouped conv whose groups are whole channel blocks (RegNet's group width 16) is block-diagonal in
    NCHW16c: it runs our direct conv kernel (each output block reads its group's input blocks), not TVM's
    generic grouped conv, and matches ONNX Runtime."""
    cm = assert_matches_ort(single_conv_model(cin, cout, 14, k=3, stride=stride, groups=groups, act="relu"))
    assert cm.report["kernels"] == ["f32_conv3x3_nchw16c_7x16"], cm.report["kernels"]


@pytest.mark.parametrize("channels,groups,stride", [(64, 8, 1), (104, 13, 2)])
def test_grouped_conv_of_narrow_groups_merges_them_into_blocks(channels, groups, stride):
    """Groups of 8 channels (RegNetY's group width) in blocks of 16: the two groups of each block become one
    block-diagonal group (zeros between them; 104 channels: the last block holds one group and padding), so the
    conv runs our blocked kernel instead of TVM's generic grouped conv (RegNetY-400MF ran 0.28x ONNX Runtime on
    that), and matches ONNX Runtime."""
    cm = assert_matches_ort(single_conv_model(channels, channels, 14, k=3, stride=stride, groups=groups, act="relu"))
    assert any(k.startswith("f32_conv3x3_nchw16c") for k in cm.report["kernels"]), cm.report["kernels"]
    assert cm.report["passes"]["ConvertToBlockedLayout"]["counts"]["merged_narrow_groups"] == 1


def test_grouped_conv_of_groups_not_tiling_a_block_stays_nchw_and_matches():
    cm = assert_matches_ort(single_conv_model(48, 48, 14, k=3, groups=4, act="relu"))       # groups of 12 channels
    assert not any(k.startswith("f32_conv3x3_nchw16c") for k in cm.report["kernels"])


def test_squeeze_excite_gate_is_computed_once_per_channel():
    """EfficientNet's squeeze-and-excitation: x * sigmoid(conv(silu(conv(mean(x))))). The second conv's
    kernel takes bias + sigmoid into its write-back on its [1, C/16, 1, 1, 16] output; before, they were
    inlined into the multiply over the whole feature map and the sigmoid ran once per pixel. Matches ONNX
    Runtime."""
    import re

    import tvm

    import compiler
    import targets
    from compiler import pipeline
    from compiler.driver import import_model
    from zoo.onnx_builder import OnnxBuilder
    b = OnnxBuilder("se")
    x = b.input("x", [1, 32, 12, 12])
    y = b.conv(b.squeeze_excite(b.conv(x, 32, 32, 1, name="pw"), 32, 8, efficientnet=True), 32, 16, 1, name="proj")
    model = b.finish([y])
    cm = compiler.compile_model(model, sparse="off")
    results = cm.verify(tolerance=1e-4)
    assert all(r.ok for r in results), [r.line() for r in results]
    mod, _ = import_model(model, None)
    mod, _, _ = pipeline.run(mod, targets.resolve(None), pipeline.Options(sparse="off"))
    sigmoid_stores = []
    for gv, func in mod.functions.items():
        text = func.script() if isinstance(func, tvm.tirx.PrimFunc) else ""
        for line in text.splitlines():
            if "T.sigmoid(" in line and "=" in line.split("T.sigmoid(")[0]:
                name = line.split("[")[0].strip()
                shape = re.search(rf"\b{re.escape(name)}(?:: T\.Buffer| = T\.sblock_alloc_buffer)\(\((.*?)\)\)", text)
                sigmoid_stores.append((gv.name_hint, name, shape.group(1) if shape else ""))
    assert sigmoid_stores, "no kernel computes the sigmoid"
    for kernel, buf, shape in sigmoid_stores:
        dims = [int(d) for d in re.findall(r"int64\((\d+)", shape)]
        assert dims[2:4] == [1, 1], (kernel, buf, shape)     # [1, C/16, 1, 1, 16]: one per channel


def test_rounding_vectorises_with_ties_to_even():
    """relax.round lowers to TIR's nearbyint, which TVM 0.27 registers without TVectorizable: VectorizeLoop turned
    every vector loop holding one (a quantize step) back into a scalar loop, which LLVM then vectorised across the
    outer loop with gathers and scatters. The fallback's loop is a vector nearbyint after VectorizeLoop, and rounds
    halves to even as ONNX Round does."""
    import tvm
    from tvm import relax, s_tir, tirx

    import targets
    lanes = targets.resolve(None).vector_lanes
    shape = [1, 2, 4, 4, lanes]
    src = (np.arange(np.prod(shape)) - 64).reshape(shape).astype(np.float32) / 2    # ..., -0.5, 0, 0.5, 1, 1.5
    sch, out = _fallback_op(shape, lambda x: relax.op.round(x), shape, src)
    np.testing.assert_array_equal(out, np.round(src))     # numpy rounds halves to even
    lower = tvm.transform.Sequential([s_tir.transform.LowerInitBlock(), s_tir.transform.ConvertBlocksToOpaque(),
                                      s_tir.transform.LowerOpaqueBlock(), tirx.transform.FlattenBuffer(),
                                      tirx.transform.VectorizeLoop()])
    text = lower(tvm.IRModule({"main": sch.mod["main"]}))["main"].script()
    assert f"T.nearbyint(x_1[T.Ramp(" in text and f"T.int64({lanes})):" not in text, text


def test_quantize_step_with_a_runtime_scale_is_one_loop_nest():
    """A fused quantize step whose scale and zero point arrive at run time (a DynamicQuantizeLinear as float ops:
    0-d blocks for the zero point, elementwise blocks for divide, round, add, clip, subtract): the fallback
    inlines the arithmetic into one vectorised loop nest instead of one nest and one intermediate per op."""
    import tvm
    from tvm import relax, s_tir, tirx

    import targets
    from schedules.f32_fallback import Fallback
    from schedules.rule import top_blocks
    spec = targets.resolve(None)
    shape = [1, 3, 8, 8, spec.vector_lanes]
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    s = relax.Var("s", relax.TensorType([], "float32"))
    lo = relax.Var("lo", relax.TensorType([], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, s, lo]):
        with bb.dataflow():
            z = relax.op.round(relax.op.clip(relax.op.divide(relax.op.negative(lo), s), 0, 255))
            q = relax.op.clip(relax.op.add(relax.op.round(relax.op.divide(x, s)), z), 0, 255)
            out = bb.emit_output(relax.op.subtract(q, z))
        bb.emit_func_output(out)
    mod = relax.transform.LegalizeOps()(bb.get())
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.AnnotateTIROpPattern()(mod)))
    func = next(f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc))
    assert len(top_blocks(s_tir.Schedule(func))) > 5
    scheduled = Fallback().apply(func, spec).func
    sch = s_tir.Schedule(scheduled)
    assert len(top_blocks(sch)) == 1
    inner = sch.get(sch.get_loops(top_blocks(sch)[0])[-1])
    assert int(inner.kind) == 2 and int(inner.extent) == spec.vector_lanes      # vectorised over the lanes
    rng = np.random.default_rng(0)
    xv = (rng.standard_normal(shape) * 3).astype(np.float32)
    sv, lov = np.float32(6 / 255), np.float32(-2.5)
    with spec.tvm_target():
        lib = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")})).jit()
    dst = tvm.runtime.tensor(np.zeros(shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(np.asarray(v)) for v in (xv, sv, lov)], dst)
    zv = np.round(np.clip(-lov / sv, 0, 255))
    np.testing.assert_array_equal(dst.numpy(), np.clip(np.round(xv / sv) + zv, 0, 255) - zv)


@pytest.mark.parametrize("op", ["max", "min", "sum"])
def test_whole_tensor_reduction_walks_whole_vectors(op):
    """max / min / sum of every element of a channel-blocked tensor (a dynamic quantize step's range): one partial
    result per lane, updated a vector at a time over the tensor (the plain nest was one scalar chain)."""
    from tvm import relax

    import targets
    from schedules.rule import top_blocks
    lanes = targets.resolve(None).vector_lanes
    shape = [1, 3, 5, 5, lanes]
    src = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sch, out = _fallback_op(shape, lambda x: getattr(relax.op, op)(x), [], src)
    blocks = top_blocks(sch)
    assert len(blocks) == 3                        # partials' init, partials' update, final reduction
    loops = [sch.get(lp) for lp in sch.get_loops(blocks[1])]
    assert int(loops[-1].kind) == 2 and int(loops[-1].extent) == lanes
    want = getattr(np, op)(src.astype(np.float64))
    np.testing.assert_allclose(out, want, rtol=1e-5)


def test_importing_the_compiler_leaves_tvms_tensor_intrinsic_package_alone():
    """`import compiler` must not import tvm.s_tir.tensor_intrin: that package registers every target's tensor
    intrinsics on import (CUDA's alone took over a minute here), which every `shrinkc` command then paid
    (the int8 kernel imported one description from it, 9c29af8 to now)."""
    import subprocess
    import sys
    code = "import sys, compiler; print(sorted(m for m in sys.modules if m.startswith('tvm.s_tir.tensor_intrin')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_macro_kernels_build_without_reading_the_stack_source(monkeypatch):
    """TVMScript looked up the parser of every T.macro call with inspect.getouterframes, which reads a source line per
    stack frame: from a pass (hundreds of frames deep) each spmm kernel took about half a second to build, most of a
    sparse model's compile. schedules finds the parser by walking the frames; the kernel is the same."""
    import inspect
    import sys

    import tvm

    from schedules.f32_spmm_chw import spmm_chw
    read, outer = [], inspect.getouterframes

    def spy(frame, context=1):     # who asks for the stack with its source lines
        read.append(sys._getframe(1).f_code.co_name)
        return outer(frame, context)

    monkeypatch.setattr(inspect, "getouterframes", spy)

    def deep(n):      # a stack as deep as a pass's
        return deep(n - 1) if n else spmm_chw(24, 48, 7, 7, 1, 60, clip=(0.0, 6.0), pixel_tile=64, lanes=16)

    func = deep(200)
    monkeypatch.undo()
    assert read and "_find_parser_def" not in read, read     # prim_func reads the stack once; macro calls do not
    tvm.ir.assert_structural_equal(func, spmm_chw(24, 48, 7, 7, 1, 60, clip=(0.0, 6.0), pixel_tile=64, lanes=16))
