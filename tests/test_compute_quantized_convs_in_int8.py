"""ComputeQuantizedConvsInInt8 and the u8i8 VNNI 1x1 kernel: quantized 1x1 convs summed in int32."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from tvm import relax, te

import compiler
import targets
import zoo
from passes import changelog
from passes.compute_quantized_convs_in_int8 import ComputeQuantizedConvsInInt8, integer_grid, offset_grid
from passes.convert_to_blocked_layout import pack_kernel

HOST = targets.resolve(None)
needs_vnni = pytest.mark.skipif(HOST.int8_dot != "avx512_vnni", reason="this CPU has no AVX-512 VNNI")


def test_integer_grid_recovers_folded_int8_weights():
    """Per-channel int8 weights times a folded float32 scale (BN and the next step's 1 / scale): the integers and
    each channel's step come back; a per-tensor row whose largest integer is below 127 too; a float row does not."""
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (24, 40))
    q[:, 0] = 127                            # symmetric per-channel quantization reaches 127 in every row
    q[3] = rng.integers(-50, 51, 40)         # per-tensor: a row of small integers, its largest 50
    q[3, 0] = 50
    q[5] = 0                                 # an all-zero channel (pad channels too)
    step = rng.uniform(1e-4, 1e-2, 24)
    w = (q * step[:, None]).astype(np.float32)
    got, s = integer_grid(w)
    full = [r for r in range(24) if r not in (3, 5)]
    np.testing.assert_array_equal(got[full], q[full])
    np.testing.assert_array_equal(got[3], 2 * q[3])          # any finer grid is as exact: 100 / 2 steps
    np.testing.assert_allclose((got * s[:, None]).astype(np.float32), w, rtol=1e-6)
    assert got.dtype == np.int8 and s[5] == 0 and not got[5].any()
    w[7, 3] += 0.37 * step[7]                # one weight off the grid: not an int8 conv
    assert integer_grid(w) is None
    assert integer_grid(rng.standard_normal((4, 8)).astype(np.float32)) is None


def uint8_weights(rng, cout: int, cin: int, zero: int) -> np.ndarray:
    """[cout, cin] float weights s * (Q - zero), Q uint8, one scale for the tensor (TF1 / QUInt8 quantization); the
    first row reaches Q = 255 and 0, so with zero = 100 it spans -100 .. 155 steps: on no int8 grid around 0."""
    q = rng.integers(0, 256, (cout, cin))
    q[0, :2] = [0, 255]
    return ((q - zero) * np.float32(0.0123)).astype(np.float32)


def test_offset_grid_recovers_uint8_weights():
    """Asymmetric uint8 weights: integer_grid finds no grid, offset_grid gives int8 q, a step and an offset per row
    with w == q * step + offset on the used columns; an all-zero column (a pad channel) stays out, q 0 there; a
    weight off the grid: None."""
    rng = np.random.default_rng(3)
    w = uint8_weights(rng, 20, 40, 100)
    w[4] = w[4, 0]                             # a constant row: step 0
    w[:, 7] = 0                                # an unused input channel
    assert integer_grid(w) is None
    q, step, offset, used = offset_grid(w)
    assert q.dtype == np.int8 and not used[7] and used.sum() == 39 and not q[:, 7].any() and step[4] == 0
    np.testing.assert_allclose(q[:, used] * step[:, None] + offset[:, None], w[:, used], rtol=1e-5, atol=1e-7)
    assert np.isclose(step[0], 0.0123, rtol=1e-5)     # the first row spans all 255 steps
    w[2, 3] += 0.37 * 0.0123
    assert offset_grid(w) is None


