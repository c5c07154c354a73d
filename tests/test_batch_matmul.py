"""schedules/f32_batch_matmul.py and f32_softmax.py: attention's matmuls of computed tensors and its softmax."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import assert_matches_ort, onnx_model


def _attention_model(a_shape, b_shape, seed=0):
    """relu(x * s) @ relu(y * t): both operands computed, as attention's Q K^T and softmax(.) V are."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, a_shape[-1:]).astype(np.float32), "s"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, b_shape[-1:]).astype(np.float32), "t")]
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("Relu", ["xs"], ["a"]),
             helper.make_node("Mul", ["y", "t"], ["ys"]), helper.make_node("Relu", ["ys"], ["b"]),
             helper.make_node("MatMul", ["a", "b"], ["z"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, list(a_shape)),
                                       helper.make_tensor_value_info("y", 1, list(b_shape))],
                          [helper.make_tensor_value_info("z", 1, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("a_shape,b_shape", [
    ((1, 4, 49, 24), (1, 4, 24, 49)),      # Q K^T: 4 heads, 7x7 tokens (odd rows and columns)
    ((1, 4, 64, 64), (1, 4, 64, 24)),      # weights x V: a head width of 24 (vectors of 8)
    ((2, 33, 16), (2, 16, 80)),            # two batches, rows not a multiple of the tile
    ((20, 12), (12, 10)),                  # plain 2-D, 10 columns
    ((1, 1, 8), (1, 8, 16)),               # one row
    ((4, 8), (8, 1)),                      # one column
])
def test_computed_matmuls_run_our_kernel(a_shape, b_shape):
    cm = assert_matches_ort(_attention_model(a_shape, b_shape), tol=1e-5)
    assert any(k.startswith("f32_batch_matmul_") for k in cm.report["kernels"]), cm.report["kernels"]


def _softmax_model(shape, axis, scale=4.0):
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "k")]
    nodes = [helper.make_node("Mul", ["x", "k"], ["xs"]), helper.make_node("Softmax", ["xs"], ["y"], axis=axis)]
    return onnx_model(nodes, list(shape), inits)


@pytest.mark.parametrize("shape,lanes", [((1, 4, 20, 784), 16), ((3, 196), 4), ((2, 5, 10), 2), ((6, 7), 1),
                                         ((1, 16), 16)])
def test_softmax_over_the_last_axis_runs_in_rows(shape, lanes):
    """Attention's softmax over the keys: row lengths with 16, 4, 2 and 1 lanes, and a classifier's one row of one
    vector; ONNX Runtime's outputs."""
    cm = assert_matches_ort(_softmax_model(shape, -1), tol=1e-5)
    assert f"f32_softmax_rows_{lanes}" in cm.report["kernels"], cm.report["kernels"]


def test_softmax_over_channels_keeps_tvms_kernel():
    cm = assert_matches_ort(_softmax_model((1, 21, 8, 8), 1), tol=1e-5)
    assert not any(k.startswith("f32_softmax") for k in cm.report["kernels"])
