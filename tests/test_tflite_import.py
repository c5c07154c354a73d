"""compiler.frontend.tflite_import: plain, fp16 and sparse models match LiteRT; bad inputs give one clear error."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tvm
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from compiler.errors import ShrinkcError
from compiler.frontend.model_info import QUANTIZED_VERIFY_TOLERANCE
from compiler.frontend.tflite_import import HINTS_ATTR, import_tflite, sparse_hints
from tests.conftest import tflite_layers_model
from zoo.tflite_writer import (GEOMETRY_V1_MATRIX as V1_MATRIX, GEOMETRY_V2_MATRIX as V2_MATRIX, TfliteBuilder,
                               custom_op_tflite, mediapipe_geometry_tflite, mobilenet_v2_tflite)

SMALL = dict(num_blocks=4, resolution=32, num_classes=16)
VARIANTS = {"plain": {}, "fp16": dict(weights="fp16"), "csr": dict(sparsity=0.8),
            "block4x1": dict(sparsity=0.8, sparse_format="block4x1"),
            "csr_fp16": dict(sparsity=0.8, weights="fp16"),
            "block4x1_fp16": dict(sparsity=0.8, sparse_format="block4x1", weights="fp16")}


def write(folder, name: str, buf: bytes) -> str:
    path = os.path.join(str(folder), name)
    with open(path, "wb") as f:
        f.write(buf)
    return path


def run_litert(path: str, x: np.ndarray, delegates: bool = True) -> np.ndarray:
    kind = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_path=path, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def run_tvm(mod: tvm.IRModule, x: np.ndarray) -> np.ndarray:
    vm = tvm.relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def weights(mod: tvm.IRModule) -> list[np.ndarray]:
    return [p.numpy() for p in mod["main"].attrs["params"]]


def check_against_litert(path: str, tol: float = 1e-4, delegates: bool = True):
    mod, info = import_tflite(path)
    x = np.random.default_rng(0).standard_normal(info.inputs[0].shape).astype(np.float32)
    np.testing.assert_allclose(run_tvm(mod, x), run_litert(path, x, delegates), rtol=tol, atol=tol)
    return mod, info


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite")
    paths = {k: write(folder, f"{k}.tflite", mobilenet_v2_tflite(**SMALL, **kw)) for k, kw in VARIANTS.items()}
    for k in ("csr", "block4x1"):
        paths[k + "_dense"] = write(folder, f"{k}_dense.tflite", mobilenet_v2_tflite(
            **SMALL, **VARIANTS[k], store_sparse=False))
    paths["full_csr"] = write(folder, "full_csr.tflite", mobilenet_v2_tflite(sparsity=0.8))
    paths["folder"] = str(folder)
    return paths


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_litert(models, variant):
    mod, info = check_against_litert(models[variant])
    assert info.source == "tflite" and info.path == os.path.abspath(models[variant])
    assert [(t.name, t.shape, t.dtype) for t in info.inputs] == [("input", [1, 32, 32, 3], "float32")]
    assert [(t.name, t.shape, t.dtype) for t in info.outputs] == [("probs", [1, 16], "float32")]
    assert all(w.dtype != np.float16 for w in weights(mod))    # fp16 weights arrive as float32 constants


def test_full_sparse_mobilenet_matches_litert(models):
    mod, info = check_against_litert(models["full_csr"])
    assert info.inputs[0].shape == [1, 96, 96, 3] and info.outputs[0].shape == [1, 1000]
    assert len(json.loads(json.dumps(dict(mod.attrs[HINTS_ATTR])))) == 35


@pytest.mark.parametrize("fmt", ["csr", "block4x1"])
def test_sparse_weights_rebuilt_exactly(models, fmt):
    sparse, dense = weights(import_tflite(models[fmt])[0]), weights(import_tflite(models[fmt + "_dense"])[0])
    assert len(sparse) == len(dense)
    for a, b in zip(sparse, dense):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_fp16_weights_rebuilt_exactly(models):
    rebuilt = weights(import_tflite(models["csr_fp16"])[0])
    dense = weights(import_tflite(models["csr_dense"])[0])
    for a, b in zip(rebuilt, dense):
        assert np.array_equal(a, b.astype(np.float16).astype(np.float32))


def test_sparse_hints(models):
    mod, _ = import_tflite(models["block4x1"])
    hints = {k: json.loads(v) for k, v in mod.attrs[HINTS_ATTR].items()}
    assert hints == sparse_hints(models["block4x1"])
    assert len(hints) == 2 * 4 - 1 + 2                          # expand + project per block, head, classifier
    h = hints["head/weights"]
    assert h["stored"] == "head/weights_sparse" and h["shape"] == [1280, 1, 1, 16] and h["block"] == [4, 1, 1, 1]
    assert 0.15 < h["nnz"] / h["size"] < 0.25
    assert h["consumers"] == [{"op": "CONV_2D", "output": "head", "input": 1, "layout": "OHWI"}]
    fp16 = sparse_hints(models["block4x1_fp16"])["classifier/weights"]
    assert fp16["stored"] == "classifier/weights_fp16_sparse" and fp16["dtype"] == "float16"
    assert fp16["consumers"][0]["op"] == "FULLY_CONNECTED" and fp16["block"] == [4, 1]
    plain, _ = import_tflite(models["plain"])
    assert plain.attrs is None or HINTS_ATTR not in plain.attrs


@pytest.mark.parametrize("sparse", [None, "csr", "block4x1"])
def test_dynamic_range_quantized_weights(tmp_path, sparse):
    """TFLite's default optimization without a representative dataset stores conv and fully connected weights
    int8 per channel, read by the ops on float input (TVM's importer refused such models). They are dequantized:
    the import computes exactly the float32 model of the same values, and stays within the verify tolerance of
    LiteRT's hybrid kernels, which quantize those ops' inputs at run time (stored sparse, the XNNPACK delegate
    fails on them: LiteRT's own kernels)."""
    kw = dict(SMALL, weights="int8", sparsity=0.8 if sparse else 0.0, sparse_format=sparse or "csr")
    path = write(tmp_path, "int8.tflite", mobilenet_v2_tflite(**kw))
    ref = write(tmp_path, "as_fp32.tflite", mobilenet_v2_tflite(**kw, store_int8=False, store_sparse=False))
    mod, info = import_tflite(path)
    assert info.verify_tolerance == QUANTIZED_VERIFY_TOLERANCE and "14 int8 weight(s) dequantized" in info.notes[-1]
    ref_mod, ref_info = import_tflite(ref)
    assert ref_info.verify_tolerance == 0.0 and not any("quantized activations" in n for n in info.notes)
    assert all(a.dtype == np.float32 and np.array_equal(a, b) for a, b in zip(weights(mod), weights(ref_mod)))
    x = np.random.default_rng(0).standard_normal(info.inputs[0].shape).astype(np.float32)
    ours = run_tvm(mod, x)
    np.testing.assert_allclose(ours, run_litert(ref, x), rtol=1e-4, atol=1e-4)
    hybrid = run_litert(path, x, delegates=sparse is None)
    assert 0 < np.abs(ours - hybrid).max() <= QUANTIZED_VERIFY_TOLERANCE * np.abs(hybrid).max()
    if sparse:
        hints = {k: json.loads(v) for k, v in mod.attrs[HINTS_ATTR].items()}
        assert len(hints) == 9 and all(h["dtype"] == "int8" for h in hints.values())


def test_quantized_activations_loosen_verify(tmp_path):
    """An int8 activation (QUANTIZE -> DEQUANTIZE, as integer-quantized models have around every op) is computed with
    its quantize step; the model then says that --verify allows the quantized tolerance, and a note says why."""
    b = TfliteBuilder()
    b.output(b.hard_swish(b.dequantize(b.quantize(b.input([1, 4, 4, 8]), 0.05))))
    mod, info = check_against_litert(write(tmp_path, "int8_act.tflite", b.finish()))
    assert info.verify_tolerance == QUANTIZED_VERIFY_TOLERANCE
    assert info.notes[-1].startswith("quantized activations: 1 int8 tensor(s)")


@pytest.mark.parametrize("enc", [dict(order=[1, 0], formats=["SPARSE_CSR", "SPARSE_CSR"]),
                                 dict(block=(2, 4), formats=["SPARSE_CSR", "SPARSE_CSR", "DENSE", "DENSE"]),
                                 dict(order=[1, 0], formats=["DENSE", "SPARSE_CSR"])], ids=str)
def test_general_sparse_encodings(tmp_path, enc):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 300)).astype(np.float32)     # 300 columns: uint16 indices
    w[rng.random(w.shape) < 0.7] = 0
    w[:4, 8:16] = 0
    b = TfliteBuilder()
    b.output(b.fully_connected(b.input([1, 300]), w, np.zeros(8), sparse=enc))
    mod, _ = check_against_litert(write(tmp_path, "fc.tflite", b.finish()))
    assert np.array_equal(weights(mod)[0], w)


