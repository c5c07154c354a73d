"""CancelLayoutPermutes: a TFLite (NHWC) model's bias adds, activations, residual adds and means run in NCHW
between its convs, so no transpose is left between them; results match LiteRT."""
from __future__ import annotations

import numpy as np
import pytest

import targets
from compiler import driver, pipeline
from tests.conftest import tflite_layers_model
from zoo.tflite_writer import mobilenet_v2_tflite

SPEC = targets.x86_host()


def _write(tmp_path, name, buf):
    path = tmp_path / name
    path.write_bytes(buf)
    return str(path)


def _cleanup_script(path, without=None):
    mod, _ = driver.import_model(path, None)
    with SPEC.tvm_target():
        for p in dict(pipeline.phases(SPEC, pipeline.Options(sparse="off")))["cleanup"]:
            if without is None or type(p).__name__ != without:
                mod = p(mod)
    return mod["main"].script(show_meta=False)


def test_no_transpose_is_left_between_convs(tmp_path):
    """Without the pass every conv sits between two transposes; with it only the input's and the one before
    the final reshape (of a [1, C, 1, 1] mean) are left."""
    path = _write(tmp_path, "mv2.tflite", mobilenet_v2_tflite(num_blocks=4, resolution=32, num_classes=16))
    before = _cleanup_script(path, without="CancelLayoutPermutes").count("R.permute_dims(")
    after = _cleanup_script(path)
    assert before > 10
    assert after.count("R.permute_dims(") == 2
    assert "R.mean(" in after and "axis=[2, 3]" in after


@pytest.mark.parametrize("model", ["layers", "sparse_mobilenet_v2"])
def test_tflite_models_match_litert(tmp_path, monkeypatch, model):
    """Numerically the same as LiteRT; a sparse model's 1x1 convs then get their bias and ReLU6 fused and its
    depthwise convs go CHW (before, each stayed apart behind transposes)."""
    monkeypatch.setenv("SHRINKC_COST", "off")
    buf = tflite_layers_model() if model == "layers" else mobilenet_v2_tflite(num_blocks=6, resolution=32, num_classes=16,
                                                                        sparsity=0.8)
    cm = driver.compile_model(_write(tmp_path, f"{model}.tflite", buf))
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
    assert cm.report["passes"]["CancelLayoutPermutes"]["counts"]["nchw"] >= 6
    if model != "layers":
        assert cm.report["passes"]["FormCHWRegions"]["counts"].get("fused", 0) > 0
