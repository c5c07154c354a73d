"""MergeLinearChains: linear conv chains become one conv (structural), with the same outputs (numerical)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tvm import relax

import targets
import zoo
from compiler import artifact, pipeline, verify
from compiler.frontend.onnx_import import import_onnx
from passes import changelog
from passes.conv_algebra import ConvStep, NotExact, conv_np, merge
from passes.merge_linear_chains import MergeLinearChains
from zoo.onnx_builder import OnnxBuilder


def ops(mod) -> list[str]:
    names = []
    relax.analysis.post_order_visit(mod["main"], lambda e: names.append(str(e.op.name)) if isinstance(
        e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    return names


def phase(mod, name, opts=None):
    spec = targets.resolve(None, None)
    with spec.tvm_target():
        for p in dict(pipeline.phases(spec, opts or pipeline.Options(shrink="off")))[name]:
            mod = p(mod)
    return mod


def run_relax(mod, x: np.ndarray) -> np.ndarray:
    """Lower with shrinkc's phase 4, build for this machine and run on x."""
    spec = targets.resolve(None, None)
    ex = artifact.build(phase(mod, "lower"), spec)
    vm = relax.VirtualMachine(ex, tvm.cpu(0))
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def merged(model, cost=None, select=False):
    mod = phase(import_onnx(model)[0], "cleanup")
    with changelog.collecting() as book:
        out = MergeLinearChains(cost, select=select)(mod)
    return mod, out, book.summary().get("MergeLinearChains", {})