def test_sparse_weights_read_without_densify(tmp_path):
    w = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
    w[:, 4:12] = 0
    b = TfliteBuilder()
    b.output(b.fully_connected(b.input([1, 16]), b.weight(w, "w", {"block": (1, 4)}, densify=False), np.ones(8)))
    mod, _ = check_against_litert(write(tmp_path, "fc.tflite", b.finish()), delegates=False)
    assert np.array_equal(weights(mod)[0], w)
    assert json.loads(mod.attrs[HINTS_ATTR]["w_sparse"])["block"] == [1, 4]


def test_layers(tmp_path):
    mod, info = check_against_litert(write(tmp_path, "layers.tflite", tflite_layers_model()))
    assert (info.inputs[0].name, info.outputs[0].name, info.outputs[0].shape) == ("image", "scores", [1, 5])


def expect_error(path, *words, pins=None):
    with pytest.raises(ShrinkcError) as err:
        import_tflite(path, pins)
    msg = str(err.value)
    assert err.value.fix and all(w in msg for w in words), msg
    return err.value


def test_bad_files(models, tmp_path):
    expect_error(str(tmp_path / "missing.tflite"), "does not exist")
    expect_error(write(tmp_path, "empty.tflite", b""), "is empty")
    expect_error(write(tmp_path, "text.tflite", b"this is not a flatbuffer"), "not a TFLite model", "TFL3")
    with open(models["plain"], "rb") as f:
        good = f.read()
    for cut in (12, 100, len(good) // 2, len(good) - 64):
        expect_error(write(tmp_path, f"cut{cut}.tflite", good[:cut]), "truncated or damaged")


def test_custom_op(tmp_path):
    err = expect_error(write(tmp_path, "custom.tflite", custom_op_tflite("MyFancyOp")), "custom op", "'MyFancyOp'")
    assert "builtin ops" in err.fix


def test_dynamic_input_needs_pin(tmp_path):
    b = TfliteBuilder()
    b.output(b.hard_swish(b.input([1, 8, 8, 3], signature=[-1, -1, 8, 3])))
    path = write(tmp_path, "dynamic.tflite", b.finish())
    err = expect_error(path, "input 'input'", "dynamic dimension", "axis 0")   # batch and height free
    assert "--input input:1x1x8x3" in err.fix
    expect_error(path, "3 dimensions", pins={"input": [1, 8, 8]})
    expect_error(path, "fixes it at 8", pins={"input": [1, 8, 9, 3]})
    expect_error(path, "not an input", pins={"image": [1, 8, 8, 3]})
    mod, info = import_tflite(path, {"input": [2, 8, 8, 3]})
    assert info.inputs[0].shape == [2, 8, 8, 3] and info.outputs[0].shape == [2, 8, 8, 3]
    x = np.linspace(-5, 5, 2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
    np.testing.assert_allclose(run_tvm(mod, x), x * np.clip(x + 3, 0, 6) / 6, rtol=1e-5, atol=1e-6)


def test_a_dynamic_batch_alone_is_imported_as_1(tmp_path):
    b = TfliteBuilder()
    b.output(b.hard_swish(b.input([1, 8, 8, 3], signature=[-1, 8, 8, 3])))
    mod, info = import_tflite(write(tmp_path, "batch.tflite", b.finish()))
    assert info.inputs[0].shape == [1, 8, 8, 3] and info.outputs[0].shape == [1, 8, 8, 3]
    assert info.notes == ["input 'input': its dynamic batch axis is compiled as 1 (another size: --input "
                          "input:8x8x8x3)"]


def test_reshape_of_a_quantized_tensor_whose_shape_is_computed_from_a_dynamic_batch(tmp_path):
    """Integer-quantized Keras models (MobileNetV3, EfficientNet) reshape an int8 tensor to SHAPE -> STRIDED_SLICE
    -> PACK; TVM's importer refused SHAPE of a quantized tensor, though it reads only the shape."""
    b = TfliteBuilder()
    x = b.quantize(b.input([1, 2, 2, 8], signature=[-1, 2, 2, 8]), 0.05)
    b.output(b.dequantize(b.reshape_keep_batch(x, [32])))
    mod, info = import_tflite(write(tmp_path, "int8_reshape.tflite", b.finish()), {"input": [1, 2, 2, 8]})
    assert info.outputs[0].shape == [1, 32]
    v = np.linspace(-3, 3, 32, dtype=np.float32).reshape(1, 2, 2, 8)
    np.testing.assert_array_equal(run_tvm(mod, v), run_litert(write(tmp_path, "again.tflite", b.finish()), v))


def test_reshape_whose_shape_is_computed_from_a_dynamic_batch(tmp_path):
    # Keras models converted with a dynamic batch (MobileNetV3, EfficientNet, MobileNet v1 from
    # tf.keras.applications) reshape to SHAPE -> STRIDED_SLICE -> PACK; TVM's importer crashed on it.
    rng = np.random.default_rng(0)
    b = TfliteBuilder()
    x = b.input([1, 6, 6, 8], signature=[-1, 6, 6, 8])
    y = b.conv2d(x, rng.standard_normal((4, 3, 3, 8)).astype(np.float32), np.zeros(4, np.float32))
    b.output(b.reshape_keep_batch(y, [6 * 6 * 4]))
    path = write(tmp_path, "keras_reshape.tflite", b.finish())
    mod, info = import_tflite(path, {"input": [1, 6, 6, 8]})
    assert info.outputs[0].shape == [1, 144]
    x = rng.standard_normal((1, 6, 6, 8)).astype(np.float32)
    np.testing.assert_allclose(run_tvm(mod, x), run_litert(path, x), rtol=1e-4, atol=1e-5)


def test_segmentation_head_ops_match_litert(tmp_path):
    """The ops of a MediaPipe-style segmentation / detection head (CONCATENATION, MAX_POOL_2D, AVERAGE_POOL_2D with
    SAME padding, PAD, DEPTH_TO_SPACE, TANH) in one model, against LiteRT."""
    from conftest import assert_matches_ort
    b = TfliteBuilder(seed=2)
    rng = b.rng

    def conv(x, cout, name, stride=1):
        w = (rng.standard_normal((cout, 3, 3, b.shape(x)[3])) * 0.15).astype(np.float32)
        return b.conv2d(x, w, np.zeros(cout, np.float32), stride=stride, act="RELU", name=name)

    x = conv(b.input([1, 16, 16, 3]), 16, "c1")
    skip = b.pool(x, "avg", 3, 2, "SAME", name="avg")
    y = b.pad(b.pool(conv(x, 16, "c2"), "max", 2, 2, "VALID", name="max"), [[0, 0], [1, 1], [1, 1], [0, 0]])
    y = conv(y, 16, "c3")
    y = b.concat([skip, b.pool(y, "max", 3, 1, "VALID", name="max2")])
    y = b.depth_to_space(conv(y, 32, "c4"), 2)
    b.output(b.tanh(conv(y, 4, "c5")))
    path = tmp_path / "head.tflite"
    path.write_bytes(b.finish())
    assert_matches_ort(str(path), tol=1e-5)


@pytest.mark.parametrize("dtype,kernel,stride,padding,act", [
    ("uint8", 2, 2, "VALID", 0), ("uint8", 3, 1, "SAME", 3), ("int8", 4, 4, "VALID", 0), ("int8", 3, 2, "SAME", 1),
], ids=["u8_2x2", "u8_3x3_same_relu6", "i8_4x4", "i8_3x3_same_relu"])
def test_quantized_average_pool_rounds_as_litert(tmp_path, dtype, kernel, stride, padding, act):
    """A quantized AVERAGE_POOL_2D (MobileNetV1 quant's global pool, a detector's pooled skip) equals LiteRT's
    exactly: TFLite rounds each average to the nearest step; TVM's converter truncated it in int32, so about half the
    pooled values were one step off (before, this test failed on every case)."""
    from zoo.tflite_writer import _PADS, _Op, _Operator, _Opt
    b = TfliteBuilder()
    zero = 3 if dtype == "uint8" else -5

    def tensor(name, shape):
        t = b._tensor(name, shape, dtype)
        b.tensors[t].quant = {"scale": np.array([0.05], np.float32), "zero": np.array([zero]), "axis": 0}
        return t

    x = tensor("input", [1, 13, 12, 16])
    b.inputs.append(x)
    size = [(n - kernel) // stride + 1 if padding == "VALID" else -(-n // stride) for n in (13, 12)]
    y = b.output(tensor("pool", [1, *size, 16]))
    b.ops.append(_Operator(_Op.AVERAGE_POOL_2D, [x], [y], _Opt.Pool2DOptions, dict(
        Padding=_PADS[padding], StrideW=stride, StrideH=stride, FilterWidth=kernel, FilterHeight=kernel,
        FusedActivationFunction=act)))
    path = tmp_path / "pool.tflite"
    path.write_bytes(b.finish())
    info = np.iinfo(dtype)
    xv = np.random.default_rng(kernel).integers(info.min, info.max + 1, (1, 13, 12, 16)).astype(dtype)
    import compiler
    got = compiler.compile_model(str(path)).run({"input": xv})[0]
    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], xv)
    interp.invoke()
    np.testing.assert_array_equal(got, interp.get_tensor(interp.get_output_details()[0]["index"]))


def _quantized_op_model(kind: str, dtype: str) -> bytes:
    """One quantized op on a [1, 9, 10, 16] input (scale 0.05, zero point 120 on uint8's scale), its output quantized
    as TFLite requires for the op (the input's scale and zero point where it moves values)."""
    from zoo.tflite_writer import _Op, _Operator, _Opt
    b = TfliteBuilder()
    shift = 0 if dtype == "uint8" else -128

    def tensor(name, shape, scale=0.05, zero=120, data=None, dt=dtype):
        return b._tensor(name, shape, dt, data=data, quant={"scale": np.array([scale], np.float32),
                                                            "zero": np.array([zero + shift]), "axis": 0})

    x = tensor("input", [1, 8, 10, 16])
    b.inputs.append(x)
    ints = lambda name, v: b._tensor(name, np.shape(v), "int32", data=np.asarray(v, np.int32).tobytes())  # noqa: E731
    pads = [[0, 0], [1, 1], [2, 0], [0, 0]]
    ops = {   # kind: (code, extra inputs, output shape, options type, options)
        "pad": (_Op.PAD, [ints("pads", pads)], [1, 10, 12, 16], _Opt.PadOptions, {}),
        "mirror_pad": (_Op.MIRROR_PAD, [ints("pads", pads)], [1, 10, 12, 16], _Opt.MirrorPadOptions, {"Mode": 0}),
        "transpose": (_Op.TRANSPOSE, [ints("perm", [0, 3, 1, 2])], [1, 16, 8, 10], _Opt.TransposeOptions, {}),
        "strided_slice": (_Op.STRIDED_SLICE, [ints("b", [0, 1, 0, 0]), ints("e", [1, 8, 10, 16]),
                                              ints("s", [1, 2, 3, 1])], [1, 4, 4, 16], _Opt.StridedSliceOptions, {}),
        "depth_to_space": (_Op.DEPTH_TO_SPACE, [], [1, 16, 20, 4], _Opt.DepthToSpaceOptions, {"BlockSize": 2}),
        "space_to_depth": (_Op.SPACE_TO_DEPTH, [], [1, 4, 5, 64], _Opt.SpaceToDepthOptions, {"BlockSize": 2}),
        "resize_nearest": (_Op.RESIZE_NEAREST_NEIGHBOR, [ints("size", [16, 20])], [1, 16, 20, 16],
                           _Opt.ResizeNearestNeighborOptions, {}),
        "prelu": (_Op.PRELU, [tensor("alpha", [1, 1, 16], 0.0113, 128,
                                     (np.arange(0, 256, 16) + shift).astype(dtype).tobytes())], [1, 8, 10, 16], 0, {}),
        "gelu": (_Op.GELU, [], [1, 8, 10, 16], _Opt.GeluOptions, {}),
        "l2_normalization": (_Op.L2_NORMALIZATION, [], [1, 8, 10, 16], _Opt.L2NormOptions, {}),
        "batch_matmul": (_Op.BATCH_MATMUL, [tensor("b", [1, 8, 16, 5], 0.0071, 128, (np.random.default_rng(1).integers(
            0, 256, (1, 8, 16, 5)) + shift).astype(dtype).tobytes())], [1, 8, 10, 5], _Opt.BatchMatMulOptions, {}),
    }
    code, extra, shape, opt, options = ops[kind]
    # NOTE: the output steps of the ops that compute are not simple fractions of the input's (0.05 / 0.04 would
    # put a quarter of PRELU's values exactly half a step between two, which LiteRT rounds up and a float quantize
    # step to even); L2_NORMALIZATION's is the one TFLite requires (1 / 128, zero point 0)
    out_step = {"prelu": (0.0437, 100), "gelu": (0.0437, 20), "l2_normalization": (1 / 128, 128),
                "batch_matmul": (0.0913, 128)}.get(kind, (0.05, 120))
    y = b.output(tensor("y", shape, *out_step))
    b.ops.append(_Operator(code, [x] + extra, [y], opt, options))
    return b.finish()


@pytest.mark.parametrize("kind,dtype", [
    ("pad", "int8"), ("mirror_pad", "uint8"), ("transpose", "uint8"), ("strided_slice", "int8"),
    ("depth_to_space", "uint8"), ("space_to_depth", "int8"), ("resize_nearest", "int8"), ("prelu", "uint8"),
    ("prelu", "int8"), ("gelu", "int8"), ("l2_normalization", "int8"), ("batch_matmul", "int8"),
])
def test_quantized_ops_that_tvm_refused_match_litert(tmp_path, kind, dtype):
    """Integer-quantized PAD (filled with the zero point), MIRROR_PAD, TRANSPOSE, STRIDED_SLICE, DEPTH_TO_SPACE,
    SPACE_TO_DEPTH, RESIZE_NEAREST_NEIGHBOR (which move the stored integers) and PRELU, GELU, L2_NORMALIZATION,
    BATCH_MATMUL (computed on the dequantized values): TVM's converter refused each on an integer-quantized model.
    Equal to LiteRT (the computed ones: within one step on a few values, where float rounding and LiteRT's
    fixed-point requantization or lookup tables part)."""
    path = tmp_path / f"{kind}.tflite"
    path.write_bytes(_quantized_op_model(kind, dtype))
    info = np.iinfo(dtype)
    xv = np.random.default_rng(0).integers(info.min, info.max + 1, (1, 8, 10, 16)).astype(dtype)
    import compiler
    got = compiler.compile_model(str(path)).run({"input": xv})[0].astype(int)
    interp = Interpreter(model_path=str(path))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], xv)
    interp.invoke()
    want = interp.get_tensor(interp.get_output_details()[0]["index"]).astype(int)
    computed = kind in ("prelu", "gelu", "l2_normalization", "batch_matmul")
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= (1 if computed else 0)
    assert (got != want).mean() < (0.03 if computed else 1e-9)


