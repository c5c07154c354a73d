"""FoldGateIntoConvWeights: a squeeze-and-excitation gate scales the project conv's weights, not the map."""
import pytest

import compiler
from zoo.onnx_builder import OnnxBuilder

PASS = "FoldGateIntoConvWeights"


def se_block(c: int, cout: int, hw: int, efficientnet: bool, gated_is_output: bool = False):
    """pw conv -> squeeze-and-excite (x * gate) -> project conv; optionally the gated map is an output too."""
    b = OnnxBuilder("se")
    x = b.input("x", [1, c, hw, hw])
    gated = b.squeeze_excite(b.conv(x, c, c, 1, name="pw"), c, 8, efficientnet=efficientnet)
    y = b.conv(gated, c, cout, 1, name="proj")
    return b.finish([y, gated] if gated_is_output else [y])


def compiled(model):
    cm = compiler.compile_model(model, sparse="off")
    results = cm.verify(tolerance=1e-4)
    assert all(r.ok for r in results), [r.line() for r in results]
    return cm, cm.report["passes"].get(PASS, {})


@pytest.mark.parametrize("efficientnet", [True, False])
def test_gate_scales_the_weights_and_matches(efficientnet):
    """12x12 map, 32 -> 16: the weights (16 x 32) are far smaller than the map (32 x 144), so the gate goes into
    them; the map's multiply leaves the model and the weights are scaled by f32_scale_weights. Matches ONNX
    Runtime (sigmoid gate for EfficientNet, hard sigmoid for MobileNetV3)."""
    cm, entry = compiled(se_block(32, 16, 12, efficientnet))
    assert entry["counts"] == {"folded_gate": 1}
    assert entry["changes"][0]["layer"] == "conv1x1 32->16 @12x12"
    assert any(k.startswith("f32_scale_weights_ohwi16o") for k in cm.report["kernels"]), cm.report["kernels"]


def test_gate_stays_on_the_map_where_the_weights_are_larger():
    """3x3 map, 32 -> 64: scaling 64 x 32 weights costs more than the 32 x 9 map; not folded, and said why."""
    cm, entry = compiled(se_block(32, 64, 3, True))
    assert "counts" not in entry or not entry["counts"]
    assert "larger than" in entry["skipped"][0]["why"]
    assert not any(k.startswith("f32_scale_weights") for k in cm.report["kernels"])


def test_gate_stays_on_the_map_that_another_output_reads():
    """The gated map is a model output too: it must still be computed, so the conv reads it as it is."""
    cm, entry = compiled(se_block(32, 16, 12, True, gated_is_output=True))
    assert "counts" not in entry or not entry["counts"]
    assert entry["skipped"][0]["why"] == "the gated map has other readers"


@pytest.mark.parametrize("cob, cin, bo, bi", [(1, 16, 16, 16), (3, 24, 16, 8), (2, 12, 8, 4)])
def test_scale_weights_kernel_equals_numpy(cob, cin, bo, bi):
    """f32_scale_weights on its own: each input channel's weights times that channel's gate, for gate blocks
    narrower than the weights' output blocks too."""
    import numpy as np
    import tvm

    from schedules.f32_scale_weights import scale_weights
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cob, 1, 1, cin, bo)).astype(np.float32)
    g = rng.standard_normal((1, cin // bi, 1, 1, bi)).astype(np.float32)
    lib = tvm.compile(tvm.IRModule({"main": scale_weights(cob, cin, bo, bi).with_attr("global_symbol", "main")}),
                      target="llvm")
    out = tvm.runtime.tensor(np.zeros_like(w))
    lib["main"](tvm.runtime.tensor(w), tvm.runtime.tensor(g), out)
    np.testing.assert_allclose(out.numpy(), w * g.reshape(1, 1, 1, cin, 1), rtol=1e-6)
