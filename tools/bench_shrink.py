"""`python tools/bench.py shrink`: DepthShrinker's DS-F setting, compiled with merging (+ cost selection) vs without.

Each case is one ONNX model compiled twice by shrinkc: `--shrink merge` (the default: linear conv
chains become one dense conv where the cost interface says that is faster) and `--shrink off`.
Both libraries are checked against ONNX Runtime on the same input and timed against each other:
1 thread interleaved in one fresh process, 2+ threads in separate processes alternating (benchlib).
Speed-up = off median / merge median (above 1: merging is faster).

Cases: MobileNetV2-1.4 and EfficientNet-Lite0 with every expansion block linear (no ReLU6 inside:
DS-F), and the plain dense MobileNetV2 1.0 (nothing to merge: merging must not slow it).
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

import benchlib

EXACT_REL_ERR = 1e-4    # merging is exact: max relative error against ONNX Runtime must stay below this
MODES = ("merge", "off")
# case -> (zoo model, build options, every expansion block linear?)
CASES = {
    "mobilenet_v2_1.4-dsf": ("mobilenet_v2", {"width": 1.4}, True),
    "efficientnet_lite0-dsf": ("efficientnet_lite0", {}, True),
    "mobilenet_v2-dense": ("mobilenet_v2", {}, False),
}
DEFAULT_CASES = ",".join(CASES)


def build_case(case: str, resolution: int | None = None):
    """The case's ONNX model (random weights, seed 0); DS-F cases have every expansion block linear."""
    import zoo
    name, opts, dsf = CASES[case]
    opts = {**opts, **({"resolution": resolution} if resolution else {})}
    model = zoo.build(name, **opts)
    if dsf:
        expands = {n.name for n in model.graph.node if re.fullmatch(r"block\d+\.expand", n.name)}
        model = with_probe(zoo.build(name, linear_blocks=tuple(range(len(expands))), **opts), "head")
    return model


def with_probe(model, conv: str):
    """The model with the input of node `conv` as an extra output, checked against ONNX Runtime like the logits.

    NOTE: with random weights and every block linear, the head's ReLU6 saturates almost everywhere, so
    the logits alone would hide merging errors (merge and off gave bit-identical logits); the features
    before the head do not."""
    import onnx
    node = next(n for n in model.graph.node if n.name == conv)
    inferred = onnx.shape_inference.infer_shapes(model)
    model.graph.output.append(next(v for v in inferred.graph.value_info if v.name == node.input[0]))
    return model


def merge_counts(passes: dict) -> dict:
    """Chains merged, declined by the cost (not faster / too many FLOPs), and not mergeable (not exact)."""
    entry = passes.get("MergeLinearChains", {})
    merged = [c for c in entry.get("changes", []) if c["what"] == "merged_chain"]
    skipped = entry.get("skipped", [])
    by_cost = [s for s in skipped if "not faster" in s["why"] or "FLOPs" in s["why"]]
    return {"merged": len(merged), "convs_merged": sum(len(c["layers"]) for c in merged),
            "declined_by_cost": len(by_cost), "not_mergeable": len(skipped) - len(by_cost),
            "declined": [f"{s['layer']}: {s['why']}" for s in by_cost]}


def run_case(label: str, model, threads: list[int], rounds: int, work: str, cost=None) -> dict:
    """Compile `model` with shrink merge and off, verify both against ONNX Runtime, time them against each other.

    cost: the compiler.cost.Cost the merge decisions ask (None: the default one, cached in the home folder)."""
    import compiler
    from compiler import runtime
    result = {"model": label, "modes": {}, "threads": {}}
    sos, inputs = {}, None
    for mode in MODES:
        t0 = time.perf_counter()
        cm = compiler.compile_model(model, shrink=mode, cost=cost)
        compile_s = time.perf_counter() - t0
        if inputs is None:
            inputs = runtime.random_inputs(cm.metadata()["inputs"], seed=0)
        sos[mode], _ = cm.export(os.path.join(work, f"{label}-{mode}.so"))
        errs = {c.output: c.rel_err for c in cm.verify(inputs)}
        result["modes"][mode] = {"compile_s": compile_s, "max_rel_err": max(errs.values()), "rel_err": errs,
                                 "size_mb": os.path.getsize(sos[mode]) / 1e6,
                                 **merge_counts(cm.report["passes"])}
    result["exact"] = result["modes"]["merge"]["max_rel_err"] <= EXACT_REL_ERR
    npz = os.path.join(work, f"{label}_inputs.npz")
    np.savez(npz, **inputs)
    for n in threads:
        if n == 1:
            times = interleave_in_child(sos, npz, rounds)
            group = 1
        else:
            group = benchlib.BURST
            workers = {mode: benchlib.Worker("shrinkc", sos[mode], npz, n) for mode in MODES}
            try:
                times = benchlib.alternate(workers, rounds)
            finally:
                for w in workers.values():
                    w.close()
        st = {k: benchlib.stats(v) for k, v in times.items()}
        st["speedup"] = 1.0 / benchlib.paired_ratio(times["merge"], times["off"], group)
        st["speedup_of_medians"] = st["off"]["median_ms"] / st["merge"]["median_ms"]
        result["threads"][n] = st
    return result


