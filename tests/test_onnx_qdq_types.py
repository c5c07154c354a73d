"""Q / DQ steps TVM cannot read (ONNX Runtime's com.microsoft ones, int4 weights) rewritten into ones it can."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

import compiler
import zoo
from compiler.frontend.onnx_qdq_types import DOMAIN, readable_qdq


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory) -> str:
    """A MobileNetV2 quantized by ONNX Runtime with int4 per-channel weights and uint8 activations (QDQ at opset 13:
    its quantizer writes com.microsoft Q / DQ for int4), calibrated on 4 random images."""
    from onnxruntime.quantization import QuantType

    from zoo.quantize_qdq import quantize_qdq
    folder = tmp_path_factory.mktemp("int4")
    src, dst = folder / "float.onnx", folder / "int4.onnx"
    src.write_bytes(zoo.build("mobilenet_v2", width=0.35, resolution=64, num_classes=10).SerializeToString())
    quantize_qdq(str(src), str(dst), (1, 3, 64, 64), 4, np.random.default_rng(0), activation_type=QuantType.QUInt8,
                 weight_type=QuantType.QInt4)
    return str(dst)


def test_contrib_qdq_become_standard_and_int4_weights_fold(int4_model):
    """Structural: no com.microsoft node or opset left, the int4 weights' dequantizes folded to float initializers,
    the activations' steps standard Q / DQ. Numerical: ONNX Runtime, op by op, gives the rewritten graph's output
    equal to the original's."""
    import onnxruntime as ort
    model = onnx.load(int4_model)
    before = collections.Counter((n.domain, n.op_type) for n in model.graph.node)
    assert before[(DOMAIN, "DequantizeLinear")] and any(t.data_type == onnx.TensorProto.INT4
                                                        for t in model.graph.initializer)
    rewritten, count = readable_qdq(onnx.load(int4_model))
    after = collections.Counter((n.domain, n.op_type) for n in rewritten.graph.node)
    assert count == before[(DOMAIN, "DequantizeLinear")] + before[(DOMAIN, "QuantizeLinear")]
    assert not [k for k in after if k[0] == DOMAIN] and not [o for o in rewritten.opset_import if o.domain == DOMAIN]
    assert not [t for t in rewritten.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert after[("", "QuantizeLinear")] == before[(DOMAIN, "QuantizeLinear")]
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # NOTE: op by op: optimised, ONNX Runtime fuses the original's steps into its own integer kernels, which
    # round in another order than the float ops the rewritten graph leaves it
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"input": x})[0]
    got = ort.InferenceSession(rewritten.SerializeToString(), opts).run(None, {"input": x})[0]
    np.testing.assert_array_equal(got, want)


def test_int4_model_compiles_and_verifies(int4_model):
    """Before, the compile stopped at "custom op 'com.microsoft.DequantizeLinear'"; now it verifies against ONNX
    Runtime and says what it read."""
    cm = compiler.compile_model(int4_model)
    assert all(r.ok for r in cm.verify())
    assert any("com.microsoft or int4 QuantizeLinear / DequantizeLinear" in n for n in cm.info.notes)


def test_int4_weights_in_standard_dequantize_fold(tmp_path):
    """At opset 21 the quantizer writes standard DequantizeLinear of int4 weights, which TVM failed to read ("size
    mismatch": the packed type); folded to float32 they compile and verify."""
    from onnx import version_converter
    from onnxruntime.quantization import QuantType

    from zoo.quantize_qdq import quantize_qdq
    src, dst = tmp_path / "float21.onnx", tmp_path / "int4_21.onnx"
    model = zoo.build("mobilenet_v2", width=0.35, resolution=64, num_classes=10)
    onnx.save(version_converter.convert_version(model, 21), str(src))
    quantize_qdq(str(src), str(dst), (1, 3, 64, 64), 2, np.random.default_rng(0), activation_type=QuantType.QUInt8,
                 weight_type=QuantType.QInt4)
    q = onnx.load(str(dst))
    assert not [n for n in q.graph.node if n.domain == DOMAIN]
    assert any(t.data_type == onnx.TensorProto.INT4 for t in q.graph.initializer)
    cm = compiler.compile_model(str(dst))
    assert all(r.ok for r in cm.verify())


@pytest.mark.parametrize("block", [0, 2])
def test_folded_dequantize_equals_onnxruntime(block):
    """A constant int4 DequantizeLinear per axis, or in blocks of 2 along it (opset 21), folds to the values ONNX
    Runtime computes."""
    import onnxruntime as ort
    from onnx import helper
    rng = np.random.default_rng(block)
    x = rng.integers(-8, 8, (5, 3)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, (3 if block else 5, 3) if block else 5).astype(np.float32)
    zeros = rng.integers(-2, 3, scales.shape).astype(np.int8)
    attrs = {"axis": 0, **({"block_size": block} if block else {})}
    inits = [helper.make_tensor("x", onnx.TensorProto.INT4, x.shape, x.ravel().tolist()),
             onnx.numpy_helper.from_array(scales, "s"),
             helper.make_tensor("z", onnx.TensorProto.INT4, zeros.shape, zeros.ravel().tolist())]
    node = helper.make_node("DequantizeLinear", ["x", "s", "z"], ["w"], **attrs)
    add = helper.make_node("Add", ["w", "in"], ["out"])
    graph = helper.make_graph([node, add], "g", [helper.make_tensor_value_info("in", onnx.TensorProto.FLOAT, [5, 3])],
                              [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [5, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    zero_in = {"in": np.zeros((5, 3), np.float32)}
    want = ort.InferenceSession(model.SerializeToString()).run(None, zero_in)[0]
    folded, count = readable_qdq(model)
    assert count == 1 and [n.op_type for n in folded.graph.node] == ["Add"]
    np.testing.assert_array_equal(ort.InferenceSession(folded.SerializeToString()).run(None, zero_in)[0], want)
