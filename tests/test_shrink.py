"""Depth shrinking end to end: blocks, pruning named/auto blocks, the CLI (--shrink, analyze) and the report."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import compiler
import zoo
from compiler.analyze import cleaned
from compiler.calibration import load_calibration, samples
from compiler.shrink_auto import mergeable_blocks
from conftest import run_cli, save
from passes.prune_activations import find_blocks
from targets import resolve
from targets.errors import ShrinkcError

MV2 = dict(width=0.35, resolution=32, num_classes=10)


@pytest.fixture(autouse=True)
def roofline_cost(monkeypatch):
    monkeypatch.setenv("SHRINKC_COST", "off")   # decisions from the roofline estimate: fast and deterministic


@pytest.fixture(scope="module")
def mv2_path(tmp_path_factory):
    return save(zoo.build("mobilenet_v2", **MV2), tmp_path_factory.mktemp("shrink"), "mv2.onnx")


@pytest.fixture(scope="module")
def calib_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("calib") / "calib.npy")
    np.save(path, np.random.default_rng(0).uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32))
    return path


def test_find_blocks_names_and_activations():
    mod, _ = cleaned(zoo.build("mobilenet_v2", linear_blocks=(2,), **MV2), resolve(None, None))
    blocks = {b.name: b for b in find_blocks(mod["main"])}
    assert list(blocks) == [f"block{i}" for i in range(17)]
    assert blocks["block0"].kinds == ["relu6"]            # no expand: only the depthwise's activation
    assert blocks["block1"].kinds == ["relu6", "relu6"]
    assert blocks["block3"].acts == []                     # expansion block 2 was built linear
    assert blocks["block3"].layers == ["block3_expand", "block3_dw", "block3_project"]


def test_named_blocks_lose_their_activations_exactly(mv2_path):
    """--shrink-blocks block3 computes the model built without block3's activations, to 1e-4."""
    cm = compiler.compile_model(mv2_path, shrink_blocks=["block3"])
    removed = cm.report["passes"]["PruneActivations"]["changes"]
    assert [c["layer"] for c in removed] == ["block3"] and removed[0]["activations"] == 2
    linear = zoo.build("mobilenet_v2", linear_blocks=(2,), **MV2)
    x = {"input": np.random.default_rng(1).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)}
    from compiler import verify
    ref = verify.reference_outputs("onnx", linear.SerializeToString(), x)
    (res,) = verify.compare(["out"], cm.run(x), ref, tolerance=1e-4)
    assert res.ok, res.line()


def _relu6_after(model, tensors: list[str]):
    """The ONNX model with a Clip(0, 6) between each named tensor and every node that reads it."""
    from onnx import helper, numpy_helper
    g = model.graph
    for t in tensors:
        for node in g.node:
            node.input[:] = [f"{t}.final" if i == t else i for i in node.input]
        at = next(i for i, n in enumerate(g.node) if t in n.output) + 1
        g.node.insert(at, helper.make_node("Clip", [t, f"{t}.lo", f"{t}.hi"], [f"{t}.final"]))
        g.initializer.extend([numpy_helper.from_array(np.array(v, np.float32), f"{t}.{k}")
                              for k, v in (("lo", 0.0), ("hi", 6.0))])
    return model


def test_final_activation_follows_each_named_block(mv2_path, tmp_path, capsys):
    """--shrink-blocks block3,block5 --final-activation: their activations go and one ReLU6 follows each
    block's output (block3: its project conv; block5: its residual add); equal to ONNX Runtime on the model
    built so, to 1e-4, whether or not the merge of each chain is taken."""
    cm = compiler.compile_model(mv2_path, shrink_blocks=["block3", "block5"], final_activation=True)
    removed = cm.report["passes"]["PruneActivations"]["changes"]
    assert [(c["layer"], c["final_activation"]) for c in removed] == [("block3", True), ("block5", True)]
    ref_model = _relu6_after(zoo.build("mobilenet_v2", linear_blocks=(2, 4), **MV2), ["block3.project", "block5.add"])
    x = {"input": np.random.default_rng(2).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)}
    from compiler import verify
    ref = verify.reference_outputs("onnx", ref_model.SerializeToString(), x)
    (res,) = verify.compare(["out"], cm.run(x), ref, tolerance=1e-4)
    assert res.ok, res.line()
    plain = verify.reference_outputs("onnx", zoo.build("mobilenet_v2", linear_blocks=(2, 4), **MV2)
                                     .SerializeToString(), x)
    assert not verify.compare(["out"], cm.run(x), plain, tolerance=1e-4)[0].ok    # the ReLU6s do something
    code, out, err = run_cli(["compile", mv2_path, "-o", tmp_path / "f.so", "--shrink-blocks", "block3",
                              "--final-activation", "--report", tmp_path / "f.json"], capsys)
    assert code == 0, err
    changes = json.loads((tmp_path / "f.json").read_text())["passes"]["PruneActivations"]["changes"]
    assert [(c["layer"], c["final_activation"]) for c in changes] == [("block3", True)]


