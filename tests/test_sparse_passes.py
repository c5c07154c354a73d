"""SparsifyConv1x1 and FormCHWRegions: structure (kernels in, dense weights out) and numerics vs ONNX Runtime."""
from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

import targets
from compiler import driver, pipeline
from passes import changelog
from passes.form_chw_regions import FormCHWRegions
from passes.sparsify_conv1x1 import SparsifyConv1x1
from tests.conftest import assert_matches_ort, single_conv_model
from zoo.mobilenet_v2 import mobilenet_v2

SPEC = targets.x86_host()


class _FixedCost:
    """A stand-in for compiler.cost.Cost: dense layers take `dense` s, sparse ones `sparse` s."""

    enabled = True

    def __init__(self, dense, sparse):
        self.dense, self.sparse = dense, sparse

    def latency(self, mod, key=None):
        calls = mod.script(show_meta=False)
        return self.sparse if "f32_spmm_chw" in calls else self.dense


def _to_blocked():
    """The pipeline's ConvertToBlockedLayout (phase 4), as the compile runs it."""
    return next(p for p in dict(pipeline.phases(SPEC, pipeline.Options()))["lower"]
                if type(p).__name__ == "ConvertToBlockedLayout")


def _cleaned(model):
    mod, _ = driver.import_model(model, None)
    with SPEC.tvm_target():
        for p in dict(pipeline.phases(SPEC, pipeline.Options(sparse="off")))["cleanup"]:
            mod = p(mod)
    return mod


def _sparsify(mod, cost=None, sparse_min=2 / 3):
    with changelog.collecting() as book, SPEC.tvm_target():
        mod = SparsifyConv1x1(SPEC, cost, sparse_min)(mod)
        mod = FormCHWRegions(SPEC)(mod)
    return mod, book.summary()


def _conv_weight_sizes(mod):
    return [c.value.numpy().size for c in _constants(mod) if hasattr(c.value, "numpy") and c.value.numpy().ndim == 4]


def _constants(mod):
    out = []
    tvm.relax.analysis.post_order_visit(mod["main"], lambda e: out.append(e) if isinstance(e, tvm.ir.Constant) else None)
    return out


def test_sparse_conv_becomes_spmm_and_dense_weights_leave():
    mod, book = _sparsify(_cleaned(single_conv_model(64, 48, 6, residual=False, sparsity=0.85)))
    text = mod.script(show_meta=False)
    assert "f32_spmm_chw" in text and "R.nn.conv2d" not in text and "R.clip" not in text   # epilogue fused
    assert _conv_weight_sizes(mod) == []            # the [48, 64, 1, 1] weights are gone
    change = book["SparsifyConv1x1"]["changes"][0]
    assert 0.8 < change["zeros"] < 0.9 and change["block"] == 1 and change["speedup"] is None


def test_block_shape_follows_block_fill():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16, 1, 1)).astype(np.float32)
    w *= np.repeat(rng.random((8, 16)) >= 0.8, 4, axis=0)[:, :, None, None]   # 4x1 blocks, full
    _, book = _sparsify(_cleaned(single_conv_model(16, 32, 5, w=w)))
    assert book["SparsifyConv1x1"]["changes"][0]["block"] == 8 or book["SparsifyConv1x1"]["changes"][0]["block"] == 4


@pytest.mark.parametrize("sparsity,cost", [(0.5, None), (0.85, _FixedCost(dense=1e-6, sparse=2e-6))])
def test_not_fired_when_too_dense_or_slower(sparsity, cost):
    mod, book = _sparsify(_cleaned(single_conv_model(32, 32, 6, sparsity=sparsity)), cost)
    assert "f32_spmm_chw" not in mod.script(show_meta=False)
    why = book["SparsifyConv1x1"]["skipped"][0]["why"]
    assert ("< 67%" in why) if sparsity == 0.5 else ("dense" in why)


def test_a_batched_model_stays_dense_and_says_why(tmp_path, capsys):
    """The sparse CHW kernels serve batch 1: a mostly-zero 1x1 conv of a batch-2 input stays dense, with a skip
    line naming the batch and what to export instead; `shrinkc compile` says so once, `shrinkc analyze` lists the
    conv as dense with that reason (it used to leave the batched convs out of its table)."""
    import onnx

    from compiler.analyze import analyze
    from passes.sparsify_conv1x1 import BATCH_ONE
    from tests.conftest import run_cli
    model = single_conv_model(32, 32, 6, sparsity=0.85)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    mod, book = _sparsify(_cleaned(model))
    assert "f32_spmm_chw" not in mod.script(show_meta=False)
    why = book["SparsifyConv1x1"]["skipped"][0]["why"]
    assert "batch 2" in why and "export the model with batch 1" in why
    path = tmp_path / "batch2.onnx"
    onnx.save(model, path)
    code, out, err = run_cli(["compile", path, "-o", tmp_path / "batch2.so"], capsys)
    assert code == 0 and f"1 mostly-zero 1x1 convs run dense: 85% zeros but batch 2; {BATCH_ONE}" in out, err
    convs = next(s for s in analyze(str(path), cost=_FixedCost(3e-4, 1e-4))["sections"]
                 if s["title"].startswith("sparse 1x1"))
    (row,) = [dict(zip(convs["columns"], r)) for r in convs["rows"]]
    assert row["zeros"] == "85%" and row["decision"] == "dense" and "batch 2" in row["why"]


