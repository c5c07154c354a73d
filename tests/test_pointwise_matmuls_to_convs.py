"""passes/pointwise_matmuls_to_convs.py: matmuls over every pixel / token as 1x1 convs; erf as vector arithmetic."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import assert_matches_ort, onnx_model


def _mlp_model(shape, k=32, n=64, seed=0):
    """A channel-last MLP as torch exports ConvNeXt's: x -> MatMul(W1) + b1 -> GELU (Erf) -> MatMul(W2) + b2 -> * s,
    on an input of `shape` (its last axis the channels)."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((k, n)) * 0.3, "b1": rng.standard_normal(n) * 0.1,
             "w2": rng.standard_normal((n, k)) * 0.3, "b2": rng.standard_normal(k) * 0.1,
             "s": rng.standard_normal(k), "r2": np.array(math.sqrt(2)), "half": np.array(0.5), "one": np.array(1.0)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Div", ["a1", "r2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a1", "e1"], ["g0"]),
             helper.make_node("Mul", ["g0", "half"], ["g"]),
             helper.make_node("MatMul", ["g", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["a2"]),
             helper.make_node("Mul", ["a2", "s"], ["y"])]
    return onnx_model(nodes, list(shape), [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])


@pytest.mark.parametrize("shape", [(1, 12, 10, 32), (1, 50, 32), (50, 1, 32)])
def test_pixel_and_token_mlps_run_as_1x1_convs(shape, tmp_path):
    """[1, H, W, C], [1, L, C] and [L, 1, C] (as torch exports attention's projections) inputs: both matmuls become
    1x1 convs running our conv kernel; the same outputs as ONNX Runtime."""
    cm = assert_matches_ort(_mlp_model(shape), tol=1e-5, dump_dir=str(tmp_path))
    changes = cm.report["passes"]["PointwiseMatmulsToConvs"]["changes"]
    assert [(c["k"], c["n"]) for c in changes] == [(32, 64), (64, 32)]
    assert sum("conv1x1" in k for k in cm.report["kernels"]) >= 1, cm.report["kernels"]
    kernels = re.findall(r"R\.call_tir\(cls\.(\w+)", (tmp_path / "4_lower.py").read_text())
    assert not any("matmul" in k for k in kernels), kernels
    if len(shape) == 4:   # the GELU (erf) between the convs runs channel-blocked: layout changes at the ends only
        assert sum("layout_transform" in k for k in kernels) <= 2, kernels


def test_a_classifier_matmul_stays_a_matmul():
    """x [1, K] @ W: the fully connected kernel's case, left alone."""
    model = _mlp_model((1, 32))
    cm = assert_matches_ort(model, tol=1e-5)
    assert "PointwiseMatmulsToConvs" not in cm.report["passes"]


def test_erf_is_vector_arithmetic_within_4e7():
    """relax.erf legalized to TVM's rational approximation: no libm erff call in the kernel, within 4e-7 of the
    true erf from -6 to 6 and on tiny arguments."""
    import tvm
    from tvm import relax

    import targets
    from compiler import artifact
    spec = targets.resolve(None)
    xs = np.concatenate([np.linspace(-6, 6, 4001), np.logspace(-8, 0, 95), [0.0]]).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(xs.shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.erf(x))
        bb.emit_func_output(out)
    from schedules import registry
    mod = relax.transform.LegalizeOps(registry.cpu_legalize_map(spec.vector_lanes))(bb.get())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    from schedules.rule import schedule_injective
    sch = tvm.s_tir.Schedule(func)
    schedule_injective(sch, sch.get_child_blocks(sch.get_sblock("root"))[0], spec.vector_lanes)
    kernel = artifact.build_kernel(sch.mod["main"], spec)
    asm = (kernel.mod.imports[0] if kernel.mod.imports else kernel.mod).inspect_source("asm")
    assert "erff" not in asm
    got = tvm.runtime.tensor(np.zeros_like(xs))
    kernel.jit()["main"](tvm.runtime.tensor(xs), got)
    want = np.array([math.erf(float(v)) for v in xs])
    np.testing.assert_allclose(got.numpy(), want, atol=4e-7, rtol=4e-7)
