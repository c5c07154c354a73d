"""passes/prelu_as_min_max.py: PReLU as max(x, 0) + slope * min(x, 0), channel-blocked with the convs around it."""
from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import assert_matches_ort, onnx_model


def _conv_prelu_model(slope_shape, seed=0):
    """conv -> PRelu (slope of `slope_shape`, as torch exports nn.PReLU(C): [C, 1, 1]; nn.PReLU(): [1]) -> conv."""
    rng = np.random.default_rng(seed)
    inits = {"w1": rng.standard_normal((24, 3, 3, 3)) * 0.5, "slope": rng.uniform(0.05, 0.4, slope_shape),
             "w2": rng.standard_normal((16, 24, 1, 1)) * 0.3}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("PRelu", ["a", "slope"], ["p"]), helper.make_node("Conv", ["p", "w2"], ["y"])]
    return onnx_model(nodes, [1, 3, 14, 14],
                      [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])


def _rewritten(cm) -> int:
    return cm.report["passes"].get("PReluAsMinMax", {}).get("counts", {}).get("prelu", 0)


@pytest.mark.parametrize("slope_shape", [(24, 1, 1), (1,)])
def test_conv_prelus_stay_blocked(slope_shape, tmp_path):
    """Per-channel and shared slopes: no prelu kernel, no layout transform around it (the input's and output's
    only), ONNX Runtime's outputs."""
    cm = assert_matches_ort(_conv_prelu_model(slope_shape), tol=1e-5, dump_dir=str(tmp_path))
    assert _rewritten(cm) == 1
    kernels = re.findall(r"R\.call_tir\(cls\.(\w+)", (tmp_path / "4_lower.py").read_text())
    assert not any("prelu" in k for k in kernels), kernels
    assert sum("layout_transform" in k for k in kernels) <= 2, kernels


def test_tflite_prelu_matches_litert(tmp_path):
    """TFLite's PRELU (Keras slope [1, 1, C], which TVM flattens): rewritten on the NHWC tensor, LiteRT's outputs."""
    from zoo.tflite_writer import TfliteBuilder
    b = TfliteBuilder(seed=1)
    x = b.input([1, 10, 10, 3])
    x = b.conv2d(x, (b.rng.standard_normal((16, 3, 3, 3)) * 0.4).astype(np.float32), np.zeros(16, np.float32))
    x = b.prelu(x, b.rng.uniform(0.05, 0.4, (1, 1, 16)))
    x = b.conv2d(x, (b.rng.standard_normal((8, 1, 1, 16)) * 0.3).astype(np.float32), np.zeros(8, np.float32),
                 name="c2")
    b.output(x)
    path = tmp_path / "prelu.tflite"
    path.write_bytes(b.finish())
    cm = assert_matches_ort(str(path), tol=1e-5, dump_dir=str(tmp_path))
    assert _rewritten(cm) == 1
    kernels = re.findall(r"R\.call_tir\(cls\.(\w+)", (tmp_path / "4_lower.py").read_text())
    assert not any("prelu" in k for k in kernels) and "R.nn.prelu" not in (tmp_path / "1_cleanup.py").read_text()