def test_one_dimensional_conv_as_tflite_writes_it(tmp_path):
    """A 1-D conv as the TFLite converter writes it, EXPAND_DIMS -> CONV_2D (1 x k) -> SQUEEZE, a negative axis too:
    TVM's converter failed on every EXPAND_DIMS (it passed relax's expand_dims an argument it does not take)."""
    from conftest import assert_matches_ort
    b = TfliteBuilder(seed=3)
    x = b.input([1, 32, 8])
    y = b.expand_dims(x, 1)                                                  # [1, 1, 32, 8]
    w = (b.rng.standard_normal((16, 1, 3, 8)) * 0.3).astype(np.float32)
    y = b.squeeze(b.conv2d(y, w, np.zeros(16, np.float32), act="RELU", name="conv1d"), [1])   # [1, 32, 16]
    y = b.squeeze(b.expand_dims(y, -1), [3])                                 # [1, 32, 16, 1] and back
    b.output(y)
    path = tmp_path / "conv1d.tflite"
    path.write_bytes(b.finish())
    assert_matches_ort(str(path), tol=1e-5)


def _tf_ops_model(kind: str) -> bytes:
    from zoo.tflite_writer import _Op, _Opt
    b = TfliteBuilder(seed=4)
    rng = b.rng
    ints = lambda name, v: b._tensor(name, np.shape(v), "int32", data=np.asarray(v, np.int32).tobytes())  # noqa: E731
    if kind == "batch_matmul":     # a constant right operand (a transformer's projection), one adjoint
        x = b.input([1, 6, 7, 8])
        y = b._op(_Op.BATCH_MATMUL, [x, b.const(rng.standard_normal((1, 6, 5, 8)).astype(np.float32), "w")],
                  [1, 6, 7, 5], "bmm", _Opt.BatchMatMulOptions, AdjX=False, AdjY=True)
    elif kind == "gather_nd":      # int32 coordinates along the last axis
        x = b.input([1, 6, 7, 8])
        y = b._op(_Op.GATHER_ND, [x, ints("idx", [[0, 2], [0, 5], [0, 2]])], [3, 7, 8], "gather")
    else:                          # a dilated conv as TF1's converter wrote it
        x = b.input([1, 13, 11, 8])
        s = b._op(_Op.SPACE_TO_BATCH_ND, [x, ints("block", [2, 2]), ints("pads", [[2, 3], [2, 3]])],
                  [4, 9, 8, 8], "stb")
        w = (rng.standard_normal((16, 3, 3, 8)) * 0.2).astype(np.float32)
        c = b.conv2d(s, w, np.zeros(16, np.float32), padding="VALID", name="conv")          # [4, 7, 6, 16]
        y = b._op(_Op.BATCH_TO_SPACE_ND, [c, ints("block2", [2, 2]), ints("crops", [[0, 1], [0, 1]])],
                  [1, 13, 11, 16], "bts")
    b.output(y)
    return b.finish()


