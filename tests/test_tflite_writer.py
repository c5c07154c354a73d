"""zoo.tflite_writer: its files load and run in LiteRT, and sparse / fp16 storage keeps the numbers."""
from __future__ import annotations

import numpy as np
import pytest
import tflite
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tflite.BuiltinOperator import BuiltinOperator

from zoo.tflite_writer import TfliteBuilder, custom_op_tflite, encode_sparse, mobilenet_v2_tflite


def run_litert(buf: bytes, x: np.ndarray | None = None, delegates: bool = True) -> np.ndarray:
    kind = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=buf, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    if x is None:
        x = np.random.default_rng(1).standard_normal(inp["shape"]).astype(np.float32)
    it.set_tensor(inp["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def op_names(buf: bytes) -> list[str]:
    model = tflite.Model.GetRootAsModel(buf, 0)
    names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
    sg = model.Subgraphs(0)
    return [names[model.OperatorCodes(sg.Operators(i).OpcodeIndex()).BuiltinCode()]
            for i in range(sg.OperatorsLength())]


@pytest.fixture(scope="module")
def dense_ref():
    return {fmt: run_litert(mobilenet_v2_tflite(sparsity=0.8, sparse_format=fmt, store_sparse=False))
            for fmt in ("csr", "block4x1")}


def test_mobilenet_runs_in_litert():
    buf = mobilenet_v2_tflite()
    assert buf[4:8] == b"TFL3"
    out = run_litert(buf)
    assert out.shape == (1, 1000) and np.isfinite(out).all()
    assert abs(out.sum() - 1) < 1e-4 and out.max() > 2e-3   # softmax, not flat
    ops = op_names(buf)
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX"} <= set(ops)
    assert "DENSIFY" not in ops and "DEQUANTIZE" not in ops


@pytest.mark.parametrize("fmt", ["csr", "block4x1"])
def test_sparse_equals_dense_in_litert(fmt, dense_ref):
    buf = mobilenet_v2_tflite(sparsity=0.8, sparse_format=fmt)
    assert op_names(buf).count("DENSIFY") == 35           # 34 1x1 convs + the classifier
    dense_buf = mobilenet_v2_tflite(sparsity=0.8, sparse_format=fmt, store_sparse=False)
    assert len(buf) < 0.5 * len(dense_buf)
    np.testing.assert_allclose(run_litert(buf), dense_ref[fmt], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["csr", "block4x1"])
def test_sparse_fp16_close_to_dense(fmt, dense_ref):
    buf = mobilenet_v2_tflite(sparsity=0.8, sparse_format=fmt, weights="fp16")
    ops = op_names(buf)
    assert ops.count("DENSIFY") == 35 and "DEQUANTIZE" in ops
    np.testing.assert_allclose(run_litert(buf), dense_ref[fmt], rtol=5e-2, atol=5e-3)


def test_fp16_close_to_fp32():
    ref = run_litert(mobilenet_v2_tflite())
    buf = mobilenet_v2_tflite(weights="fp16")
    assert "DEQUANTIZE" in op_names(buf) and len(buf) < 0.6 * len(mobilenet_v2_tflite())
    np.testing.assert_allclose(run_litert(buf), ref, rtol=5e-2, atol=5e-3)


def test_sparsity_metadata_as_tflite_emits_it():
    model = tflite.Model.GetRootAsModel(mobilenet_v2_tflite(sparsity=0.8, sparse_format="block4x1"), 0)
    sg = model.Subgraphs(0)
    sparse = [sg.Tensors(i) for i in range(sg.TensorsLength()) if sg.Tensors(i).Sparsity() is not None]
    t = next(t for t in sparse if t.Name() == b"head/weights_sparse")
    sp = t.Sparsity()
    assert list(t.ShapeAsNumpy()) == [1280, 1, 1, 112]
    assert list(sp.TraversalOrderAsNumpy()) == [0, 1, 2, 3, 4] and list(sp.BlockMapAsNumpy()) == [0]
    assert [sp.DimMetadata(i).Format() for i in range(5)] == [0, 0, 0, 1, 0]   # DENSE x3, CSR, block DENSE
    assert [sp.DimMetadata(i).DenseSize() for i in (0, 1, 2, 4)] == [320, 1, 1, 4]


# each encoding checked against LiteRT's own DENSIFY: x @ W^T must come out
ENCODINGS = [dict(), dict(order=[1, 0], formats=["DENSE", "SPARSE_CSR"]),
             dict(formats=["SPARSE_CSR", "SPARSE_CSR"]), dict(formats=["SPARSE_CSR", "DENSE"]),
             dict(block=(2, 2)), dict(block=(1, 4)), dict(block=(4, 1)),
             dict(block=(2, 4), formats=["SPARSE_CSR", "SPARSE_CSR", "DENSE", "DENSE"])]


def sparse_weights(shape=(8, 16), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < 0.6] = 0
    w[:, 4:8] = 0
    w[2] = 0
    return w


@pytest.mark.parametrize("enc", ENCODINGS, ids=str)
def test_encodings_match_litert_densify(enc):
    w = sparse_weights()
    values, sp = encode_sparse(w, **enc)
    assert values.size < w.size
    b = TfliteBuilder()
    x = b.input([1, 16])
    b.output(b.fully_connected(x, w, np.zeros(8, np.float32), sparse=enc))
    xin = np.random.default_rng(2).standard_normal((1, 16)).astype(np.float32)
    np.testing.assert_allclose(run_litert(b.finish(), xin), xin @ w.T, rtol=1e-5, atol=1e-5)


def test_sparse_fc_without_densify():
    """TFLite's own sparse FC kernel reads the weights (XNNPACK would ignore the sparsity)."""
    w = sparse_weights()
    b = TfliteBuilder()
    x = b.input([1, 16])
    b.output(b.fully_connected(x, b.weight(w, "w", sparse={"block": (1, 4)}, densify=False), np.zeros(8)))
    buf = b.finish()
    assert "DENSIFY" not in op_names(buf)
    xin = np.ones((1, 16), np.float32)
    np.testing.assert_allclose(run_litert(buf, xin, delegates=False), xin @ w.T, rtol=1e-5, atol=1e-5)


def conv_ref(x, w, b, stride, padding, groups=1):
    """NHWC conv with OHWI weights (depthwise: groups = channels, weights 1HWC), TFLite padding rules."""
    n, h, wd, c = x.shape
    o, kh, kw, _ = w.shape if groups == 1 else (w.shape[3], w.shape[1], w.shape[2], 1)
    oh, ow = (-(-h // stride), -(-wd // stride)) if padding == "SAME" else ((h - kh) // stride + 1, (wd - kw) // stride + 1)
    ph = max((oh - 1) * stride + kh - h, 0) // 2 if padding == "SAME" else 0
    pw = max((ow - 1) * stride + kw - wd, 0) // 2 if padding == "SAME" else 0
    xp = np.pad(x, ((0, 0), (ph, kh + oh * stride), (pw, kw + ow * stride), (0, 0)))
    out = np.zeros((n, oh, ow, o), np.float32)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + oh * stride:stride, j:j + ow * stride:stride, :]
            out += patch @ w[:, i, j, :].T if groups == 1 else patch * w[0, i, j, :]
    return out + b


def test_layers_match_numpy():
    rng = np.random.default_rng(3)
    w1, b1 = rng.standard_normal((6, 3, 3, 4)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    w2, b2 = rng.standard_normal((1, 3, 3, 6)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    w3, b3 = rng.standard_normal((5, 6)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    b = TfliteBuilder()
    x = b.input([1, 9, 9, 4])
    y = b.conv2d(x, w1, b1, stride=2, padding="VALID", act="RELU")
    z = b.depthwise_conv2d(y, w2, b2, stride=1, padding="SAME", act="RELU6")
    y = b.hard_swish(b.add(y, z, act="RELU6"))
    y = b.reshape(b.mean_hw(y), [1, 6])
    b.output(b.softmax(b.fully_connected(y, w3, b3)))
    xin = rng.standard_normal((1, 9, 9, 4)).astype(np.float32)
    r = np.maximum(conv_ref(xin, w1, b1, 2, "VALID"), 0)
    r = np.clip(r + np.clip(conv_ref(r, w2, b2, 1, "SAME", groups=6), 0, 6), 0, 6)
    r = (r * np.clip(r + 3, 0, 6) / 6).mean(axis=(1, 2)) @ w3.T + b3
    ref = np.exp(r - r.max()) / np.exp(r - r.max()).sum()
    np.testing.assert_allclose(run_litert(b.finish(), xin), ref, rtol=1e-4, atol=1e-5)


def test_custom_op_is_rejected_by_litert():
    buf = custom_op_tflite("MyOp")
    assert "CUSTOM" in op_names(buf)
    with pytest.raises(RuntimeError, match="MyOp"):
        Interpreter(model_content=buf).allocate_tensors()


def test_dynamic_signature_is_written():
    b = TfliteBuilder()
    b.output(b.hard_swish(b.input([1, 4, 4, 3], signature=[-1, 4, 4, 3])))
    it = Interpreter(model_content=b.finish())
    assert list(it.get_input_details()[0]["shape_signature"]) == [-1, 4, 4, 3]