def interleave_in_child(sos: dict, npz: str, rounds: int) -> dict[str, list[float]]:
    """1 thread: the libraries interleaved in ONE fresh process (benchlib.interleave), away from the compiles.

    The compiling process holds the compiled modules, cost measurements and ONNX Runtime sessions; a clean
    child times only the two libraries."""
    code = ("import json, os, sys; os.environ['TVM_NUM_THREADS'] = '1'; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import numpy as np, benchlib, compiler\n"
            "inputs = dict(np.load(sys.argv[3])); fns = {}\n"
            "for mode, so in json.loads(sys.argv[5]).items():\n"
            "    r = compiler.load(so); f, a = r.vm['main'], r._args(inputs); fns[mode] = (lambda f=f, a=a: f(*a))\n"
            "print(json.dumps(benchlib.interleave(fns, int(sys.argv[4]))))")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(here), here, npz, str(rounds), json.dumps(sos)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def print_case(r: dict) -> None:
    m = r["modes"]["merge"]
    print(f"{r['model']}: {m['merged']} chains merged ({m['convs_merged']} convs), {m['declined_by_cost']} declined "
          f"by cost, {m['not_mergeable']} not mergeable; max rel err merge {m['max_rel_err']:.1e} off "
          f"{r['modes']['off']['max_rel_err']:.1e} (by output: merge "
          f"{', '.join(f'{k} {v:.1e}' for k, v in m['rel_err'].items())})", flush=True)
    for n, t in r["threads"].items():
        print(f"  x{n}: merge {t['merge']['median_ms']:.2f} ms, off {t['off']['median_ms']:.2f} ms, "
              f"speed-up {t['speedup']:.2f}x", flush=True)


def results_md(command: str, results: list[dict], resolution: int | None, fresh: bool = False) -> str:
    lines = ["## DS-F: merging linear blocks (`tools/bench.py shrink`)", "",
             f"- date: {datetime.date.today()}", f"- machine: {benchlib.machine()}", f"- command: `{command}`",
             f"- input resolution: {resolution or 'each model’s own (224)'}; random weights (seed 0)",
             "- method: each model compiled by shrinkc twice, `shrink=merge` (default: merge + cost selection) and "
             "`shrink=off`; 1 thread: both libraries in one fresh process, runs interleaved after warm-up; 2+ threads: "
             "each library in its own process, bursts of 5 alternating. Speed-up = 1 / median over rounds of (merge "
             "median / off median in that round): slow phases of this shared machine hit both libraries of a round "
             "alike; the ratio of the two overall medians is shown beside it. "
             f"Error: max |ours - ONNX Runtime| / max |ONNX Runtime| over the outputs (merging must stay <= "
             f"{EXACT_REL_ERR:g}); DS-F models also output the features before the head, since with random weights "
             "the head's ReLU6 saturates and the logits alone would hide errors. "
             "Merge decisions are measured at 1 thread (used for every thread count)"
             f"{', anew in this run' if fresh else ' and cached in ~/.cache/shrinkc/costs.json'}.", "",
             "| model | threads | merge median (ms) | off median (ms) | speed-up | of medians | chains merged (convs) | "
             "declined by cost | not mergeable | rel. err merge / off | compile s merge / off |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, o = r["modes"]["merge"], r["modes"]["off"]
        for n, t in r["threads"].items():
            lines.append(f"| {r['model']} | {n} | {t['merge']['median_ms']:.2f} | {t['off']['median_ms']:.2f} | "
                         f"**{t['speedup']:.2f}x** | {t['speedup_of_medians']:.2f}x | {m['merged']} ({m['convs_merged']}) | {m['declined_by_cost']} | "
                         f"{m['not_mergeable']} | {m['max_rel_err']:.1e} / {o['max_rel_err']:.1e}"
                         f"{'' if r['exact'] else ' **NOT EXACT**'} | {m['compile_s']:.0f} / {o['compile_s']:.0f} |")
    declined = [(r["model"], d) for r in results for d in r["modes"]["merge"]["declined"]]
    if declined:
        lines += ["", "Chains the cost declined:", ""] + [f"- {mdl}: {d}" for mdl, d in declined]
    return "\n".join(lines)


def write_section(path: str, key: str, text: str) -> None:
    """Put `text` into the markdown file as section `key`, replacing that section from an earlier run."""
    begin, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    old = open(path).read() if os.path.exists(path) else "# DepthShrinker in shrinkc: results\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(new)


def cmd_shrink(args, command: str) -> None:
    import tempfile
    work = tempfile.mkdtemp(prefix="shrinkc-bench-shrink-")
    threads = [int(t) for t in args.threads.split(",")]
    cost = None
    if args.fresh_costs:   # decisions measured now, not read from an earlier (maybe busier) run's cache
        import targets
        from compiler.cost import Cost
        cost = Cost(targets.resolve(None, None), cache_dir=os.path.join(work, "cost-cache"))
    results = []
    for case in args.cases.split(","):
        t0 = time.perf_counter()
        r = run_case(case, build_case(case, args.resolution), threads, args.rounds, work, cost)
        print_case(r)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        results.append(r)
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, args.out)
    write_section(out, "shrink", results_md(command, results, args.resolution, args.fresh_costs))
    print(f"wrote {out}")


def add_parser(sub, root: str) -> None:
    p = sub.add_parser("shrink", help="DS-F (all block activations removed): merge vs shrink off")
    p.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--resolution", type=int, default=None, help="input size (default: the models' own, 224)")
    p.add_argument("--fresh-costs", action="store_true",
                   help="measure every merge decision anew (default: reuse ~/.cache/shrinkc/costs.json)")
    p.add_argument("--out-dir", default=os.path.join(root, "benchmarks"))
    p.add_argument("--out", default="RESULTS-shrink.md")
    p.set_defaults(func=lambda a: cmd_shrink(a, "python tools/bench.py " + " ".join(sys.argv[1:])))
