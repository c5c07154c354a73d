"""Built-in models compiled for this machine match ONNX Runtime; the Python API exports and loads them."""
from __future__ import annotations

import numpy as np
import pytest

import compiler
import zoo
from conftest import assert_matches_ort


@pytest.mark.parametrize("name,opts", [
    ("mobilenet_v2", dict(width=0.35, resolution=64, num_classes=10)),
    ("mobilenet_v2", dict(width=0.5, resolution=48, num_classes=10, bn=True, explicit_pad=True)),
    ("mobilenet_v3_small", dict(width=0.5, resolution=64, num_classes=10)),
    ("mobilenet_v3_large", dict(width=0.35, resolution=48, num_classes=10, bn=True)),
    ("efficientnet_lite0", dict(resolution=64, num_classes=10, explicit_pad=True)),
])
def test_builtin_models_match_onnxruntime(name, opts):
    assert_matches_ort(zoo.build(name, **opts))


@pytest.mark.parametrize("sparsity", [0.0, 0.85])
def test_blazeface_detector_matches_onnxruntime(sparsity, monkeypatch):
    """A MediaPipe-style detector: asymmetric pads, max-pooled and channel-padded shortcuts, two heads reshaped
    and concatenated into two outputs; at 85% zeros its block 1x1 convs run sparse in CHW around those ops, the
    stem and the shortcuts' max pools too (cost measurement off: the rule's choice, not a timing, decides here)."""
    monkeypatch.setenv("SHRINKC_COST", "off")
    cm = assert_matches_ort(zoo.build("blazeface", sparsity=sparsity))
    assert [o["name"] for o in cm.metadata()["outputs"]] == ["scores", "boxes"]
    sparse = [r["kernel"] for r in cm.metadata()["sparse_layers"]]
    assert len(sparse) == (16 if sparsity else 0) and all(k.startswith("f32_spmm_chw") for k in sparse)
    # sparse: the stem, read by block 0's depthwise conv and its shortcut, runs in CHW alone
    assert any(k.startswith("f32_conv5x5s2_chw_") for k in cm.report["kernels"]) == bool(sparsity)
    # and its shortcuts' max pools of sparse outputs run in CHW
    assert sum(k.startswith("f32_maxpool2x2s2_chw_") for k in cm.report["kernels"]) == (3 if sparsity else 0)


