"""Phase 1 and layout passes: the expected IR appears (structural) and outputs do not change (numerical)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from onnx import helper, numpy_helper
from tvm import relax

import targets
import zoo
from compiler import pipeline
from compiler.frontend.onnx_import import import_onnx
from conftest import assert_matches_ort, onnx_model
from passes import changelog
from passes.convert_to_blocked_layout import ConvertToBlockedLayout
from passes.fold_constants_numpy import FoldConstantsNumpy
from passes.fold_pad_into_conv import FoldPadIntoConv
from passes.fold_scale_into_conv import FoldScaleIntoConv
from passes.rewriting import const_np


def ops(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(mod["main"], lambda e: names.append(str(e.op.name)) if isinstance(
        e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return names


def cleanup(mod):
    seq = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
           FoldConstantsNumpy(), relax.transform.FoldConstant()]
    for p in seq:
        mod = p(mod)
    return mod


def test_batchnorm_folds_into_conv_weights():
    model = zoo.build("mobilenet_v2", width=0.35, resolution=32, num_classes=4, bn=True)
    mod = cleanup(import_onnx(model)[0])
    before = ops(mod)
    assert before.count("relax.subtract") > 10 and before.count("relax.divide") > 10
    with changelog.collecting() as book:
        after = ops(FoldScaleIntoConv()(mod))
    assert "relax.subtract" not in after and "relax.divide" not in after and "relax.multiply" not in after
    assert after.count("relax.nn.conv2d") == before.count("relax.nn.conv2d")
    # each BN became one bias add; the residual adds stay
    assert after.count("relax.add") == before.count("relax.add")
    assert book.summary()["FoldScaleIntoConv"]["counts"]["folded_scale_shift"] == before.count("relax.nn.conv2d")
    assert_matches_ort(model)


def _pad_model(value: float):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Pad", ["x", "pads", "v"], ["p"], mode="constant"),
             helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3], name="conv_after_pad")]
    inits = [numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 1, 2], np.int64), "pads"),
             numpy_helper.from_array(np.array(value, np.float32), "v"), numpy_helper.from_array(w, "w")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 4, 9, 9])],
                          [helper.make_tensor_value_info("y", 1, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_zero_pad_folds_into_conv():
    model = _pad_model(0.0)
    mod = cleanup(import_onnx(model)[0])
    assert "relax.nn.pad" in ops(mod)
    out = FoldPadIntoConv()(mod)
    assert "relax.nn.pad" not in ops(relax.transform.DeadCodeElimination()(out))
    assert_matches_ort(model)


def test_nonzero_pad_is_not_folded():
    model = _pad_model(1.5)
    with changelog.collecting() as book:
        out = FoldPadIntoConv()(cleanup(import_onnx(model)[0]))
    assert "relax.nn.pad" in ops(out)
    assert "not zero" in book.summary()["FoldPadIntoConv"]["skipped"][0]["why"]
    assert_matches_ort(model)


def test_numpy_folding_leaves_no_constant_arithmetic():
    model = zoo.build("mobilenet_v2", width=0.35, resolution=32, num_classes=4, bn=True)
    mod = relax.transform.CanonicalizeBindings()(relax.transform.DecomposeOpsForInference()(import_onnx(model)[0]))
    assert "relax.sqrt" in ops(mod)
    assert "relax.sqrt" not in ops(FoldConstantsNumpy()(mod))


def _blocked_after_phase1(model):
    mod = import_onnx(model)[0]
    for p in pipeline.phases(targets.resolve(None), pipeline.Options())[0][1]:   # phase 1 only
        mod = p(mod)
    return ConvertToBlockedLayout(16, pad=True)(mod)


def test_blocked_layout_converts_only_at_the_borders():
    out = _blocked_after_phase1(zoo.build("mobilenet_v2", width=0.5, resolution=32, num_classes=4))
    names = ops(out)
    # the stem reads the NCHW image itself; the only conversion is back to NCHW before the classifier
    assert names.count("relax.layout_transform") == 1
    assert all("NCHW16c" in str(c.attrs.out_layout) for c in _calls(out, "relax.nn.conv2d"))


def test_grouped_conv_stays_nchw():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1] * 4, group=4)],
                          "g", [helper.make_tensor_value_info("x", 1, [1, 16, 8, 8])],
                          [helper.make_tensor_value_info("y", 1, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    out = ConvertToBlockedLayout(16, pad=True)(cleanup(import_onnx(model)[0]))
    assert [str(c.attrs.data_layout) for c in _calls(out, "relax.nn.conv2d")] == ["NCHW"]
    assert_matches_ort(model)


def _calls(mod, name):
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) and isinstance(
        e.op, tvm.ir.Op) and str(e.op.name) == name else None)
    return found


def test_blazeface_pools_and_channel_pads_stay_blocked():
    """A detector's max-pooled, zero-channel-padded shortcuts run blocked (before: back to NCHW and again
    blocked at every such block); layout transforms are left only at the heads' outputs."""
    out = _blocked_after_phase1(zoo.build("blazeface"))
    names = ops(out)
    assert names.count("relax.layout_transform") == 4 and "relax.nn.pad" in names    # whole zero blocks
    pools = _calls(out, "relax.nn.max_pool2d")
    assert len(pools) == 3 and all(str(p.attrs.layout) == "NCHW16c" for p in pools)
    assert all("NCHW16c" in str(c.attrs.out_layout) for c in _calls(out, "relax.nn.conv2d"))   # heads too


