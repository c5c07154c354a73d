"""Ops that real detectors and classifiers use around the convs compile and match ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import assert_matches_ort


def _graph(nodes, inits, in_shape, out="out", opset=13):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, in_shape)],
                          [helper.make_tensor_value_info(out, 1, None)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _w(*shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.3).astype(np.float32)


def conv(x, w, out, k=3, s=1, group=1, pads=None):
    return helper.make_node("Conv", [x, w], [out], kernel_shape=[k, k], strides=[s, s],
                            pads=pads if pads is not None else [k // 2] * 4, group=group)


CASES = {
    # BlazeFace-style: conv, 2x2 max pool, channel zero-padding for the residual, relu
    "blaze_block": _graph([conv("x", "w1", "a", k=5, group=16), conv("a", "w2", "b", k=1),
                            helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                            helper.make_node("Pad", ["p", "pads"], ["pp"], mode="constant"),
                            conv("b", "w3", "c", k=3, s=2),
                            helper.make_node("Add", ["c", "pp"], ["d"]), helper.make_node("Relu", ["d"], ["out"])],
                           {"w1": _w(16, 1, 5, 5), "w2": _w(16, 16, 1, 1, seed=1), "w3": _w(24, 16, 3, 3, seed=2),
                            "pads": np.array([0, 0, 0, 0, 0, 8, 0, 0], np.int64)}, [1, 16, 16, 16]),
    # squeeze-and-excite with sigmoid, and a hard-sigmoid gate
    "squeeze_excite": _graph([conv("x", "w1", "a", k=1), helper.make_node("ReduceMean", ["a"], ["m"], axes=[2, 3]),
                               conv("m", "w2", "r", k=1, pads=[0] * 4), helper.make_node("Relu", ["r"], ["rr"]),
                               conv("rr", "w3", "e", k=1, pads=[0] * 4), helper.make_node("Sigmoid", ["e"], ["g"]),
                               helper.make_node("Mul", ["a", "g"], ["sa"]),
                               helper.make_node("HardSigmoid", ["sa"], ["hs"], alpha=0.2, beta=0.5),
                               helper.make_node("Mul", ["sa", "hs"], ["out"])],
                              {"w1": _w(32, 8, 1, 1), "w2": _w(8, 32, 1, 1, seed=1), "w3": _w(32, 8, 1, 1, seed=2)},
                              [1, 8, 10, 10]),
    # FPN-style: upsample (nearest and bilinear), concat on channels, average pool, leaky relu
    "fpn_head": _graph([conv("x", "w1", "a", k=3, s=2), helper.make_node("Resize", ["a", "", "sc"], ["u"], mode="nearest"),
                         helper.make_node("Resize", ["a", "", "sc"], ["ub"], mode="linear"),
                         helper.make_node("Concat", ["x", "u", "ub"], ["c"], axis=1),
                         helper.make_node("AveragePool", ["c"], ["ap"], kernel_shape=[3, 3], pads=[1] * 4, strides=[1, 1]),
                         conv("ap", "w2", "b", k=1), helper.make_node("LeakyRelu", ["b"], ["out"], alpha=0.1)],
                        {"w1": _w(16, 8, 3, 3), "w2": _w(12, 40, 1, 1, seed=1),
                         "sc": np.array([1, 1, 2, 2], np.float32)}, [1, 8, 12, 12]),
    # detector head: conv -> transpose to NHWC -> reshape to anchors -> softmax over classes
    "detector_head": _graph([conv("x", "w1", "a", k=3), helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]),
                              helper.make_node("Reshape", ["t", "shape"], ["r"]),
                              helper.make_node("Softmax", ["r"], ["out"], axis=-1)],
                             {"w1": _w(12, 16, 3, 3), "shape": np.array([1, -1, 3], np.int64)}, [1, 16, 6, 6]),
    # standalone batch norm (not after a conv), reflect padding, a 1x1 conv with more groups
    "misc": _graph([helper.make_node("BatchNormalization", ["x", "s", "b", "mu", "var"], ["bn"]),
                     helper.make_node("Pad", ["bn", "pads"], ["p"], mode="reflect"),
                     conv("p", "w1", "a", k=3, pads=[0] * 4), conv("a", "w2", "out", k=1, group=2)],
                    {"s": np.ones(8, np.float32) * 1.5, "b": np.full(8, 0.1, np.float32),
                     "mu": np.full(8, 0.2, np.float32), "var": np.full(8, 2.0, np.float32),
                     "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "w1": _w(16, 8, 3, 3),
                     "w2": _w(16, 8, 1, 1, seed=3)}, [1, 8, 9, 9]),
    # torch.onnx's dynamo exporter: global pool as ReduceMean over axes (-1, -2), then a view; the
    # blocked layout once reduced the vector lanes for -1 and the reshape failed
    "negative_axes_pool": _graph([conv("x", "w1", "a", k=1),
                                   helper.make_node("ReduceMean", ["a"], ["m"], axes=[-1, -2], keepdims=1),
                                   helper.make_node("Reshape", ["m", "shape"], ["out"])],
                                  {"w1": _w(32, 8, 1, 1), "shape": np.array([1, 32], np.int64)}, [1, 8, 7, 7]),
    # torch.onnx's channel shuffle (ShuffleNet): the shape read at run time through Shape -> Gather ->
    # Div -> Unsqueeze -> Concat -> Reshape, twice; TVM's importer crashed on Gather of a Shape
    "channel_shuffle": _graph([conv("x", "w1", "a", k=1),
                                helper.make_node("Shape", ["a"], ["s"]),
                                helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
                                helper.make_node("Gather", ["s", "i1"], ["c"], axis=0),
                                helper.make_node("Div", ["c", "two"], ["c2"]),
                                helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
                                helper.make_node("Unsqueeze", ["c2", "ax0"], ["c21"]),
                                helper.make_node("Concat", ["n1", "two1", "c21", "hw"], ["shape5"], axis=0),
                                helper.make_node("Reshape", ["a", "shape5"], ["r"]),
                                helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
                                helper.make_node("Shape", ["a"], ["s2"]),
                                helper.make_node("Reshape", ["t", "s2"], ["u"]),
                                conv("u", "w2", "out", k=3)],
                               {"w1": _w(16, 8, 1, 1), "w2": _w(8, 16, 3, 3, seed=1), "i0": np.array(0, np.int64),
                                "i1": np.array(1, np.int64), "two": np.array(2, np.int64),
                                "ax0": np.array([0], np.int64), "two1": np.array([2], np.int64),
                                "hw": np.array([6, 6], np.int64)}, [1, 8, 6, 6]),
}


def test_shape_arithmetic_folds_to_constants():
    from compiler.frontend.onnx_fold_shapes import fold_shape_subgraphs
    model, folded = fold_shape_subgraphs(CASES["channel_shuffle"], {"x": [1, 8, 6, 6]})
    ops = [n.op_type for n in model.graph.node]
    assert folded == 8 and ops == ["Conv", "Reshape", "Transpose", "Reshape", "Conv"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_mix_matches_onnxruntime(name):
    assert_matches_ort(CASES[name], tol=1e-4)


@pytest.mark.parametrize("largest", [1, 0])
def test_topk_and_cumsum(largest):
    """A classifier's TopK (values and int64 indices; TVM lowers it to a runtime library call that has no loop nest
    to schedule) and a CumSum, against ONNX Runtime; tuning finds no task in the library call."""
    from onnx import TensorProto

    from compiler import tune
    import targets
    nodes = [conv("x", "w", "c"), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("TopK", ["f", "k"], ["v", "i"], largest=largest),
             helper.make_node("CumSum", ["f", "axis"], ["s"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("v", 1, None),
                           helper.make_tensor_value_info("i", TensorProto.INT64, None),
                           helper.make_tensor_value_info("s", 1, None)],
                          [numpy_helper.from_array(_w(16, 3, 3, 3), "w"),
                           numpy_helper.from_array(np.array([5], np.int64), "k"),
                           numpy_helper.from_array(np.array(1, np.int64), "axis")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    cm = assert_matches_ort(model, tol=1e-5)
    # OUT.json names the runtime routine it calls and the library a board needs for it (the runtime alone lacks it)
    assert cm.metadata()["runtime"] == {"functions": ["tvm.contrib.sort.topk"],
                                        "libraries": ["libtvm_runtime.so", "libtvm_runtime_extra.so"]}
    tasks = tune.extract_tasks(model, targets.x86_host(), meta_schedule=False)
    assert tasks and not any("topk" in t.name for t in tasks), [t.name for t in tasks]
