"""ONNX Runtime's com.microsoft QuantizeLinear / DequantizeLinear (its quantizer's int4 weights) read as standard ops."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

import compiler
import zoo
from compiler.frontend.onnx_contrib_qdq import DOMAIN, contrib_qdq_to_standard


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
    rewritten, count = contrib_qdq_to_standard(onnx.load(int4_model))
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
    assert any("com.microsoft QuantizeLinear / DequantizeLinear" in n for n in cm.info.notes)
