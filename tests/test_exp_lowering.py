"""schedules/f32_exp_lowering.py: exp and sigmoid compiled as vector arithmetic, accurate, and used by models."""
import numpy as np
import pytest
import tvm
from tvm.script import tirx as T

import targets
from compiler import artifact  # noqa: F401  (imports the lowering, as every build does)
from tests.conftest import assert_matches_ort

N = 4096


def _kernel(lanes: int):
    @T.prim_func
    def func(a: T.Buffer((N,), "float32"), e: T.Buffer((N,), "float32"), s: T.Buffer((N,), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i in T.serial(N // lanes):
            for j in T.vectorized(lanes):
                e[i * lanes + j] = T.exp(a[i * lanes + j])
                s[i * lanes + j] = T.sigmoid(a[i * lanes + j])
    spec = targets.resolve(None, None)
    return tvm.compile(tvm.IRModule({"main": func}), target=spec.tvm_target())


def _inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-110, 110, N // 2), rng.normal(0, 5, N // 2 - 8),
                        [np.nan, np.inf, -np.inf, 0.0, 88.7, 88.8, -87.3, -87.4]]).astype(np.float32)
    return x


@pytest.mark.parametrize("lanes", [1, 16])
def test_exp_and_sigmoid_are_accurate(lanes):
    lib, x = _kernel(lanes), _inputs()
    dev = tvm.cpu()
    a, e, s = (tvm.runtime.tensor(v, dev) for v in (x, np.zeros_like(x), np.zeros_like(x)))
    lib["main"](a, e, s)
    e, s, x64 = e.numpy(), s.numpy(), x.astype(np.float64)
    with np.errstate(over="ignore"):
        ref_e, ref_s = np.exp(x64), 1 / (1 + np.exp(-x64))
    normal = np.isfinite(x) & (ref_e >= np.finfo(np.float32).tiny) & (ref_e <= np.finfo(np.float32).max)
    rel = np.abs(e[normal] - ref_e[normal]) / ref_e[normal]
    assert rel.max() <= 2 * 2.0 ** -23, rel.max()                         # within 2 ulps
    assert np.isnan(e[np.isnan(x)]).all() and np.isnan(s[np.isnan(x)]).all()
    assert (e[x > 88.73] == np.inf).all() and (e[x < -87.34] == 0).all()  # no subnormal results
    finite = ~np.isnan(x)
    assert np.abs(s[finite] - ref_s[finite]).max() <= 2.5e-7
    assert s[x == np.inf][0] == 1.0 and 0 <= s[x == -np.inf][0] < 1e-38


def test_no_libm_call_per_lane():
    # LLVM's own exp of a vector is one scalar expf call per lane; the lowering leaves none
    asm = _kernel(16).mod.inspect_source("asm")
    assert "expf" not in asm and ("vfmadd" in asm or "fmla" in asm)


def test_efficientnet_b0_silu_and_squeeze_excite_match_onnxruntime():
    import zoo
    assert_matches_ort(zoo.build("efficientnet_b0", resolution=64, num_classes=10))
