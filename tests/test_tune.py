"""`shrinkc tune`: tasks, knob spaces, the tuning database (resumable, target-keyed, corrupt lines), compile --tuning-db."""
from __future__ import annotations

import json
import shutil
import socket

import numpy as np

import pytest
from onnx import helper, numpy_helper

import targets
from compiler import tune
from compiler.tuning_db import TuningDB, knobs_from_db, knobs_id, target_key
from conftest import run_cli, save
from targets.errors import ShrinkcError


def conv_dw_model():
    """conv3x3 (8 -> 32) -> relu -> depthwise 3x3 -> relu: two tunable kernels on an 8x8 image."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 8, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 1, 3, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["c"], kernel_shape=[3, 3], pads=[1] * 4, group=32),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "convdw", [helper.make_tensor_value_info("x", 1, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", 1, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return save(conv_dw_model(), tmp_path_factory.mktemp("tune"), "convdw.onnx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lines(db) -> list[dict]:
    return [json.loads(x) for x in (db / "records.jsonl").read_text().splitlines() if x.strip()]


def test_knob_space_lists_settings_the_rule_takes_and_only_for_its_kind(tiny):
    spec = targets.resolve(None)
    tasks = tune.extract_tasks(tiny, spec)
    kinds = {t.rule.kind: t for t in tasks if t.rule.kind}
    # the 3x3 stride-1 dense conv is a Winograd kernel where the target says so (x86 with AVX-512)
    dense = "conv2d_winograd_nchwc" if spec.kernel_defaults.get("winograd_min_channels") else "conv2d_nchwc"
    assert {dense, "dwconv2d_nchwc"} <= kinds.keys()
    for kind, task in kinds.items():
        assert len(task.space) > 2 and task.space[0] == task.rule.apply(task.func, spec).knobs  # default first
        for knobs in task.space[:4]:
            done = task.rule.apply(task.func, spec, knobs)
            assert done.knobs == knobs and done.name.startswith("f32_")
    # must not fire: the depthwise rule has nothing to tune in a dense conv, and vice versa
    conv, dw = kinds[dense], kinds["dwconv2d_nchwc"]
    assert dw.rule.knob_space(conv.func, spec) == [] and conv.rule.knob_space(dw.func, spec) == []


def test_tune_writes_records_and_a_rerun_measures_nothing(tiny, tmp_path):
    db = tmp_path / "db"
    first = tune.tune(tiny, db=str(db), trials=3)
    n_tasks = len(first.tasks)
    assert first.trials == 3 and first.measured == n_tasks + 3 and first.reused == 0
    recs = lines(db)
    assert len(recs) == first.measured
    assert all(r["target"] == target_key(targets.resolve(None)) for r in recs)
    assert sum(1 for r in recs if r["latency_s"]) >= n_tasks  # every default schedule ran
    again = tune.tune(tiny, db=str(db), trials=3)
    assert again.measured == 0 and again.reused == first.measured
    assert len(lines(db)) == len(recs)
    more = tune.tune(tiny, db=str(db), trials=5)  # a larger budget continues where the first stopped
    assert more.measured == 2 and len(lines(db)) == len(recs) + 2


def test_corrupt_and_torn_lines_are_skipped_with_a_warning(tiny, tmp_path, capsys):
    db = tmp_path / "db"
    tune.tune(tiny, db=str(db), trials=1)
    good = lines(db)
    text = (db / "records.jsonl").read_text().splitlines()
    text.insert(1, "{not json")
    (db / "records.jsonl").write_text("\n".join(text) + '\n{"target": "x86/tor')  # torn last write
    capsys.readouterr()
    assert len(TuningDB(str(db)).records()) == len(good)
    err = capsys.readouterr().err
    assert "line 2 is corrupt; skipped" in err and f"line {len(good) + 2} is corrupt" in err
    res = tune.tune(tiny, db=str(db), trials=2)  # appends after the torn line, not into it
    assert res.measured == 1 and res.reused == len(good)
    assert len(TuningDB(str(db)).records()) == len(good) + 1


def test_records_of_one_target_never_apply_to_another(tiny, tmp_path, capsys):
    db = tmp_path / "db"
    tune.tune(tiny, db=str(db), trials=2)
    assert knobs_from_db(str(db), targets.resolve(None))
    capsys.readouterr()
    assert knobs_from_db(str(db), targets.resolve("rpi4")) == {}
    assert "no records for target 'rpi4'" in capsys.readouterr().err


def test_compile_with_tuning_db_applies_the_best_knobs_and_still_verifies(tiny, tmp_path):
    import compiler
    spec = targets.resolve(None)
    conv = next(t for t in tune.extract_tasks(tiny, spec) if t.rule.kind in ("conv2d_nchwc", "conv2d_winograd_nchwc"))
    default_name = conv.rule.apply(conv.func, spec).name
    pick = next(k for k in conv.space[1:] if conv.rule.apply(conv.func, spec, k).name != default_name)
    want = conv.rule.apply(conv.func, spec, pick).name
    db = TuningDB(str(tmp_path / "db"), create=True)
    for knobs, latency in ((conv.space[0], 2e-3), (pick, 1e-3)):  # the faster record wins
        db.append({"target": target_key(spec), "task": conv.key, "knobs": knobs, "latency_s": latency})
    cm = compiler.compile_model(tiny, tuning_db=str(tmp_path / "db"))
    assert want in cm.report["kernels"] and default_name not in cm.report["kernels"]
    assert all(r.ok for r in cm.verify())
    untuned = compiler.compile_model(tiny)
    assert default_name in untuned.report["kernels"] and want not in untuned.report["kernels"]


def test_missing_database_is_one_clear_error(tiny, tmp_path, capsys):
    code, _, err = run_cli(["compile", tiny, "-o", tmp_path / "m.so", "--tuning-db", tmp_path / "nope"], capsys)
    assert code == 2 and "holds no tuning database" in err and "Traceback" not in err


def test_interrupted_tuning_keeps_every_finished_measurement(tiny, tmp_path):
    class Interrupting(tune.LocalMeasurer):
        calls = 0

        def measure(self, kernel, arrays, name):
            Interrupting.calls += 1
            if Interrupting.calls == 3:
                raise KeyboardInterrupt
            return super().measure(kernel, arrays, name)

    spec = targets.resolve(None)
    db = TuningDB(str(tmp_path / "db"), create=True)
    res = tune.Tuner(tune.extract_tasks(tiny, spec), spec, db, Interrupting(spec)).run(trials=4, budget_s=None)
    assert res.stopped == "interrupted" and res.measured == 2
    assert len(db.records()) == 2 and all(r["latency_s"] for r in db.records())


def test_candidate_with_wrong_outputs_is_rejected(tiny, tmp_path):
    class Corrupting(tune.LocalMeasurer):
        def measure(self, kernel, arrays, name):
            latency, outs = super().measure(kernel, arrays, name)
            if not name.endswith("_ref") and self.seen:
                outs[-1] = outs[-1] + 1.0  # a schedule that computes something else
            self.seen = True
            return latency / 10, outs

    spec = targets.resolve(None)
    task = next(t for t in tune.extract_tasks(tiny, spec) if t.rule.kind == "dwconv2d_nchwc")
    measurer = Corrupting(spec)
    measurer.seen = False
    db = TuningDB(str(tmp_path / "db"), create=True)
    res = tune.Tuner([task], spec, db, measurer).run(trials=1, budget_s=None)
    assert res.measured == 2
    bad = [r for r in db.records() if knobs_id(r["knobs"]) != knobs_id(task.space[0])]
    assert bad[0]["latency_s"] is None and "outputs differ" in bad[0]["error"]
    assert task.best_knobs == task.space[0]


def test_unreachable_tracker_is_one_clear_error(tiny, tmp_path, capsys):
    port = free_port()
    target = "rpi4" if shutil.which("aarch64-linux-gnu-g++") else None    # a farm of x86 boards otherwise
    with pytest.raises(ShrinkcError, match=f"no RPC tracker at 127.0.0.1:{port}"):
        tune.tune(tiny, target, db=str(tmp_path / "db"), rpc_tracker=f"127.0.0.1:{port}", rpc_key="rpi4-emu")
    code, _, err = run_cli(["tune", tiny, "--target", "rpi4", "--db", tmp_path / "db"], capsys)
    want = ("cannot be timed on this machine", "--rpc-tracker") if target else \
        ("cross compiler 'aarch64-linux-gnu-g++'", "apt-get install g++-aarch64-linux-gnu")
    assert code == 2 and err.count("\n") == 1 and all(w in err for w in want), err
    lib = tmp_path / "m.so"
    assert run_cli(["compile", tiny, "-o", lib], capsys)[0] == 0
    code, _, err = run_cli(["run", lib, "--rpc-tracker", f"127.0.0.1:{port}", "--rpc-key", "k"], capsys)
    assert code == 2 and err.count("\n") == 1 and f"no RPC tracker at 127.0.0.1:{port}" in err


def test_tune_cli_prints_progress_and_a_gains_table(tiny, tmp_path, capsys):
    code, _, err = run_cli(["tune", tiny, "--db", tmp_path / "db", "--trials", "2", "--time-budget", "60"], capsys)
    assert code == 0
    progress = [x for x in err.split("\r") if x.startswith("[tune] [")]
    assert progress[0].startswith("[tune] [") and "kernels 1/" in progress[0]
    last = progress[-1]
    assert "trials 2/2" in last and "best model ~" in last and "(untuned " in last and "ETA " in last
    assert last.startswith("[tune] [#") and "ms" in last.split("best model ~")[1]
    table = err.split("kernel (tuned)")[1]
    assert "default ms" in table and "gain" in table and "model estimate (sum of kernels)" in table


@pytest.mark.slow   # NOTE: MetaSchedule builds and runs in worker processes: minutes on a busy 2-core host
def test_metaschedule_schedule_of_a_fallback_kernel_replays_from_the_database(tiny, tmp_path):
    import compiler
    from compiler.tune_meta import tune_kernel
    spec = targets.resolve(None)
    task = next(t for t in tune.extract_tasks(tiny, spec) if not t.rule.kind)
    assert task.space[-1] == {"meta_schedule": tune.MS_TRIALS}  # its one step beyond the default
    func, trace = tune_kernel(task.func, spec, str(tmp_path / "ms"), trials=2)
    assert (tmp_path / "ms" / "database_tuning_record.json").is_file()
    db = TuningDB(str(tmp_path / "db"), create=True)
    db.append({"target": target_key(spec), "task": task.key, "knobs": {"meta_schedule": 2}, "trace": trace,
               "latency_s": 1e-9})
    cm = compiler.compile_model(tiny, tuning_db=str(tmp_path / "db"))
    assert cm.report["passes"]["MetaScheduleTrace"]["counts"] == {"replayed": 1}
    assert all(r.ok for r in cm.verify())
    assert "MetaScheduleTrace" not in compiler.compile_model(tiny).report["passes"]  # must not fire untuned


@pytest.mark.parametrize("case,extra,needle", [
    # (this machine's target where the error is not about the board: these need no cross compiler installed)
    ("unreachable_tracker", ["--rpc-tracker", "127.0.0.1:{port}", "--rpc-key", "x86-farm"],
     "no RPC tracker at 127.0.0.1:{port}"),
    ("missing_cc", ["--target", "rpi4", "--cc", "no-such-aarch64-g++"], "cross compiler 'no-such-aarch64-g++'"),
    ("key_without_tracker", ["--rpc-key", "rpi4-emu"], "--rpc-tracker and --rpc-key go together"),
])
def test_tune_errors_are_one_line_exit_2(case, extra, needle, tiny, tmp_path, capsys):
    port = free_port()
    argv = ["tune", tiny, "--db", tmp_path / "db", *[a.format(port=port) for a in extra]]
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shrinkc: error: ") and "fix:" in lines[0], err
    assert needle.format(port=port) in lines[0]
    assert not (tmp_path / "db" / "records.jsonl").exists()


def test_tune_cli_warns_once_about_a_corrupt_line_and_carries_on(tiny, tmp_path, capsys):
    db = tmp_path / "db"
    db.mkdir()
    (db / "records.jsonl").write_text('{"target": "x86/0", "task": "t", "knobs": {}}\n{torn\n')
    code, _, err = run_cli(["tune", tiny, "--db", db, "--trials", "0"], capsys)
    assert code == 0, err
    warnings = [x for x in err.splitlines() if x.startswith("shrinkc: warning:")]
    assert warnings == [f"shrinkc: warning: {db / 'records.jsonl'} line 2 is corrupt; skipped"]
    after = (db / "records.jsonl").read_text().splitlines()[2:]
    assert "error" not in err and after and all(json.loads(x)["latency_s"] for x in after)  # appended after it


def _sparse_model(tmp_path, monkeypatch) -> str:
    """MobileNetV2-0.35 at 32x32 with every 1x1 conv 90% sparse: spmm, fused and CHW kernels that passes build."""
    from zoo.mobilenet_v2 import mobilenet_v2
    monkeypatch.setenv("SHRINKC_COST", "off")  # the sparse pass fires by its rule, not a timing
    return save(mobilenet_v2(width=0.35, resolution=32, num_classes=10, sparsity=0.9), tmp_path, "sparse.onnx")


def test_kernels_passes_build_are_tuned_on_their_own_weights(tmp_path, monkeypatch):
    """Kernels a pass emits already scheduled (spmm, fused expand + depthwise, fused first conv + depthwise) are
    tasks whose knobs the tuner times, on the call's real sparse weights (random indices would read out of bounds).
    (Before, `shrinkc tune` skipped them; before that it crashed on them: they have no root block.)"""
    from schedules.handwritten import HANDWRITTEN, recipe
    from schedules.rule import task_key
    model = _sparse_model(tmp_path, monkeypatch)
    spec = targets.resolve(None)
    tasks = tune.extract_tasks(model, spec)
    built = [t for t in tasks if t.rule is HANDWRITTEN]
    kinds = {recipe(t.func)["kind"] for t in built}
    assert {"spmm_chw", "spmm_dwconv2d_chw", "conv2d_dwconv2d_chw"} <= kinds, kinds
    for t in built:
        assert t.key == task_key(t.func) and t.space[0] == recipe(t.func)["knobs"]
        if recipe(t.func)["kind"].startswith("spmm"):      # row_ptr and col come from the model, not random
            row_ptr = t.constants[1]
            assert row_ptr.dtype == np.int32 and row_ptr[0] == 0 and row_ptr[-1] > 0
        # the key names what the kernel computes, not its knobs
        assert task_key(HANDWRITTEN.apply(t.func, spec, t.space[-1]).func) == t.key
    assert sum(len(t.space) > 1 for t in built) >= 3   # a 2x2 layer's spmm has one pixel tile, others more
    res = tune.tune(model, db=str(tmp_path / "db"), trials=12)
    assert not res.stopped
    recs = [r for r in lines(tmp_path / "db") if r["task"] in {t.key for t in built}]
    assert len(recs) > len(built) and all(r["error"] == "" and r["latency_s"] > 0 for r in recs), recs


def test_compile_rebuilds_a_pass_built_kernel_with_its_tuned_knobs(tmp_path, monkeypatch):
    import compiler
    from schedules.handwritten import HANDWRITTEN, recipe
    model = _sparse_model(tmp_path, monkeypatch)
    spec = targets.resolve(None)
    spmm = next(t for t in tune.extract_tasks(model, spec, meta_schedule=False)
                if t.rule is HANDWRITTEN and recipe(t.func)["kind"] == "spmm_chw" and len(t.space) > 1)
    pick = spmm.space[1]
    want = HANDWRITTEN.apply(spmm.func, spec, pick).name
    assert want != spmm.name
    db = TuningDB(str(tmp_path / "db"), create=True)
    for knobs, latency in ((spmm.space[0], 2e-3), (pick, 1e-3)):
        db.append({"target": target_key(spec), "task": spmm.key, "knobs": knobs, "latency_s": latency})
    cm = compiler.compile_model(model, tuning_db=str(tmp_path / "db"))
    retuned = cm.report["passes"]["ApplySchedules"]["changes"]
    assert [c["knobs"] for c in retuned if c["what"] == "retuned"] == [pick] * spmm.uses
    kernels = cm.report["kernels"]
    assert any(k.startswith(want) for k in kernels)
    layers = cm.metadata()["sparse_layers"]
    assert all(layer["kernel"] in kernels for layer in layers)   # the report follows
    assert any(layer["kernel"].startswith(want) for layer in layers)
    assert all(r.ok for r in cm.verify())
