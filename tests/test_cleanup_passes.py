"""Phase 1 and layout passes: the expected IR appears (structural) and outputs do not change (numerical)."""
from __future__ import annotations

import numpy as np
import onnx
import tvm
from onnx import helper, numpy_helper
from tvm import relax

import targets
import zoo
from compiler import pipeline
from compiler.frontend.onnx_import import import_onnx
from conftest import assert_matches_ort
from passes import changelog
from passes.convert_to_blocked_layout import ConvertToBlockedLayout
from passes.fold_constants_numpy import FoldConstantsNumpy
from passes.fold_pad_into_conv import FoldPadIntoConv
from passes.fold_scale_into_conv import FoldScaleIntoConv


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


def test_blocked_layout_converts_only_at_the_borders():
    model = zoo.build("mobilenet_v2", width=0.5, resolution=32, num_classes=4)
    spec = targets.resolve(None)
    mod = import_onnx(model)[0]
    for p in pipeline.phases(spec, pipeline.Options())[0][1]:   # phase 1 only
        mod = p(mod)
    out = ConvertToBlockedLayout(16, pad=True)(mod)
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