@pytest.mark.parametrize("kind", ["batch_matmul", "gather_nd", "dilated_conv"])
def test_tf_ops_tvm_converted_wrongly_match_litert(tmp_path, kind):
    """BATCH_MATMUL with a constant operand (TVM's converter looked it up as a computed tensor and failed),
    GATHER_ND (TVM moved the coordinates' axis first: wrong elements, reads past the data) and
    SPACE_TO_BATCH_ND -> CONV_2D -> BATCH_TO_SPACE_ND (TF1's dilated conv; TVM called a missing packed function),
    against LiteRT. All three failed before."""
    from conftest import assert_matches_ort
    path = tmp_path / f"{kind}.tflite"
    path.write_bytes(_tf_ops_model(kind))
    assert_matches_ort(str(path), tol=1e-5)


def _upsampling_model(custom: bool, k: int, stride: int, padding: str, weights: str = "fp32") -> bytes:
    """conv -> a transposed conv with bias (MediaPipe's custom Convolution2DTransposeBias, or TRANSPOSE_CONV)."""
    b = TfliteBuilder(weights=weights, seed=5)
    x = b.input([1, 6, 7, 8])
    y = b.conv2d(x, (b.rng.standard_normal((8, 3, 3, 8)) * 0.3).astype(np.float32),
                 (b.rng.standard_normal(8) * 0.1).astype(np.float32), act="RELU")
    w = (b.rng.standard_normal((5, k, k, 8)) * 0.3).astype(np.float32)
    bias = b.rng.standard_normal(5).astype(np.float32)
    b.output((b.transpose_conv_bias if custom else b.transpose_conv)(y, w, bias, stride=stride, padding=padding))
    return b.finish()


