"""SparsifyDense: mostly-zero fully connected layers become spmv kernels (structure, not firing, vs ONNX Runtime)."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

import targets
from compiler import driver
from passes import changelog
from passes import sparsify_dense
from passes.sparsify_dense import SparsifyDense, kernel_name, kernels
from conftest import onnx_model
from tests.test_sparse_passes import _cleaned, _constants

SPEC = targets.x86_host()


def fc_model(k, n, sparsity, seed=0, gemm=True):
    """x[1, K] -> Gemm(transB) with bias (gemm) or MatMul without bias, weights with `sparsity` zeros."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * (rng.random((n, k)) >= sparsity)
    b = rng.standard_normal(n).astype(np.float32)
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")]
    return onnx_model(nodes, [1, k], inits, name="fc")


class _FixedCost:
    """A stand-in for compiler.cost.Cost: dense layers take `dense` s, sparse ones `sparse` s."""

    enabled = True

    def __init__(self, dense, sparse):
        self.dense, self.sparse = dense, sparse

    def latency(self, mod, key=None):
        return self.sparse if "f32_spmv_" in mod.script(show_meta=False) else self.dense


def _sparsify(mod, cost=None):
    with changelog.collecting() as book, SPEC.tvm_target():
        mod = SparsifyDense(SPEC, cost)(mod)
    return mod, book.summary()


def _weight_sizes(mod):
    return [c.value.numpy().size for c in _constants(mod) if hasattr(c.value, "numpy")
            and c.value.numpy().dtype == np.float32 and c.value.numpy().ndim == 2]


def test_sparse_fc_becomes_spmv_and_dense_weights_leave():
    mod, book = _sparsify(_cleaned(fc_model(96, 40, 0.85)), _FixedCost(dense=2e-6, sparse=1e-6))
    text = mod.script(show_meta=False)
    first = kernel_name(kernels(SPEC)[0])             # all kernels timed alike: the first is kept
    assert first in text and "R.matmul" not in text and "R.add" not in text     # bias fused
    assert 96 * 40 not in _weight_sizes(mod)          # the dense [96, 40] weights are gone
    change = book["SparsifyDense"]["changes"][0]
    assert 0.8 < change["zeros"] < 0.9 and change["speedup"] == 2.0 and change["kernel"] == first


@pytest.mark.parametrize("sparsity,cost", [(0.3, None), (0.9, _FixedCost(dense=1e-6, sparse=2e-6))])
def test_not_fired_when_too_dense_or_slower(sparsity, cost):
    mod, book = _sparsify(_cleaned(fc_model(64, 32, sparsity)), cost)
    assert "f32_spmv_" not in mod.script(show_meta=False) and "R.matmul" in mod.script(show_meta=False)
    why = book["SparsifyDense"]["skipped"][0]["why"]
    assert ("< 67%" in why) if sparsity == 0.3 else ("dense" in why)


@pytest.mark.parametrize("gemm", [True, False])
@pytest.mark.parametrize("kernel", kernels(SPEC))
def test_sparse_fc_matches_onnxruntime(monkeypatch, gemm, kernel):
    """Each spmv kernel of the host, end to end (the pass offered only that kernel)."""
    monkeypatch.setenv("SHRINKC_COST", "off")
    monkeypatch.setattr(sparsify_dense, "kernels", lambda spec: [kernel])
    cm = driver.compile_model(fc_model(200, 37, 0.9, gemm=gemm))
    assert kernel_name(kernel) in cm.report["kernels"]
    assert [r["kernel"] for r in cm.metadata()["sparse_layers"]] == [kernel_name(kernel)]
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]


def test_spmv_kernels_per_target():
    """The permute kernel only where the target has AVX-512; the sliced-ELL kernel everywhere."""
    x86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    assert [k[0] for k in kernels(targets.resolve({**x86, "mcpu": "skylake-avx512"}))] == ["perm", "sell", "sell"]
    assert [k[0] for k in kernels(targets.resolve({**x86, "mcpu": "haswell"}))] == ["sell", "sell"]
    assert [k[0] for k in kernels(targets.rpi4())] == ["sell", "sell"]


