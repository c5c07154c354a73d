"""The command line end to end, and every user error as one clear line with exit code 2."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import run_cli, save, single_conv_model


def test_compile_verify_run(small_mv2, tmp_path, capsys):
    out = tmp_path / "m.so"
    code, stdout, err = run_cli(["compile", small_mv2, "-o", out, "--verify", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert "verify" in stdout and "MISMATCH" not in stdout
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["inputs"] == [{"name": "input", "shape": [1, 3, 64, 64], "dtype": "float32"}]
    assert meta["outputs"][0]["shape"] == [1, 10]
    assert meta["target"]["name"] == "x86" and meta["shrinkc_version"]
    assert "ApplySchedules" in meta["passes"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"import", "cleanup", "lower", "build"} <= set(report["timings_s"])

    np.save(tmp_path / "x.npy", np.ones((1, 3, 64, 64), np.float32))
    code, stdout, err = run_cli(["run", out, "--input", f"input={tmp_path / 'x.npy'}", "--save", tmp_path / "o.npz",
                                 "--repeat", "3"], capsys)
    assert code == 0, err
    assert "classifier: shape [1, 10]" in stdout and "checksum" in stdout and "median" in stdout
    assert np.load(tmp_path / "o.npz")["classifier"].shape == (1, 10)


def test_targets_and_inspect(small_mv2, capsys):
    code, stdout, _ = run_cli(["targets"], capsys)
    assert code == 0
    for name in ("x86", "rpi4", "pixel", "cuda", "aarch64-linux-gnu-g++", "cortex-a72"):
        assert name in stdout
    code, stdout, _ = run_cli(["inspect", small_mv2], capsys)
    assert code == 0 and "input: 1x3x64x64" in stdout and "Conv" in stdout and "depthwise 3x3" in stdout


def _truncated(path, tmp_path):
    data = open(path, "rb").read()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    return bad


def _not_a_model(tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is not a model\n" * 20)
    return p


def _unsupported_op(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="ok"),
                           helper.make_node("Celu", ["y"], ["z"], name="celu_1")],
                          "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("z", 1, None)])
    return save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path, "unsupported.onnx")


def _external(tmp_path, keep_data: bool):
    """A model whose weights an exporter wrote to a separate file (ONNX external data), that file kept or not."""
    path = tmp_path / "external.onnx"
    onnx.save_model(single_conv_model(8, 16, 8), path, save_as_external_data=True, location="external.onnx.data",
                    size_threshold=0)
    if not keep_data:
        (tmp_path / "external.onnx.data").unlink()
    return path


def _dynamic(tmp_path, axis=2, name="height"):
    m = single_conv_model(8, 8, 8)
    m.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    return save(m, tmp_path, f"dynamic_{name}.onnx")


@pytest.mark.parametrize("case,extra,needle", [
    ("missing", [], "does not exist"),
    ("not_a_model", [], "not a readable ONNX model"),
    ("truncated", [], "not a readable ONNX model"),
    ("unsupported", [], "unsupported op 'Celu' (node 'celu_1')"),
    ("dynamic", [], "dynamic dimension 'height'"),
    ("missing_external", [], "keeps its weights (tensor 'w') in 'external.onnx.data', which is not in"),
    ("unknown_target", ["--target", "vax"], "unknown target 'vax'"),
    ("missing_cc", ["--target", "rpi4", "--cc", "no-such-aarch64-g++"], "cross compiler 'no-such-aarch64-g++'"),
    ("bad_pin", ["--input", "x=1x8x8x8"], "cannot read --input"),
    ("static_pin", ["--input", "input:1x3x96x96"], "sets axis 2 to 96, but the model fixes it at 64"),
])
def test_errors_are_one_line(case, extra, needle, small_mv2, tmp_path, capsys):
    model = {"missing": tmp_path / "nope.onnx", "not_a_model": _not_a_model(tmp_path),
             "truncated": _truncated(small_mv2, tmp_path), "unsupported": _unsupported_op(tmp_path),
             "dynamic": _dynamic(tmp_path), "missing_external": _external(tmp_path, False)}.get(case, small_mv2)
    out = tmp_path / "out.so"
    code, _, err = run_cli(["compile", model, "-o", out, *extra], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shrinkc: error: "), err
    assert needle in lines[0] and "fix:" in lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".so")]


def test_weights_in_an_external_data_file_compile_and_verify(tmp_path, capsys):
    code, out, err = run_cli(["compile", _external(tmp_path, True), "-o", tmp_path / "ext.so", "--verify"], capsys)
    assert code == 0 and "-> ok" in out, err


def test_dynamic_dimension_can_be_pinned(tmp_path, capsys):
    code, stdout, err = run_cli(["compile", _dynamic(tmp_path), "-o", tmp_path / "d.so", "--input", "x:1x8x8x8",
                                 "--verify"], capsys)
    assert code == 0, err
    assert "ok" in stdout


@pytest.mark.parametrize("pin", [[], ["--input", "x:2x8x8x8"]])
def test_a_dynamic_batch_alone_is_compiled_as_1_with_a_note(pin, tmp_path, capsys):
    code, stdout, err = run_cli(["compile", _dynamic(tmp_path, 0, "batch"), "-o", tmp_path / "b.so", "--verify",
                                 "--report", tmp_path / "b.json", *pin], capsys)
    assert code == 0, err
    assert "ok" in stdout
    notes = json.loads((tmp_path / "b.json").read_text())["model"]["notes"]
    if pin:                          # the user's size wins, nothing to say
        assert not notes and "dynamic batch" not in err
    else:
        assert notes == ["input 'x': its dynamic batch axis is compiled as 1 (another size: --input x:8x8x8x8)"]
        assert f"shrinkc: note: {notes[0]}" in err


def test_debug_shows_traceback(tmp_path, capsys):
    code, _, err = run_cli(["compile", tmp_path / "nope.onnx", "-o", tmp_path / "o.so", "--debug"], capsys)
    assert code == 2 and "Traceback" in err


def test_failed_link_leaves_previous_library(small_mv2, tmp_path, capsys):
    out = tmp_path / "keep.so"
    out.write_bytes(b"previous library")
    fake_cc = tmp_path / "broken-g++"
    fake_cc.write_text("#!/bin/sh\necho 'broken linker' >&2\nexit 1\n")
    fake_cc.chmod(0o755)
    code, _, err = run_cli(["compile", small_mv2, "-o", out, "--target", "rpi4", "--cc", fake_cc], capsys)
    assert code == 2 and "linking the library for 'rpi4' failed" in err
    assert out.read_bytes() == b"previous library"
    assert sorted(os.listdir(tmp_path)) == ["broken-g++", "keep.so"]


def test_run_errors(tmp_path, capsys):
    code, _, err = run_cli(["run", tmp_path / "none.so"], capsys)
    assert code == 2 and "does not exist" in err


def test_internal_error_names_the_pass_and_the_way_around_it(tmp_path, capsys, monkeypatch):
    # A TVM crash inside a pass used to print only TVM's message: the user could not tell which pass,
    # nor that --shrink off / --sparse off avoids it.
    from compiler import pipeline

    class Boom:
        def __call__(self, mod):
            raise ValueError("number of dimensions do not match")

    real = pipeline.phases
    monkeypatch.setattr(pipeline, "phases", lambda spec, opts: [
        (name, [Boom()] if name == "shrink" else passes) for name, passes in real(spec, opts)])
    model = save(single_conv_model(8, 8, 6), tmp_path, "conv.onnx")
    code, out, err = run_cli(["compile", model, "-o", tmp_path / "m.so"], capsys)
    assert code == 1 and not os.path.exists(tmp_path / "m.so")
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "in pass Boom (phase shrink)" in lines[0]
    assert "number of dimensions" in lines[0] and "--shrink off" in lines[0]


def _refused_while_converting(tmp_path, kind: str):
    """A model whose import fails halfway through conversion: a Landmarks2TransformMatrix of an unknown version
    (.tflite), a Reshape to a shape computed at run time (.onnx)."""
    if kind == "tflite":
        from zoo.tflite_writer import GEOMETRY_V2_MATRIX, TfliteBuilder
        b = TfliteBuilder(seed=4)
        b.output(b.mediapipe_geometry("Landmarks2TransformMatrix", [b.input([1, 8, 3], "landmarks")], [1, 4, 4], 3,
                                      GEOMETRY_V2_MATRIX, "matrix"))
        (tmp_path / "refused.tflite").write_bytes(b.finish())
        return tmp_path / "refused.tflite", "version 3 is not supported"
    x, k = (helper.make_tensor_value_info(n, t, s) for n, t, s in (("x", onnx.TensorProto.FLOAT, [1, 8]),
                                                                   ("k", onnx.TensorProto.INT64, [1])))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "k"], ["y"])],
                              "g", [x, k], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "refused.onnx")
    return tmp_path / "refused.onnx", "cannot import op 'Reshape'"


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_an_op_refused_while_converting_is_one_line_to_the_end(tmp_path, kind):
    """An op refused halfway through conversion left TVM's half-built BlockBuilder in the error's frames; its
    destruction at exit printed a native 'BlockBuilder destroyed with remaining blocks!' after the one-line error.
    A separate process, as a user runs it, so that the interpreter's exit is part of what is checked."""
    import subprocess
    import sys
    model, needle = _refused_while_converting(tmp_path, kind)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "compiler.cli", "compile", str(model), "-o", str(tmp_path / "r.so")],
                          cwd=root, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_debug_shows_the_converter_frames_an_import_error_dropped(tmp_path, capsys):
    """An import error drops its frames (native_log.released) to free TVM's BlockBuilder; --debug still shows the
    traceback down into the converter that refused, and without --debug nothing of it shows."""
    model, needle = _refused_while_converting(tmp_path, "tflite")
    code, _, err = run_cli(["compile", model, "-o", tmp_path / "r.so", "--debug"], capsys)
    assert code == 2 and "in convert_landmarks_to_matrix" in err and "in _geometry_options" in err
    assert err.strip().splitlines()[-1].startswith("shrinkc: error: ") and needle in err
    code, _, err = run_cli(["compile", model, "-o", tmp_path / "r.so"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
