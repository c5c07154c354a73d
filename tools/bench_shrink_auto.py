"""`python tools/bench.py shrink-auto`: `--shrink auto` on a CNN trained on digits (tools/train_digits.py).

The trained model is compiled through the `shrinkc compile` command line twice: `--shrink auto
--calib <calibration split> --max-drop D` and `--shrink merge` (lossless). On the HELD-OUT split,
both libraries and ONNX Runtime (the exported model itself) are run sample by sample: accuracy of
each and top-1 agreement of auto with the original. Latency: the two libraries against each other,
1 thread interleaved in this process, 2+ threads in separate processes alternating.
Speed-up = merge-only median / auto median.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile

import numpy as np

import bench_shrink
import benchlib
import train_digits

MODES = ("auto", "merge")
BURST_PROCESSES = 200   # runs per burst when each library runs in its own process (2+ threads)


def compile_cli(onnx_path: str, mode: str, calib: str, max_drop: float, work: str) -> tuple[str, dict]:
    """Run `shrinkc compile` (in this process) and return the library and its report."""
    from compiler import cli
    so, report = os.path.join(work, f"digits-{mode}.so"), os.path.join(work, f"digits-{mode}.report.json")
    argv = ["compile", onnx_path, "-o", so, "--shrink", mode, "--report", report]
    if mode == "auto":
        argv += ["--calib", calib, "--max-drop", str(max_drop)]
    print("shrinkc " + " ".join(argv), flush=True)
    if cli.main(argv) != 0:
        raise SystemExit(f"shrinkc compile --shrink {mode} failed")
    with open(report) as f:
        return so, json.load(f)


def top1(run, xs: np.ndarray) -> np.ndarray:
    return np.array([int(np.argmax(run({"input": x[None]}))) for x in xs])


def evaluate(onnx_path: str, sos: dict, xs: np.ndarray, ys: np.ndarray) -> dict:
    """Held-out accuracy of ONNX Runtime and each library, and each library's top-1 agreement with ONNX Runtime."""
    import onnxruntime as ort

    import compiler
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    ref = top1(lambda feed: sess.run(None, feed)[0], xs)
    out = {"original": {"accuracy": float(np.mean(ref == ys))}}
    for mode, so in sos.items():
        runner = compiler.load(so)
        pred = top1(lambda feed: runner.run(feed)[0], xs)
        out[mode] = {"accuracy": float(np.mean(pred == ys)), "agreement": float(np.mean(pred == ref))}
    return out


def removed_blocks(report: dict) -> tuple[list[dict], float | None]:
    """Per block what calibration measured (and whether it was removed), and the calibration agreement."""
    changes = report["passes"].get("ChooseBlocks", {}).get("changes", [])
    measured = [c for c in changes if c["what"] == "measured"]
    agreement = next((c["top1_agreement"] for c in changes if c["what"] == "agreement"), None)
    return measured, agreement


def time_libraries(sos: dict, x: np.ndarray, threads: list[int], rounds: int, work: str) -> dict:
    inputs = {"input": x[None]}
    npz = os.path.join(work, "digits_input.npz")
    np.savez(npz, **inputs)
    out = {}
    for n in threads:
        # NOTE: at 2 threads bursts of 20 runs (about 2 ms of this model) read two identical libraries far apart
        # (auto removed nothing); a guess: each burst starts by waking a stopped process's thread pool, a large
        # share of so short a burst. Bursts of 200 runs make it a small share
        burst = 10 if n == 1 else BURST_PROCESSES
        if n == 1:
            fns = benchlib.library_calls(sos, inputs)
            times = benchlib.interleave(fns, rounds, burst=burst)
        else:
            workers = {mode: benchlib.Worker("shrinkc", so, npz, n) for mode, so in sos.items()}
            try:
                times = benchlib.alternate(workers, rounds, burst=burst)
            finally:
                for w in workers.values():
                    w.close()
        st = {k: benchlib.stats(v) for k, v in times.items()}
        # NOTE: paired per round, as bench_shrink: a slow phase of this shared machine (whole bursts slowed at
        # 2 threads) hits both libraries of a round; the ratio of overall medians read two identical libraries
        # 0.56x apart at 2 threads
        st["speedup"] = benchlib.paired_ratio(times["merge"], times["auto"], burst)
        st["speedup_of_medians"] = st["merge"]["median_ms"] / st["auto"]["median_ms"]
        out[n] = st
    return out


def finetuned(info: dict) -> str:
    """How train_digits' DepthShrinker-style fine-tuning went, for the page's model line ('' without it)."""
    if not info.get("linear_blocks"):   # absent from train.json files written before the option
        return ""
    return (f"then DepthShrinker-style fine-tuning with blocks "
            f"{', '.join(f'_blocks_blocks_{i}' for i in info['linear_blocks'])} (the least needed by training-split "
            f"loss) trained without their activations, with a penalty (weight {info['range_weight']}) on their "
            "ReLU6 inputs' distance from [0, 6], every ReLU6 kept in the export, shrinkc not told which blocks; ")


