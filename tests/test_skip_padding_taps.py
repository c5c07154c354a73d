"""passes/skip_padding_taps.py: convs split into output regions without the taps that read only padding."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from conftest import assert_matches_ort
from passes import skip_padding_taps
from passes.skip_padding_taps import axis_runs


def _conv_model(hw, cin, cout, k, dilation, pad, stride=1, groups=1, seed=0):
    """1x1 conv (so the dilated conv reads a blocked tensor, as in a network) -> the conv -> ReLU."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((cin, 3, 1, 1)) * 0.3).astype(np.float32)
    w = (rng.standard_normal((cout, cin // groups, k, k)) * 0.3).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], kernel_shape=[1, 1]),
             helper.make_node("Conv", ["a", "w", "b"], ["c"], kernel_shape=[k, k], pads=[pad] * 4,
                              dilations=[dilation] * 2, strides=[stride] * 2, group=groups),
             helper.make_node("Relu", ["c"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, hw, hw])],
                          [helper.make_tensor_value_info("y", 1, None)],
                          [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w, "w"),
                           numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def _splits(cm) -> list:
    return [c for c in cm.report["passes"].get("SkipPaddingTaps", {}).get("changes", []) if c["what"] == "split_conv"]


def test_axis_runs_of_an_aspp_conv():
    """3 taps 12 apart on 14 pixels (padding 12): two border outputs each side see two taps, the rest one."""
    assert axis_runs(14, 14, 3, 1, 12, 12) == [(0, 2, 1, 2), (2, 10, 1, 1), (12, 2, 0, 2)]
    assert axis_runs(14, 14, 3, 1, 36, 36) == [(0, 14, 1, 1)]            # only the centre tap, everywhere
    assert axis_runs(14, 14, 3, 1, 1, 1) == [(0, 1, 1, 2), (1, 12, 0, 3), (13, 1, 0, 2)]


def test_aspp_convs_drop_their_padding_taps(tmp_path):
    """DeepLabV3's ASPP on a 14x14 map: rate 36 becomes a 1x1 conv (one region), rate 12 nine regions (3 x 3)."""
    for rate, regions, kernel in ((36, [1, 1], "conv1x1"), (12, [3, 3], None)):   # kernel: all there is
        cm = assert_matches_ort(_conv_model(14, 128, 128, 3, rate, rate), tol=1e-5, dump_dir=str(tmp_path))
        assert [c["regions"] for c in _splits(cm)] == [regions]
        if kernel:
            assert not any("conv3x3" in k for k in cm.report["kernels"]), cm.report["kernels"]
        lowered = (tmp_path / "4_lower.py").read_text()
        # the slices and concats stay channel-blocked: only the model's input and output change layout
        assert sum("layout_transform" in c for c in re.findall(r"R\.call_tir\(cls\.(\w+)", lowered)) <= 2


def test_ordinary_padded_convs_are_left_whole():
    """A 3x3 conv with padding 1 reads padding on its border only: not split."""
    cm = assert_matches_ort(_conv_model(16, 16, 16, 3, 1, 1), tol=1e-5)
    assert _splits(cm) == []


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hw=st.integers(3, 16), k=st.sampled_from([3, 5]), dilation=st.integers(1, 12), stride=st.sampled_from([1, 2]),
       extra=st.integers(0, 6), depthwise=st.booleans(), seed=st.integers(0, 99))
def test_split_convs_match_onnxruntime(hw, k, dilation, stride, extra, depthwise, seed):
    """Random dilated convs (dense or depthwise, stride 1 / 2, padding up to the receptive field plus a bit):
    split or not, the same outputs as ONNX Runtime."""
    reach = (k - 1) * dilation
    pad = min(reach // 2 + extra, reach)
    if hw + 2 * pad < reach + 1:
        pad = (reach + 1 - hw + 1) // 2
    channels = 8
    saved, skip_padding_taps.MIN_SAVED = skip_padding_taps.MIN_SAVED, 0     # small convs split too, here
    try:
        assert_matches_ort(_conv_model(hw, channels, channels, k, dilation, pad, stride,
                                       groups=channels if depthwise else 1, seed=seed), tol=1e-5)
    finally:
        skip_padding_taps.MIN_SAVED = saved


def test_small_convs_are_left_whole():
    """A 3x3 conv on a 4x4 map skips a third of its taps, but too few multiply-adds to pay for nine kernels."""
    cm = assert_matches_ort(_conv_model(4, 16, 16, 3, 1, 1), tol=1e-5)
    assert _splits(cm) == []


@pytest.mark.parametrize("hw,k,dilation,stride,pad,depthwise", [(10, 3, 6, 1, 6, False), (9, 3, 4, 2, 4, False),
                                                               (12, 5, 12, 1, 24, False), (7, 3, 3, 1, 3, True),
                                                               (11, 3, 5, 1, 5, False)])
def test_split_cases_match_onnxruntime(hw, k, dilation, stride, pad, depthwise):
    """Cases that do split (stride 2, 5x5 taps down to the centre one, depthwise, a middle run of all three taps)."""
    saved, skip_padding_taps.MIN_SAVED = skip_padding_taps.MIN_SAVED, 0
    try:
        cm = assert_matches_ort(_conv_model(hw, 8, 8, k, dilation, pad, stride, groups=8 if depthwise else 1),
                                tol=1e-5)
    finally:
        skip_padding_taps.MIN_SAVED = saved
    assert len(_splits(cm)) == 1
