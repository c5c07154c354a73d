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


def test_squeeze_excite_mean_to_n_c_reads_the_nchw_tensor(tmp_path, monkeypatch):
    """A Keras squeeze-and-excite as the TFLite converter writes it (MEAN over H, W without kept dims, RESHAPE
    to [1, 1, 1, C], two 1x1 convs, LOGISTIC, MUL) after a depthwise conv with SiLU (LOGISTIC, MUL): the mean
    reads the NCHW tensor (before, its transpose back to NHWC was a full copy of the depthwise output) and the
    model matches LiteRT."""
    from zoo.tflite_writer import TfliteBuilder
    monkeypatch.setenv("SHRINKC_COST", "off")
    rng = np.random.default_rng(5)
    b = TfliteBuilder()
    x = b.conv2d(b.input([1, 12, 12, 3], name="image"), rng.standard_normal((16, 3, 3, 3)), rng.standard_normal(16),
                 stride=2)
    d = b.depthwise_conv2d(x, rng.standard_normal((1, 3, 3, 16)), rng.standard_normal(16))
    d = b.mul(d, b.logistic(d))
    s = b.reshape(b.mean_hw(d, keep_dims=False), [1, 1, 1, 16])
    s = b.conv2d(s, rng.standard_normal((4, 1, 1, 16)), rng.standard_normal(4), act="RELU")
    g = b.logistic(b.conv2d(s, rng.standard_normal((16, 1, 1, 4)), rng.standard_normal(16)))
    b.output(b.conv2d(b.mul(d, g), rng.standard_normal((8, 1, 1, 16)), rng.standard_normal(8), name="out"))
    path = _write(tmp_path, "se.tflite", b.finish())
    before, after = _cleanup_script(path, without="CancelLayoutPermutes"), _cleanup_script(path)
    assert "axis=[1, 2], keepdims=False" in before
    assert "axis=[2, 3], keepdims=True" in after and "axis=[1, 2]" not in after
    assert after.count("R.permute_dims(") < before.count("R.permute_dims(")
    cm = driver.compile_model(path)
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