@pytest.mark.parametrize("cin,cout,extra", [(24, 24, 4), (24, 40, 16), (16, 16, 8)])
def test_channel_pad_of_a_blocked_tensor_zeroes_the_pad_lanes(cin, cout, extra):
    """conv -> + 1 (the pad lanes of a 24-channel blocked tensor become 1, not 0) -> zero channels appended ->
    conv reading them: the appended channels must read as zeros, in the same block or new ones."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((cout, cin, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((8, cout + extra, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "one"], ["b"]),
             helper.make_node("Pad", ["b", "pads"], ["p"], mode="constant"), helper.make_node("Conv", ["p", "w2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), "pads")]
    model = onnx_model(nodes, [1, cin, 6, 6], inits)
    out = ConvertToBlockedLayout(16, pad=True)(cleanup(import_onnx(model)[0]))
    names = ops(out)
    assert names.count("relax.layout_transform") == 2                  # the input's and the output's only
    assert ("relax.where" in names) == (cout % 16 != 0)                # pad lanes in the last block: zeroed
    assert_matches_ort(model)


def test_one_element_constants_stay_scalars_in_blocked_layout():
    """conv (24 channels: a padded block) -> * c -> + d -> / e -> conv, c, d, e of shape [1] as TFLite writes its
    scales: each stays one value (before: a per-channel blocked constant, 0 or 1 in the pad lanes, which readers
    of one step could not read as one), and the outputs are ONNX Runtime's."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((24, 8, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((16, 24, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Mul", ["a", "c"], ["b"]),
             helper.make_node("Add", ["b", "d"], ["e1"]), helper.make_node("Div", ["e1", "e"], ["f"]),
             helper.make_node("Conv", ["f", "w2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array([0.5], np.float32), "c"),
             numpy_helper.from_array(np.array([0.25], np.float32), "d"),
             numpy_helper.from_array(np.array([3.0], np.float32), "e")]
    model = onnx_model(nodes, [1, 8, 6, 6], inits)
    out = ConvertToBlockedLayout(16, pad=True)(cleanup(import_onnx(model)[0]))
    steps = [c for name in ("relax.multiply", "relax.add", "relax.divide") for c in _calls(out, name)]
    assert len(steps) == 3 and all(const_np(c.args[1]).size == 1 for c in steps)
    assert all(len(c.args[0].ty.shape.values) == 5 for c in steps)     # blocked, between blocked convs
    assert_matches_ort(model)


def test_channel_concat_of_whole_blocks_stays_blocked():
    """A fire module (SqueezeNet): 1x1 squeeze, then 1x1 and 3x3 expands of 32 channels each concatenated
    along channels, then a conv: the concat joins the two blocked tensors block after block, with no layout
    transform to NCHW and back around it; the model matches ONNX Runtime. A concat of 24 + 24 channels (not
    whole blocks of 16) goes through NCHW and matches too."""
    rng = np.random.default_rng(0)

    def fire(e):
        inits = {"sq": (16, 32, 1, 1), "e1": (e, 16, 1, 1), "e3": (e, 16, 3, 3), "out": (16, 2 * e, 1, 1)}
        nodes = [helper.make_node("Conv", ["x", "sq"], ["s"]), helper.make_node("Relu", ["s"], ["r"]),
                 helper.make_node("Conv", ["r", "e1"], ["a"]),
                 helper.make_node("Conv", ["r", "e3"], ["b"], pads=[1, 1, 1, 1]),
                 helper.make_node("Concat", ["a", "b"], ["c"], axis=1), helper.make_node("Relu", ["c"], ["cr"]),
                 helper.make_node("Conv", ["cr", "out"], ["y"])]
        graph = helper.make_graph(nodes, "fire", [helper.make_tensor_value_info("x", 1, [1, 32, 13, 13])],
                                  [helper.make_tensor_value_info("y", 1, None)],
                                  [numpy_helper.from_array(rng.standard_normal(v).astype(np.float32), k)
                                   for k, v in inits.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    def transforms(model):
        from compiler import driver
        mod, _ = driver.import_model(model, None)
        mod, _, _ = pipeline.run(mod, targets.x86_host(), pipeline.Options(sparse="off"))
        return mod["main"].script(show_meta=False).count("layout_transform")

    assert_matches_ort(fire(32))
    assert_matches_ort(fire(24))
    assert transforms(fire(32)) == 2                 # the input's to blocks, the output's back
    assert transforms(fire(24)) > 2


@pytest.mark.parametrize("cout", [2, 6])
def test_few_output_channels_go_back_to_nchw_from_their_lanes(cout):
    """conv -> conv with a few outputs (a mask, a head's scores: one padded block): the transform back to NCHW reads
    only their lanes (a slice of the blocked tensor's last axis first), not the 16 of the padded block."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((cout, 16, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"])]
    model = onnx_model(nodes, [1, 3, 12, 12], [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    out = ConvertToBlockedLayout(16, pad=True)(cleanup(import_onnx(model)[0]))
    (back,) = [c for c in _calls(out, "relax.layout_transform") if len(c.args[0].ty.shape.values) == 5]
    assert [int(d) for d in back.args[0].ty.shape.values] == [1, 1, 12, 12, cout]
    assert [int(d) for d in back.ty.shape.values] == [1, cout, 12, 12]
    assert_matches_ort(model)


@pytest.mark.parametrize("cout,cuts,blocked", [
    (32, [(0, 16), (16, 32)], True),             # a C2f / CSP split in halves of whole blocks
    (48, [(-32, 2 ** 63 - 1), (0, 16)], True),    # negative start, end past the last channel (as exporters write)
    (24, [(0, 16), (16, 24)], True),             # to the last channel of a padded block
    (32, [(0, 8), (8, 32)], False),              # inside a block: NCHW
])
def test_channel_slices_of_whole_blocks_stay_blocked(cout, cuts, blocked):
    """conv -> channel slices -> a conv on each -> add: slices from block boundaries stay blocked (no layout
    transform but the input's and output's), others go through NCHW; ONNX Runtime's outputs either way."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((cout, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4)]
    inits = [numpy_helper.from_array(w1, "w1")]
    for i, (lo, hi) in enumerate(cuts):
        width = len(range(cout)[lo:hi])
        inits += [numpy_helper.from_array(np.array([lo], np.int64), f"lo{i}"),
                  numpy_helper.from_array(np.array([hi], np.int64), f"hi{i}"),
                  numpy_helper.from_array(np.array([1], np.int64), f"ax{i}"),
                  numpy_helper.from_array(rng.standard_normal((16, width, 1, 1)).astype(np.float32), f"ws{i}")]
        nodes += [helper.make_node("Slice", ["a", f"lo{i}", f"hi{i}", f"ax{i}"], [f"s{i}"]),
                  helper.make_node("Conv", [f"s{i}", f"ws{i}"], [f"c{i}"])]
    nodes.append(helper.make_node("Add", ["c0", "c1"], ["y"]))
    model = onnx_model(nodes, [1, 3, 10, 10], inits)
    out = ConvertToBlockedLayout(16, pad=True)(cleanup(import_onnx(model)[0]))
    assert (ops(out).count("relax.layout_transform") == 1) == blocked    # the output's (the stem reads NCHW)
    assert_matches_ort(model)


def _layer_norm_model(channels: int, channels_last: bool, seed: int = 0):
    """conv -> LayerNorm over channels -> 1x1 conv, the LayerNorm as exporters write it: ReduceMean, Sub, Pow 2,
    ReduceMean, Add eps, Sqrt, Div, Mul, Add; channels_last: between transposes to NHWC and back (ConvNeXt's
    torch.onnx export), else over axis 1 of the NCHW tensor."""
    rng = np.random.default_rng(seed)
    axis = [-1] if channels_last else [1]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], kernel_shape=[3, 3], pads=[1] * 4)]
    src = "a"
    if channels_last:
        nodes.append(helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]))
        src = "t"
    nodes += [helper.make_node("ReduceMean", [src], ["m"], axes=axis), helper.make_node("Sub", [src, "m"], ["d"]),
              helper.make_node("Pow", ["d", "two"], ["p"]), helper.make_node("ReduceMean", ["p"], ["v"], axes=axis),
              helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
              helper.make_node("Div", ["d", "s"], ["n"]), helper.make_node("Mul", ["n", "g"], ["ng"]),
              helper.make_node("Add", ["ng", "b"], ["o"])]
    if channels_last:
        nodes.append(helper.make_node("Transpose", ["o"], ["oc"], perm=[0, 3, 1, 2]))
    nodes.append(helper.make_node("Conv", ["oc" if channels_last else "o", "w1"], ["y"]))
    vec = (channels,) if channels_last else (channels, 1, 1)
    inits = {"w0": rng.standard_normal((channels, 3, 3, 3)) * 0.3, "w1": rng.standard_normal((8, channels, 1, 1)),
             "two": np.array(2.0), "eps": np.array(1e-6), "g": rng.uniform(0.5, 1.5, vec),
             "b": rng.standard_normal(vec) * 0.1}
    return onnx_model(nodes, [1, 3, 10, 12], [numpy_helper.from_array(np.asarray(v, np.float32), k)
                                               for k, v in inits.items()])


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_layer_norm_over_channels_stays_blocked(tmp_path, channels_last):
    """The LayerNorm between two convs runs in the convs' blocked layout: its means over the channel blocks and
    their lanes, one value per pixel broadcast against the blocks; no transpose and no layout transform but the
    output's. With 24 channels (a padded block: pad lanes would enter the mean) it goes through NCHW. Both match
    ONNX Runtime."""
    import re
    for channels in (32, 24):
        cm = assert_matches_ort(_layer_norm_model(channels, channels_last), tol=1e-5, dump_dir=str(tmp_path))
        calls = re.findall(r"R\.call_tir\(cls\.(\w+)", (tmp_path / "4_lower.py").read_text())
        moved = sum("layout_transform" in c or "transpose" in c for c in calls)
        assert (moved == 1) if channels == 32 else (moved > 1), (channels, calls)
        assert cm.report["passes"]["SquareAsMultiply"]["counts"] == {"square": 1}