def test_auto_measures_agreement_with_the_final_activation(mv2_path, calib_path):
    """With --final-activation, auto mode's gated model puts the ReLU6 after each block it tries to remove:
    some block's agreement alone differs from the one measured without it, and the blocks it removes get
    the ReLU6 (PruneActivations computes them as test_final_activation_follows_each_named_block checks)."""
    calib = load_calibration(calib_path)
    runs = {f: compiler.compile_model(mv2_path, shrink="auto", calib=calib, max_drop=1.0, final_activation=f)
            for f in (False, True)}
    alone = {f: {c["layer"]: c["agreement_alone"] for c in cm.report["passes"]["ChooseBlocks"]["changes"]
                 if c["what"] == "measured"} for f, cm in runs.items()}
    both = alone[False].keys() & alone[True].keys()
    assert len(both) >= 10 and any(alone[False][k] != alone[True][k] for k in both)
    removed = [c["layer"] for c in runs[True].report["passes"]["PruneActivations"]["changes"]]
    assert removed and all(c["final_activation"] for c in runs[True].report["passes"]["PruneActivations"]["changes"])


def test_unknown_block_name_is_one_line_error(mv2_path, tmp_path, capsys):
    code, out, err = run_cli(["compile", mv2_path, "-o", tmp_path / "m.so", "--shrink-blocks", "block99"], capsys)
    assert code == 2 and "no block named block99" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["compile", "--max-drop", "-0.5"], ["compile", "--max-drop", "2"],
                                  ["compile", "--sparse-min", "80"], ["analyze", "--sparse-min", "1.5"]])
def test_shares_outside_0_1_are_one_line_errors(mv2_path, tmp_path, capsys, argv):
    cmd, flag, value = argv
    out_so = tmp_path / "m.so"
    code, _, err = run_cli([cmd, mv2_path, *(["-o", out_so] if cmd == "compile" else []), flag, value], capsys)
    assert code == 2 and f"{flag} {float(value):g} is not a share between 0 and 1" in err
    assert len(err.strip().splitlines()) == 1 and not out_so.exists()


def test_auto_without_calibration_is_an_error(mv2_path, tmp_path, capsys):
    code, _, err = run_cli(["compile", mv2_path, "-o", tmp_path / "m.so", "--shrink", "auto"], capsys)
    assert code == 2 and "--calib" in err


@pytest.mark.parametrize("max_drop", [0.0, 1.0])
def test_auto_keeps_agreement_within_budget(mv2_path, calib_path, max_drop):
    cm = compiler.compile_model(mv2_path, shrink="auto", calib=load_calibration(calib_path), max_drop=max_drop)
    entry = cm.report["passes"]["ChooseBlocks"]
    (summary,) = [c for c in entry["changes"] if c["what"] == "agreement"]
    measured = [c for c in entry["changes"] if c["what"] == "measured"]
    assert len(measured) == 17 and summary["samples"] == 8
    assert summary["top1_agreement"] >= 1.0 - max_drop
    removed = cm.report["passes"].get("PruneActivations", {}).get("changes", [])
    assert sorted(c["layer"] for c in removed) == sorted(summary["blocks"])
    if max_drop == 1.0:   # anything goes: every block whose merge the cost accepts loses its activations
        mod, _ = cleaned(zoo.build("mobilenet_v2", **MV2), resolve(None, None))
        from compiler.cost import Cost
        with resolve(None, None).tvm_target():
            faster = mergeable_blocks(mod, [f"block{i}" for i in range(17)], Cost(resolve(None, None)))
        assert faster and sorted(c["layer"] for c in removed) == sorted(faster)


class _NeverFaster:
    """A cost under which no merged conv is ever faster than its chain."""

    def latency(self, mod, key=None):
        return 1e-3


