"""`shrinkc demo` (make demo): build the built-in example, compile it for this machine, verify, time, report."""
from __future__ import annotations

import os
import time

import numpy as np


def _interleaved(fns: dict, rounds: int = 30, warmup: int = 5) -> dict[str, list[float]]:
    """Time each function in turn, round after round, so drift hits all of them alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def main(args) -> int:
    os.environ["TVM_NUM_THREADS"] = "1"   # one thread for both runtimes, timed in one process
    import onnx
    import onnxruntime as ort

    import compiler
    import zoo
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model_path = os.path.join(out, "demo_mobilenet_v2.onnx")
    onnx.save(zoo.demo_model(), model_path)
    print(f"built-in example: {model_path}")
    print("  " + zoo.demo_model.__doc__.strip().splitlines()[0])
    t0 = time.perf_counter()
    cm = compiler.compile_model(model_path)
    compile_s = time.perf_counter() - t0
    so, meta = cm.export(os.path.join(out, "demo_mobilenet_v2.so"))
    inputs = compiler.runtime.random_inputs(cm.metadata()["inputs"])
    results = cm.verify(inputs)
    for r in results:
        print("verify " + r.line())
    if not all(r.ok for r in results):
        print("demo: verification FAILED")
        return 1
    runner = compiler.load(so)
    f_ours = runner.vm["main"]
    args_ours = runner._args(inputs)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    times = _interleaved({"shrinkc": lambda: f_ours(*args_ours), "onnxruntime": lambda: sess.run(None, inputs)})
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    ratio = med["shrinkc"] / med["onnxruntime"]
    print()
    print(f"| {'':28} | {'shrinkc':>10} | {'ONNX Runtime':>12} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 14}|")
    print(f"| {'latency, median of 30 (ms)':28} | {med['shrinkc']:10.2f} | {med['onnxruntime']:12.2f} |")
    print(f"| {'latency, min (ms)':28} | {min(times['shrinkc']) * 1e3:10.2f} | {min(times['onnxruntime']) * 1e3:12.2f} |")
    print(f"| {'size (MB)':28} | {os.path.getsize(so) / 1e6:10.2f} | {os.path.getsize(model_path) / 1e6:12.2f} |")
    print(f"shrinkc / ONNX Runtime latency: {ratio:.2f}x (1 thread, same input, this machine); "
          f"compile {compile_s:.1f} s for target '{cm.spec.name}'")
    print("what the passes did:")
    for name, entry in cm.report["passes"].items():
        counts = ", ".join(f"{k} {v}" for k, v in entry["counts"].items())
        if counts:
            print(f"  {name}: {counts}")
    print(f"library: {so} (+ {os.path.basename(meta)})")
    return 0
