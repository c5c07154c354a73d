"""compiler/frontend/onnx_import.py: ops and attributes TVM's importer failed on or read differently (Upsample of
opsets 7 and 9, Resize-10, opset 18's Resize `axes`, Slice-1's attributes, ImageScaler, LpNormalization,
ConvTranspose's output_shape, MaxPool's SAME_LOWER), against ONNX Runtime. Models of the ONNX Model Zoo's era use the older forms."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from compiler.errors import ShrinkcError
from conftest import assert_matches_ort, onnx_model


def _model(op, opset, scales, mode="nearest", size=(12, 10), **attrs):
    """conv -> `op` (scales as an attribute for Upsample-7, else an initializer) -> conv."""
    rng = np.random.default_rng(opset)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.4).astype(np.float32), "w2")]
    if op == "Upsample" and opset < 9:
        resize = helper.make_node(op, ["a"], ["r"], mode=mode, scales=[float(s) for s in scales])
    else:
        inits.append(numpy_helper.from_array(np.array(scales, np.float32), "scales"))
        inputs = ["a", "roi", "scales"] if op == "Resize" and opset >= 11 else ["a", "scales"]
        if opset >= 11:
            inits.append(numpy_helper.from_array(np.zeros(0, np.float32), "roi"))
        resize = helper.make_node(op, inputs, ["r"], mode=mode, **attrs)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4), resize,
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1])]
    model = onnx_model(nodes, [1, 3, *size], inits, opset=opset)
    model.ir_version = 4 if opset < 11 else 8
    return model


@pytest.mark.parametrize("op,opset,scales,mode", [
    ("Upsample", 7, [1, 1, 2, 2], "nearest"), ("Upsample", 7, [1, 1, 3, 1.5], "nearest"),
    ("Upsample", 7, [1, 1, 2, 2], "linear"), ("Upsample", 9, [1, 1, 2.5, 2], "nearest"),
    ("Upsample", 9, [1, 1, 2, 3], "linear"), ("Resize", 10, [1, 1, 2, 3], "nearest"),
    ("Resize", 10, [1, 1, 0.5, 0.75], "nearest"), ("Resize", 10, [1, 1, 2, 0.75], "nearest"),
    ("Resize", 10, [1, 1, 1.5, 0.5], "linear"), ("Resize", 10, [1, 1, 1.5, 0.75], "linear")])
def test_legacy_resizes_match_onnxruntime(op, opset, scales, mode):
    """Enlarging (floor), shrinking (ceil) and both at once, by whole and fractional factors."""
    assert_matches_ort(_model(op, opset, scales, mode), tol=1e-5)


def test_resize_18_axes():
    """Opset 18's `axes`: sizes (or scales) of H and W only."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array([20, 17], np.int64), "sizes"),
             numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "scales")]
    for extra, attrs in ((["", "", "sizes"], {"axes": [2, 3]}), (["", "scales"], {"axes": [-1, -2]})):
        nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
                 helper.make_node("Resize", ["a", *extra], ["y"], mode="linear", **attrs)]
        assert_matches_ort(onnx_model(nodes, [1, 3, 12, 10], inits, opset=18), tol=1e-5)


def test_resize_antialias():
    """Opset 18's antialias filters only when an axis shrinks: enlarging it matches ONNX Runtime, shrinking is one
    clear error (TVM's resize ignored the attribute: silently other numbers)."""
    import compiler
    rng = np.random.default_rng(4)
    w1 = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w1")

    def model(scales):
        nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
                 helper.make_node("Resize", ["a", "", "scales"], ["y"], mode="linear", antialias=1)]
        return onnx_model(nodes, [1, 3, 12, 10], [w1, numpy_helper.from_array(np.array(scales, np.float32),
                                                                              "scales")], opset=18)
    assert_matches_ort(model([1, 1, 2, 1.5]), tol=1e-5)
    with pytest.raises(ShrinkcError, match="antialias=1 that shrinks"):
        compiler.compile_model(model([1, 1, 0.5, 1]))
    # sizes for axes given W first: W 10 -> 9 shrinks (read against the axes, not the input's last dimensions)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Resize", ["a", "", "", "sizes"], ["y"], mode="linear", antialias=1, axes=[3, 2])]
    sizes = numpy_helper.from_array(np.array([9, 20], np.int64), "sizes")
    with pytest.raises(ShrinkcError, match="antialias=1 that shrinks"):
        compiler.compile_model(onnx_model(nodes, [1, 3, 8, 10], [w1, sizes], opset=18))