def test_measured_choice_records_speedup():
    _, book = _sparsify(_cleaned(single_conv_model(32, 32, 6, sparsity=0.9)), _FixedCost(dense=3e-6, sparse=1e-6))
    assert book["SparsifyConv1x1"]["changes"][0]["speedup"] == 3.0


def test_dense_layers_of_one_shape_share_one_measurement():
    """Dense 1x1 speed does not depend on the weights: its cost key names the shape, so models that differ only
    in weights (a sparsity sweep) measure each dense shape once; a sparse kernel's key stays its structure."""
    class _Keys(_FixedCost):
        keys: list = []

        def latency(self, mod, key=None):
            self.keys.append((key, "f32_spmm_chw" in mod.script(show_meta=False)))
            return super().latency(mod, key)

    for seed, h in ((0, 6), (1, 6), (2, 7)):
        _sparsify(_cleaned(single_conv_model(32, 32, h, seed=seed, sparsity=0.9)), _Keys(3e-6, 1e-6))
    dense = [k for k, sparse in _Keys.keys if not sparse]
    assert len(dense) == 3 and dense[0] == dense[1] != dense[2] and "32x32@6x6" in dense[0]
    assert all(k is None for k, sparse in _Keys.keys if sparse)


@pytest.mark.parametrize("residual,act", [(True, "relu6"), (False, "relu"), (False, "none")])
def test_sparse_conv_matches_onnxruntime(monkeypatch, residual, act):
    monkeypatch.setenv("SHRINKC_COST", "off")
    cm = driver.compile_model(single_conv_model(40, 40, 7, residual=residual, act=act, sparsity=0.8))
    assert any(k.startswith("f32_spmm_chw") for k in cm.report["kernels"])
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]


@pytest.mark.parametrize("act,post", [("none", "relu"), ("relu6", "relu6"), ("relu", "relu")])
def test_activation_after_the_residual_add_is_the_spmm_epilogue(monkeypatch, act, post):
    """conv -> (act) -> + input -> ReLU / ReLU6 (BlazeFace's blocks end so): one spmm kernel applies the clip
    after its residual add (`clip2` in its recipe), no activation op is left in the graph, and the result
    matches ONNX Runtime (the input is signed, so the clip after the add changes it)."""
    import json

    from schedules.rule import BUILDER_ATTR
    monkeypatch.setenv("SHRINKC_COST", "off")
    model = single_conv_model(32, 32, 6, act=act, residual=True, post=post, sparsity=0.8)
    mod, _ = _sparsify(_cleaned(model))
    spmm = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("f32_spmm_chw")]
    assert len(spmm) == 1
    args = json.loads(str(spmm[0].attrs[BUILDER_ATTR]))["args"]
    assert args["residual"] and args["clip2"] == [0.0, 6.0 if post == "relu6" else float(np.finfo(np.float32).max)]
    main = mod["main"].script(show_meta=False)
    assert "R.clip" not in main and "R.nn.relu" not in main
    assert_matches_ort(model)


@pytest.mark.parametrize("extra", [8, 5])
def test_a_shortcut_that_appends_zero_channels_is_read_unpadded(monkeypatch, extra):
    """relu(conv1x1(x) + pad(x, zero channels appended)) (BlazeFace's wider blocks): the spmm reads x itself as
    its residual (`res_channels` in its recipe: the output channels past it get no residual), the Pad leaves
    the graph, and the result matches ONNX Runtime; with 8 and with 5 appended channels (the residual's last
    rows inside and across a kernel block)."""
    import json

    from onnx import helper, numpy_helper

    from schedules.rule import BUILDER_ATTR
    from tests.conftest import onnx_model
    monkeypatch.setenv("SHRINKC_COST", "off")
    rng = np.random.default_rng(extra)
    cin, cout = 24, 24 + extra
    w = (rng.standard_normal((cout, cin, 1, 1)) * (rng.random((cout, cin, 1, 1)) > 0.8)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), "pads")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"]), helper.make_node("Pad", ["x", "pads"], ["xp"]),
             helper.make_node("Add", ["y", "xp"], ["s"]), helper.make_node("Relu", ["s"], ["z"])]
    model = onnx_model(nodes, [1, cin, 12, 12], inits, out="z")
    mod, _ = _sparsify(_cleaned(model))
    spmm = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("f32_spmm_chw")]
    assert len(spmm) == 1
    args = json.loads(str(spmm[0].attrs[BUILDER_ATTR]))["args"]
    assert args["residual"] and args["res_channels"] == cin and args["clip2"][0] == 0.0
    main = mod["main"].script(show_meta=False)
    assert "R.nn.pad" not in main and "R.nn.relu" not in main
    assert_matches_ort(model)


@pytest.mark.parametrize("act", ["hswish", "hswish_tflite", "hswish_sixth", "hswish_hsigmoid"])
def test_hard_swish_after_a_sparse_conv_is_its_epilogue(monkeypatch, act):
    """Hard swish as importers spell it (the ONNX op; TFLite's (x * relu6(x + 3)) / 6; a product with 1/6;
    x * HardSigmoid(x)) is fused into the spmm kernel as HSWISH, no clip is left in the graph, and the result
    matches ONNX Runtime."""
    from schedules.chw_rows import HSWISH
    from schedules.f32_spmm_chw import kernel_clip
    monkeypatch.setenv("SHRINKC_COST", "off")
    model = single_conv_model(24, 32, 6, act=act, sparsity=0.8)
    mod, _ = _sparsify(_cleaned(model))
    spmm = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("f32_spmm_chw")]
    assert len(spmm) == 1 and kernel_clip(spmm[0]) == HSWISH
    assert "R.clip" not in mod["main"].script(show_meta=False)
    assert_matches_ort(model)


