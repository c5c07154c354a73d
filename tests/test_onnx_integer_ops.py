"""Dynamically quantized ONNX models (ONNX Runtime's quantize_dynamic: DynamicQuantizeLinear, ConvInteger,
MatMulInteger) are rewritten to float ops of the same values and compile; the fallback schedule keeps their
quantize steps and whole-tensor reductions vectorised."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

import compiler
import zoo
from compiler.frontend.model_info import QUANTIZED_VERIFY_TOLERANCE
from compiler.frontend.onnx_integer_ops import integer_ops_in_float

INTEGER_OPS = {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}


def _dynamic_model(tmp_path, per_channel: bool) -> str:
    from onnxruntime.quantization import quantize_dynamic
    src, dst = tmp_path / "float.onnx", tmp_path / f"dynamic_{per_channel}.onnx"
    src.write_bytes(zoo.build("mobilenet_v2", width=0.35, resolution=64, num_classes=10).SerializeToString())
    quantize_dynamic(str(src), str(dst), per_channel=per_channel)
    return str(dst)


def _ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_rewrite_is_float_ops_with_the_integer_models_values(tmp_path, per_channel):
    """Every ConvInteger / MatMulInteger and the DynamicQuantizeLinear before it become float ops (and the int8
    weights their float copies); ONNX Runtime gives the rewritten graph's output bit for bit equal to the
    integer graph's (its integer kernels are exact, and so is a float conv of whole numbers this small)."""
    model = onnx.load(_dynamic_model(tmp_path, per_channel))
    before = collections.Counter(n.op_type for n in model.graph.node)
    rewritten, count = integer_ops_in_float(model)
    after = collections.Counter(n.op_type for n in rewritten.graph.node)
    assert count == before["ConvInteger"] + before["MatMulInteger"] > 30
    assert not INTEGER_OPS & set(after) and after["Conv"] == before["ConvInteger"]
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in rewritten.graph.initializer
               if t.name.endswith("__float"))
    assert not [t.name for t in rewritten.graph.initializer if t.data_type in (onnx.TensorProto.INT8,
                                                                               onnx.TensorProto.UINT8)]
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(_ort(rewritten, x), _ort(model, x))


def test_integer_model_read_as_int_keeps_its_types():
    """A ConvInteger output read by something other than a Cast to float, and the uint8 tensor of a
    DynamicQuantizeLinear read by another op, keep their integer types through Casts."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 1, 1)).astype(np.int8), "w")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("ConvInteger", ["q", "w", "z"], ["acc"]),
             helper.make_node("Neg", ["acc"], ["neg"]),                     # int32 arithmetic on the result
             helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.INT32)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("neg", TensorProto.INT32, [1, 4, 4, 4]),
                               helper.make_tensor_value_info("q32", TensorProto.INT32, [1, 3, 4, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    rewritten, count = integer_ops_in_float(model)
    assert count == 1 and not INTEGER_OPS & {n.op_type for n in rewritten.graph.node}
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    import onnxruntime as ort
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == np.int32
        np.testing.assert_array_equal(a, b)


def test_dynamically_quantized_model_compiles_and_verifies(tmp_path):
    """ONNX Runtime's quantize_dynamic output was refused ('unsupported op ConvInteger'); it compiles, says how it
    is computed and verifies within the quantized tolerance."""
    cm = compiler.compile_model(_dynamic_model(tmp_path, per_channel=True))
    assert cm.info.verify_tolerance == QUANTIZED_VERIFY_TOLERANCE
    assert any(n.startswith("dynamically quantized:") for n in cm.info.notes)
    results = cm.verify()
    assert all(r.ok for r in results), [r.line() for r in results]


def test_runtime_quantize_steps_stay_in_the_blocked_layout(tmp_path):
    """The quantize steps' scalar scale and the min / max over each whole activation are the same in any layout,
    so ConvertToBlockedLayout keeps them on the blocked tensors: the only conversion is back to NCHW before the
    classifier, as in the float model (a scalar operand failed the pass; a whole reduction went back to NCHW).
    Blocks that divide the channels here (pad=False); a tensor with padding channels is reduced in NCHW, as
    its padding lanes may hold any value."""
    import targets
    from compiler import pipeline
    from compiler.frontend.onnx_import import import_onnx
    from passes.convert_to_blocked_layout import ConvertToBlockedLayout
    from tvm import relax
    mod = import_onnx(_dynamic_model(tmp_path, per_channel=False))[0]
    for p in pipeline.phases(targets.resolve(None), pipeline.Options())[0][1]:   # phase 1 only
        mod = p(mod)
    mod = ConvertToBlockedLayout(16, pad=False)(mod)
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    names = [str(c.op.name) for c in calls if hasattr(c.op, "name")]
    assert names.count("relax.layout_transform") == 1
    reductions = [c for c in calls if hasattr(c.op, "name") and str(c.op.name) in ("relax.max", "relax.min")
                  and c.attrs.axis is None]
    blocked = [c for c in reductions if len(c.args[0].ty.shape.values) == 5]
    assert len(reductions) > 60 and len(blocked) == len(reductions) - 4     # not: the image's, the classifier's
