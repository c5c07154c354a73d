"""QuantizeStepsInFloat: an activation's quantize -> (int clips) -> dequantize as float ops of the same values
(bit for bit but where x / scale lies within an ulp of a half step: x times 1 / scale may land on the next step)."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from passes.quantize_steps_in_float import QuantizeStepsInFloat

C, S, Z = 8, 0.05, -3


def qdq_module(scale=S, zero=Z, deq_scale=S, deq_zero=Z, int_clip=None, dtype="int8", flatten=False):
    """x -> quantize -> (clip in the int domain) -> (flatten) -> dequantize, one per-tensor or per-channel step."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, C, 4, 4], "float32"))
    as_const = lambda v, t: relax.const(np.asarray(v, t))   # noqa: E731
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.quantize(x, as_const(scale, "float32"), as_const(zero, dtype), axis=1,
                                          out_dtype=dtype))
            if int_clip:
                q = bb.emit(relax.op.clip(q, *int_clip))
            if flatten:     # as ONNX Runtime's QOperator models flatten the int tensor before their classifier
                q = bb.emit(relax.op.reshape(q, [1, C * 16]))
            y = bb.emit_output(relax.op.dequantize(q, as_const(deq_scale, "float32"), as_const(deq_zero, dtype),
                                                   axis=1, out_dtype="float32"))
        bb.emit_func_output(y)
    return bb.get()


def ops(mod) -> list[str]:
    return [b.value.op.name for blk in mod["main"].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call)]


def run(mod, x):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def inputs(scale=S) -> np.ndarray:
    """Random values, ties between two int8 steps (k + 0.5) * scale, and values past both ends of the range."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, C, 4, 4)).astype(np.float32) * 3
    x.reshape(-1)[:40] = (np.arange(-20, 20) + 0.5) * scale
    x.reshape(-1)[40:44] = [100.0, -100.0, 127.5 * scale, -128.5 * scale]
    return x


def near_half_step(x: np.ndarray, scale) -> np.ndarray:
    """Where x / scale is within 2 float32 ulps of k + 0.5 (x times 1 / scale may round to the other step)."""
    v = x.astype(np.float64) / np.float64(np.float32(scale))
    return np.abs(v - np.floor(v) - 0.5) <= 2 * np.abs(np.spacing(v.astype(np.float32))).astype(np.float64)


@pytest.mark.parametrize("case", [
    dict(),                                                     # ONNX QDQ
    dict(int_clip=(-3, 127)),                                   # TFLite: the fused ReLU as an int clip
    dict(int_clip=(-20, 40), deq_scale=0.1, deq_zero=2),        # another scale and zero point reading it back
    dict(zero=7, deq_zero=7, dtype="uint8"),
    dict(zero=7, deq_zero=7, dtype="uint8", int_clip=(7, 255), flatten=True),
    dict(scale=0.0625, deq_scale=0.0625),                       # a power-of-two scale: 1 / scale is exact
], ids=["qdq", "int_relu", "rescaled", "uint8", "flattened", "power_of_two"])
def test_same_values_in_float(case):
    mod = qdq_module(**case)
    after = QuantizeStepsInFloat()(mod)
    steps = ["relax.multiply", "relax.round", "relax.clip"] + (["relax.add"] if "deq_zero" in case and
                                                               case["deq_zero"] != case.get("zero", Z) else [])
    assert ops(after) == steps + ["relax.multiply"] + (["relax.reshape"] if case.get("flatten") else [])
    scale, zero, dtype = case.get("scale", S), case.get("zero", Z), case.get("dtype", "int8")
    x = inputs(scale)
    want, got = run(mod, x).reshape(x.shape), run(after, x).reshape(x.shape)
    # bit for bit, ties (to even) and saturation included, but where x / scale is within an ulp of a half step
    # (none with a power-of-two scale); there one step apart at most
    exact = np.log2(scale) == np.round(np.log2(scale))
    near = np.zeros(x.shape, bool) if exact else near_half_step(x, scale)
    assert near.sum() <= 42                      # the ties put in, no random value
    np.testing.assert_array_equal(got[~near], want[~near])
    step = np.float32(case.get("deq_scale", scale))
    assert np.all(np.abs(got[near] - want[near]) <= step * 1.0001)
    # and what the ONNX / TFLite definitions say (numpy rounds ties to even too)
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    if "int_clip" in case:
        lo, hi = max(lo, case["int_clip"][0]), min(hi, case["int_clip"][1])
    q = np.clip(np.round(x / np.float32(scale)) + zero, lo, hi)
    spec = ((q - case.get("deq_zero", zero)) * np.float32(case.get("deq_scale", scale))).astype(np.float32)
    np.testing.assert_array_equal(got[~near], spec.reshape(got.shape)[~near])


def test_per_channel_and_constant_steps_stay():
    """A per-channel activation scale keeps its quantize / dequantize; so does a constant's (weights fold)."""
    mod = qdq_module(scale=np.full(C, S, np.float32))
    assert ops(QuantizeStepsInFloat()(mod)) == ops(mod) == ["relax.quantize", "relax.dequantize"]
    bb = relax.BlockBuilder()
    with bb.function("main", []):
        with bb.dataflow():
            q = bb.emit(relax.op.quantize(relax.const(np.ones((2, 2), np.float32)), relax.const(np.float32(S)),
                                          relax.const(np.int8(0)), out_dtype="int8"))
            y = bb.emit_output(relax.op.dequantize(q, relax.const(np.float32(S)), relax.const(np.int8(0))))
        bb.emit_func_output(y)
    const_mod = bb.get()
    assert ops(QuantizeStepsInFloat()(const_mod)) == ["relax.quantize", "relax.dequantize"]
