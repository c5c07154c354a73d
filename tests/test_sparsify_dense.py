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
    graph = helper.make_graph(nodes, "fc", [helper.make_tensor_value_info("x", 1, [1, k])],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


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