@pytest.mark.parametrize("act", ["silu", "silu_swapped"])
def test_silu_after_a_sparse_conv_is_its_epilogue(monkeypatch, act):
    """SiLU as exporters write it (x * Sigmoid(x), either order) is fused into the spmm kernel as SILU, no
    sigmoid or product is left in the graph, and the result matches ONNX Runtime (with a residual add after)."""
    from schedules.chw_rows import SILU
    from schedules.f32_spmm_chw import kernel_clip
    monkeypatch.setenv("SHRINKC_COST", "off")
    model = single_conv_model(32, 32, 6, act=act, sparsity=0.8, residual=True)
    mod, _ = _sparsify(_cleaned(model))
    spmm = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("f32_spmm_chw")]
    assert len(spmm) == 1 and kernel_clip(spmm[0]) == SILU
    main = mod["main"].script(show_meta=False)
    assert "R.sigmoid" not in main and "R.multiply" not in main
    assert_matches_ort(model)


def test_sparse_mobilenet_v2_region_matches_onnxruntime(monkeypatch):
    """Sparse MobileNetV2-style network: depthwise convs between sparse 1x1s stay CHW, no transforms inside."""
    from zoo.mobilenet_v2 import mobilenet_v2
    monkeypatch.setenv("SHRINKC_COST", "off")
    model = mobilenet_v2(width=0.35, resolution=64, num_classes=10, sparsity=0.85, sparse_from=3)
    cm = driver.compile_model(model)
    kernels = cm.report["kernels"]
    assert any(k.startswith("f32_spmm_chw") for k in kernels) and any("_chw_" in k and "dwconv" in k for k in kernels)
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
    mod, _ = _sparsify(_cleaned(model))
    lowered = mod
    with SPEC.tvm_target():
        lowered = _to_blocked()(lowered)
    text = lowered.script(show_meta=False)
    # inside the sparse part (blocks 3..) no layout_transform sits between two CHW kernels
    lines = [ln for ln in text.splitlines() if "R.call_tir(cls.f32_" in ln or "layout_transform" in ln]
    first_sparse = next(i for i, ln in enumerate(lines) if "f32_spmm_chw" in ln)
    last_sparse = max(i for i, ln in enumerate(lines) if "f32_spmm_chw" in ln)
    assert not any("layout_transform" in ln for ln in lines[first_sparse:last_sparse])


def test_sparse_mobilenet_v1_is_one_chw_region_that_matches_onnxruntime(monkeypatch):
    """MobileNetV1 (no residuals, a depthwise conv before every pointwise one), 85% zeros in the 1x1s: the first
    conv is fused with the first depthwise conv, every depthwise conv with the sparse 1x1 before it, so the
    whole network from the input to the pool is one CHW region without a layout transform; it matches ONNX
    Runtime."""
    from zoo.mobilenet_v1 import mobilenet_v1
    monkeypatch.setenv("SHRINKC_COST", "off")
    model = mobilenet_v1(width=0.25, resolution=64, num_classes=10, sparsity=0.85)
    cm = driver.compile_model(model)
    kernels = cm.report["kernels"]
    assert any(k.startswith("f32_conv3x3s2_dwconv3x3s1_chw") for k in kernels), kernels
    assert sum(k.startswith("f32_spmm1x1_dwconv3x3") for k in kernels) == 12, kernels
    counts = cm.report["passes"]["FormCHWRegions"]["counts"]
    assert counts["fused_first_conv"] == 1 and counts["fused"] == 12, counts
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
    mod, _ = _sparsify(_cleaned(model))
    with SPEC.tvm_target():
        lowered = _to_blocked()(mod)
    text = lowered.script(show_meta=False)
    assert "layout_transform" not in text and text.count("R.call_tir(cls.f32_spmm") == 13


def test_depthwise_outputs_read_by_a_sparse_1x1_are_padded_to_whole_vectors(monkeypatch):
    """At 56x56 input the depthwise outputs of blocks 1-2 (14x14), 3-5 (7x7) and 13-16 (2x2) are 196, 49 and 4
    floats per plane, not whole vectors: those kernels write them padded to 208, 64 and 16 and the sparse 1x1
    after each reads them so; block 0's (28x28: 784) and blocks 6-12's (4x4: 16) stay as they are.
    Equal to ONNX Runtime."""
    from zoo.mobilenet_v2 import mobilenet_v2
    monkeypatch.setenv("SHRINKC_COST", "off")
    cm = driver.compile_model(mobilenet_v2(width=0.35, resolution=56, num_classes=10, sparsity=0.85, sparse_from=0))
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
    padded = [c for c in cm.report["passes"]["FormCHWRegions"]["changes"] if c["what"] == "padded_planes"]
    assert all(c["kernel"].startswith("f32_spmm_chw") for c in padded)
    planes = {int(re.match(r"block(\d+)_", c["layer"]).group(1)): c["plane"] for c in padded}
    assert planes == {1: 208, 2: 208, 3: 64, 4: 64, 5: 64, 13: 16, 14: 16, 15: 16, 16: 16}