def test_auto_removes_nothing_whose_merge_would_not_pay(mv2_path, calib_path):
    # auto mode once removed activations of blocks the cost then declined to merge: accuracy lost, no speed
    cm = compiler.compile_model(mv2_path, shrink="auto", calib=load_calibration(calib_path), max_drop=1.0,
                                cost=_NeverFaster())
    assert "PruneActivations" not in cm.report["passes"]
    skipped = cm.report["passes"]["ChooseBlocks"]["skipped"]
    assert len(skipped) == 17 and all("would not be faster" in k["why"] for k in skipped)


def test_cli_shrink_modes_and_report(tmp_path, capsys):
    path = save(zoo.build("mobilenet_v2", linear_blocks=(2, 3), **MV2), tmp_path, "lin.onnx")
    reports = {}
    for mode in ("off", "merge"):
        rep = tmp_path / f"{mode}.json"
        code, out, err = run_cli(["compile", path, "-o", tmp_path / f"{mode}.so", "--shrink", mode, "--verify",
                                  "--report", rep], capsys)
        assert code == 0, err
        assert "-> ok" in out
        reports[mode] = json.loads(rep.read_text())
    assert "MergeLinearChains" not in reports["off"]["passes"]
    merged = reports["merge"]["passes"]["MergeLinearChains"]["changes"]
    assert {"block3_expand", "block4_expand"} <= {layer for c in merged for layer in c["layers"]}
    assert all(len(c["shape"]) == 4 for c in merged)
    meta = json.loads((tmp_path / "merge.json").read_text())
    assert meta["passes"]["MergeLinearChains"]["counts"]["merged_chain"] == len(merged)


def test_cli_analyze_lists_every_block(mv2_path, calib_path, capsys):
    code, out, err = run_cli(["analyze", mv2_path, "--calib", calib_path], capsys)
    assert code == 0, err
    depth = out.split("## depth")[1].split("\n## ")[0]     # the sparse sections name layers block*_ too
    rows = [line for line in depth.splitlines() if line.startswith("block")]
    assert len(rows) == 18   # header + 17 blocks
    assert "## sparse 1x1 convs" in out and "## CHW regions" in out
    assert "merge if activations removed" in out
    code, out_final, err = run_cli(["analyze", mv2_path, "--calib", calib_path, "--final-activation"], capsys)
    assert code == 0, err
    final = out_final.split("## depth")[1].split("\n## ")[0]
    rows_final = [line for line in final.splitlines() if line.startswith("block")]
    assert len(rows_final) == 18 and rows_final != rows     # measured with a ReLU6 after each removed block


def test_calibration_npz_by_name_and_shape_errors(tmp_path):
    path = str(tmp_path / "c.npz")
    np.savez(path, input=np.zeros((3, 3, 8, 8), np.float32))
    feeds = samples(load_calibration(path), [{"name": "input", "shape": [1, 3, 8, 8], "dtype": "float32"}])
    assert len(feeds) == 3 and feeds[0]["input"].shape == (1, 3, 8, 8)
    with pytest.raises(ShrinkcError, match="shape"):
        samples(load_calibration(path), [{"name": "input", "shape": [1, 3, 9, 9], "dtype": "float32"}])
    with pytest.raises(ShrinkcError, match="no input"):
        samples(load_calibration(path), [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}])
    with pytest.raises(ShrinkcError, match="does not exist"):
        load_calibration(str(tmp_path / "missing.npy"))


# --- tools/bench_shrink.py: the benchmark's core on a tiny model, so the script cannot rot (no timing asserted) ---
def _bench_shrink():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import bench_shrink
    return bench_shrink


def test_bench_shrink_core_on_a_tiny_dsf_model(tmp_path):
    bench = _bench_shrink()
    dense = zoo.build("mobilenet_v2", **MV2)
    n_expansion = len({n.name.split(".")[0] for n in dense.graph.node if n.name.endswith(".expand")})
    model = bench.with_probe(zoo.build("mobilenet_v2", linear_blocks=tuple(range(n_expansion)), **MV2), "head")
    r = bench.run_case("tiny-dsf", model, [1], 2, str(tmp_path))
    merge, off = r["modes"]["merge"], r["modes"]["off"]
    assert merge["merged"] > 0 and merge["convs_merged"] >= 2 * merge["merged"]
    assert off["merged"] == 0 and set(merge["rel_err"]) == {"classifier", "block16.project"}
    assert r["exact"] and merge["max_rel_err"] <= bench.EXACT_REL_ERR
    t = r["threads"][1]
    assert t["speedup_of_medians"] == pytest.approx(t["off"]["median_ms"] / t["merge"]["median_ms"])
    assert t["speedup"] > 0
    md = bench.results_md("cmd", [r], 32)
    assert "| tiny-dsf | 1 |" in md
    out = tmp_path / "R.md"
    bench.write_section(str(out), "shrink", "first")
    bench.write_section(str(out), "other", "kept")
    bench.write_section(str(out), "shrink", "second")
    text = out.read_text()
    assert "second" in text and "first" not in text and "kept" in text


