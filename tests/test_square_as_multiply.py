"""passes/square_as_multiply.py: x ** 2 as x * x (structural), the same outputs (numerical)."""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from conftest import assert_matches_ort, onnx_model


def test_squares_become_multiplies_and_other_powers_stay():
    """Pow(x, 2) is rewritten, Pow(x, 3) and Pow(x, 0.5) are not; bit-identical outputs to ONNX Runtime's powf
    for the square (it is x * x correctly rounded)."""
    nodes = [helper.make_node("Pow", ["x", "two"], ["a"]), helper.make_node("Pow", ["x", "three"], ["b"]),
             helper.make_node("Abs", ["x"], ["ax"]), helper.make_node("Pow", ["ax", "half"], ["c"]),
             helper.make_node("Sum", ["a", "b", "c"], ["y"])]
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (("two", 2.0), ("three", 3.0),
                                                                             ("half", 0.5))]
    cm = assert_matches_ort(onnx_model(nodes, [1, 4, 6, 6], inits), tol=1e-6)
    assert cm.report["passes"]["SquareAsMultiply"]["counts"] == {"square": 1}
    square = onnx_model([helper.make_node("Pow", ["x", "two"], ["y"])], [1, 4, 6, 6], inits[:1])
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32) * 30
    import compiler
    (ours,) = compiler.compile_model(square).run({"x": x})
    np.testing.assert_array_equal(ours, np.power(x, np.float32(2)))