def test_block_outputs_between_sparse_kernels_are_padded_to_whole_vectors(monkeypatch):
    """PadChannelPlanes at 56x56 input: the outputs of blocks 1-2 (14x14), 3-5 (7x7) and 13-16 (2x2), read only by
    the next block's fused expand + depthwise kernel (in_plane), its project as the residual (res_plane) and the
    head 1x1 (in_plane), are written padded to 208, 64 and 16; the head's output, read by the pooling, and the
    28x28 / 4x4 outputs stay as they are. Equal to ONNX Runtime."""
    from zoo.mobilenet_v2 import mobilenet_v2
    monkeypatch.setenv("SHRINKC_COST", "off")
    cm = driver.compile_model(mobilenet_v2(width=0.35, resolution=56, num_classes=10, sparsity=0.85, sparse_from=0))
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
    changes = cm.report["passes"]["PadChannelPlanes"]["changes"]
    by = {key: {c["layer"]: c[key] for c in changes if key in c} for key in ("out_plane", "in_plane", "res_plane")}
    assert by["out_plane"] == {"block1_project": 208, "block2_add": 208, "block3_project": 64, "block4_add": 64,
                               "block5_add": 64, "block13_project": 16, "block14_add": 16, "block15_add": 16,
                               "block16_project": 16}
    assert by["res_plane"] == {"block2_add": 208, "block4_add": 64, "block5_add": 64, "block14_add": 16,
                               "block15_add": 16}
    assert by["in_plane"] == {"block2_dw_relu6": 208, "block3_dw_relu6": 208, "block4_dw_relu6": 64,
                              "block5_dw_relu6": 64, "block6_dw_relu6": 64, "block14_dw_relu6": 16,
                              "block15_dw_relu6": 16, "block16_dw_relu6": 16, "head_relu6": 16}
    assert all(c["kernel"] in cm.report["kernels"] for c in changes)


def test_a_sparse_output_the_model_returns_keeps_its_shape(monkeypatch):
    """A 7x7 sparse 1x1 whose output is the model's: not padded (its reader is not a kernel)."""
    monkeypatch.setenv("SHRINKC_COST", "off")
    cm = driver.compile_model(single_conv_model(48, 48, 7, residual=True, act="relu6", sparsity=0.85))
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
    assert any(k.startswith("f32_spmm_chw") for k in cm.report["kernels"])
    assert not cm.report["passes"].get("PadChannelPlanes", {}).get("changes")


def _mobilenet_v1_like(resolution: int = 28):
    """conv -> (depthwise 3x3 -> sparse pointwise 1x1 + ReLU6) x 3, the middle one stride 2: each pointwise
    reads a depthwise output and feeds the next depthwise conv (MobileNetV1's pattern)."""
    from zoo.onnx_builder import OnnxBuilder
    b = OnnxBuilder("mv1_like", seed=3)
    x = b.relu6(b.conv(b.input("input", [1, 3, resolution, resolution]), 3, 16, 3, 2, name="stem"))
    c = 16
    for i, (cout, stride) in enumerate([(32, 1), (48, 2), (64, 1)]):
        x = b.relu6(b.conv(x, c, c, 3, stride, groups=c, name=f"dw{i}"))
        x = b.relu6(b.conv(x, c, cout, 1, name=f"pw{i}", sparsity=0.85))
        c = cout
    return b.finish([b.linear(b.flatten_via_shape(b.global_pool(x)), c, 10)])


def test_depthwise_pointwise_chains_read_padded_planes_in_fused_kernels(monkeypatch):
    """MobileNetV1's pattern at 14x14 / 7x7 planes: each depthwise output (padded to 208 / 64) is read by a
    sparse pointwise conv that is itself fused into the next depthwise kernel, which reads the padded
    planes; equal to ONNX Runtime."""
    monkeypatch.setenv("SHRINKC_COST", "off")
    cm = driver.compile_model(_mobilenet_v1_like())
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
    changes = cm.report["passes"]["FormCHWRegions"]["changes"]
    fused = [c for c in changes if c["what"] == "fused"]
    assert [c["layer"] for c in fused] == ["dw1", "dw2"]
    assert {c["plane"] for c in changes if c["what"] == "padded_planes"} == {208, 64}
    kernels = {r["layer"]: r["kernel"] for r in cm.metadata()["sparse_layers"]}
    assert kernels["pw0"] == fused[0]["kernel"] and kernels["pw1"] == fused[1]["kernel"]   # what runs
    assert kernels["pw2"].startswith("f32_spmm_chw_") and kernels["pw2"] in cm.report["kernels"]