def test_bench_shrink_auto_report_from_a_compile_report():
    _bench_shrink()
    import bench_shrink_auto as auto
    changes = [{"what": "measured", "layer": "b0", "linearity": 0.5, "agreement_alone": 0.4, "removed": False},
               {"what": "measured", "layer": "b1", "linearity": 0.9, "agreement_alone": 0.999, "removed": True},
               {"what": "agreement", "layer": "", "top1_agreement": 0.995, "samples": 10, "blocks": ["b1"]}]
    measured, agreement = auto.removed_blocks({"passes": {"ChooseBlocks": {"changes": changes}}})
    assert [m["layer"] for m in measured if m["removed"]] == ["b1"] and agreement == 0.995
    assert auto.removed_blocks({"passes": {}}) == ([], None)
    stats = {"min_ms": 1.0, "median_ms": 1.0, "runs": 1}
    info = {"blocks": [1, 2], "resolution": 16, "epochs": 1, "train_s": 1.0, "linearity": 0.0, "expansion": 6,
            "train_samples": 10, "calib_samples": 4, "test_samples": 5}
    ev = {"original": {"accuracy": 0.9}, "merge": {"accuracy": 0.9, "agreement": 1.0},
          "auto": {"accuracy": 0.8, "agreement": 0.95}}
    md = auto.results_md("cmd", info, 0.01, measured, agreement, ev,
                         {1: {"auto": stats, "merge": stats, "speedup": 1.05, "speedup_of_medians": 1.0}},
                         {"auto": 1, "merge": 0})
    assert "removed 1 of 2 blocks: b1" in md and "| shrinkc --shrink auto | 0.8000 | **0.9500** |" in md
    assert "| 1 | 1.0000 | 1.0000 | **1.05x** | 1.00x |" in md     # the paired speed-up, then the medians' ratio
    assert "calibration = 4 other images (not trained on)" in md
    assert "on a trained CNN" in md and "fine-tun" not in md   # train.json without fine-tuning (or older ones)
    tuned = dict(info, linear_blocks=[0, 1], finetune_epochs=3, range_weight=5.0)
    md = auto.results_md("cmd", tuned, 0.01, measured, agreement, ev, {}, {"auto": 1, "merge": 0})
    assert "on a CNN fine-tuned the DepthShrinker way" in md and "1 epochs + 3 fine-tuning epochs" in md
    assert "blocks _blocks_blocks_0, _blocks_blocks_1 (the least needed" in md and "penalty (weight 5.0)" in md


# --- fitted removal: each removed activation becomes the per-channel affine map closest to it on calibration data ---
def test_fit_affine_is_the_least_squares_line_per_channel():
    from compiler.shrink_auto import fit_affine
    rng = np.random.default_rng(3)
    x = rng.normal([1.0, -2.0, 4.0, 0.5], [2.0, 1.0, 3.0, 0.0], (4000, 4)).astype(np.float64)
    f = np.clip(x, 0.0, 6.0)
    a, b = fit_affine(np.stack([x.mean(0), (x * x).mean(0), f.mean(0), (x * f).mean(0)]))
    for c in range(3):
        slope, icpt = np.polyfit(x[:, c], f[:, c], 1)
        assert a[c] == pytest.approx(slope, rel=1e-4, abs=1e-5) and b[c] == pytest.approx(icpt, rel=1e-4, abs=1e-5)
    assert a[3] == 1.0 and b[3] == pytest.approx(f[0, 3] - x[0, 3])   # constant input: a shift, exact there


