"""QuantizeStepsInFloat: an activation's quantize -> (int clips) -> dequantize as float ops of exactly the same values."""
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


def inputs() -> np.ndarray:
    """Random values, exact ties between two int8 steps (k + 0.5) * S, and values past both ends of the range."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, C, 4, 4)).astype(np.float32) * 3
    x.reshape(-1)[:40] = (np.arange(-20, 20) + 0.5) * S
    x.reshape(-1)[40:44] = [100.0, -100.0, 127.5 * S, -128.5 * S]
    return x


@pytest.mark.parametrize("case", [
    dict(),                                                     # ONNX QDQ
    dict(int_clip=(-3, 127)),                                   # TFLite: the fused ReLU as an int clip
    dict(int_clip=(-20, 40), deq_scale=0.1, deq_zero=2),        # another scale and zero point reading it back
    dict(zero=7, deq_zero=7, dtype="uint8"),
    dict(zero=7, deq_zero=7, dtype="uint8", int_clip=(7, 255), flatten=True),
], ids=["qdq", "int_relu", "rescaled", "uint8", "flattened"])
def test_same_values_in_float(case):
    mod = qdq_module(**case)
    after = QuantizeStepsInFloat()(mod)
    steps = ["relax.divide", "relax.round", "relax.clip"] + (["relax.add"] if "deq_zero" in case and
                                                             case["deq_zero"] != case.get("zero", Z) else [])
    assert ops(after) == steps + ["relax.multiply"] + (["relax.reshape"] if case.get("flatten") else [])
    x = inputs()
    want, got = run(mod, x), run(after, x)
    np.testing.assert_array_equal(got, want)   # bit for bit, ties (to even) and saturation included
    # and what the ONNX / TFLite definitions say (numpy rounds ties to even too)
    scale, zero, dtype = case.get("scale", S), case.get("zero", Z), case.get("dtype", "int8")
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    if "int_clip" in case:
        lo, hi = max(lo, case["int_clip"][0]), min(hi, case["int_clip"][1])
    q = np.clip(np.round(x / np.float32(scale)) + zero, lo, hi)
    spec = ((q - case.get("deq_zero", zero)) * np.float32(case.get("deq_scale", scale))).astype(np.float32)
    np.testing.assert_array_equal(got, spec.reshape(got.shape))


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