def test_chunked_sparse_convs_match_onnxruntime(monkeypatch):
    """On a target that names an L1 share for sparse tiles (Zen 5 does), 7x7 sparse 1x1 convs with many input
    channels walk them in chunks (f32_spmm_chw_..._k<chunk>, weights encoded by chunk); one that feeds a depthwise
    conv is fused with it after all, its weights encoded again by output block. Equal to ONNX Runtime."""
    import dataclasses
    from zoo.onnx_builder import OnnxBuilder
    host = targets.x86_host()
    chunked = dataclasses.replace(host, kernel_defaults={**host.kernel_defaults, "spmm_chunk_bytes": 32768})
    monkeypatch.setattr(targets, "x86_host", lambda: chunked)
    monkeypatch.setenv("SHRINKC_COST", "off")
    b = OnnxBuilder("chunked", seed=5)
    x = b.input("input", [1, 320, 7, 7])
    x = b.relu6(b.conv(x, 320, 64, 1, name="pw0", sparsity=0.85))           # chunked, then fused with dw
    x = b.relu6(b.conv(x, 64, 64, 3, 1, groups=64, name="dw"))
    x = b.relu6(b.conv(x, 64, 320, 1, name="pw1", sparsity=0.85))
    x = b.conv(x, 320, 48, 1, name="pw2", sparsity=0.85)                     # chunked
    cm = driver.compile_model(b.finish([b.linear(b.flatten_via_shape(b.global_pool(x)), 48, 10)]))
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
    kernels = {r["layer"]: r["kernel"] for r in cm.metadata()["sparse_layers"]}
    assert re.fullmatch(r"f32_spmm_chw_\d+x\d_k\d+(_\d+)?", kernels["pw2"])
    assert "_k" not in kernels["pw1"] and kernels["pw0"].startswith("f32_spmm1x1_dwconv3x3s1_chw")


def test_first_conv_goes_chw_when_the_region_starts_at_the_input(monkeypatch):
    """All 1x1s sparse (from block 0): the first conv, fused with block 0's depthwise conv, reads the NCHW
    input and writes CHW (f32_conv3x3s2_dwconv3x3s1_chw_...), no layout transform before the first sparse
    kernel; equal to ONNX Runtime. With the region starting at block 3 the first conv stays blocked."""
    from zoo.mobilenet_v2 import mobilenet_v2
    monkeypatch.setenv("SHRINKC_COST", "off")
    model = mobilenet_v2(width=0.35, resolution=64, num_classes=10, sparsity=0.85, sparse_from=0)
    cm = driver.compile_model(model)
    assert any(k.startswith("f32_conv3x3s2_dwconv3x3s1_chw_") for k in cm.report["kernels"])
    (fused,) = [c for c in cm.report["passes"]["FormCHWRegions"]["changes"] if c["what"] == "fused_first_conv"]
    assert fused["layer"] == "block0_dw" and fused["first_conv"] == "stem"
    assert "block0_dw" not in {c["layer"] for c in cm.report["passes"]["FormCHWRegions"]["changes"]
                               if c["what"] == "chw"}
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
    mod, _ = _sparsify(_cleaned(model))
    with SPEC.tvm_target():
        lowered = _to_blocked()(mod)
    lines = [ln for ln in lowered.script(show_meta=False).splitlines()
             if "R.call_tir(cls.f32_" in ln or "layout_transform" in ln]
    first_sparse = next(i for i, ln in enumerate(lines) if "f32_spmm" in ln)
    assert "f32_conv3x3s2_dwconv3x3s1_chw_" in lines[0] \
        and not any("layout_transform" in ln for ln in lines[:first_sparse])
    late, _ = _sparsify(_cleaned(mobilenet_v2(width=0.35, resolution=64, num_classes=10, sparsity=0.85,
                                              sparse_from=3)))
    assert "f32_conv3x3s2_" not in late.script(show_meta=False)


@pytest.mark.parametrize("k,stride,pads", [(5, 2, [1, 1, 2, 2]), (3, 1, [1, 1, 1, 1])])
def test_first_conv_read_by_a_depthwise_and_a_shortcut_goes_chw_alone(monkeypatch, k, stride, pads):
    """A first conv whose output a CHW depthwise conv and a sparse 1x1's residual both read (BlazeFace's stem):
    computed alone in CHW (f32_conv{k}x{k}s{s}_chw_...), its ReLU fused, no layout transform before the first
    sparse kernel, equal to ONNX Runtime; where a dense conv also reads it, it stays blocked."""
    from onnx import helper, numpy_helper

    from tests.conftest import onnx_model
    monkeypatch.setenv("SHRINKC_COST", "off")
    rng = np.random.default_rng(k)
    c = 16

    def model(dense_reader: bool):
        w1 = rng.standard_normal((c, 3, k, k)).astype(np.float32)
        wdw = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
        wpw = (rng.standard_normal((c, c, 1, 1)) * (rng.random((c, c, 1, 1)) > 0.85)).astype(np.float32)
        inits = [numpy_helper.from_array(v, n) for n, v in (("w1", w1), ("wdw", wdw), ("wpw", wpw),
                                                              ("wd", rng.standard_normal((4, c, 1, 1)).astype(np.float32)))]
        nodes = [helper.make_node("Conv", ["x", "w1"], ["s"], kernel_shape=[k, k], strides=[stride] * 2,
                                  pads=[pads[0], pads[1], pads[2], pads[3]]),
                 helper.make_node("Relu", ["s"], ["sr"]),
                 helper.make_node("Conv", ["sr", "wdw"], ["d"], kernel_shape=[3, 3], pads=[1] * 4, group=c),
                 helper.make_node("Conv", ["d", "wpw"], ["p"]), helper.make_node("Add", ["p", "sr"], ["y"])]
        if dense_reader:
            nodes += [helper.make_node("Conv", ["sr", "wd"], ["e"]), helper.make_node("Concat", ["y", "e"], ["z"],
                                                                                      axis=1)]
        return onnx_model(nodes, [1, 3, 32, 32], inits, out="z" if dense_reader else "y")

    alone = model(False)
    mod, _ = _sparsify(_cleaned(alone))
    with SPEC.tvm_target():
        lowered = _to_blocked()(mod)
    lines = [ln for ln in lowered.script(show_meta=False).splitlines()
             if "R.call_tir(cls." in ln or "layout_transform" in ln]
    assert f"f32_conv{k}x{k}s{stride}_chw_" in lines[0], lines
    assert not any("layout_transform" in ln or "relu" in ln for ln in lines), lines
    assert_matches_ort(alone)
    mixed, _ = _sparsify(_cleaned(model(True)))
    assert f"f32_conv{k}x{k}s{stride}_chw_" not in mixed.script(show_meta=False)


