"""passes/compute_convs_by_winograd.py: which convs become Winograd kernels (structural), the same outputs as
ONNX Runtime within 1e-4 (numerical). The kernels themselves: tests/test_schedules.py."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import compile_with_kernel_defaults, onnx_model, single_conv_model


def _compile(model):
    """Compile for this machine with Winograd from 16 channels (x86 AVX-512's default; other hosts lack it)."""
    cm = compile_with_kernel_defaults(model, winograd_min_channels=16)
    assert all(r.ok for r in cm.verify(tolerance=1e-4)), [r.line() for r in cm.verify(tolerance=1e-4)]
    return cm, cm.report["passes"]["ComputeConvsByWinograd"]


def _two_convs(clipped_too: bool):
    """x -> Conv 5x5 (32 -> 32) -> Conv 1x1 -> y; with `clipped_too` the 5x5 conv's output is also read by a Relu
    whose result is added to y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32, 5, 5)).astype(np.float32) * 0.05, "w5"),
             numpy_helper.from_array(rng.standard_normal((32, 32, 1, 1)).astype(np.float32) * 0.2, "w1")]
    nodes = [helper.make_node("Conv", ["x", "w5"], ["a"], kernel_shape=[5, 5], pads=[2] * 4),
             helper.make_node("Conv", ["a", "w1"], ["b" if clipped_too else "y"], kernel_shape=[1, 1])]
    if clipped_too:
        nodes += [helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Add", ["b", "r"], ["y"])]
    return onnx_model(nodes, [1, 32, 12, 12], inits)


def test_5x5_read_by_a_conv_is_winograd():
    cm, log = _compile(_two_convs(clipped_too=False))
    assert log["counts"] == {"winograd4x4": 1}, log
    assert any(k.startswith("f32_conv5x5_winograd4x4_") for k in cm.report["kernels"]), cm.report["kernels"]


def test_5x5_also_read_by_an_activation_stays_direct():
    cm, log = _compile(_two_convs(clipped_too=True))
    assert log["counts"] == {} and "relax.nn.relu" in log["skipped"][0]["why"], log
    assert not any("winograd" in k for k in cm.report["kernels"]), cm.report["kernels"]


@pytest.mark.parametrize("act", ["relu6", "relu", "hswish"])
def test_5x5_not_where_clipped(act):
    """A 5x5 conv whose output an activation reads keeps the direct kernel, with the reason logged: with unit
    weights and 224 channels F(4x4, 5x5) left 2.4e-4 of the ReLU6's peak (the direct kernel 3.5e-5)."""
    cm, log = _compile(single_conv_model(224, 224, 14, k=5, act=act))
    assert not any("winograd" in k for k in cm.report["kernels"]), cm.report["kernels"]
    assert log["skipped"] and "F(4x4, 5x5) not used" in log["skipped"][0]["why"], log


def test_3x3_is_winograd_even_where_clipped():
    """F(2x2, 3x3) (additions of +-1 terms) keeps a direct conv's accuracy: used before a ReLU6 too."""
    cm, log = _compile(single_conv_model(64, 64, 14, k=3, act="relu6"))
    assert log["counts"] == {"winograd2x2": 1}, log