def _affine_instead_of(model, fits: dict):
    """The ONNX model with each named Clip node replaced by Mul + Add with per-channel constants (a, b)."""
    from onnx import helper, numpy_helper
    g = model.graph
    for name, (a, b) in fits.items():
        at, node = next((i, n) for i, n in enumerate(g.node) if n.name == name)
        out = node.output[0]
        g.node.remove(node)
        g.node.insert(at, helper.make_node("Mul", [node.input[0], f"{name}.a"], [f"{name}.ax"]))
        g.node.insert(at + 1, helper.make_node("Add", [f"{name}.ax", f"{name}.b"], [out]))
        g.initializer.extend([numpy_helper.from_array(np.asarray(v, np.float32).reshape(1, -1, 1, 1), f"{name}.{k}")
                              for k, v in (("a", a), ("b", b))])
    return model


def test_fitted_removal_merges_and_equals_the_model_with_those_affine_maps():
    """PruneActivations with fits: block3's ReLU6s become a x + b per channel, folded into the convs before
    them, so the block still merges into one conv; the result equals ONNX Runtime on the model with the two
    Clips replaced by those Mul + Add, to 1e-4."""
    import tvm
    from tvm import relax

    from compiler import verify
    from passes import changelog
    from passes.merge_linear_chains import MergeLinearChains
    from passes.prune_activations import PruneActivations
    model = zoo.build("mobilenet_v2", **MV2)
    mod, _ = cleaned(model, resolve(None, None))
    (blk,) = [b for b in find_blocks(mod["main"]) if b.name == "block3"]
    chans = [int(a.value.args[0].ty.shape.values[1]) for a in blk.acts]
    rng = np.random.default_rng(4)
    fits = [(rng.uniform(0.3, 1.2, c).astype(np.float32), rng.uniform(-0.5, 0.5, c).astype(np.float32))
            for c in chans]
    with changelog.collecting() as book:
        pruned = PruneActivations(["block3"], fits={"block3": fits})(mod)
        merged = MergeLinearChains(None, select=False)(pruned)
    changes = book.summary()
    assert changes["PruneActivations"]["changes"][0]["fitted"] is True
    assert any(c["layers"] == ["block3_expand", "block3_dw", "block3_project"]
               for c in changes["MergeLinearChains"]["changes"])
    ops = [str(b.value.op.name) for blk_ in merged["main"].body.blocks for b in blk_.bindings
           if isinstance(b.value, relax.Call) and hasattr(b.value.op, "name")]
    assert "relax.multiply" not in ops        # the affine maps were folded into the convs
    x = np.random.default_rng(5).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    ref = verify.reference_outputs("onnx", _affine_instead_of(
        zoo.build("mobilenet_v2", **MV2), {"block3.expand.relu6": fits[0], "block3.dw.relu6": fits[1]})
        .SerializeToString(), {"input": x})
    target = tvm.target.Target.from_device("cpu")
    with target:
        ex = tvm.compile(merged, target, relax_pipeline=relax.get_default_pipeline(target))
    out = relax.VirtualMachine(ex, tvm.cpu(0))["main"](tvm.runtime.tensor(x))
    out = out if hasattr(out, "numpy") else out[0]
    (res,) = verify.compare(["out"], [out.numpy()], ref, tolerance=1e-4)
    assert res.ok, res.line()


def test_gated_model_fits_the_activation_on_its_calibration_inputs(mv2_path, calib_path):
    """fit_block's (a, b) for block3's first ReLU6 equal a least-squares line through that activation's
    inputs, read from ONNX Runtime on the same calibration images."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from compiler.shrink_auto import GatedModel
    mod, _ = cleaned(onnx.load(mv2_path), resolve(None, None))
    blocks = [b for b in find_blocks(mod["main"]) if b.acts]
    model = GatedModel(mod, blocks)
    feeds = samples(load_calibration(calib_path), model.inputs)
    fits = model.fit_block(feeds, "block3", set(), {})
    first = model.act_indices("block3")[0]
    m = onnx.load(mv2_path)
    m.graph.output.append(helper.make_tensor_value_info("block3.expand", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    xs = np.concatenate([sess.run(["block3.expand"], f)[0] for f in feeds])     # [N, C, H, W]
    xs = xs.transpose(1, 0, 2, 3).reshape(xs.shape[1], -1)
    a, b = fits[first]
    for c in range(0, xs.shape[0], 7):
        slope, icpt = np.polyfit(xs[c], np.clip(xs[c], 0, 6), 1)
        assert a[c] == pytest.approx(slope, rel=1e-3, abs=1e-4) and b[c] == pytest.approx(icpt, rel=1e-3, abs=1e-4)
    assert not np.allclose(a, 1.0)            # the calibration inputs do reach below 0