def blocked_module(w: np.ndarray, h: int = 6, width: int = 5, lo: float = -128.0, hi: float = 127.0,
                   stride: int = 1, tflite_scale: bool = False) -> tvm.IRModule:
    """x (NCHW16c) -> round -> clip(lo, hi) -> * s2 -> 1x1 conv (OHWI16o) -> + bias: a quantize step and a conv as
    ConvertToBlockedLayout leaves them; tflite_scale: s2 of shape [1], as TFLite stores a scale (ConvertToBlockedLayout
    keeps one-element constants as they are)."""
    cout, cin = w.shape
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, -(-cin // 16), h, width, 16], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.clip(bb.emit(relax.op.round(x)), lo, hi))
            s2 = np.float32(0.02)
            if tflite_scale:
                s2 = np.full([1], s2, np.float32)
            xs = bb.emit(relax.op.multiply(a, relax.const(s2)))
            k = relax.const(pack_kernel(w[:, :, None, None], 16, -(-cin // 16) * 16))
            y = bb.emit(relax.op.nn.conv2d(xs, k, strides=[stride, stride], data_layout="NCHW16c",
                                           kernel_layout="OHWI16o", out_layout="NCHW16c"))
            bias = relax.const(np.linspace(-1, 1, -(-cout // 16) * 16, dtype=np.float32).reshape(1, -1, 1, 1, 16))
            out = bb.emit_output(relax.op.add(y, bias))
        bb.emit_func_output(out)
    return bb.get()


def conv_calls(mod) -> list[relax.Call]:
    return [b.value for blk in mod["main"].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and b.value.op.name == "relax.nn.conv2d"]


@needs_vnni
@pytest.mark.parametrize("cin,cout,h,w,lo,hi,stride,tflite_scale", [
    (16, 16, 1, 1, -128, 127, 1, False),     # one pixel, one block
    (24, 40, 7, 7, 0, 255, 1, False),        # padded channels in and out (uint8 range)
    (48, 96, 6, 5, -125, 130, 1, False),     # odd rows, a shifted range (an ONNX zero point folded into the clip)
    (32, 20, 9, 9, -3, 127, 2, False),       # strided, a TFLite ReLU as the clip
    # a TFLite scale of shape [1]: before 854b798 it was not read as one step, so no conv of an integer .tflite ran
    # in int8 (ConvertToBlockedLayout made it a blocked per-channel constant then; it keeps it as it is now)
    (24, 32, 5, 5, -149, 106, 1, True),
], ids=["1px", "pad", "shifted", "stride2", "tflite_scale"])
def test_int8_conv_equals_float_conv(cin, cout, h, w, lo, hi, stride, tflite_scale):
    """Structural: the conv reads uint8 and sums in int32. Numerical: the same outputs as the float conv (up to
    float rounding of the float sums), the steps' extremes included."""
    rng = np.random.default_rng(cin + cout)
    q = rng.integers(-127, 128, (cout, cin))
    wts = (q * rng.uniform(1e-3, 1e-2, (cout, 1))).astype(np.float32)
    mod = blocked_module(wts, h, w, lo, hi, stride, tflite_scale)
    with changelog.collecting() as book:
        after = ComputeQuantizedConvsInInt8()(mod)
    (conv,) = conv_calls(after)
    assert conv.args[0].ty.dtype == "uint8" and conv.ty.dtype == "int32" and conv.args[1].value.numpy().dtype == np.int8
    assert book.summary()["ComputeQuantizedConvsInInt8"]["counts"]["int8"] == 1
    x = rng.uniform(lo - 20, hi + 20, [int(d) for d in mod["main"].params[0].ty.shape.values]).astype(np.float32)
    x.reshape(-1)[:4] = [lo, hi, lo - 50, hi + 50]
    want, got = compile_run(mod, x), compile_run(after, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@needs_vnni
@pytest.mark.parametrize("cin,cout,h,w,lo,hi,stride", [
    (32, 16, 5, 4, 0, 255, 1),
    (24, 40, 7, 7, -128, 127, 1),     # pad lanes in (their junk must stay out of the pixel sums) and out
    (48, 32, 9, 9, -3, 127, 2),       # strided: the pixel sums at the conv's output pixels
], ids=["uint8", "pad", "stride2"])
def test_int8_conv_with_uint8_weights_equals_float_conv(cin, cout, h, w, lo, hi, stride):
    """Asymmetric uint8 weights (before, such convs stayed float): the conv sums in int32 on the offset grid and adds
    offset x the per-pixel sum of its input; the float conv's outputs."""
    rng = np.random.default_rng(cin * cout)
    wts = uint8_weights(rng, cout, cin, 100)
    mod = blocked_module(wts, h, w, lo, hi, stride)
    with changelog.collecting() as book:
        after = ComputeQuantizedConvsInInt8()(mod)
    (conv,) = conv_calls(after)
    assert conv.args[0].ty.dtype == "uint8" and conv.ty.dtype == "int32"
    assert book.summary()["ComputeQuantizedConvsInInt8"]["counts"]["int8_offset"] == 1
    x = rng.uniform(lo - 20, hi + 20, [int(d) for d in mod["main"].params[0].ty.shape.values]).astype(np.float32)
    x[:, -1] = 1000.0                   # pad lanes of the last block: junk far outside the step's range
    want, got = compile_run(mod, x), compile_run(after, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def compile_run(mod, x):
    from compiler import artifact, pipeline
    plain = dataclasses.replace(HOST, int8_dot="")   # NOTE: lowering alone; the module is blocked already
    with plain.tvm_target():
        lowered = tvm.transform.Sequential(pipeline._lower_cpu(plain, pipeline.Options())[1:])(mod)
    vm = relax.VirtualMachine(artifact.build(lowered, plain), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@needs_vnni
@pytest.mark.parametrize("k,n,flattened", [(32, 20, False), (64, 48, False), (64, 48, True)],
                         ids=["32x20", "64x48", "64x48_flattened"])
def test_int8_fully_connected_equals_float(k, n, flattened):
    """A classifier [1, K] x [K, N] reading a quantize step: the int8 conv on one pixel (N padded to whole blocks,
    sliced back), the float result's values. flattened: the step is a blocked [1, K/16, 1, 1, 16] tensor, back to
    NCHW and flattened before the classifier (ONNX Runtime's QOperator MobileNetV2: its classifier stayed float)."""
    rng = np.random.default_rng(k + n)
    wts = (rng.integers(-127, 128, (k, n)) * rng.uniform(1e-3, 1e-2, (1, n))).astype(np.float32)
    bb = relax.BlockBuilder()
    shape = [1, k // 16, 1, 1, 16] if flattened else [1, k]
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.clip(bb.emit(relax.op.round(x)), 0.0, 255.0))
            xs = bb.emit(relax.op.multiply(a, relax.const(0.05, "float32")))
            if flattened:
                xs = bb.emit(relax.op.layout_transform(xs, index_map=lambda b, cb, h, w, c: (b, cb * 16 + c, h, w)))
                xs = bb.emit(relax.op.reshape(xs, [1, k]))
            out = bb.emit_output(relax.op.matmul(xs, relax.const(wts)))
        bb.emit_func_output(out)
    mod = bb.get()
    with changelog.collecting() as book:
        after = ComputeQuantizedConvsInInt8()(mod)
    assert book.summary()["ComputeQuantizedConvsInInt8"]["counts"]["int8_matmul"] == 1
    (conv,) = conv_calls(after)
    assert conv.args[0].ty.dtype == "uint8"
    xv = rng.uniform(-10, 270, shape).astype(np.float32)
    want, got = compile_run(mod, xv), compile_run(after, xv)
    assert got.shape == (1, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_not_fired_without_a_quantize_step_or_an_integer_grid():
    """A float conv input (no clip(round)), float weights, a kxk conv, a range wider than 255: left as they were."""
    rng = np.random.default_rng(1)
    grid_w = (rng.integers(-127, 128, (16, 16)) * 0.01).astype(np.float32)
    for mod in (blocked_module(rng.standard_normal((16, 16)).astype(np.float32)),    # float weights
                blocked_module(grid_w, lo=-200, hi=200)):                           # 401 steps
        assert conv_calls(ComputeQuantizedConvsInInt8()(mod))[0].args[0].ty.dtype == "float32"


def test_flattened_step_in_another_channel_order_stays_float():
    """A blocked step flattened through a layout transform that is not ConvertToBlockedLayout's (channel c * 4 + cb,
    not cb * 16 + c): the classifier's weights would meet the wrong inputs, so it stays a float matmul."""
    wts = (np.random.default_rng(0).integers(-127, 128, (64, 16)) * 0.01).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 4, 1, 1, 16], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(relax.op.clip(bb.emit(relax.op.round(x)), 0.0, 255.0))
            xs = bb.emit(relax.op.multiply(a, relax.const(0.05, "float32")))
            xs = bb.emit(relax.op.layout_transform(xs, index_map=lambda b, cb, h, w, c: (b, c * 4 + cb, h, w)))
            out = bb.emit_output(relax.op.matmul(bb.emit(relax.op.reshape(xs, [1, 64])), relax.const(wts)))
        bb.emit_func_output(out)
    assert not conv_calls(ComputeQuantizedConvsInInt8()(bb.get()))


@needs_vnni
def test_qdq_model_int8_against_float_and_onnxruntime(tmp_path):
    """A static-QDQ MobileNetV2: every 1x1 conv sums in int32 (u8i8 kernels, int8 weights inside), verifies
    against ONNX Runtime; without VNNI (a target without it) the same model stays float and verifies too."""
    from zoo.quantize_qdq import quantize_qdq
    src, qdq = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    src.write_bytes(zoo.build("mobilenet_v2", width=0.35, resolution=64, num_classes=10).SerializeToString())
    quantize_qdq(str(src), str(qdq), (1, 3, 64, 64), 4, np.random.default_rng(0))
    cm = compiler.compile_model(str(qdq), sparse="off")
    assert cm.report["passes"]["ComputeQuantizedConvsInInt8"]["counts"] == {"int8": 34, "int8_matmul": 1}
    assert any(k.startswith("u8i8_conv1x1_nchw16c") for k in cm.report["kernels"])
    assert all(r.ok for r in cm.verify())
    plain = compiler.compile_model(str(qdq), target=dataclasses.replace(HOST, int8_dot=""), sparse="off")
    assert "ComputeQuantizedConvsInInt8" not in plain.report["passes"]
    assert not any(k.startswith("u8i8") for k in plain.report["kernels"])
    assert all(r.ok for r in plain.verify())
    from compiler import runtime
    x = runtime.random_inputs(cm.metadata()["inputs"], seed=3)
    a, b = cm.run(x)[0], plain.run(x)[0]
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()


@needs_vnni
def test_dynamically_quantized_model_int8(tmp_path):
    """ONNX Runtime's quantize_dynamic: each conv reads q - z with z computed at run time (onnx_integer_ops); the
    1x1 convs sum uint8 q in int32 and subtract z * sum Wq after, and the model verifies against ONNX Runtime."""
    from onnxruntime.quantization import quantize_dynamic
    src, dyn = tmp_path / "float.onnx", tmp_path / "dynamic.onnx"
    src.write_bytes(zoo.build("mobilenet_v2", width=0.35, resolution=64, num_classes=10).SerializeToString())
    quantize_dynamic(str(src), str(dyn), per_channel=True)
    cm = compiler.compile_model(str(dyn), sparse="off")
    counts = cm.report["passes"]["ComputeQuantizedConvsInInt8"]["counts"]
    assert counts["int8"] == 34 and counts["int8_matmul"] == 1
    assert all(r.ok for r in cm.verify())


@needs_vnni
def test_tf1_uint8_tflite_int8_against_litert(tmp_path):
    """A MobileNetV1 quantized as TF1 wrote it (uint8 everything, asymmetric per-tensor weights): its pointwise convs
    sum in int32 on the offset grid (before, every one stayed float) and it verifies against LiteRT. (The classifier
    reads the average pool, no quantize step: it stays float.)"""
    from zoo.tflite_writer import uint8_mobilenet_v1_tflite
    path = tmp_path / "tf1_uint8.tflite"
    path.write_bytes(uint8_mobilenet_v1_tflite(0.5, 64, num_classes=10, num_layers=3, softmax=False))
    cm = compiler.compile_model(str(path))
    counts = cm.report["passes"]["ComputeQuantizedConvsInInt8"]["counts"]
    assert counts.get("int8_offset", 0) + counts.get("int8", 0) == 3 and counts.get("int8_offset", 0) >= 2
    assert cm.info.inputs[0].dtype == "uint8"
    assert all(r.ok for r in cm.verify())


@needs_vnni
@pytest.mark.parametrize("cin,cout,oh,ow,stride,tile", [
    (16, 16, 1, 1, 1, None), (64, 48, 7, 7, 1, None), (32, 32, 14, 14, 1, (14, 2)), (16, 32, 5, 3, 1, (1, 1)),
    (48, 16, 8, 8, 2, None), (32, 64, 6, 6, 1, (6, 4)),
])
def test_u8i8_kernel_shape_sweep(cin, cout, oh, ow, stride, tile):
    """The kernel alone against numpy int64 sums: tiles below, at and above the row, odd rows, strides, extremes."""
    from compiler import artifact
    from schedules.u8i8_conv2d_nchwc import U8I8Conv2dNCHWc, conv2d_u8i8_nchwc, pack_vnni
    h, w = (oh - 1) * stride + 1, (ow - 1) * stride + 1
    data = te.placeholder((1, cin // 16, h, w, 16), "uint8", name="data")
    kern = te.placeholder((cout // 16, cin // 4, 16, 4), "int8", name="kern")
    out = conv2d_u8i8_nchwc(data, kern, (stride, stride))
    knobs = {"pixel_tile": tile[0], "oc_blocks": tile[1]} if tile else None
    done = U8I8Conv2dNCHWc().apply(te.create_prim_func([data, kern, out]), HOST, knobs)
    assert done.name.startswith("u8i8_conv1x1_nchw16c_")
    f = artifact.build_kernel(done.func, HOST).jit()["main"]
    rng = np.random.default_rng(cin * cout)
    x = rng.integers(0, 256, (1, cin // 16, h, w, 16)).astype(np.uint8)
    q = rng.integers(-128, 128, (cout, cin)).astype(np.int8)
    x.reshape(-1)[:32] = 255
    q[0, :] = -128                                            # the largest sums the int32 lanes see
    args = [tvm.runtime.tensor(a) for a in (x, pack_vnni(pack_kernel(q[:, :, None, None], 16, cin).astype(np.int8)),
                                            np.zeros((1, cout // 16, oh, ow, 16), np.int32))]
    f(*args)
    xin = x.transpose(0, 1, 4, 2, 3).reshape(cin, h, w)[:, ::stride, ::stride].reshape(cin, -1).astype(np.int64)
    want = (q.astype(np.int64) @ xin).reshape(cout // 16, 16, oh, ow).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(args[2].numpy()[0], want)
