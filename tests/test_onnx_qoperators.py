"""QOperator-format quantized ONNX (ONNX Runtime's quantize_static with QuantFormat.QOperator: QLinearConv and the
com.microsoft QLinearAdd / QLinearMul / QLinearGlobalAveragePool / QGemm) is read in QDQ form and compiles."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

import compiler
import zoo
from compiler.frontend.model_info import QUANTIZED_VERIFY_TOLERANCE
from compiler.frontend.onnx_qoperators import MICROSOFT, STANDARD, qoperators_to_qdq


@pytest.fixture(scope="module")
def qoperator_model(tmp_path_factory) -> str:
    """A MobileNetV3-Small (squeeze-and-excitation: QLinearMul, residual QLinearAdd, QGemm classifier) quantized by
    ONNX Runtime in the QOperator format, calibrated on 4 random images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    folder = tmp_path_factory.mktemp("qop")
    src, dst = folder / "float.onnx", folder / "qoperator.onnx"
    src.write_bytes(zoo.build("mobilenet_v3_small", width=0.5, resolution=64, num_classes=10).SerializeToString())
    rng = np.random.default_rng(0)

    class Images(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(src), str(dst), Images(), quant_format=QuantFormat.QOperator,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, per_channel=True)
    return str(dst)


def test_qoperators_become_float_ops_between_quantize_steps(qoperator_model):
    """Every QLinear* / QGemm node becomes its float op between DequantizeLinear and QuantizeLinear, the int8
    weights and int32 biases float constants, no com.microsoft op or opset left; ONNX Runtime runs the rewritten
    graph to within a few int8 steps of the original (its requantization rounds in another order)."""
    import onnxruntime as ort
    model = onnx.load(qoperator_model)
    before = collections.Counter(n.op_type for n in model.graph.node)
    qops = sum(v for k, v in before.items() if k in STANDARD | MICROSOFT)
    assert before["QLinearConv"] and before["QLinearMul"] and before["QLinearAdd"] and before["QGemm"]
    rewritten, count = qoperators_to_qdq(model)
    after = collections.Counter(n.op_type for n in rewritten.graph.node)
    assert count == qops and not (STANDARD | MICROSOFT) & set(after)
    assert after["Conv"] == before["QLinearConv"] and after["Gemm"] == before["QGemm"]
    assert not [o for o in rewritten.opset_import if o.domain == "com.microsoft"]
    assert not [t.name for t in rewritten.graph.initializer if t.data_type == onnx.TensorProto.INT32]
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    want = ort.InferenceSession(model.SerializeToString(), opts).run(None, {"input": x})[0]
    got = ort.InferenceSession(rewritten.SerializeToString(), opts).run(None, {"input": x})[0]
    assert np.abs(got - want).max() <= QUANTIZED_VERIFY_TOLERANCE * np.abs(want).max()


def test_qoperator_model_compiles_and_verifies(qoperator_model):
    """Refused before ('custom op com.microsoft.QLinearAdd'); compiles with a note, its quantize steps as float ops,
    and verifies against ONNX Runtime on the QOperator model within the quantized tolerance."""
    cm = compiler.compile_model(qoperator_model)
    assert any(n.startswith("QOperator format:") for n in cm.info.notes)
    assert cm.info.verify_tolerance == QUANTIZED_VERIFY_TOLERANCE
    assert cm.report["passes"]["QuantizeStepsInFloat"]["counts"]["in_float"] > 50
    results = cm.verify()
    assert all(r.ok for r in results), [r.line() for r in results]