def test_python_api_export_load_run(tmp_path):
    model = zoo.build("mobilenet_v2", width=0.35, resolution=32, num_classes=5)
    cm = compiler.compile_model(model)
    so, meta = cm.export(str(tmp_path / "api.so"))
    x = {"input": np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    direct = cm.run(x)[0]
    loaded = compiler.load(so).run(x)[0]
    np.testing.assert_allclose(direct, loaded, rtol=0, atol=0)
    assert direct.shape == (1, 5)
    assert cm.metadata()["runtime"] == {"functions": [], "libraries": ["libtvm_runtime.so"]}   # no routine by name


def test_compiled_vm_by_default_bytecode_for_profiling(tmp_path):
    """CPU libraries run the model's Relax function as compiled code; a profiling build runs it as bytecode
    and times every kernel. Both compute the same; profiling the compiled one is a clear error."""
    from targets.errors import ShrinkcError
    model = zoo.build("mobilenet_v2", width=0.35, resolution=32, num_classes=5)
    x = {"input": np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    fast, _ = compiler.compile_model(model).export(str(tmp_path / "fast.so"))
    prof, _ = compiler.compile_model(model, profiling=True).export(str(tmp_path / "prof.so"))
    fast_runner, prof_runner = compiler.load(fast), compiler.load(prof)
    assert (fast_runner.metadata["vm"], prof_runner.metadata["vm"]) == ("compiled", "bytecode")
    np.testing.assert_array_equal(fast_runner.run(x)[0], prof_runner.run(x)[0])
    rows = prof_runner.profile(x, repeat=2)
    assert any(r["kernel"].startswith("f32_") and r["calls"] >= 1 for r in rows)
    with pytest.raises(ShrinkcError, match="profiling=True"):
        fast_runner.profile(x, repeat=1)


def test_weights_are_inside_the_library(tmp_path):
    """The .so alone (plus its JSON) runs: no parameter files are written."""
    model = zoo.build("mobilenet_v2", width=0.35, resolution=32, num_classes=5)
    so, _ = compiler.compile_model(model).export(str(tmp_path / "w.so"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.so"]
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert (tmp_path / "w.so").stat().st_size > 4 * params * 0.9


def test_verify_compares_tiny_outputs_to_their_own_magnitude():
    # untrained Keras models give logits of 1e-11; a fixed 1e-6 floor on the scale let any answer pass
    import numpy as np
    from compiler import verify
    ref = np.array([[1e-11, -2e-11, 3e-11]])
    (good,) = verify.compare(["y"], [ref * (1 + 1e-7)], [ref])
    (bad,) = verify.compare(["y"], [-ref], [ref])
    (zero,) = verify.compare(["y"], [np.zeros((1, 3))], [np.zeros((1, 3))])
    assert good.ok and not bad.ok and zero.ok


def test_dynamic_range_quantized_sparse_tflite_verifies_against_litert(tmp_path, monkeypatch):
    """int8 weights stored sparse (TFLite's sparsity + dynamic-range optimizations together) run as spmm kernels on
    their dequantized values; --verify's reference falls back to LiteRT's own kernels where the XNNPACK delegate
    fails on the model, and allows the difference of LiteRT quantizing the ops' inputs (cost measurement off)."""
    monkeypatch.setenv("SHRINKC_COST", "off")
    from zoo.tflite_writer import mobilenet_v2_tflite
    path = tmp_path / "int8_sparse.tflite"
    path.write_bytes(mobilenet_v2_tflite(num_blocks=4, resolution=32, num_classes=16, weights="int8", sparsity=0.85))
    cm = compiler.compile_model(str(path))
    results = cm.verify()
    assert all(r.ok for r in results) and 0 < results[0].rel_err, [r.line() for r in results]
    assert any(k.startswith("f32_spmm_chw") for k in cm.report["kernels"])


def test_qdq_quantized_onnx_model_verifies_with_the_quantized_tolerance(tmp_path):
    """ONNX Runtime's static QDQ quantization (int8 weights and activations as QuantizeLinear / DequantizeLinear
    pairs) compiles to float32 with the quantize steps kept, as float ops in the conv kernels; single values can land
    one int8 step apart from ONNX Runtime's (float summation order), so the model says which tolerance --verify
    applies, and a note says why."""
    from compiler.frontend.model_info import QUANTIZED_VERIFY_TOLERANCE
    from zoo.quantize_qdq import quantize_qdq
    src, qdq = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    src.write_bytes(zoo.build("mobilenet_v2", width=0.35, resolution=64, num_classes=10).SerializeToString())
    quantize_qdq(str(src), str(qdq), (1, 3, 64, 64), 4, np.random.default_rng(0))
    cm = compiler.compile_model(str(qdq))
    assert cm.info.verify_tolerance == QUANTIZED_VERIFY_TOLERANCE
    assert any(n.startswith("quantized activations:") and "QuantizeLinear" in n for n in cm.info.notes)
    results = cm.verify()
    assert all(r.ok for r in results), [r.line() for r in results]
    assert compiler.compile_model(str(src)).info.verify_tolerance == 0.0
    # the activations' quantize steps run as float ops fused into the convs (QuantizeStepsInFloat): no int8 tensor
    # and no layout transform for one is left
    assert cm.report["passes"]["QuantizeStepsInFloat"]["counts"]["in_float"] > 10
    assert not [k for k in cm.report["kernels"] if "quantize" in k or "layout_transform" in k]


def test_float16_weights_behind_float32_borders_say_so(tmp_path):
    """A float16 converter's keep_io_types output: float32 input and output cast to float16 inside, float16
    weights; widened like any float16 model, and the note does not claim float16 inputs."""
    import onnx
    from onnx import TensorProto, helper
    model = _float16_model(zoo.build("mobilenet_v3_large", width=0.35, resolution=32, num_classes=5))
    g = model.graph
    (inp,), (out,) = g.input, g.output
    for n in g.node:
        n.input[:] = [inp.name + "_h" if x == inp.name else x for x in n.input]
        n.output[:] = [out.name + "_h" if x == out.name else x for x in n.output]
    g.node.insert(0, helper.make_node("Cast", [inp.name], [inp.name + "_h"], to=TensorProto.FLOAT16))
    g.node.append(helper.make_node("Cast", [out.name + "_h"], [out.name], to=TensorProto.FLOAT))
    inp.type.tensor_type.elem_type = out.type.tensor_type.elem_type = TensorProto.FLOAT
    onnx.checker.check_model(model)
    cm = compiler.compile_model(model, sparse="off")
    assert "a float16 model: computed in float32 (its inputs and outputs are float32)" in cm.info.notes
    results = cm.verify()
    assert all(r.ok for r in results), [r.line() for r in results]


def _float16_model(model):
    """The model in float16 as a half-precision export stores it: float weights, inputs and outputs float16."""
    import onnx
    from onnx import TensorProto, numpy_helper
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*m.graph.input, *m.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    del m.graph.value_info[:]
    return m


@pytest.mark.parametrize("sparsity", [0.0, 0.85])
def test_float16_model_runs_in_float32_with_its_float16_signature(sparsity, tmp_path, monkeypatch):
    """A half-precision export (MobileNetV3: hard swish, squeeze-and-excitation) failed inside the pipeline
    (float16 activations met float32 blocked weights). Now it is computed in float32 and the library still takes
    and returns float16; it matches ONNX Runtime on the float16 model, dense and with sparse 1x1 weights (cost
    measurement off: the rule's choice, not a timing, decides here)."""
    monkeypatch.setenv("SHRINKC_COST", "off")
    from compiler import runtime
    from compiler.frontend.onnx_float16 import widen_float16
    model = _float16_model(zoo.build("mobilenet_v3_large", width=0.5, resolution=64, sparsity=sparsity))
    wide = widen_float16(model)
    assert not any(t.data_type == 10 for t in wide.graph.initializer)
    casts = [(n.op_type, n.attribute[0].i) for n in wide.graph.node if n.op_type == "Cast"]
    assert casts == [("Cast", 1), ("Cast", 10)]          # in: to float32; out: to float16
    cm = compiler.compile_model(model)
    results = cm.verify()
    assert all(r.ok for r in results), [r.line() for r in results]
    assert any(n.endswith("its float16 inputs and outputs kept") for n in cm.info.notes)
    if sparsity:
        assert any(k.startswith("f32_spmm_chw") for k in cm.report["kernels"])
    so, _ = cm.export(str(tmp_path / "m.so"))
    m = runtime.load(so)
    assert [t["dtype"] for t in m.metadata["inputs"] + m.metadata["outputs"]] == ["float16", "float16"]
    out = m.run(runtime.random_inputs(m.metadata["inputs"], seed=0))[0]
    assert out.dtype == np.float16 and np.all(np.isfinite(out))