def test_sparse_off_leaves_convs_dense(monkeypatch):
    monkeypatch.setenv("SHRINKC_COST", "off")
    cm = driver.compile_model(single_conv_model(32, 32, 6, sparsity=0.9), sparse="off")
    assert not any(k.startswith("f32_spmm_chw") for k in cm.report["kernels"])


def test_group_dropped_when_whole_model_is_not_faster():
    """KeepIfFaster: a sparse rewrite the whole model does not gain from is undone, and the report says so."""
    from passes.keep_if_faster import KeepIfFaster

    class _WholeModelCost:
        enabled = True

        def latency(self, mod, key=None):
            return 2.0 if "f32_spmm_chw" in mod.script(show_meta=False) else 1.0

    before = _cleaned(single_conv_model(32, 32, 6, sparsity=0.9))
    with changelog.collecting() as book, SPEC.tvm_target():
        after = KeepIfFaster([SparsifyConv1x1(SPEC, None), FormCHWRegions(SPEC)], _WholeModelCost(), "SparseRegions")(before)
    assert "f32_spmm_chw" not in after.script(show_meta=False)
    summary = book.summary()
    assert summary["SparsifyConv1x1"]["counts"] == {} and "dropped" in summary["SparsifyConv1x1"]["skipped"][0]["why"]
    assert "dropped" in summary["SparseRegions"]["skipped"][0]["why"]


class _LatePartsCost:
    """Stand-in cost: a sparse layer beats its dense one; a whole model runs in 1 (dense), `big` with a sparse 1x1
    on its largest (16x16) plane, less 0.01 per sparse 1x1 (the more the faster)."""
    enabled = True

    def __init__(self, big: float):
        self.big = big

    def latency(self, mod, key=None):
        text = mod.script(show_meta=False)
        if text.count("R.nn.conv2d") + text.count("R.call_tir") <= 3:       # one layer's module
            return 0.5 if "f32_sp" in text else 1.0
        spmm = [ln for ln in text.splitlines() if "R.call_tir(cls.f32_spmm" in ln]
        return (self.big if any(", 16, 16)" in ln for ln in spmm) else 1.0) - 0.01 * len(spmm)


def _sparse_phase(cost, sparse_fc=False):
    """MobileNetV2-0.35 at 32x32 (1x1 convs on 16x16 .. 1x1 planes), 85% zeros, through the pipeline's sparse phase."""
    mod = _cleaned(mobilenet_v2(width=0.35, resolution=32, num_classes=10, sparsity=0.85, sparse_fc=sparse_fc))
    with changelog.collecting() as book, SPEC.tvm_target():
        for p in dict(pipeline.phases(SPEC, pipeline.Options(cost=cost)))["sparse"]:
            mod = p(mod)
    text = mod.script(show_meta=False)
    return text, [ln for ln in text.splitlines() if "R.call_tir(cls.f32_spmm" in ln], book.summary()


@pytest.mark.parametrize("big", [2.0, 1.15])
def test_sparse_phase_keeps_the_late_part_of_a_region_that_is_slower_or_little_faster_whole(big):
    """Where the whole CHW region measures slower (big 2.0) or gains less than FALLBACK_BELOW (1.15: 1.18x), its late
    part alone (1x1 convs on planes up to 1/16 of the largest, faster here than the whole and than 1/64's part) is
    kept; the report says so and why the larger planes stayed dense; the sparse classifier stays sparse either way
    (its own measurement decides)."""
    text, spmm, summary = _sparse_phase(_LatePartsCost(big), sparse_fc=True)
    assert spmm and not any(", 16, 16)" in ln or ", 8, 8)" in ln for ln in spmm)
    assert any(", 4, 4)" in ln for ln in spmm)                    # 1/16 of 16x16, not only 1/64's 2x2 and below
    # the classifier and the 8 1x1 convs on the 1x1 plane (project of block 14, blocks 15-17, the last conv) run spmv
    assert "R.matmul" not in text and summary["SparsifyDense"]["counts"] == {"sparse": 9}
    (kept,) = summary["SparseRegions"]["changes"]
    assert kept["part"] == "the part on planes up to 1/16 of the largest" and kept["after_ms"] < kept["before_ms"]
    assert kept["after_ms"] < kept["whole_ms"]
    (why,) = [s["why"] for s in summary["SparseRegions"]["skipped"]]
    assert why.startswith("whole model") and why.endswith("the part on planes up to 1/16 of the largest kept")
    skips = [s["why"] for s in summary["SparsifyConv1x1"]["skipped"]]
    assert any("16x16 plane, above the 16 pixels" in w for w in skips)
    assert not any("undone" in s for s in summary["SparsifyConv1x1"]["skipped"])   # the whole region's run: left out
    assert len(summary["SparsifyConv1x1"]["changes"]) == len(spmm)          # the kept part's, once each


