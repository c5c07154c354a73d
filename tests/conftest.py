"""Shared fixtures: small models built in code, and a way to run the CLI in-process."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

os.environ.setdefault("TVM_NUM_THREADS", "2")


def onnx_model(nodes, x_shape, inits, out="y", opset=13, name="g") -> onnx.ModelProto:
    """A one-input float model: `nodes` reading "x" of `x_shape`, returning `out`."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", 1, x_shape)],
                              [helper.make_tensor_value_info(out, 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def save(model: onnx.ModelProto, folder, name: str) -> str:
    path = os.path.join(str(folder), name)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def small_mv2(model_dir) -> str:
    from zoo.mobilenet_v2 import mobilenet_v2
    return save(mobilenet_v2(width=0.35, resolution=64, num_classes=10), model_dir, "mv2_small.onnx")


def single_conv_model(cin, cout, h, k=1, stride=1, groups=1, pad=None, residual=False, act="relu6",
                      w=None, seed=0, sparsity=0.0, post=None) -> onnx.ModelProto:
    """Conv (+bias) -> activation (-> + input (-> post: "relu" / "relu6" after the add)): the unit most kernels
    serve."""
    rng = np.random.default_rng(seed)
    w = w if w is not None else rng.standard_normal((cout, cin // groups, k, k)).astype(np.float32)
    if sparsity:
        w = w * (rng.random(w.shape) >= sparsity)
    b = rng.standard_normal(cout).astype(np.float32)
    p = k // 2 if pad is None else pad
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[k, k], strides=[stride, stride],
                              pads=[p] * 4, group=groups)]
    inits = [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b, "b")]
    out = "y"
    if act == "relu6":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"),
                  numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["y", "lo", "hi"], ["z"]))
        out = "z"
    elif act == "relu":
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
        out = "z"
    elif act == "hswish":           # the ONNX op (opset 14)
        nodes.append(helper.make_node("HardSwish", ["y"], ["z"]))
        out = "z"
    elif act == "hswish_hsigmoid":  # y * HardSigmoid(y): older torch exports (opset < 14)
        nodes += [helper.make_node("HardSigmoid", ["y"], ["g"], alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["y", "g"], ["z"])]
        out = "z"
    elif act in ("hswish_tflite", "hswish_sixth"):   # spelled out: (y * relu6(y + 3)) / 6, y * (relu6(y + 3) * 1/6)
        inits += [numpy_helper.from_array(np.array(v, np.float32), n)
                  for n, v in (("three", 3), ("lo", 0), ("hi", 6), ("six", 6), ("sixth", 1 / 6))]
        nodes += [helper.make_node("Add", ["y", "three"], ["y3"]), helper.make_node("Clip", ["y3", "lo", "hi"], ["c"])]
        if act == "hswish_tflite":
            nodes += [helper.make_node("Mul", ["y", "c"], ["yc"]), helper.make_node("Div", ["yc", "six"], ["z"])]
        else:
            nodes += [helper.make_node("Mul", ["c", "sixth"], ["g"]), helper.make_node("Mul", ["y", "g"], ["z"])]
        out = "z"
    elif act in ("silu", "silu_swapped"):         # y * Sigmoid(y) (torch.onnx, the TFLite converter), or swapped
        nodes += [helper.make_node("Sigmoid", ["y"], ["g"]),
                  helper.make_node("Mul", ["y", "g"] if act == "silu" else ["g", "y"], ["z"])]
        out = "z"
    if residual:
        nodes.append(helper.make_node("Add", [out, "x"], ["r"]))
        out = "r"
    if post == "relu":
        nodes.append(helper.make_node("Relu", [out], ["p"]))
        out = "p"
    elif post == "relu6":
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("plo", 0), ("phi", 6))]
        nodes.append(helper.make_node("Clip", [out, "plo", "phi"], ["p"]))
        out = "p"
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", 1, [1, cin, h, h])],
                              [helper.make_tensor_value_info(out, 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14 if act == "hswish" else 13)])
    model.ir_version = 8
    return model


def tflite_layers_model() -> bytes:
    """A small NHWC TFLite model of one of each layer: conv + ReLU, depthwise + ReLU6, residual add + ReLU6,
    hard swish, mean, fully connected, softmax (input "image" [1, 9, 9, 4], output "scores" [1, 5])."""
    from zoo.tflite_writer import TfliteBuilder
    rng = np.random.default_rng(3)
    b = TfliteBuilder()
    x = b.input([1, 9, 9, 4], name="image")
    y = b.conv2d(x, rng.standard_normal((6, 3, 3, 4)), rng.standard_normal(6), stride=2, padding="VALID", act="RELU")
    z = b.depthwise_conv2d(y, rng.standard_normal((1, 3, 3, 6)), rng.standard_normal(6), act="RELU6")
    y = b.hard_swish(b.add(y, z, act="RELU6"))
    y = b.reshape(b.mean_hw(y), [1, 6])
    b.output(b.softmax(b.fully_connected(y, rng.standard_normal((5, 6)), rng.standard_normal(5)), name="scores"))
    return b.finish()


def assert_matches_ort(model, target=None, tol=1e-4, **options):
    """Compile for this machine and compare with ONNX Runtime on a seeded random input."""
    import compiler
    cm = compiler.compile_model(model, target, **options)
    results = cm.verify(tolerance=tol)
    assert all(r.ok for r in results), [r.line() for r in results]
    return cm


def compile_with_kernel_defaults(model, **defaults):
    """Compile for this machine's target with `defaults` added to its kernel defaults (registered under a
    temporary name, removed after)."""
    import dataclasses

    import compiler
    import targets
    spec = targets.resolve(None)
    targets.NAMED["_test_defaults"] = lambda: dataclasses.replace(
        spec, kernel_defaults={**spec.kernel_defaults, **defaults})
    try:
        return compiler.compile_model(model, "_test_defaults")
    finally:
        del targets.NAMED["_test_defaults"]


def run_cli(argv, capsys):
    """Run `shrinkc ARGV` in-process; returns (exit code, stdout, stderr)."""
    from compiler.cli import main
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
