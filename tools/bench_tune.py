"""`python tools/bench.py tune`: what `shrinkc tune` buys on MobileNetV2, and how fast it gets there.

For each variant (dense; 85% sparse 1x1 weights; linear blocks that merge) the built-in model is
tuned with a time budget (the dense one longest) while the best model estimate (sum over kernels
of uses x best time) is recorded after every trial. Then the model is compiled twice, untuned and
with --tuning-db, and the two libraries are timed against each other: at 1 thread in this process,
interleaved run by run after warm-up; at 2 threads each in a process of its own, bursts
alternating (tools/benchlib.py). A second tune over the same database checks that it re-measures
nothing. Results: benchmarks/RESULTS-tune.md, the curves as PNGs beside it, raw data as JSON.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time

import numpy as np

import benchlib
import zoo

# variant -> options of zoo.build("mobilenet_v2", ...) on top of width and resolution
VARIANTS = {
    "dense": {},
    "sparse": {"sparsity": 0.85},
    "merged": {"linear_blocks": zoo.DEMO_LINEAR_BLOCKS},  # blocks 5, 9 and 12 lose their ReLU6s
}
GOAL = 1.2             # the goal for dense MobileNetV2 after 30 minutes
UNLIMITED_TRIALS = 100_000  # the time budget ends a run, not the trial count


def add_arguments(p) -> None:
    p.add_argument("--minutes", type=float, default=30.0, help="tuning budget of the dense model")
    p.add_argument("--variant-minutes", type=float, default=10.0, help="tuning budget of the sparse and merged models")
    p.add_argument("--variants", default="dense,sparse,merged", help=f"some of: {','.join(VARIANTS)}")
    p.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width (smoke runs: 0.35)")
    p.add_argument("--resolution", type=int, default=224, help="input size (smoke runs: 96)")
    p.add_argument("--trials", type=int, default=UNLIMITED_TRIALS, help="trial cap (the budget usually ends first)")
    p.add_argument("--threads", default="1,2", help="thread counts to time the libraries at")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds at 1 thread (2+ threads: as many rounds of bursts)")
    p.add_argument("--db-dir", default=None, help="keep the tuning databases here (one folder per variant; "
                   "an existing one is continued); default: a temporary folder")
    p.add_argument("--no-rerun", action="store_true", help="skip the second tune over the same database")
    p.add_argument("--out-dir", default=os.path.join(benchlib.ROOT, "benchmarks"))
    p.add_argument("--out", default="RESULTS-tune.md")


def tune_variant(name: str, model_path: str, db: str, minutes: float, trials: int) -> dict:
    """Tune with a budget, recording (trials, minutes, best model estimate ms) after each trial."""
    from compiler import tune
    curve: list[tuple[int, float, float]] = []

    def observe(n: int, elapsed_s: float, estimate_s: float) -> None:
        curve.append((n, elapsed_s / 60, estimate_s * 1e3))

    t0 = time.perf_counter()
    res = tune.tune(model_path, db=db, trials=trials, time_budget_min=minutes, observer=observe)
    gains = sorted(((t.best_name or t.name, t.uses, (t.default_s or 0) * 1e3, (t.best_s or 0) * 1e3, t.trials)
                    for t in res.tasks), key=lambda r: -r[1] * r[2])
    return {"variant": name, "minutes_budget": minutes, "tune_s": time.perf_counter() - t0, "trials": res.trials,
            "measured": res.measured, "reused": res.reused, "stopped": res.stopped, "kernels": len(res.tasks),
            "estimate_untuned_ms": res.untuned_s * 1e3, "estimate_tuned_ms": res.tuned_s * 1e3,
            "curve": curve, "gains": gains}


def rerun_measures_nothing(model_path: str, db: str, trials: int) -> dict:
    """A second tune over the same database, as many trials as the first took and no budget."""
    from compiler import tune
    t0 = time.perf_counter()
    res = tune.tune(model_path, db=db, trials=trials)
    return {"measured": res.measured, "reused": res.reused, "seconds": time.perf_counter() - t0}


def time_libraries(libs: dict[str, str], inputs: dict, threads: list[int], rounds: int, work: str) -> dict:
    """Per thread count: {label: stats} of each library, interleaved (1 thread) or alternating processes."""
    npz = os.path.join(work, "inputs.npz")
    np.savez(npz, **inputs)
    out = {}
    for n in threads:
        if n == 1:
            fns = benchlib.library_calls(libs, inputs)
            times = benchlib.interleave(fns, rounds)
        else:
            workers = {label: benchlib.Worker("shrinkc", so, npz, n) for label, so in libs.items()}
            try:
                times = benchlib.alternate(workers, rounds)
            finally:
                for w in workers.values():
                    w.close()
        out[n] = {k: benchlib.stats(v) for k, v in times.items()}
    return out


def bench_variant(name: str, args, work: str) -> dict:
    import onnx

    import compiler
    from compiler import runtime
    model_path = os.path.join(work, f"mobilenet_v2_{name}.onnx")
    onnx.save(zoo.build("mobilenet_v2", width=args.width, resolution=args.resolution, **VARIANTS[name]), model_path)
    db = os.path.join(args.db_dir or work, f"db_{name}")
    minutes = args.minutes if name == "dense" else args.variant_minutes
    print(f"== {name}: tuning for {minutes:g} min, database {db}", flush=True)
    result = tune_variant(name, model_path, db, minutes, args.trials)
    if not args.no_rerun:
        result["rerun"] = rerun_measures_nothing(model_path, db, result["trials"])
        print(f"   rerun over the same database: {result['rerun']['measured']} new measurements, "
              f"{result['rerun']['reused']} reused", flush=True)
    libs = {}
    for label, db_arg in (("untuned", None), ("tuned", db)):
        cm = compiler.compile_model(model_path, tuning_db=db_arg)
        libs[label], _ = cm.export(os.path.join(work, f"{name}_{label}.so"))
        if label == "tuned":
            inputs = runtime.random_inputs(cm.metadata()["inputs"], seed=0)
            result["tuned_max_rel_err"] = max(r.rel_err for r in cm.verify(inputs))
    result["timing"] = time_libraries(libs, inputs, [int(t) for t in args.threads.split(",")], args.rounds, work)
    for n, t in result["timing"].items():
        print(f"   x{n}: untuned {t['untuned']['median_ms']:.2f} ms, tuned {t['tuned']['median_ms']:.2f} ms, "
              f"speed-up {speedup(t):.2f}x", flush=True)
    return result


def speedup(timing: dict) -> float:
    return timing["untuned"]["median_ms"] / timing["tuned"]["median_ms"]


def write_charts(results: list[dict], out_dir: str, stem: str) -> dict[str, str]:
    """Best model estimate against trials and against minutes, one line per variant."""
    charts = {}
    for axis, (col, label) in {"trials": (0, "trials"), "minutes": (1, "minutes of tuning")}.items():
        path = os.path.join(out_dir, f"{stem}-curve-{axis}.png")
        series = {r["variant"]: ([c[col] for c in r["curve"]], [c[2] for c in r["curve"]]) for r in results}
        benchlib.line_chart(path, f"shrinkc tune: best model estimate (sum of kernels, 1 thread) vs {axis}",
                            series, label, "ms per inference (estimate)")
        charts[axis] = os.path.basename(path)
    return charts


def write_markdown(path: str, command: str, args, results: list[dict], charts: dict[str, str]) -> None:
    lines = ["# shrinkc tune: tuned vs untuned default compile", "",
             f"- date: {datetime.date.today()}", f"- machine: {benchlib.machine()}", f"- command: `{command}`",
             f"- model: MobileNetV2 width {args.width} input {args.resolution} (zoo, random weights); variants: "
             "dense, 85% zeros in every 1x1 conv (sparse), blocks 5/9/12 linear (merged)",
             "- method: `shrinkc tune` in this process at 1 thread with the budget below; then untuned and tuned "
             "libraries compiled in the same run and timed: 1 thread interleaved run by run after warm-up, "
             "2 threads each in its own process, bursts alternating. Speed-up = untuned median / tuned median.",
             f"- goal: dense >= {GOAL}x with a 30-minute budget", "",
             "| variant | budget (min) | trials | kernels | threads | untuned min / median (ms) | "
             "tuned min / median (ms) | speed-up | estimate (sum of kernels) | tuned max rel. err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for n, t in r["timing"].items():
            u, tu = t["untuned"], t["tuned"]
            lines.append(f"| {r['variant']} | {r['minutes_budget']:g} | {r['trials']} | {r['kernels']} | {n} | "
                         f"{u['min_ms']:.2f} / {u['median_ms']:.2f} | {tu['min_ms']:.2f} / {tu['median_ms']:.2f} | "
                         f"**{speedup(t):.2f}x** | {r['estimate_untuned_ms']:.2f} -> {r['estimate_tuned_ms']:.2f} ms | "
                         f"{r['tuned_max_rel_err']:.1e} |")
    lines += ["", "## Tuning curve", "", "Best model estimate after each trial: the sum over tuned kernels of uses x "
              "best kernel time, without the VM's overhead. Kernels a pass emits already scheduled (sparse spmm, the fused "
              "expand + depthwise kernel, CHW depthwise and first convs) are tuned through their own knobs "
              "(schedules/handwritten.py) and are in the estimate; sparse fully connected (spmv) kernels are not.", "", f"![vs trials]({charts['trials']})", "",
              f"![vs minutes]({charts['minutes']})", "", "## Resuming", "",
              "| variant | first run: new / stopped | rerun over the same database: new / reused | rerun (s) |",
              "|---|---|---|---|"]
    for r in results:
        rr = r.get("rerun")
        lines.append(f"| {r['variant']} | {r['measured']} / {r['stopped'] or 'trials done'} | "
                     + (f"{rr['measured']} / {rr['reused']} | {rr['seconds']:.0f} |" if rr else "not run | |"))
    for r in results:
        lines += ["", f"## {r['variant']}: per-kernel gains (heaviest first)", "",
                  "| kernel (tuned) | uses | default ms | tuned ms | gain | trials |", "|---|---|---|---|---|---|"]
        for kname, uses, d, b, n in r["gains"][:15]:
            lines.append(f"| {kname} | {uses} | {d:.3f} | {b:.3f} | {(d / b if b else 0):.2f}x | {n} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def cmd_tune(args) -> None:
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"bench tune: unknown variant(s) {', '.join(unknown)}; use some of: {', '.join(VARIANTS)}")
    os.makedirs(args.out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="shrinkc-bench-tune-")
    results = [bench_variant(name, args, work) for name in names]
    out = os.path.join(args.out_dir, args.out)
    stem = os.path.splitext(args.out)[0]
    charts = write_charts(results, args.out_dir, stem)
    write_markdown(out, "python tools/bench.py " + " ".join(sys.argv[1:]), args, results, charts)
    with open(os.path.join(args.out_dir, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {out}")