def test_a_region_that_gains_enough_whole_is_kept_whole_without_trying_parts():
    text, spmm, summary = _sparse_phase(_LatePartsCost(0.9))
    assert any(", 16, 16)" in ln for ln in spmm)
    (kept,) = summary["SparseRegions"]["changes"]
    assert "part" not in kept and "skipped" not in summary["SparseRegions"]
    assert not any("plane, above" in s["why"] for s in summary["SparsifyConv1x1"].get("skipped", []))


def test_region_dropped_when_no_late_part_is_faster_either():
    """Every fallback slower too: nothing sparse in the convs, the report gives each part's time."""
    class _Slower(_LatePartsCost):
        def latency(self, mod, key=None):
            t = super().latency(mod, key)
            return t if t <= 0.5 or t >= 1.0 else 1.5       # a whole model with sparse convs: always slower

    text, spmm, summary = _sparse_phase(_Slower(2.0))
    assert not spmm
    why = summary["SparseRegions"]["skipped"][0]["why"]
    assert why.endswith(": dropped") and "1/16 of the largest alone 1500.00 ms" in why \
        and "1/64 of the largest alone" in why
    assert summary["SparsifyConv1x1"]["counts"] == {}
    undone = [s for s in summary["SparsifyConv1x1"]["skipped"] if "undone" in s]      # the whole region's layers
    assert undone and all("dropped" in s["why"] for s in undone)


def _small_sparse_mv2():
    from zoo.mobilenet_v2 import mobilenet_v2
    return mobilenet_v2(width=0.35, resolution=64, num_classes=10, sparsity=0.85, sparse_from=3, sparse_block=4)


def test_report_lists_every_sparse_layer(tmp_path):
    """OUT.json's sparse_layers: one row per sparse 1x1 (blocks 3-16 expand + project, and the head) with its
    model name, zeros, block shape, kernel and measured speed-up."""
    import json
    cm = driver.compile_model(_small_sparse_mv2(), shrink="off", cost=_FixedCost(3e-4, 1e-4))
    rows = cm.metadata()["sparse_layers"]
    expected = {f"block{i}_{k}" for i in range(3, 17) for k in ("expand", "project")} | {"head"}
    assert {r["layer"] for r in rows} == expected
    for r in rows:
        assert r["sparsity"] == pytest.approx(0.85, abs=0.01) and r["speedup_vs_dense"] == 3.0
        assert r["block"] in ("4x1", "8x1")
        if r["layer"].endswith("expand"):      # fused with the depthwise conv it feeds
            assert r["kernel"].startswith(f"f32_spmm{r['block']}_dwconv3x3s"), r
        else:
            assert r["kernel"].startswith("f32_spmm_chw_") and r["kernel"].split("_")[3].endswith("x" + r["block"][0])
        assert r["kernel"] in cm.report["kernels"] or r["kernel"].rsplit("_", 1)[0] in cm.report["kernels"]
    _, meta = cm.export(str(tmp_path / "m.so"))
    assert json.load(open(meta))["sparse_layers"] == rows


def test_report_lists_no_sparse_layer_when_the_rewrite_is_undone():
    """Every layer measures faster sparse, the whole model does not: the layers run dense and are not listed."""
    class _SlowWhole(_FixedCost):
        def latency(self, mod, key=None):
            return 1.0 if mod.script(show_meta=False).count("R.call_tir(cls.f32_spmm_chw") > 1 else \
                super().latency(mod, key)

    mod = _cleaned(_small_sparse_mv2())
    opts = pipeline.Options(shrink="off", cost=_SlowWhole(3e-4, 1e-4))
    with changelog.collecting() as book, SPEC.tvm_target():
        for p in dict(pipeline.phases(SPEC, opts))["sparse"]:
            mod = p(mod)
    assert "f32_spmm_chw" not in mod.script(show_meta=False)
    assert book.summary()["SparsifyConv1x1"]["skipped"] and driver.sparse_layers(book.summary()) == []


def test_analyze_shows_every_1x1_conv_its_decision_and_the_chw_region(tmp_path):
    """shrinkc analyze's sparse sections: blocks 0-2 dense (no zeros, and why), blocks 3-16 and the head sparse
    with block fill and kernel, and one CHW region from block3's expand to the head."""
    import onnx

    from compiler.analyze import analyze, render
    from zoo.mobilenet_v2 import mobilenet_v2
    path = str(tmp_path / "m.onnx")
    onnx.save(mobilenet_v2(width=0.35, resolution=64, num_classes=10, sparsity=0.85, sparse_from=3), path)
    report = analyze(path, cost=_FixedCost(3e-4, 1e-4))
    convs, regions = (s for s in report["sections"] if s["title"].startswith(("sparse 1x1", "CHW regions")))
    rows = {r[0]: dict(zip(convs["columns"], r)) for r in convs["rows"]}
    assert len(rows) == 34   # 16 expand + 17 project + head
    for name, r in rows.items():
        early = name.split("_")[0] in ("block0", "block1", "block2")
        assert r["zeros"] == ("0%" if early else "85%") and r["block fill"].startswith("1x1:")
        assert r["decision"] == ("dense" if early else "sparse"), name
        assert ("0% zeros < 67%" in r["why"]) if early else ("f32_spmm_chw_" in r["why"] and "3.0x faster" in r["why"])
    (region, whole) = regions["rows"]
    assert region[1].startswith("block3_") and region[2:6] == ["29", "14", "1", "1"] and "kept" in whole[-1]
    # each expand that feeds a depthwise conv is fused with it (f32_spmm<b>x1_dwconv...)
    assert "spmm_chw x" in region[-1] and re.search(r"spmm\dx1_dwconv3x3s2 x", region[-1])
    text = render(report)
    assert "## sparse 1x1 convs" in text and "## CHW regions" in text and "block16_project" in text