def test_unsupported_upsample_is_one_clear_error():
    """Scaling the channel axis is refused naming the op and the scales."""
    import compiler
    with pytest.raises(ShrinkcError, match=r"Upsample with scales \[1.0, 2.0, 2.0, 2.0\]"):
        compiler.compile_model(_model("Upsample", 9, [1, 2, 2, 2]))


def _one_op_model(nodes, inits, opset, x_shape=(1, 3, 12, 10)):
    """conv (8 channels) -> `nodes` (reading "a", writing "y")."""
    rng = np.random.default_rng(opset)
    w = numpy_helper.from_array((rng.standard_normal((8, x_shape[1], 3, 3)) * 0.4).astype(np.float32), "w0")
    conv = helper.make_node("Conv", ["x", "w0"], ["a"], kernel_shape=[3, 3], pads=[1] * 4)
    model = onnx_model([conv, *nodes], list(x_shape), [w, *inits], opset=opset)
    model.ir_version = 4 if opset < 11 else 8
    return model


def test_slice_with_attributes():
    """Slice of opsets 1-9: starts / ends / axes are attributes (an end past the axis clamps)."""
    node = helper.make_node("Slice", ["a"], ["y"], starts=[1, 2], ends=[5, 100], axes=[1, 3])
    assert_matches_ort(_one_op_model([node], [], 9), tol=1e-6)


def test_image_scaler():
    """ImageScaler (opsets 1-9): x * scale + a bias per channel, on the model's input."""
    node = helper.make_node("ImageScaler", ["x"], ["s"], scale=0.5, bias=[0.1, -0.2, 0.3])
    conv = helper.make_node("Conv", ["s", "w0"], ["y"], kernel_shape=[3, 3])
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w0")
    model = onnx_model([node, conv], [1, 3, 8, 8], [w], opset=8)
    model.ir_version = 4
    assert_matches_ort(model, tol=1e-5)


@pytest.mark.parametrize("p,axis", [(2, 1), (1, -1)])
def test_lp_normalization(p, axis):
    node = helper.make_node("LpNormalization", ["a"], ["y"], p=p, axis=axis)
    assert_matches_ort(_one_op_model([node], [], 11), tol=1e-5)


@pytest.mark.parametrize("attrs", [{"output_shape": [24, 20]}, {"output_shape": [25, 21]},
                                   {"output_shape": [25, 23], "auto_pad": "SAME_UPPER"},
                                   {"output_shape": [25, 21], "auto_pad": "SAME_LOWER"},
                                   {"output_shape": [25, 21], "output_padding": [1, 1]},
                                   {"output_shape": [27, 22]}])
def test_conv_transpose_output_shape(attrs):
    """output_shape picks the pads (an odd one at the start, at the end for SAME_UPPER), or an output padding
    where it is larger than the natural 26 x 22."""
    wt = numpy_helper.from_array((np.random.default_rng(1).standard_normal((8, 4, 4, 4)) * 0.2).astype(np.float32),
                                 "wt")
    node = helper.make_node("ConvTranspose", ["a", "wt"], ["y"], kernel_shape=[4, 4], strides=[2, 2], **attrs)
    assert_matches_ort(_one_op_model([node], [wt], 11), tol=1e-5)


@pytest.mark.parametrize("kernel,stride", [(3, 2), (2, 2), (3, 3)])
def test_max_pool_same_lower(kernel, stride):
    """auto_pad SAME_LOWER on odd and even sizes (15 x 14): ceil(size / stride) outputs, the odd pad first."""
    node = helper.make_node("MaxPool", ["a"], ["y"], kernel_shape=[kernel] * 2, strides=[stride] * 2,
                            auto_pad="SAME_LOWER")
    assert_matches_ort(_one_op_model([node], [], 11, x_shape=(1, 3, 15, 14)), tol=1e-6)


def test_verify_names_a_shape_mismatch():
    """Outputs of different shapes: the verify line says so, instead of an error of inf at []."""
    from compiler import verify
    (res,) = verify.compare(["y"], [np.zeros((1, 4, 24, 24))], [np.zeros((1, 4, 26, 26))])
    assert not res.ok and res.line() == "y: shape [1, 4, 24, 24] vs reference [1, 4, 26, 26] -> MISMATCH"
