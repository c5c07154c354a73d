"""Benchmarks: shrinkc against ONNX Runtime (and LiteRT) on the same inputs, as ratios from one run.

  python tools/bench.py models   [--models mobilenet_v2,...] [--threads 1,2] [--rounds 30] [--tflite F]
  python tools/bench.py sparse   [--sparsities 70,80,85,90,95] [--blocks 1,4] [--threads 1,2]  (tools/bench_sparse.py)
  python tools/bench.py tune     [--minutes 30] [--variant-minutes 10] [--variants dense,sparse,merged]
  python tools/bench.py shrink   [--cases mobilenet_v2_1.4-dsf,...] [--threads 1,2] [--rounds 30] [--resolution R]
  python tools/bench.py shrink-auto [--epochs 15] [--max-drop 0.01] [--threads 1,2] [--rounds 50] [--linear-blocks K]
  python tools/bench.py bound    [--model F.onnx] [--rounds 50]  (tools/bench_bound.py: the FMA-peak floor)

1 thread: both runtimes in this process, interleaved run by run after warm-up. More threads: each
runtime in a process of its own, bursts alternating (two thread pools in one process fight over
the cores). Results and the command that made them go to benchmarks/*.md, charts beside them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

os.environ["TVM_NUM_THREADS"] = "1"   # this process times at 1 thread; workers set their own
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import bench_bound  # noqa: E402
import bench_sparse  # noqa: E402
import bench_shrink  # noqa: E402
import bench_shrink_auto  # noqa: E402
import benchlib  # noqa: E402
import bench_tune  # noqa: E402

DEFAULT_MODELS = "mobilenet_v2,mobilenet_v3_large,efficientnet_lite0,efficientnet_b0"


def bench_model(name: str, model_path: str, threads: list[int], rounds: int, work: str, charts: str,
                compile_options: dict | None = None, tflite: str | None = None) -> dict:
    import onnxruntime as ort

    import compiler
    from compiler import runtime
    t0 = time.perf_counter()
    cm = compiler.compile_model(model_path, **(compile_options or {}))
    compile_s = time.perf_counter() - t0
    so, _ = cm.export(os.path.join(work, f"{name}.so"))
    inputs = runtime.random_inputs(cm.metadata()["inputs"], seed=0)
    npz = os.path.join(work, f"{name}_inputs.npz")
    np.savez(npz, **inputs)
    err = max(r.rel_err for r in cm.verify(inputs))
    result = {"model": name, "compile_s": compile_s, "max_rel_err": err, "size_mb": os.path.getsize(so) / 1e6,
              "threads": {}}
    runner = compiler.load(so)
    for n in threads:
        if n == 1:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
            f, args = runner.vm["main"], runner._args(inputs)
            fns = {"shrinkc": lambda: f(*args), "onnxruntime": lambda: sess.run(None, inputs)}
            if tflite:
                from ai_edge_litert.interpreter import Interpreter
                interp = Interpreter(model_path=tflite, num_threads=1)
                interp.allocate_tensors()
                for d, v in zip(interp.get_input_details(), inputs.values()):
                    interp.set_tensor(d["index"], v.transpose(0, 2, 3, 1).copy() if v.ndim == 4 else v)
                fns["litert"] = interp.invoke
            times = benchlib.interleave(fns, rounds)
            group = 1
        else:
            runtimes = {"shrinkc": ("shrinkc", so), "onnxruntime": ("onnxruntime", model_path)}
            times = benchlib.alternate_runtimes(runtimes, npz, n, rounds)
            group = benchlib.BURST
        result["threads"][n] = {k: benchlib.stats(v) for k, v in times.items()}
        result["threads"][n]["paired_ratio"] = benchlib.paired_ratio(times["shrinkc"], times["onnxruntime"], group)
    # per-kernel times need the VM's hooks: a second build of the same model, with them (artifact.vm_mode)
    profiled = compiler.compile_model(model_path, profiling=True, **(compile_options or {}))
    layers = profiled.runner().profile(inputs, repeat=10)
    families: dict[str, float] = {}
    for row in layers:
        family = benchlib.kernel_family(row["kernel"])
        families[family] = families.get(family, 0.0) + row["ms"]
    result["families"] = sorted(families.items(), key=lambda kv: -kv[1])
    result["layers"] = layers
    chart = os.path.join(charts, f"{name}_layers.png")
    benchlib.bar_chart(chart, f"{name}: time per kernel, shrinkc, 1 thread ({benchlib.machine().split(',')[0]})",
                       [(r["kernel"][:48], r["ms"]) for r in layers if r["ms"] > 0.005])
    result["chart"] = os.path.relpath(chart, os.path.dirname(charts) if False else charts)
    return result


def write_models_md(path: str, command: str, results: list[dict]) -> None:
    lines = [f"# shrinkc vs ONNX Runtime, default compile (no tuning)", "",
             f"- date: {datetime.date.today()}", f"- machine: {benchlib.machine()}",
             f"- command: `{command}`",
             "- method: 1 thread in one process, runs interleaved after warm-up; 2+ threads: each runtime in its "
             "own process, bursts of 5 runs alternating with pauses between. Ratio = median over rounds of "
             "(shrinkc median / ONNX Runtime median in that round), below 1 = shrinkc faster: this shared machine "
             "has slow phases lasting seconds, which hit both runtimes of a round alike; the ratio of the two "
             "overall medians is shown beside it.", ""]
    lines += ["| model | threads | shrinkc min / median (ms) | ONNX Runtime min / median (ms) | ratio | "
              "ratio of medians | compile (s) | max rel. err | .so MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for n, t in r["threads"].items():
            s, o = t["shrinkc"], t["onnxruntime"]
            extra = f" (LiteRT {t['litert']['median_ms']:.2f})" if "litert" in t else ""
            lines.append(f"| {r['model']} | {n} | {s['min_ms']:.2f} / {s['median_ms']:.2f} | {o['min_ms']:.2f} / "
                         f"{o['median_ms']:.2f}{extra} | **{t['paired_ratio']:.2f}** | {s['median_ms'] / o['median_ms']:.2f} | "
                         f"{r['compile_s']:.1f} | {r['max_rel_err']:.1e} | {r['size_mb']:.1f} |")
    for r in results:
        lines += ["", f"## {r['model']}: where the time goes (shrinkc, 1 thread)", "",
                  f"![per kernel]({r['chart']})", "", "| kernel family | ms |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in r["families"] if v >= 0.001]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def cmd_models(args) -> None:
    import onnx

    import zoo
    os.makedirs(args.out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="shrinkc-bench-")
    out = os.path.join(args.out_dir, args.out)
    results = []
    for name in args.models.split(","):
        path = name if os.path.exists(name) else os.path.join(work, f"{name}.onnx")
        if not os.path.exists(name):
            onnx.save(zoo.build(name), path)
        label = os.path.splitext(os.path.basename(name))[0]
        tflite = args.tflite
        if tflite is None and name == "mobilenet_v2" and not args.no_litert:
            # LiteRT/XNNPACK on the same network (NHWC, its own random weights: speed does not depend on them)
            from zoo.tflite_writer import mobilenet_v2_tflite
            tflite = os.path.join(work, "mobilenet_v2.tflite")
            with open(tflite, "wb") as f:
                f.write(mobilenet_v2_tflite(width=1.0, resolution=224))
        r = bench_model(label, path, [int(t) for t in args.threads.split(",")], args.rounds, work,
                        os.path.dirname(out), tflite=tflite)     # charts beside the page that names them
        results.append(r)
        for n, t in r["threads"].items():
            print(f"{label} x{n}: shrinkc {t['shrinkc']['median_ms']:.2f} ms, onnxruntime "
                  f"{t['onnxruntime']['median_ms']:.2f} ms, ratio {t['paired_ratio']:.2f}"
                  f", compile {r['compile_s']:.1f} s", flush=True)
    write_models_md(out, "python tools/bench.py " + " ".join(sys.argv[1:]), results)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True)
    p = sub.add_parser("models", help="built-in models: default compile vs ONNX Runtime")
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--tflite", default=None, help="also time LiteRT on this .tflite (same network)")
    p.add_argument("--no-litert", action="store_true", help="skip LiteRT on the built-in MobileNetV2 .tflite")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks"))
    p.add_argument("--out", default="RESULTS.md")
    p.set_defaults(func=cmd_models)
    bench_sparse.add_parser(sub, os.path.join(ROOT, "benchmarks"))
    p = sub.add_parser("tune", help="MobileNetV2 variants: tuning curve, tuned vs untuned compile",
                       description=bench_tune.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_tune.add_arguments(p)
    p.set_defaults(func=bench_tune.cmd_tune)
    bench_shrink.add_parser(sub, ROOT)
    bench_shrink_auto.add_parser(sub, ROOT)
    bench_bound.add_parser(sub, ROOT)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
