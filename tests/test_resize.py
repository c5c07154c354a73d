"""schedules/f32_resize2d_nchw.py: bilinear resize computed separably, against ONNX Runtime, and where it applies."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import assert_matches_ort

KERNEL = "f32_resize2d_linear_nchw"


def _model(in_hw, out_hw, mode="linear", ctm="half_pixel", channels=6, last=False):
    """conv -> Resize(sizes) -> conv, the resize between blocked-layout kernels as in a segmentation head; last:
    conv -> Resize, the resize the model's output (in NCHW) as a segmentation model's upsampled map is."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((5, channels, 1, 1)) * 0.3).astype(np.float32)
    sizes = np.array([1, channels, *out_hw], np.int64)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Resize", ["a", "", "", "sizes"], ["r"], mode=mode,
                              coordinate_transformation_mode=ctm),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, *in_hw])],
                          [helper.make_tensor_value_info("y", 1, None)],
                          [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                           numpy_helper.from_array(sizes, "sizes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    if last:
        m.graph.node.pop()
        m.graph.output[0].name = "r"
    return m


SIZES = [((14, 14), (28, 28)), ((7, 9), (56, 72)), ((12, 10), (31, 17)), ((20, 24), (9, 10))]


@pytest.mark.parametrize("ctm,in_hw,out_hw",
                         [(c, i, o) for c in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")
                          for i, o in SIZES] + [("half_pixel", (5, 6), (1, 1)), ("pytorch_half_pixel", (5, 6), (1, 1))])
@pytest.mark.parametrize("last", [False, True], ids=["blocked", "nchw"])
def test_bilinear_resize_matches_onnxruntime(ctm, in_hw, out_hw, last):
    """Up by 2 and 8 (NCHW rows of 28 and 72: vectors of 4 and 8 lanes), by odd factors, down, to one pixel;
    between convs (blocked) and as the output (NCHW)."""
    cm = assert_matches_ort(_model(in_hw, out_hw, ctm=ctm, last=last), tol=1e-5)
    kernel = KERNEL if last else KERNEL + "16c"
    assert any(k == kernel or k.startswith(kernel + "_") for k in cm.report["kernels"]), cm.report["kernels"]


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("in_hw,out_hw", [((5, 6), (1, 1)), ((5, 6), (1, 8)), ((5, 6), (8, 1)), ((1, 6), (1, 9))])
def test_align_corners_to_one_pixel(mode, in_hw, out_hw):
    """align_corners to one pixel along an axis (x * (in - 1) / (out - 1) has no value there) compiles and gives
    ONNX Runtime's outputs (the first pixel of that axis): passes/slice_one_pixel_resizes.py."""
    for last in (False, True):
        cm = assert_matches_ort(_model(in_hw, out_hw, mode=mode, ctm="align_corners", last=last), tol=1e-5)
        assert cm.report["passes"]["SliceOnePixelResizes"]["counts"] == {"resize": 1}


def test_other_resizes_keep_tvms_kernel():
    """Nearest and cubic are not this kernel's; they still compile and match."""
    for mode in ("nearest", "cubic"):
        cm = assert_matches_ort(_model((6, 6), (12, 12), mode=mode), tol=1e-4)
        assert not any(k.startswith(KERNEL) for k in cm.report["kernels"])


def test_tables_give_topis_coordinates():
    """Half-pixel up by 2: output column 0 reads input 0 only (-0.25 clamped), column 1 reads 0 and 1 at 1/4."""
    from schedules.f32_resize2d_nchw import axis_table
    lo, hi, f = axis_table(4, 8, "half_pixel")
    assert lo.tolist() == [0, 0, 0, 1, 1, 2, 2, 3] and hi.tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
    np.testing.assert_allclose(f, [0.75, 0.25, 0.75, 0.25, 0.75, 0.25, 0.75, 0.25])
    lo, hi, f = axis_table(4, 7, "align_corners")
    assert lo[-1] == 3 and f[0] == 0 and abs(float(f[1]) - 0.5) < 1e-7


def test_resize_between_convs_runs_blocked(tmp_path):
    """Between two convs the resize keeps their channel-blocked layout: the only layout transforms left are the
    model's input into blocks and its output out of them (two more around an NCHW resize)."""
    import re

    import compiler
    cm = compiler.compile_model(_model((14, 14), (28, 28)), dump_dir=str(tmp_path))
    assert any(k.startswith(KERNEL + "16c") for k in cm.report["kernels"]), cm.report["kernels"]
    lowered = (tmp_path / "4_lower.py").read_text()
    calls = re.findall(r"R\.call_tir\(cls\.(\w+)", lowered)
    assert sum("layout_transform" in c for c in calls) == 2, calls


def _tflite_resize(tmp_path, size, method, align_corners, half_pixel_centers):
    """conv -> RESIZE_BILINEAR / RESIZE_NEAREST_NEIGHBOR (NHWC) -> conv, as a .tflite file."""
    from zoo.tflite_writer import TfliteBuilder
    b = TfliteBuilder(seed=1)
    x = b.input([1, 12, 10, 3])
    x = b.conv2d(x, (b.rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32), np.zeros(16, np.float32))
    x = b.resize(x, size, method, align_corners, half_pixel_centers)
    b.output(b.conv2d(x, (b.rng.standard_normal((8, 3, 3, 16)) * 0.3).astype(np.float32), np.zeros(8, np.float32),
                      name="c2"))
    path = tmp_path / "resize.tflite"
    path.write_bytes(b.finish())
    return str(path)


@pytest.mark.parametrize("method", ["bilinear", "nearest"])
@pytest.mark.parametrize("align_corners,half_pixel_centers", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("size", [(17, 13), (6, 5)])
def test_tflite_resizes_match_litert(tmp_path, method, align_corners, half_pixel_centers, size):
    """TFLite's resizes with each coordinate option, enlarging and shrinking by fractional factors. Nearest with
    align_corners rounds x.5 up, as TFLite does (TVM rounded it to even: (6, 5) reads 4.5)."""
    assert_matches_ort(_tflite_resize(tmp_path, size, method, align_corners, half_pixel_centers), tol=1e-5)