@pytest.mark.parametrize("k,stride,padding,weights", [(2, 2, "SAME", "fp32"), (3, 2, "SAME", "fp16"),
                                                      (4, 2, "SAME", "fp32"), (3, 2, "VALID", "fp32"),
                                                      (5, 3, "SAME", "fp32")])
def test_mediapipe_transposed_conv_with_bias_matches_litert(tmp_path, k, stride, padding, weights):
    """MediaPipe's segmentation models upsample with the custom op Convolution2DTransposeBias (refused before as a
    custom op): against LiteRT running it (its XNNPACK delegate has it) and against LiteRT's TRANSPOSE_CONV with the
    same weights and bias; fp16 weights through DEQUANTIZE as MediaPipe stores them."""
    from conftest import assert_matches_ort

    from compiler.verify import reference_outputs
    custom, builtin = tmp_path / "custom.tflite", tmp_path / "builtin.tflite"
    custom.write_bytes(_upsampling_model(True, k, stride, padding, weights))
    builtin.write_bytes(_upsampling_model(False, k, stride, padding, weights))
    info = assert_matches_ort(str(custom), tol=1e-5).info
    x = {"input": np.random.default_rng(0).standard_normal((1, 6, 7, 8)).astype(np.float32)}
    np.testing.assert_allclose(reference_outputs("tflite", str(custom), x)[0],
                               reference_outputs("tflite", str(builtin), x)[0], rtol=1e-5, atol=1e-5)
    assert info.outputs[0].shape[1:3] == ([6 * stride, 7 * stride] if padding == "SAME" else
                                          [5 * stride + k, 6 * stride + k])


def _argmax_pool_model(k: int = 2, h: int = 8, padding: str = "VALID") -> bytes:
    """conv + ReLU (windows of equal zeros: ties) -> MaxPoolingWithArgmax2D -> conv -> MaxUnpooling2D at the pooling's
    indices (MediaPipe's hair segmentation encoder / decoder pattern); the indices are an output too."""
    b = TfliteBuilder(seed=3)
    x = b.input([1, h, h + 2, 8])
    y = b.conv2d(x, (b.rng.standard_normal((8, 3, 3, 8)) * 0.3).astype(np.float32), np.zeros(8, np.float32), act="RELU")
    values, indices = b.max_pool_argmax(y, k, padding)
    d = b.conv2d(values, (b.rng.standard_normal((8, 3, 3, 8)) * 0.3).astype(np.float32), np.zeros(8, np.float32))
    b.output(b.max_unpool(d, indices, k))
    b.output(indices)
    return b.finish()