def test_sparse_mobilenet_v2_classifier_matches_onnxruntime(monkeypatch):
    """zoo's sparse_fc option: the classifier runs sparse next to the sparse 1x1s, and the network still matches."""
    from zoo.mobilenet_v2 import mobilenet_v2
    monkeypatch.setenv("SHRINKC_COST", "off")
    model = mobilenet_v2(width=0.35, resolution=64, num_classes=40, sparsity=0.85, sparse_from=10, sparse_fc=True)
    cm = driver.compile_model(model)
    layers = cm.metadata()["sparse_layers"]
    assert any(r["kernel"] == kernel_name(kernels(SPEC)[0]) for r in layers)
    assert any(r["kernel"].startswith("f32_spmm_chw") for r in layers)
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]


def head_model(sparsity, seed=0):
    """Keras-style squeeze-excite and head, every conv 1x1 with `sparsity` zeros: x[1, 48, 6, 6] -> SE (mean,
    conv 48->16 + bias, ReLU, conv 16->48 + bias, Sigmoid, Mul) -> conv 48->64 on the 6x6 plane -> mean ->
    conv 64->40 + bias -> Flatten. Three of the four convs run on a 1x1 plane."""
    rng = np.random.default_rng(seed)

    def conv(name, cin, cout, x, out, bias=True):
        w = rng.standard_normal((cout, cin, 1, 1)).astype(np.float32) * (rng.random((cout, cin, 1, 1)) >= sparsity)
        inits.append(numpy_helper.from_array(w, name + "_w"))
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), name + "_b"))
        return helper.make_node("Conv", [x, name + "_w"] + [name + "_b"] * bias, [out], name=name)

    inits: list = []
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), conv("se_reduce", 48, 16, "p", "r"),
             helper.make_node("Relu", ["r"], ["rr"]), conv("se_expand", 16, 48, "rr", "e"),
             helper.make_node("Sigmoid", ["e"], ["g"]), helper.make_node("Mul", ["x", "g"], ["xg"]),
             conv("project", 48, 64, "xg", "y", bias=False), helper.make_node("GlobalAveragePool", ["y"], ["q"]),
             conv("logits", 64, 40, "q", "l"), helper.make_node("Flatten", ["l"], ["out"])]
    return onnx_model(nodes, [1, 48, 6, 6], inits, out="out", name="head")


def test_convs_on_a_1x1_plane_become_spmv():
    """A 1x1 conv on a 1x1 plane is a matrix-vector product: SparsifyDense takes it (reshape, spmv with
    the bias fused, reshape back) and its dense weights leave; the conv on the 6x6 plane stays a conv."""
    mod, book = _sparsify(_cleaned(head_model(0.85)), _FixedCost(dense=2e-6, sparse=1e-6))
    text = mod.script(show_meta=False)
    assert text.count("R.nn.conv2d(") == 1 and text.count("f32_spmv_") >= 3
    sizes = [c.value.numpy().size for c in _constants(mod) if hasattr(c.value, "numpy")]
    assert not {48 * 16, 16 * 48, 64 * 40} & set(sizes) and 64 * 48 in sizes
    changes = book["SparsifyDense"]["changes"]
    assert len(changes) == 3 and all(c["speedup"] == 2.0 for c in changes)


def test_sparse_conv1x1_leaves_1x1_planes_to_spmv(monkeypatch):
    """End to end: SparsifyConv1x1 says why it leaves the 1x1-plane convs, SparsifyDense runs them, and the
    model (SE gate, head) matches ONNX Runtime with every spmv kernel of the host."""
    monkeypatch.setenv("SHRINKC_COST", "off")
    for kernel in kernels(SPEC):
        monkeypatch.setattr(sparsify_dense, "kernels", lambda spec, k=kernel: [k])
        cm = driver.compile_model(head_model(0.85, seed=1))
        skipped = cm.report["passes"]["SparsifyConv1x1"]["skipped"]
        assert sum("1x1 plane, left to SparsifyDense" in s["why"] for s in skipped) == 3
        kinds = [r["kernel"] for r in cm.metadata()["sparse_layers"]]
        assert sum(k.startswith(kernel_name(kernel)) for k in kinds) == 3 and len(kinds) == 4, kinds
        assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
