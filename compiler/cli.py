"""The `shrinkc` command line: compile, run, tune, analyze, targets, inspect, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from targets.errors import ShrinkcError


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="a name from `shrinkc targets` (x86, rpi4, pixel, cuda, "
                   "cuda:sm_XX) or a TVM target JSON dict; default: this machine")
    p.add_argument("--input", action="append", default=[], metavar="NAME:1x3x224x224",
                   help="pin an input's shape (needed for dynamic dimensions)")
    p.add_argument("--cc", default=None, help="cross compiler to link with (default: the target's)")
    p.add_argument("--shrink", choices=["off", "merge", "auto"], default="merge",
                   help="depth shrinking: merge linear conv chains (default), auto also prunes activations")
    p.add_argument("--calib", default=None, help="calibration inputs (.npy with a batch axis, or .npz by input name)")
    p.add_argument("--max-drop", type=float, default=0.01, help="top-1 agreement budget for --shrink auto")
    p.add_argument("--shrink-blocks", default="", help="comma-separated blocks whose activations to remove")
    p.add_argument("--final-activation", action="store_true",
                   help="put one ReLU6 after each block whose activations are removed (DepthShrinker's final "
                        "activation; with --shrink auto, measured with it)")
    p.add_argument("--sparse", choices=["off", "auto"], default="auto", help="sparse 1x1 kernels where profitable")
    p.add_argument("--sparse-min", type=float, default=2 / 3, help="least share of zeros for a sparse 1x1")
    p.add_argument("--tuning-db", default=None, help="apply a tuning database written by `shrinkc tune`")
    p.add_argument("--threads", type=int, default=None, help="threads for verification and timing runs")


def _share(flag: str, value: float) -> float:
    """A share given on the command line (--max-drop, --sparse-min): between 0 and 1, or one error line."""
    if not 0.0 <= value <= 1.0:
        raise ShrinkcError(f"{flag} {value:g} is not a share between 0 and 1",
                           f"write it as a fraction ({flag} 0.01 means 1%)")
    return value


def _compile_kwargs(args) -> dict:
    from compiler.frontend.onnx_import import parse_input_pins
    _share("--max-drop", args.max_drop)
    _share("--sparse-min", args.sparse_min)
    kw = dict(target=args.target, inputs=parse_input_pins(args.input), cc=args.cc, tuning_db=args.tuning_db,
              shrink=args.shrink, sparse=args.sparse, sparse_min=args.sparse_min, max_drop=args.max_drop,
              shrink_blocks=[b for b in args.shrink_blocks.split(",") if b], final_activation=args.final_activation)
    if args.calib:
        from compiler.calibration import load_calibration
        kw["calib"] = load_calibration(args.calib)
    if getattr(args, "dump_ir", None):
        kw["dump_dir"] = args.dump_ir
    return kw


def cmd_compile(args) -> int:
    from compiler import runtime
    runtime.set_threads(args.threads)
    import compiler
    if not args.output.endswith(".so"):
        raise ShrinkcError(f"output '{args.output}' must end in .so", "write -o OUT.so")
    cm = compiler.compile_model(args.model, **_compile_kwargs(args))
    for note in cm.info.notes + [cm.spec.warning] * bool(cm.spec.warning):
        print(f"shrinkc: note: {note}", file=sys.stderr)
    so, meta = cm.export(args.output, args.report)
    print(f"wrote {so} ({os.path.getsize(so) / 1e6:.2f} MB) and {meta} for target '{cm.spec.name}'")
    for name, entry in cm.report["passes"].items():
        counts = ", ".join(f"{k} {v}" for k, v in entry["counts"].items())
        if counts:
            print(f"  {name}: {counts}")
    sparse = cm.metadata()["sparse_layers"]
    if sparse:
        ups = [r["speedup_vs_dense"] for r in sparse if r["speedup_vs_dense"] is not None]
        measured = f", {min(ups):.1f}-{max(ups):.1f}x faster than dense each" if ups else ""
        print(f"  sparse layers: {len(sparse)}{measured} (every one under 'sparse_layers' in {meta})")
    from passes.sparsify_conv1x1 import BATCH_ONE
    batch = [k for k in cm.report["passes"].get("SparsifyConv1x1", {}).get("skipped", []) if BATCH_ONE in k["why"]]
    if batch:
        print(f"  {len(batch)} mostly-zero 1x1 convs run dense: {batch[0]['why'].split('skipped: ')[-1]}")
    needs = cm.metadata()["runtime"]
    if needs["functions"]:
        print(f"  calls {', '.join(needs['functions'])}: a board running it needs {', '.join(needs['libraries'])}")
    if args.verify:
        if not cm.spec.runs_here():
            print(f"verify: skipped, a '{cm.spec.name}' library does not run on this machine "
                  f"({cm.spec.run_hint()})")
        else:
            results = cm.verify()
            for r in results:
                print("verify " + r.line())
            if not all(r.ok for r in results):
                worst = max(results, key=lambda r: r.rel_err)
                raise ShrinkcError(f"verification failed: output '{worst.output}' differs from "
                                   f"{'ONNX Runtime' if cm.info.source == 'onnx' else 'LiteRT'} by "
                                   f"{worst.rel_err:.3g} (relative) at {list(worst.where)}",
                                   "run with --shrink off --sparse off to find the pass, and report it")
    return 0


def cmd_run(args) -> int:
    import numpy as np
    from compiler import runtime
    runtime.set_threads(args.threads)
    if args.rpc_tracker:
        from compiler.remote import run_remote
        return run_remote(args)
    runner = runtime.load(args.library)
    inputs = runtime.random_inputs(runner.inputs, args.seed)
    for item in args.input:
        if "=" not in item:
            raise ShrinkcError(f"cannot read --input '{item}'", "write it as NAME=FILE.npy")
        name, path = item.split("=", 1)
        if not os.path.exists(path):
            raise ShrinkcError(f"input file '{path}' does not exist", "check the path")
        inputs[name] = np.load(path)
    outputs = runner.run(inputs)
    for t, o in zip(runner.outputs, outputs):
        print(f"{t['name']}: shape {list(o.shape)} {o.dtype} checksum {float(np.sum(o, dtype=np.float64)):.6f}")
    if args.save:
        np.savez(args.save, **{t["name"]: o for t, o in zip(runner.outputs, outputs)})
        print(f"saved outputs to {args.save}")
    if args.repeat:
        times = runner.time(inputs, repeat=args.repeat)
        print(f"latency over {args.repeat} runs: min {min(times) * 1e3:.3f} ms, "
              f"median {float(np.median(times)) * 1e3:.3f} ms (threads: {os.environ.get('TVM_NUM_THREADS', 'default')})")
    return 0


def cmd_tune(args) -> int:
    from compiler.tune import cmd_tune as tune_main
    return tune_main(args, _compile_kwargs(args))


def cmd_targets(args) -> int:
    import targets
    for row in targets.describe_all():
        print(f"{row['name']}: {row['description']}")
        print(f"  tvm target: {json.dumps(row['tvm'])}" + (f"  host: {json.dumps(row['host'])}" if row["host"] else ""))
        print(f"  cross compiler: {row['cross_compiler'] or 'host g++'}"
              + (f" (package: {row['compiler_package']})" if row["compiler_package"] else ""))
        print(f"  notes: {row['notes']}")
    print("cuda:sm_XX selects a CUDA architecture; any TVM target JSON dict is accepted too.")
    return 0


def cmd_inspect(args) -> int:
    from compiler.inspect_model import describe
    print(describe(args.model))
    return 0


def cmd_analyze(args) -> int:
    from compiler.analyze import analyze, render
    from compiler.frontend.onnx_import import parse_input_pins
    sparse_min = _share("--sparse-min", args.sparse_min)
    calib = None
    if args.calib:
        from compiler.calibration import load_calibration
        calib = load_calibration(args.calib)
    print(render(analyze(args.model, calib, args.target, parse_input_pins(args.input), sparse_min=sparse_min,
                         final_activation=args.final_activation)))
    return 0


def cmd_demo(args) -> int:
    from compiler.demo import main as demo_main
    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = argparse.ArgumentParser(prog="shrinkc", parents=[common],
                                     description="Compile mobile CNNs into small, fast TVM libraries.")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser

    def sub_parser(name, **kw):
        return add(name, parents=[common], **kw)
    sub.add_parser = sub_parser

    p = sub.add_parser("compile", help="compile a model into OUT.so + OUT.json")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    _add_compile_options(p)
    p.add_argument("--verify", action="store_true", help="compare with ONNX Runtime / LiteRT on a random input")
    p.add_argument("--report", default=None, help="write the metadata plus compile phase timings here")
    p.add_argument("--dump-ir", default=None, help="write the IR after each phase into this folder")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", help="run a compiled library (here, or on a board through an RPC tracker)")
    p.add_argument("library")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    p.add_argument("--save", default=None, help="save the outputs to this .npz")
    p.add_argument("--repeat", type=int, default=0, help="time this many runs; print min and median latency")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT")
    p.add_argument("--rpc-key", default=None)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tune", help="tune a model's kernels for a target, here or on boards behind an RPC tracker")
    p.add_argument("model")
    _add_compile_options(p)
    p.add_argument("--db", required=True, help="tuning database folder (created; reruns continue from it)")
    p.add_argument("--trials", type=int, default=64, help="knob settings to time after each kernel's default")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES", help="stop after this long")
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="time on boards behind this tracker")
    p.add_argument("--rpc-key", default=None, help="the boards' key at the tracker (e.g. rpi4-emu)")
    p.add_argument("--builders", type=int, default=1, help="parallel candidate builds (MetaSchedule)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("targets", help="list the named targets")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("inspect", help="print a model's inputs, outputs and op counts")
    p.add_argument("model")
    p.add_argument("--input", action="append", default=[], metavar="NAME:1x3x224x224")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("analyze", help="per block: activation linearity, cost before/after merging, decision; "
                                       "per 1x1 conv: sparsity, block fill, sparse or dense and why; CHW regions")
    p.add_argument("model")
    p.add_argument("--calib", default=None, help="calibration inputs (.npy with a batch axis, or .npz by input name)")
    p.add_argument("--target", default=None, help="a name from `shrinkc targets` or a TVM target JSON dict")
    p.add_argument("--input", action="append", default=[], metavar="NAME:1x3x224x224")
    p.add_argument("--sparse-min", type=float, default=2 / 3, help="least share of zeros for a sparse 1x1")
    p.add_argument("--final-activation", action="store_true",
                   help="measure blocks as `compile --final-activation` removes them (a ReLU6 after each)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="compile, verify and time the built-in example model")
    p.add_argument("--out", default="out/demo", help="folder for the demo's model and library")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SHRINKC_DEBUG") == "1"
    try:
        return args.func(args)
    except ShrinkcError as err:
        if debug:
            print(getattr(err, "dropped_traceback", ""), end="", file=sys.stderr)   # native_log.released's
            traceback.print_exc()
        print(f"shrinkc: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shrinkc: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in shrinkc or TVM: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
        where, hint = "", ""
        if getattr(err, "shrinkc_where", None):
            phase, name = err.shrinkc_where
            where = f" in pass {name} (phase {phase})"
            hint = {"shrink": "; --shrink off skips that phase", "sparse": "; --sparse off skips that phase"
                    }.get(phase, "")
        print(f"shrinkc: internal error{where}: {type(err).__name__}: {first} (run with --debug for the "
              f"traceback and report it{hint})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