def results_md(command: str, info: dict, max_drop: float, measured: list[dict], calib_agreement, ev: dict,
               times: dict, merged: dict) -> str:
    removed = [m["layer"] for m in measured if m["removed"]]
    title = "a CNN fine-tuned the DepthShrinker way" if info.get("linear_blocks") else "a trained CNN"
    more_epochs = f" + {info['finetune_epochs']} fine-tuning epochs" if info.get("linear_blocks") else ""
    lines = [f"## `--shrink auto` on {title} (`tools/bench.py shrink-auto`)", "",
             f"- date: {datetime.date.today()}", f"- machine: {benchlib.machine()}", f"- command: `{command}`",
             f"- model: tools/train_digits.py, {len(info['blocks'])} inverted residual blocks (ReLU6, expansion "
             f"{info['expansion']}), scikit-learn "
             f"digits enlarged to {info['resolution']}x{info['resolution']}, {info['epochs']} epochs"
             f"{more_epochs} on 1 thread in "
             f"{info['train_s']} s, linearity penalty {info['linearity']}, {finetuned(info)}exported with torch.onnx "
             "(BN folded); "
             f"trained on {info['train_samples']} images; calibration = {info['calib_samples']} other images "
             f"(not trained on), evaluation = the {info['test_samples']} held-out images",
             f"- `--shrink auto --max-drop {max_drop}` removed {len(removed)} of {len(measured)} blocks: "
             f"{', '.join(removed) or 'none'} (agreement on the calibration data {calib_agreement}); "
             f"chains merged: auto {merged['auto']}, merge-only {merged['merge']}",
             "- a removed activation becomes its least-squares per-channel affine fit on the calibration data "
             "(compiler/shrink_auto.py), folded into the conv before it", "",
             "| held-out | accuracy | top-1 agreement with the original |", "|---|---|---|",
             f"| original (ONNX Runtime) | {ev['original']['accuracy']:.4f} | - |",
             f"| shrinkc --shrink merge | {ev['merge']['accuracy']:.4f} | {ev['merge']['agreement']:.4f} |",
             f"| shrinkc --shrink auto | {ev['auto']['accuracy']:.4f} | **{ev['auto']['agreement']:.4f}** |", "",
             "Speed-up = median over rounds of (merge-only median / auto median in that round), 1 thread: both "
             "libraries in this process, bursts of 10 interleaved; 2 threads: each in its own process, bursts of "
             f"{BURST_PROCESSES} alternating; 'of medians' = ratio of the overall medians.", "",
             "| threads | auto median (ms) | merge-only median (ms) | speed-up (merge / auto) | of medians |",
             "|---|---|---|---|---|"]
    for n, t in times.items():
        lines.append(f"| {n} | {t['auto']['median_ms']:.4f} | {t['merge']['median_ms']:.4f} | "
                     f"**{t['speedup']:.2f}x** | {t['speedup_of_medians']:.2f}x |")
    lines += ["", "| block | linearity (1 - max non-linear share) | agreement alone (fitted removal) | removed |", "|---|---|---|---|"]
    lines += [f"| {m['layer']} | {m['linearity']:.4f} | {m['agreement_alone']:.4f} | "
              f"{'yes' if m['removed'] else 'no'} |" for m in measured]
    return "\n".join(lines)


def cmd_shrink_auto(args) -> None:
    work = args.work or tempfile.mkdtemp(prefix="shrinkc-bench-auto-")
    info = train_digits.train(work, args.epochs, args.resolution, args.seed, args.linearity, args.expansion,
                              args.linear_blocks, args.finetune_epochs, args.range_weight)
    print(f"trained in {info['train_s']} s, held-out accuracy {info['torch_test_accuracy']:.4f}", flush=True)
    sos, reports = {}, {}
    for mode in MODES:
        sos[mode], reports[mode] = compile_cli(info["onnx"], mode, info["calib_x"], args.max_drop, work)
    measured, calib_agreement = removed_blocks(reports["auto"])
    merged = {m: reports[m]["passes"].get("MergeLinearChains", {}).get("counts", {}).get("merged_chain", 0)
              for m in MODES}
    xte, yte = np.load(info["test_x"]), np.load(info["test_y"])
    ev = evaluate(info["onnx"], sos, xte, yte)
    print(f"held-out: original {ev['original']['accuracy']:.4f}, auto {ev['auto']['accuracy']:.4f} "
          f"(agreement {ev['auto']['agreement']:.4f}), removed {[m['layer'] for m in measured if m['removed']]}",
          flush=True)
    times = time_libraries(sos, xte[0], [int(t) for t in args.threads.split(",")], args.rounds, work)
    for n, t in times.items():
        print(f"  x{n}: auto {t['auto']['median_ms']:.4f} ms, merge {t['merge']['median_ms']:.4f} ms, "
              f"speed-up {t['speedup']:.2f}x", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, args.out)
    command = "python tools/bench.py " + " ".join(sys.argv[1:])
    section = "shrink-auto-finetuned" if args.linear_blocks else "shrink-auto"
    bench_shrink.write_section(out, section, results_md(command, info, args.max_drop, measured,
                                                              calib_agreement, ev, times, merged))
    print(f"wrote {out}")


def add_parser(sub, root: str) -> None:
    p = sub.add_parser("shrink-auto", help="--shrink auto on a CNN trained on scikit-learn's digits")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--resolution", type=int, default=16, help="digits enlarged to this size (multiple of 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--linearity", type=float, default=0.0,
                   help="weight of train_digits' ReLU6 linearity penalty (0: plain training)")
    p.add_argument("--expansion", type=int, default=train_digits.EXPANSION, help="expansion factor of every block")
    p.add_argument("--linear-blocks", type=int, default=0,
                   help="train_digits' DepthShrinker-style fine-tuning of this many blocks without their "
                        "activations (0: none); the page gets its own section")
    p.add_argument("--finetune-epochs", type=int, default=train_digits.FINETUNE_EPOCHS)
    p.add_argument("--range-weight", type=float, default=train_digits.RANGE_WEIGHT)
    p.add_argument("--max-drop", type=float, default=0.01)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--work", default=None, help="folder for the model, splits and libraries (default: a temp dir)")
    p.add_argument("--out-dir", default=os.path.join(root, "benchmarks"))
    p.add_argument("--out", default="RESULTS-shrink.md")
    p.set_defaults(func=cmd_shrink_auto)
