"""`python tools/bench.py bound`: the most any schedule could speed a model up on this machine, at 1 thread.

Direct convolution and matrix products cost one multiply-add per weight per output pixel, and one core
does at most `peak` float32 multiply-adds a second: its fused multiply-add rate, measured here by a TIR
kernel that does nothing else (16 independent vector accumulators held in registers, no memory traffic).
A model of M such multiply-adds therefore takes at least M / peak seconds however its kernels are
scheduled, a floor that grants free memory traffic, free depthwise convs beyond their multiply-adds and
no time between kernels. Measured time / floor (the model and the peak kernel run in turn, a ratio per round,
their median) bounds what tuning the kernels can gain over the default compile (issue 6 asks >= 1.2x on
MobileNetV2 1.0 224). Not covered: algorithms with fewer multiplies
(Winograd, Strassen), lower precision.

The page also lists the default compile's kernels by family from a profiled run (interpreted VM, a
little slower): time per inference, the multiply-adds their loops execute (TVM's estimate_tir_flops / 2:
half their float operations, so padded channels and epilogues count too) and the share of the peak that is.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile

import numpy as np

import benchlib

ACCUMULATORS = 16      # vector accumulators of the peak kernel: enough to cover the FMA latency on every core
PEAK_STEPS = 1 << 18   # FMA steps per accumulator per call (about a millisecond with 16 lanes)


def peak_kernel(lanes: int, accumulators: int = ACCUMULATORS, steps: int = PEAK_STEPS):
    """A PrimFunc of `accumulators` x `lanes` independent multiply-add chains, `steps` each, kept in registers."""
    from tvm.script import tirx as T
    n = accumulators * lanes

    @T.prim_func
    def fma_peak(a: T.Buffer((n,), "float32"), out: T.Buffer((n,), "float32")):
        T.func_attr({"tirx.noalias": True})
        acc = T.alloc_buffer((n,), "float32", scope="local")
        for k in T.unroll(accumulators):
            for j in T.vectorized(lanes):
                acc[k * lanes + j] = a[k * lanes + j]
        for _ in T.serial(steps):
            for k in T.unroll(accumulators):
                for j in T.vectorized(lanes):
                    acc[k * lanes + j] = acc[k * lanes + j] * T.float32(0.999999) + T.float32(1e-7)
        for k in T.unroll(accumulators):
            for j in T.vectorized(lanes):
                out[k * lanes + j] = acc[k * lanes + j]
    return fma_peak


def peak_call(spec, steps: int = PEAK_STEPS):
    """(a no-argument call of the peak kernel, the multiply-adds one call does)."""
    import tvm

    from compiler import artifact  # noqa: F401  (the target's intrinsic lowerings, as every build has)
    lanes = spec.vector_lanes
    lib = tvm.compile(tvm.IRModule({"main": peak_kernel(lanes, ACCUMULATORS, steps)}), target=spec.tvm_target())
    dev = tvm.cpu()
    n = ACCUMULATORS * lanes
    a = tvm.runtime.tensor(np.ones(n, np.float32), dev)
    out = tvm.runtime.tensor(np.zeros(n, np.float32), dev)
    f = lib["main"]
    f(a, out)
    if not np.all(np.isfinite(out.numpy())):
        raise SystemExit("the peak kernel computed non-finite values")
    return (lambda: f(a, out)), n * steps


def model_macs(mod) -> dict[str, int]:
    """Multiply-adds of the convs and matrix products of an imported model (Relax, static shapes), by op."""
    import tvm
    from tvm import relax

    from passes.rewriting import static_shape

    def shape(expr) -> list[int]:
        dims = static_shape(expr)
        if dims is None:
            raise SystemExit(f"{expr.name_hint}: not a static shape, cannot count its multiply-adds "
                             "(pin the input's dimensions)")
        return dims

    out: dict[str, int] = {}
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if not isinstance(v, relax.Call) or not isinstance(v.op, tvm.ir.Op):
                continue
            name = v.op.name
            if name == "relax.nn.conv2d":
                macs = int(np.prod(shape(b.var))) * int(np.prod(shape(v.args[1])[1:]))  # Cin/groups x kh x kw each
            elif name == "relax.matmul":
                macs = int(np.prod(shape(b.var))) * shape(v.args[0])[-1]
            else:
                continue
            out[name.split(".")[-1]] = out.get(name.split(".")[-1], 0) + macs
    return out


def kernel_macs(mod) -> dict[str, float]:
    """Multiply-adds each PrimFunc of a lowered module executes (estimate_tir_flops / 2; None if not estimable)."""
    import tvm
    from tvm.s_tir.analysis import estimate_tir_flops
    out = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            try:
                out[gv.name_hint] = estimate_tir_flops(tvm.IRModule({"main": func})) / 2
            except Exception:      # data-dependent loops (sparse kernels): not estimable
                out[gv.name_hint] = None
    return out


def measure(model, rounds: int, work: str) -> dict:
    """The default compile of `model` (an ONNX ModelProto): the multiply-adds of the imported model, its
    median at 1 thread, a per-family profile."""
    import targets
    from compiler import artifact, driver, pipeline, runtime
    spec = targets.resolve(None, None)
    mod, info = driver.import_model(model, None)
    macs = model_macs(mod)
    lowered, _, _ = pipeline.run(mod, spec, pipeline.Options())
    macs_by_kernel = kernel_macs(lowered)
    cm = driver.CompiledModel(artifact.build(lowered, spec, False), info, spec,
                              _source_bytes=model.SerializeToString())   # verify runs ONNX Runtime on these
    so, _ = cm.export(os.path.join(work, "model.so"))
    inputs = runtime.random_inputs(cm.metadata()["inputs"], seed=0)
    # the model and the peak kernel in turn, round by round (a slow phase of the host hits both); timed before the
    # check against ONNX Runtime, whose session's threads would share the cores
    peak, per_call = peak_call(spec)     # per_call: the multiply-adds of one peak kernel call
    times = benchlib.interleave({**benchlib.library_calls({"default": so}, inputs), "peak": peak}, rounds)
    err = max(c.rel_err for c in cm.verify(inputs))
    profiled = driver.CompiledModel(artifact.build(lowered, spec, True), info, spec)
    rows = profiled.runner().profile(inputs, repeat=max(5, rounds // 2))
    families: dict[str, dict] = {}
    for r in rows:
        f = families.setdefault(benchlib.kernel_family(r["kernel"]), {"ms": 0.0, "macs": 0.0, "estimated": True})
        f["ms"] += r["ms"]
        if r["kernel"] in macs_by_kernel:      # a kernel (VM builtins are not)
            if macs_by_kernel[r["kernel"]] is None:
                f["estimated"] = False           # one kernel of the family not estimable: no share of the peak
            else:
                f["macs"] += macs_by_kernel[r["kernel"]] * r["calls"]
    model_s, peak_s = times["default"], times["peak"]
    total = sum(macs.values())
    return {"spec": spec, "macs": macs, "median_ms": 1e3 * float(np.median(model_s)), "min_ms": 1e3 * min(model_s),
            "runs": len(model_s), "max_rel_err": err, "families": families,
            "peak": per_call / float(np.median(peak_s)), "best_peak": per_call / min(peak_s),
            "floor_ms": 1e3 * total * float(np.median(peak_s)) / per_call,
            # per round: the model's time / the floor at that round's peak
            "max_speedup": float(np.median([m * per_call / (total * p) for m, p in zip(model_s, peak_s)])),
            "profiled_ms": sum(f["ms"] for f in families.values())}


def results_md(command: str, label: str, m: dict) -> str:
    macs, peak = m["macs"], m["peak"]
    total = sum(macs.values())
    lines = [
        "# How much faster could any schedule make the default compile? (`tools/bench.py bound`)", "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {benchlib.machine()}",
        f"- command: `{command}`",
        f"- model: {label}; 1 thread",
        "", "Method: tools/bench_bound.py's docstring. The model and the FMA-peak kernel run in turn after warm-up, "
        f"{m['runs']} rounds; `max speed-up` = median over rounds of (the model's time / its multiply-adds at that "
        "round's peak). The floor grants free memory traffic, free work outside multiply-adds and no time between "
        "kernels, so no schedule of these direct convolutions on this core can beat it.", "",
        "| FMA peak, median / best (GFLOP/s) | multiply-adds (M) | floor (ms) | default compile median / min (ms) "
        "| max speed-up | max rel. err |",
        "|---|---|---|---|---|---|",
        f"| {2 * peak / 1e9:.1f} / {2 * m['best_peak'] / 1e9:.1f} "
        f"| {total / 1e6:.1f} ({', '.join(f'{k} {v / 1e6:.1f}' for k, v in sorted(macs.items()))}) "
        f"| {m['floor_ms']:.2f} | {m['median_ms']:.2f} / {m['min_ms']:.2f} | **{m['max_speedup']:.2f}x** "
        f"| {m['max_rel_err']:.1e} |", "",
        f"Default compile by kernel family, profiled run ({m['profiled_ms']:.2f} ms in all; interpreted VM): "
        "multiply-adds the family's loops execute (half their float operations: padded channels and epilogues "
        "count too) and the share of the median peak that is "
        "(empty where the kernels' loops depend on data or the row is not a kernel).", "",
        "| family | ms | share | multiply-adds (M) | of peak |",
        "|---|---|---|---|---|",
    ]
    for name, f in sorted(m["families"].items(), key=lambda kv: -kv[1]["ms"]):
        share = f["ms"] / m["profiled_ms"]
        if f["macs"] > 0 and f["estimated"]:
            of_peak = f"{f['macs'] / (f['ms'] / 1e3) / peak:.0%}"
            mm = f"{f['macs'] / 1e6:.1f}"
        else:
            of_peak, mm = "", ""
        lines.append(f"| {name} | {f['ms']:.3f} | {share:.0%} | {mm} | {of_peak} |")
    return "\n".join(lines) + "\n"


def cmd_bound(args) -> None:
    import onnx

    import zoo
    if args.model:
        model, label = onnx.load(args.model), os.path.basename(args.model)
    else:
        model = zoo.build("mobilenet_v2", width=args.width, resolution=args.resolution)
        label = f"MobileNetV2 width {args.width:g} input {args.resolution} (zoo, random weights, dense)"
    with tempfile.TemporaryDirectory() as work:
        m = measure(model, args.rounds, work)
    print(f"peak {2 * m['peak'] / 1e9:.1f} GFLOP/s, {sum(m['macs'].values()) / 1e6:.1f} M multiply-adds: floor "
          f"{m['floor_ms']:.2f} ms; default compile {m['median_ms']:.2f} ms: at most {m['max_speedup']:.2f}x",
          flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, args.out)
    command = "python tools/bench.py " + " ".join(sys.argv[1:])
    with open(out, "w") as f:
        f.write(results_md(command, label, m))
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({k: v for k, v in m.items() if k != "spec"}, f, indent=1)
    print(f"wrote {out}")


def add_parser(sub, root: str) -> None:
    p = sub.add_parser("bound", help="the most any schedule could speed the default compile up (FMA-peak floor)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="an ONNX file (default: the zoo's MobileNetV2)")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--out-dir", default=os.path.join(root, "benchmarks"))
    p.add_argument("--out", default="RESULTS-bound.md")
    p.set_defaults(func=cmd_bound)