@pytest.mark.parametrize("k,h,padding", [(2, 8, "VALID"), (3, 9, "VALID"), (2, 9, "VALID"), (2, 8, "SAME")])
def test_mediapipe_argmax_pooling_and_unpooling_match_litert(tmp_path, k, h, padding):
    """MediaPipe's MaxPoolingWithArgmax2D / MaxUnpooling2D (refused before as custom ops) against LiteRT running them
    (XNNPACK delegate): the unpooled decoder output, and the indices themselves, bit for bit (LiteRT stores the
    window position x * kh + y, the first maximum on ties, as int32 bits in a float32 tensor)."""
    from conftest import assert_matches_ort
    path = tmp_path / "argmax.tflite"
    path.write_bytes(_argmax_pool_model(k, h, padding))
    results = assert_matches_ort(str(path), tol=1e-5).verify(tolerance=1e-5)
    assert results[1].output.endswith("indices") and results[1].max_abs_err == 0


def test_mediapipe_pooling_that_litert_cannot_run_is_refused(tmp_path):
    b = TfliteBuilder(seed=3)
    v, _ = b.max_pool_argmax(b.input([1, 9, 9, 4]), 2, "SAME")     # SAME on a plane of partial windows
    b.output(v)
    expect_error(write(tmp_path, "pool_same.tflite", b.finish()), "MaxPoolingWithArgmax2D (output 'pool')",
                 "padding 1")


def test_fully_connected_without_bias_and_squeeze_without_dims(tmp_path):
    """A FULLY_CONNECTED with no bias (-1) and a fused ReLU on a 4-D input (its output flattened to [rows, units])
    failed (the fused activation's call was reshaped before it had a type); a SQUEEZE without squeeze_dims failed
    reading the absent list (TFLite drops every axis of size 1). Against LiteRT; both failed before."""
    from conftest import assert_matches_ort
    from zoo.tflite_writer import _Op, _Opt
    b = TfliteBuilder(seed=5)
    x = b.input([1, 1, 6, 8])
    w = b.const((b.rng.standard_normal((5, 8)) * 0.3).astype(np.float32), "w")
    y = b._op(_Op.FULLY_CONNECTED, [x, w, -1], [6, 5], "fc", _Opt.FullyConnectedOptions, FusedActivationFunction=1,
              KeepNumDims=False)
    y = b.reshape(y, [1, 6, 1, 5])
    b.output(b._op(_Op.SQUEEZE, [y], [6, 5], "squeeze", _Opt.SqueezeOptions))
    path = tmp_path / "fc.tflite"
    path.write_bytes(b.finish())
    assert_matches_ort(str(path), tol=1e-5)


def _ssd_head(**options) -> bytes:
    """A tiny SSD-style detector: a conv, box and class heads over 8 x 8 anchors, TFLite_Detection_PostProcess."""
    b = TfliteBuilder(seed=0)
    rng = b.rng
    x = b.conv2d(b.input([1, 16, 16, 3]), (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32),
                 np.zeros(8, np.float32), stride=2, act="RELU", name="c1")
    box = b.conv2d(x, (rng.standard_normal((4, 1, 1, 8)) * 0.3).astype(np.float32), np.zeros(4, np.float32), name="box")
    cls = b.conv2d(x, (rng.standard_normal((4, 1, 1, 8)) * 0.5).astype(np.float32), np.zeros(4, np.float32), name="cls")
    yy, xx = np.meshgrid((np.arange(8) + 0.5) / 8, (np.arange(8) + 0.5) / 8, indexing="ij")
    anchors = np.stack([yy.ravel(), xx.ravel(), np.full(64, 0.2), np.full(64, 0.2)], 1).astype(np.float32)
    for out in b.detection_postprocess(b.reshape(box, [1, 64, 4]), b.logistic(b.reshape(cls, [1, 64, 4])), anchors,
                                       **options):
        b.output(out)
    return b.finish()


@pytest.mark.parametrize("options", [{}, {"nms_score_threshold": 0.95}, {"use_regular_nms": True,
                                                                         "detections_per_class": 3}],
                         ids=["fast_nms", "few_detections", "regular_nms"])
def test_ssd_detection_postprocess_matches_litert(tmp_path, options):
    """TFLite_Detection_PostProcess, the custom op that ends TF's SSD detectors and that LiteRT registers itself, was
    refused as a custom op; now TVM's converter (its non-maximum suppression kernels left unscheduled: scheduling
    one lost the buffer it writes in place) gives LiteRT's boxes, classes, scores and count. LiteRT leaves the rows
    past the count undefined, so verify compares the counted rows (few_detections: 1 of 10)."""
    path = tmp_path / "ssd.tflite"
    path.write_bytes(_ssd_head(**options))
    import compiler
    cm = compiler.compile_model(str(path))
    assert cm.info.counted_by == {n: "num_detections" for n in ("detection_boxes", "detection_classes",
                                                                "detection_scores")}
    results = cm.verify(tolerance=1e-5)
    assert all(r.ok for r in results), [r.line() for r in results]


@pytest.mark.parametrize("regular_nms", [False, True])
def test_uint8_ssd_detector_matches_litert(tmp_path, regular_nms):
    """A TF1-style quantized SSD: uint8 heads, LOGISTIC and anchors feed TFLite_Detection_PostProcess, which reads
    them quantized; boxes, classes, scores and count equal LiteRT's."""
    from zoo.tflite_writer import uint8_ssd_tflite
    path = tmp_path / "ssd_u8.tflite"
    path.write_bytes(uint8_ssd_tflite(regular_nms))
    import compiler
    results = compiler.compile_model(str(path)).verify(tolerance=1e-5)
    assert all(r.ok for r in results), [r.line() for r in results]
    assert [r.output for r in results][-1] == "num_detections"


def test_ssd_with_several_classes_per_detection_is_refused(tmp_path):
    path = tmp_path / "ssd2.tflite"
    path.write_bytes(_ssd_head(max_classes_per_detection=2))
    import compiler
    with pytest.raises(ShrinkcError, match="max_classes_per_detection 2"):
        compiler.compile_model(str(path))


