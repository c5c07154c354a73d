"""compiler/frontend/onnx_import.py: Upsample (opsets 7 and 9), Resize-10 and opset 18's Resize `axes`, against
ONNX Runtime (models of the ONNX Model Zoo's era use them; TVM's importer failed or rounded differently)."""
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


def test_unsupported_upsample_is_one_clear_error():
    """Scaling the channel axis is refused naming the op and the scales."""
    import compiler
    with pytest.raises(ShrinkcError, match=r"Upsample with scales \[1.0, 2.0, 2.0, 2.0\]"):
        compiler.compile_model(_model("Upsample", 9, [1, 2, 2, 2]))