def test_channel_mean_kernel_adds_whole_vectors():
    """The mean over channels of NCHW16c (the fallback's lane_reduction): 16 partial sums per pixel, each block
    added as one vector, then the lanes; the scheduled kernel has a vectorised loop inside a parallel one."""
    from tvm import s_tir, te

    from schedules.f32_fallback import lane_reduction
    x = te.placeholder((1, 6, 5, 7, 16), "float32", name="x")
    k1, k4 = te.reduce_axis((0, 6), "k1"), te.reduce_axis((0, 16), "k4")
    red = te.compute((1, 1, 5, 7, 1), lambda a, b, h, w, c: te.sum(x[a, k1, h, w, k4], axis=[k1, k4]), name="red")
    sch = s_tir.Schedule(te.create_prim_func([x, red]))
    assert lane_reduction(sch, sch.get_sblock("red"), 16)
    text = sch.mod.script()
    assert "T.parallel(35)" in text and text.count("T.vectorized(16)") == 2, text
    lib = tvm.compile(sch.mod, target="llvm")
    data = np.random.default_rng(0).standard_normal((1, 6, 5, 7, 16)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((1, 1, 5, 7, 1), np.float32))
    lib(tvm.runtime.tensor(data), out)
    np.testing.assert_allclose(out.numpy(), data.sum(axis=(1, 4), keepdims=True), rtol=1e-5, atol=1e-5)


def test_per_pixel_map_times_blocked_tensor():
    """A spatial attention map (one channel: sigmoid of a 1-channel conv) times a 32-channel tensor, blocked: the
    map's value per pixel multiplies every channel (a one-channel tensor in its padded block would have paired
    lane with lane); matches ONNX Runtime."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Conv", ["a", "wm"], ["m"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Sigmoid", ["m"], ["s"]), helper.make_node("Mul", ["a", "s"], ["g"]),
             helper.make_node("Conv", ["g", "w1"], ["y"])]
    inits = {"w0": rng.standard_normal((32, 3, 3, 3)), "wm": rng.standard_normal((1, 32, 3, 3)) * 0.2,
             "w1": rng.standard_normal((8, 32, 1, 1))}
    assert_matches_ort(onnx_model(nodes, [1, 3, 9, 11], [numpy_helper.from_array(np.asarray(v, np.float32), k)
                                                          for k, v in inits.items()]), tol=1e-5)