# ---- MediaPipe's geometry ops: LiteRT cannot run them, so the reference is numpy, written from MediaPipe's CPU kernels
def _ref_matrix_v2(lm: np.ndarray, o: dict) -> np.ndarray:
    p = lm.reshape(-1, 3).astype(np.float64)
    left, right = p[o["left_rotation_idx"]], p[o["right_rotation_idx"]]
    r = o["target_rotation_radians"] - np.arctan2(right[1] - left[1], right[0] - left[0])
    idx = list(o["subset_idxs"]) + ([o["subset_idxs"][-1]] if len(o["subset_idxs"]) % 2 else [])
    rot = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    q = p[idx, :2] @ rot.T
    hi, lo = q.max(0), q.min(0)
    cx, cy = np.array([[np.cos(-r), -np.sin(-r)], [np.sin(-r), np.cos(-r)]]) @ ((hi + lo) / 2)
    t = np.eye(4)
    for m in ([[1, 0, 0, cx], [0, 1, 0, cy], [0, 0, 1, 0], [0, 0, 0, 1]],
              [[np.cos(-r), -np.sin(-r), 0, 0], [np.sin(-r), np.cos(-r), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
              np.diag([o["scale_x"] * (hi - lo)[0] / o["output_width"],
                       o["scale_y"] * (hi - lo)[1] / o["output_height"], 1, 1]),
              [[1, 0, 0, -o["output_width"] / 2], [0, 1, 0, -o["output_height"] / 2], [0, 0, 1, 0], [0, 0, 0, 1]]):
        t = t @ np.asarray(m, np.float64)
    return t.reshape(1, 4, 4)


def _ref_matrix_v1(lm: np.ndarray, o: dict) -> np.ndarray:
    p = lm.reshape(-1, 3).astype(np.float64)
    left, right = p[o["left_rotation_idx"]], p[o["right_rotation_idx"]]
    a = -np.arctan((right[1] - left[1]) / (right[0] - left[0]))
    idx = list(o["subset"]) + ([o["subset"][-1]] if len(o["subset"]) % 2 else [])
    q = p[idx, :2] @ np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]).T
    hi, lo, rng = np.maximum(q.max(0), -1e5), np.minimum(q.min(0), 1e5), o["landmarks_range"]
    box = (hi - lo) * o["bbox_size_multiplier"]
    mid = (hi + lo) / 2
    rm = np.array([[np.cos(-a), -np.sin(-a)], [np.sin(-a), np.cos(-a)]]) @ mid
    (ih, iw), (oh, ow) = o["input_hw"], o["output_hw"]
    itm = np.array([[(iw - 1) / 2, 0, (iw - 1) / 2], [0, (ih - 1) / 2, (ih - 1) / 2], [0, 0, 1]]) \
        @ np.array([[np.cos(-a), -np.sin(-a), rm[0] / rng * 2 - 1], [np.sin(-a), np.cos(-a), rm[1] / rng * 2 - 1],
                    [0, 0, 1]]) \
        @ np.diag([box[0] / rng, box[1] / rng, 1]) @ np.array([[2 / (ow - 1), 0, -1], [0, 2 / (oh - 1), -1], [0, 0, 1]])
    out = np.zeros((4, 4))
    out[0], out[1] = [itm[0, 0], itm[0, 1], 0, itm[0, 2]], [itm[1, 0], itm[1, 1], 0, itm[1, 2]]
    out[2], out[3] = [itm[2, 0], itm[2, 1], itm[2, 2], 0], [0, 0, 0, 1]
    return out.reshape(1, 4, 4)


def _ref_warp(x: np.ndarray, m: np.ndarray, oh: int, ow: int, version: int) -> np.ndarray:
    _, h, w, c = x.shape
    xt, yt = m.reshape(-1)[0:4].astype(np.float64).copy(), m.reshape(-1)[4:8].astype(np.float64).copy()
    if version == 2:
        xt[3] += xt[0] * 0.5 + xt[1] * 0.5 - 0.5
        yt[3] += yt[0] * 0.5 + yt[1] * 0.5 - 0.5
    out = np.zeros((1, oh, ow, c))
    for oy in range(oh):
        for ox in range(ow):
            tx, ty = xt[0] * ox + xt[1] * oy + xt[3], yt[0] * ox + yt[1] * oy + yt[3]
            if tx < 0 or tx > w - 1 or ty < 0 or ty > h - 1:
                continue
            fx, fy = int(np.floor(tx)), int(np.floor(ty))

            def at(yy, xx):
                return x[0, yy, xx] if 0 <= yy < h and 0 <= xx < w else np.zeros(c)
            rc, lc = tx - fx, ty - fy
            upper = (1 - rc) * at(fy, fx) + rc * at(fy, fx + 1)
            lower = (1 - rc) * at(fy + 1, fx) + rc * at(fy + 1, fx + 1)
            out[0, oy, ox] = lc * lower + (1 - lc) * upper
    return out


def _ref_landmarks(lm: np.ndarray, m: np.ndarray, dims: int, scale: float = 1.0) -> np.ndarray:
    f = m.reshape(-1).astype(np.float64)
    p = lm.reshape(-1, dims).astype(np.float64).copy()
    x, y = p[:, 0].copy(), p[:, 1].copy()
    p[:, 0], p[:, 1] = f[0] * x + f[1] * y + f[3] * scale, f[4] * x + f[5] * y + f[7] * scale
    return p.reshape(lm.shape)