def test_kernels_fused_away_leave_the_module(monkeypatch):
    """An expand 1x1's own sparse kernel, replaced by the fused expand + depthwise kernel, is not left in
    the module (it would be compiled into the library for nothing): every scheduled kernel is called."""
    from tvm import relax

    from schedules.rule import SCHEDULED_ATTR
    from zoo.mobilenet_v2 import mobilenet_v2
    mod, book = _sparsify(_cleaned(mobilenet_v2(width=0.35, resolution=64, num_classes=10, sparsity=0.85,
                                                sparse_from=3)))
    assert any(c["what"] == "fused" for c in book["FormCHWRegions"]["changes"])
    called = {g.name_hint for g in relax.analysis.all_global_vars(mod["main"])}
    kernels = {g.name_hint for g, f in mod.functions.items() if SCHEDULED_ATTR in (f.attrs or {})}
    fused_away = {c["expand"] for c in book["FormCHWRegions"]["changes"] if c["what"] == "fused"}
    assert kernels and kernels <= called and not fused_away & kernels


def test_sparse_efficientnet_b0_keeps_silu_and_squeeze_excite_in_chw(monkeypatch):
    """Sparse EfficientNet-B0: SiLU fuses into the CHW kernels (first conv, expand + depthwise, depthwise)
    as their epilogue, so every depthwise conv goes CHW, every SE product is folded into the sparse project
    conv that reads it, every 1x1 outside the SEs is sparse, and the compiled model matches ONNX Runtime."""
    import zoo
    monkeypatch.setenv("SHRINKC_COST", "off")
    model = zoo.build("efficientnet_b0", resolution=64, num_classes=10, sparsity=0.85)
    mod, book = _sparsify(_cleaned(model))
    counts = book["FormCHWRegions"]["counts"]
    assert counts.get("fused_first_conv") == 1 and counts.get("fused") == 15 and counts.get("se_gate") == 16
    assert book["SparsifyConv1x1"]["counts"]["sparse"] == 15 + 16 + 1          # expand, project, head
    assert not any("not next to a sparse" in s["why"] for s in book["FormCHWRegions"].get("skipped", []))
    cm = driver.compile_model(model)
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]


def test_sparse_mobilenet_v3_region_keeps_hard_swish_and_squeeze_excite_in_chw(monkeypatch):
    """Sparse MobileNetV3-Large: hard swish fuses into the CHW kernels as their epilogue, a depthwise conv
    followed by squeeze-and-excitation still goes CHW (the SE product stays NCHW), so every depthwise conv
    is a CHW kernel, each SE product is folded into the sparse 1x1 that reads it (the gate scales the weights),
    and only the SE gates' [1, C, 1, 1] vectors change layout between sparse kernels; the compiled model
    matches ONNX Runtime."""
    from zoo.mobilenet_v3 import mobilenet_v3
    monkeypatch.setenv("SHRINKC_COST", "off")
    model = mobilenet_v3("large", width=0.5, resolution=64, num_classes=10, sparsity=0.85)
    cleaned = _cleaned(model)
    n_depthwise = cleaned.script(show_meta=False).count("groups=") - cleaned.script(show_meta=False).count("groups=1,")
    mod, book = _sparsify(cleaned)
    counts = book["FormCHWRegions"]["counts"]
    assert counts.get("chw", 0) + counts.get("fused", 0) + counts.get("fused_first_conv", 0) == n_depthwise > 0
    # every SE product feeding a sparse 1x1 is folded into it: the gate scales its weights, x * gate is not stored
    n_se = sum(1 for n in model.graph.node if n.name.endswith("se.mul"))
    assert counts.get("se_gate") == n_se > 0
    assert not [ln for ln in mod.script(show_meta=False).splitlines() if "R.multiply(" in ln and "se_mul" in ln]
    assert not any("not next to a sparse" in s["why"] for s in book["FormCHWRegions"].get("skipped", []))
    with SPEC.tvm_target():
        lowered = _to_blocked()(mod)
    lines = [ln for ln in lowered.script(show_meta=False).splitlines()
             if "R.call_tir(cls.f32_" in ln or "layout_transform" in ln]
    first = next(i for i, ln in enumerate(lines) if "f32_spmm" in ln)
    last = max(i for i, ln in enumerate(lines) if "f32_spmm" in ln)
    moved = [re.search(r"R\.Tensor\(\(([^)]*)\)", ln).group(1) for ln in lines[first:last] if "layout_transform" in ln]
    assert moved and all(s.replace(" ", "").split(",")[2:4] == ["1", "1"] for s in moved), moved
    cm = driver.compile_model(model)
    assert all(r.ok for r in cm.verify()), [r.line() for r in cm.verify()]
