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
    "inception_v1",   # LRN, Concat of four branches, MaxPool with pads
])
def test_real_export_matches_onnxruntime(name):
    cm = assert_matches_ort(light_model(name), tol=1e-3)
    assert cm.metadata()["outputs"][0]["shape"][1] == 1000


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shufflenet", "inception_v2", "densenet121"])
def test_real_export_matches_onnxruntime_slow(name):
    assert_matches_ort(light_model(name), tol=1e-3)