@pytest.mark.parametrize("version", [1, 2])
def test_mediapipe_geometry_ops_match_their_kernels(tmp_path, version):
    """Landmarks2TransformMatrix, TransformTensorBilinear and TransformLandmarks (refused before as custom ops), both
    versions of each, compiled by shrinkc against numpy written from MediaPipe's CPU kernels (LiteRT has none of
    them); landmarks that put the crop partly off the feature map, so the zero outside is tested too."""
    import compiler
    path = write(tmp_path, f"geometry_v{version}.tflite", mediapipe_geometry_tflite(version))
    cm = compiler.compile_model(path)
    rng = np.random.default_rng(7)
    lm = (rng.uniform(2, 14, (8, 3)) * [1, 1, 0.1]).astype(np.float32)
    inputs = {"landmarks": lm.reshape([1, 8, 3] if version == 2 else [1, 1, 1, 24]),
              "features": rng.standard_normal((1, 16, 18, 5)).astype(np.float32),
              "crop_landmarks": rng.uniform(0, 12, (1, 6, 3) if version == 2 else (1, 1, 6, 3)).astype(np.float32)}
    matrix, crop, mapped = cm.run(inputs)
    want = _ref_matrix_v2(lm, V2_MATRIX) if version == 2 else _ref_matrix_v1(lm, V1_MATRIX)
    np.testing.assert_allclose(matrix, want, rtol=1e-4, atol=1e-4)
    ref_crop = _ref_warp(inputs["features"], matrix, 10, 12, version)
    assert 0 < np.count_nonzero(ref_crop.any(axis=3)) < 120          # part of the crop falls off the map
    np.testing.assert_allclose(crop, ref_crop, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mapped, _ref_landmarks(inputs["crop_landmarks"], matrix, 3, 0.5 if version == 1 else 1),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ShrinkcError, match="LiteRT cannot run the custom op 'Landmarks2TransformMatrix'") as err:
        cm.verify(inputs)
    assert "without --verify" in err.value.fix


def test_mediapipe_geometry_op_of_another_version_or_without_options_is_refused(tmp_path):
    b = TfliteBuilder(seed=4)
    lm = b.input([1, 8, 3], "landmarks")
    b.output(b.mediapipe_geometry("Landmarks2TransformMatrix", [lm], [1, 4, 4], 3, V2_MATRIX, "matrix"))
    expect_error(write(tmp_path, "v3.tflite", b.finish()), "Landmarks2TransformMatrix (output 'matrix') version 3")
    b = TfliteBuilder(seed=4)
    lm = b.input([1, 8, 3], "landmarks")
    b.output(b.mediapipe_geometry("Landmarks2TransformMatrix", [lm], [1, 4, 4], 2,
                                  {k: v for k, v in V2_MATRIX.items() if k != "scale_x"}, "matrix"))
    expect_error(write(tmp_path, "noscale.tflite", b.finish()), "lacks the option(s) scale_x")
    b = TfliteBuilder(seed=4)
    lm = b.input([1, 8, 3], "landmarks")
    b.output(b.mediapipe_geometry("Landmarks2TransformMatrix", [lm], [1, 4, 4], 2, {**V2_MATRIX, "subset_idxs": [0, 9]},
                                  "matrix"))
    expect_error(write(tmp_path, "far.tflite", b.finish()), "names landmarks [1, 4, 0, 9] of 8")
    b = TfliteBuilder(seed=4)
    lm = b.input([1, 8, 3], "landmarks")
    b.output(b.mediapipe_geometry("Landmarks2TransformMatrix", [lm], [1, 4, 4], 2, {**V2_MATRIX, "output_width": 0},
                                  "matrix"))
    expect_error(write(tmp_path, "zero.tflite", b.finish()), "version 2 has options", "'output_width': 0")


def _ref_resample(x: np.ndarray, warp: np.ndarray) -> np.ndarray:
    b, h, w, c = x.shape
    out = np.zeros(x.shape)
    for n in range(b):
        for yy in range(h):
            for xx in range(w):
                px, py = float(warp[n, yy, xx, 0]), float(warp[n, yy, xx, 1])
                if not (px > -1 and py > -1 and px < w and py < h):
                    continue
                fx, fy = int(np.floor(px)), int(np.floor(py))
                dx, dy = fx + 1 - px, fy + 1 - py

                def at(r, q):
                    return x[n, r, q] if 0 <= r < h and 0 <= q < w else np.zeros(c)
                out[n, yy, xx] = dx * dy * at(fy, fx) + (1 - dx) * (1 - dy) * at(fy + 1, fx + 1) \
                    + dx * (1 - dy) * at(fy + 1, fx) + (1 - dx) * dy * at(fy, fx + 1)
    return out


def test_mediapipe_resampler_matches_its_kernel(tmp_path):
    """MediaPipe's Resampler (TF Addons' resampler; refused before as a custom op) against numpy written from its CPU
    kernel: points inside, on the border strip (-1, 0) and past the map."""
    import compiler
    b = TfliteBuilder(seed=4)
    x, warp = b.input([2, 6, 7, 3], "image"), b.input([2, 6, 7, 2], "warp")
    b.output(b.mediapipe_geometry("Resampler", [x, warp], [2, 6, 7, 3], 1, {}, "resampled"))
    cm = compiler.compile_model(write(tmp_path, "resampler.tflite", b.finish()))
    rng = np.random.default_rng(3)
    inputs = {"image": rng.standard_normal((2, 6, 7, 3)).astype(np.float32),
              "warp": rng.uniform(-2, 8, (2, 6, 7, 2)).astype(np.float32)}
    (got,) = cm.run(inputs)
    want = _ref_resample(inputs["image"], inputs["warp"])
    assert 0 < np.count_nonzero(want.any(axis=3)) < 84
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version,shape,options", [(1, [1, 2, 3, 4], {"dimensions": 2, "scale": 2.0}),
                                                   (2, [1, 5, 2], {})])
def test_mediapipe_transform_landmarks_of_two_values_each(tmp_path, version, shape, options):
    """TransformLandmarks on (x, y) landmarks: version 1 with two landmarks per position and a scaled translation,
    version 2 with [1, N, 2]; the matrix a model input."""
    import compiler
    b = TfliteBuilder(seed=1)
    lm, m = b.input(shape, "lm"), b.input([1, 4, 4], "m")
    b.output(b.mediapipe_geometry("TransformLandmarks", [lm, m], shape, version, options, "mapped"))
    cm = compiler.compile_model(write(tmp_path, "landmarks2.tflite", b.finish()))
    rng = np.random.default_rng(0)
    x, matrix = rng.standard_normal(shape).astype(np.float32), rng.standard_normal((1, 4, 4)).astype(np.float32)
    (got,) = cm.run({"lm": x, "m": matrix})
    np.testing.assert_allclose(got, _ref_landmarks(x, matrix, 2, options.get("scale", 1.0)), rtol=1e-5, atol=1e-5)
