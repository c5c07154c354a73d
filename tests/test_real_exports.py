"""Graphs from real exporters (the onnx package's 'light' model zoo: ResNet-50, SqueezeNet, Inception,
ShuffleNet, DenseNet as exported by onnx-caffe2, opset 9) compile and match ONNX Runtime.

The light models compute every weight with ConstantOfShape (one value per tensor), which would make
any network's output constant; the tests put seeded random weights in their place first.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import assert_matches_ort

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """The light model `name` with its ConstantOfShape weights replaced by seeded He-scaled random ones."""
    model = onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    bn_positive = {n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (1, 4)}
    keep = []
    for node in model.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = [int(d) for d in inits[node.input[0]]]
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 0
        if fan_in:   # conv / fc weights
            value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif node.output[0] in bn_positive:   # BN scale and variance
            value = rng.uniform(0.5, 1.5, shape)
        else:        # biases, BN shift and mean
            value = rng.standard_normal(shape) * 0.1
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def test_light_model_weights_are_random_not_constant():
    model = light_model("squeezenet")
    assert not any(n.op_type == "ConstantOfShape" for n in model.graph.node)
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["conv1_w_0"]
    assert w.shape == (64, 3, 3, 3) and w.std() > 0.1


@pytest.mark.parametrize("name", [
    "squeezenet",     # Concat of two conv branches (blocked tensors inside a tuple), Dropout, MaxPool
    "resnet50",       # variadic Sum for the residual, BatchNormalization, 7x7 AveragePool
])
def test_real_export_matches_onnxruntime(name):
    cm = assert_matches_ort(light_model(name), tol=1e-3)
    assert cm.metadata()["outputs"][0]["shape"][1] == 1000


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shufflenet", "inception_v2", "densenet121",
                                  "inception_v1"])   # LRN, Concat of four branches, MaxPool with pads (57 s)
def test_real_export_matches_onnxruntime_slow(name):
    assert_matches_ort(light_model(name), tol=1e-3)


def test_prune_zeros_the_smallest_1x1_and_classifier_weights(tmp_path):
    """tools/real_exports.py prune: exactly round(85%) of each 1x1 conv's, the classifier's and a constant 2-D
    MatMul operand's weights, the smallest in magnitude, become zero; kxk and depthwise convs are left as they
    were."""
    import sys
    from onnx import helper
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import real_exports
    rng = np.random.default_rng(0)
    ws = {"stem": rng.standard_normal((8, 3, 3, 3)), "dw": rng.standard_normal((8, 1, 3, 3)),
          "pw": rng.standard_normal((16, 8, 1, 1)), "fc": rng.standard_normal((10, 16)),
          "mm": rng.standard_normal((10, 6))}
    nodes = [helper.make_node("Conv", ["x", "stem"], ["a"], pads=[1] * 4),
             helper.make_node("Conv", ["a", "dw"], ["b"], pads=[1] * 4, group=8),
             helper.make_node("Conv", ["b", "pw"], ["c"]),
             helper.make_node("GlobalAveragePool", ["c"], ["d"]), helper.make_node("Flatten", ["d"], ["e"]),
             helper.make_node("Gemm", ["e", "fc"], ["f"], transB=1), helper.make_node("MatMul", ["f", "mm"], ["y"])]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, None)],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in ws.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "torch_toy.onnx")
    real_exports.prune(str(tmp_path), names=["toy"])
    out = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "torch_toy_pruned85.onnx").graph.initializer}
    for k in ("stem", "dw"):
        np.testing.assert_array_equal(out[k], ws[k].astype(np.float32))
    for k in ("pw", "fc", "mm"):
        w, zero = ws[k].astype(np.float32), out[k] == 0
        assert zero.sum() == round(0.85 * w.size)
        assert np.abs(w[zero]).max() <= np.abs(w[~zero]).min()          # the smallest ones
        np.testing.assert_array_equal(out[k][~zero], w[~zero])