def block_model(cin, hidden, cout, k, stride, pad_mode, expand=True, project=True, bias=True, bn=False,
                residual=False, act_inside=False, hw=8, dense_middle=False, seed=0):
    """1x1 expand -> kxk depthwise (or dense) -> 1x1 project [+ input]; padding same/valid/explicit Pad."""
    b = OnnxBuilder("chain", seed, explicit_pad=pad_mode == "explicit")
    x = y = b.input("input", [1, cin, hw, hw])
    c = cin
    if expand:
        y = b.conv(y, c, hidden, 1, name="expand", bias=bias, bn=bn)
        c = hidden
        if act_inside:
            y = b.relu6(y, name="expand.relu6")
    mid_out = c if not dense_middle else hidden
    y = b.conv(y, c, mid_out, k, stride, groups=1 if dense_middle else c, name="dw", bias=bias, bn=bn,
               pad=0 if pad_mode == "valid" else k // 2)
    c = mid_out
    if project:
        y = b.conv(y, c, cout, 1, name="project", bias=bias, bn=bn)
    if residual:
        y = b.add(y, x, name="add")
    return b.finish([y])


def _check_block(rng_seed, **kw):
    model = block_model(**kw)
    before, after, log = merged(model)
    assert ops(after).count("relax.nn.conv2d") == 1, log
    x = np.random.default_rng(rng_seed).uniform(-1, 1, [1, kw["cin"], kw["hw"], kw["hw"]]).astype(np.float32)
    ref = ort_run(model, x)
    ours = run_relax(after, x)
    (res,) = verify.compare(["out"], [ours], [ref], tolerance=1e-4)
    assert res.ok, res.line()
    return log


@st.composite
def blocks(draw):
    cin = draw(st.integers(1, 64))
    stride = draw(st.sampled_from([1, 2]))
    pad_mode = draw(st.sampled_from(["same", "valid", "explicit"]))
    k = draw(st.sampled_from([1, 3, 5]))
    same_size = stride == 1 and (pad_mode != "valid" or k == 1)
    residual = same_size and draw(st.booleans())
    project = residual or draw(st.booleans())
    expand = draw(st.booleans()) or not project
    return dict(cin=cin, hidden=draw(st.integers(1, 64)), cout=cin if residual else draw(st.integers(1, 64)),
                k=k, stride=stride, pad_mode=pad_mode, expand=expand, project=project, bias=draw(st.booleans()),
                bn=draw(st.booleans()), residual=residual, hw=draw(st.integers(5, 9)),
                dense_middle=draw(st.integers(0, 4)) == 0, seed=draw(st.integers(0, 1000)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks())
def test_random_blocks_merge_exactly_vs_onnxruntime(kw):
    _check_block(1, **kw)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_kernel_composition_matches_numpy_chain(data):
    """conv_algebra alone, float64: the merged conv plus chain(0) equals running the chain."""
    rng = np.random.default_rng(data.draw(st.integers(0, 10**6)))
    hw = (data.draw(st.integers(4, 11)), data.draw(st.integers(4, 11)))
    c = cin = data.draw(st.integers(1, 6))
    steps = []
    for i in range(data.draw(st.integers(2, 3))):
        k, s = data.draw(st.sampled_from([1, 3, 5])), data.draw(st.sampled_from([1, 2]))
        dw = i > 0 and data.draw(st.booleans())
        pad = tuple(data.draw(st.integers(0, k // 2)) for _ in range(4))
        cout = c if dw else data.draw(st.integers(1, 6))
        oh, ow = (hw[0] + pad[0] + pad[2] - k) // s + 1, (hw[1] + pad[1] + pad[3] - k) // s + 1
        if oh < 1 or ow < 1:
            break
        w = rng.standard_normal((cout, 1 if dw else c, k, k))
        steps.append(ConvStep(w, (s, s), pad, dw, hw, (oh, ow), rng.standard_normal(cout), f"c{i}"))
        hw, c = (oh, ow), cout
    if len(steps) < 2:
        return
    residual = steps[-1].out_channels == cin and steps[-1].out_hw == steps[0].in_hw and data.draw(st.booleans())
    x = rng.standard_normal((cin, *steps[0].in_hw))
    ref = x
    for s in steps:
        ref = conv_np(ref, s)
    ref = ref + x if residual else ref
    try:
        m, c0, folded = merge(steps, residual)
    except NotExact:
        return
    out = conv_np(x, m) + c0 + (x if residual and not folded else 0)
    assert np.max(np.abs(out - ref)) <= 1e-9 * max(1.0, np.max(np.abs(ref)))


def test_inverted_residual_block_becomes_one_conv_with_residual_folded():
    log = _check_block(2, cin=8, hidden=48, cout=8, k=3, stride=1, pad_mode="same", bn=True, residual=True, hw=7)
    (change,) = log["changes"]
    assert change["layers"] == ["expand", "dw", "project"]
    assert change["shape"] == [8, 8, 3, 3] and change["residual_folded"]
    # the expand bias seen through zero padding differs at the borders: a per-pixel constant
    assert change["bias"] == "per-pixel"


def test_op_count_drops_and_residual_add_is_gone():
    model = block_model(8, 32, 8, 3, 1, "same", residual=True)
    before, after, _ = merged(model)
    assert ops(before).count("relax.nn.conv2d") == 3 and ops(before).count("relax.add") == 4
    assert ops(after).count("relax.nn.conv2d") == 1 and ops(after).count("relax.add") == 1


def test_stride2_5x5_block_with_explicit_pad():
    log = _check_block(3, cin=6, hidden=24, cout=10, k=5, stride=2, pad_mode="explicit", hw=9)
    assert log["changes"][0]["stride"] == [2, 2] and log["changes"][0]["shape"] == [10, 6, 5, 5]


def test_activation_inside_chain_is_not_merged():
    model = block_model(8, 32, 8, 3, 1, "same", act_inside=True)
    before, after, log = merged(model)
    # expand -> relu6 -> dw -> project: only dw+project is linear (and merges when asked to)
    assert ops(after).count("relax.clip") == 1
    assert ops(after).count("relax.nn.conv2d") == 2
    assert log["changes"][0]["layers"][0] == "dw" and len(log["changes"][0]["layers"]) == 2


def test_two_padded_kxk_convs_are_declined_with_a_reason():
    # 3x3 dense (pad 1) -> 3x3 depthwise (pad 1): the first conv sees real input under the second's pad
    b = OnnxBuilder("kk", 0)
    x = b.input("input", [1, 4, 8, 8])
    y = b.conv(b.conv(x, 4, 4, 3, name="a"), 4, 4, 3, groups=4, name="b")
    before, after, log = merged(b.finish([y]))
    assert ops(after).count("relax.nn.conv2d") == 2
    assert "real input at the border" in log["skipped"][0]["why"]


def test_grouped_and_dilated_convs_are_skipped():
    b = OnnxBuilder("g", 0)
    x = b.input("input", [1, 8, 8, 8])
    y = b.conv(x, 8, 8, 1, name="expand")
    y = b.conv(y, 8, 8, 3, groups=2, name="grouped")
    y = b.node("Conv", [y, b.const("w", np.ones((8, 8, 3, 3), np.float32))], name="dilated", kernel_shape=[3, 3],
               pads=[2, 2, 2, 2], dilations=[2, 2])
    before, after, log = merged(b.finish([y]))
    whys = {s["layer"]: s["why"] for s in log["skipped"]}
    assert "not depthwise" in whys["grouped"] and any("dilated" in w for w in whys.values())
    assert ops(after).count("relax.nn.conv2d") == 3


class _Stub:
    """A stand-in cost: chains take `chain` seconds, single convs `single`."""

    enabled = False

    def __init__(self, chain: float, single: float):
        self.chain, self.single, self.asked = chain, single, 0

    def latency(self, mod, key=None):
        self.asked += 1
        return self.chain if ops(mod).count("relax.nn.conv2d") > 1 else self.single


def test_selection_keeps_a_chain_the_cost_says_is_faster():
    model = block_model(16, 96, 16, 3, 1, "same", residual=True)
    _, after, log = merged(model, _Stub(chain=1e-3, single=2e-3), select=True)
    assert ops(after).count("relax.nn.conv2d") == 3
    assert "not faster" in log["skipped"][0]["why"]
    _, after, log = merged(model, _Stub(chain=2e-3, single=1e-3), select=True)
    assert ops(after).count("relax.nn.conv2d") == 1


def test_selection_does_not_time_chains_whose_flops_explode():
    # 1x1 (4->64) then 3x3 depthwise: merged = dense 3x3 4->64, 9x the FLOPs of the depthwise part
    model = block_model(4, 64, 4, 3, 1, "same", project=False)
    stub = _Stub(chain=1.0, single=0.0)
    _, after, log = merged(model, stub, select=True)
    assert stub.asked == 0 and ops(after).count("relax.nn.conv2d") == 2
    assert "FLOPs" in log["skipped"][0]["why"]


def test_ds_f_mobilenet_v2_merges_every_block_and_matches_onnxruntime(tmp_path):
    """DS-F (all block activations removed): compiled through the whole pipeline vs ONNX Runtime."""
    from conftest import assert_matches_ort
    model = zoo.build("mobilenet_v2", width=0.35, resolution=32, num_classes=4, linear_blocks=tuple(range(16)),
                      bn=True)
    cm = assert_matches_ort(model, cost=_Stub(chain=2e-3, single=1e-3))
    entry = cm.report["passes"]["MergeLinearChains"]
    assert entry["counts"]["merged_chain"] >= 10
