"""Measuring without fooling ourselves: interleaved in-process timing, one process per runtime at
more than one thread, machine facts, and the markdown/PNG writers that tools/bench.py uses."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def machine() -> str:
    cpu = platform.processor() or "?"
    fields: dict = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break     # the first CPU's block is enough
    except OSError:
        pass
    if "model name" in fields:
        # NOTE: "AMD EPYC" alone does not tell a Zen 4 (family 25) from a Zen 5 (family 26) host
        cpu = f"{fields['model name']} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    import onnxruntime
    import tvm
    return (f"{cpu}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
            f"TVM {tvm.__version__}, ONNX Runtime {onnxruntime.__version__}")


def interleave(fns: dict, rounds: int, warmup: int = 5, burst: int = 1) -> dict[str, list[float]]:
    """Per-run seconds of each function, run in turn round after round (drift hits all alike)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(burst):
                t0 = time.perf_counter()
                f()
                out[k].append(time.perf_counter() - t0)
    return out


def library_calls(libs: dict[str, str], inputs: dict) -> dict:
    """{label: no-argument call of that exported library on `inputs`}, loaded in this process."""
    import compiler
    calls = {}
    for label, so in libs.items():
        runner = compiler.load(so)
        calls[label] = (lambda f, a: lambda: f(*a))(runner.vm["main"], runner._args(inputs))
    return calls


def paired_ratio(a: list[float], b: list[float], group: int = 1) -> float:
    """Median over rounds of (a's median / b's median in that round); a round = `group` runs of each,
    as interleave (group 1) and alternate (group = burst) record them. A slow phase of this shared
    machine (a neighbour on the second core for seconds) hits both runtimes of a round alike, where
    it skews the two overall medians by however many of each one's runs it caught."""
    rounds = min(len(a), len(b)) // group
    ratios = [float(np.median(a[i * group:(i + 1) * group]) / np.median(b[i * group:(i + 1) * group]))
              for i in range(rounds)]
    return float(np.median(ratios))


def kernel_family(kernel: str) -> str:
    """A profile row's kernel family: f32_conv1x1_nchw16c_7x16_3 -> conv1x1; VM builtins as they are."""
    return kernel.split("_")[1] if kernel.startswith(("f32_", "u8i8_")) else kernel


def stats(times: list[float]) -> dict:
    return {"min_ms": 1e3 * min(times), "median_ms": 1e3 * float(np.median(times)), "runs": len(times)}


# --- one runtime per process, for runs at more than one thread --------------------------------
def _worker_main(kind: str, path: str, inputs_npz: str, threads: int) -> None:
    """Serve 'run N' lines on stdin with a JSON list of N latencies on stdout."""
    inputs = dict(np.load(inputs_npz))
    if kind == "shrinkc":
        os.environ["TVM_NUM_THREADS"] = str(threads)
        sys.path.insert(0, ROOT)
        import compiler
        runner = compiler.load(path)
        f, args = runner.vm["main"], runner._args(inputs)
        call = lambda: f(*args)  # noqa: E731
    elif kind == "onnxruntime":
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        call = lambda: sess.run(None, inputs)  # noqa: E731
    else:  # litert, with its default XNNPACK delegate, or its own kernels where the delegate fails on the model
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
        try:
            interp = Interpreter(model_path=path, num_threads=threads)
            interp.allocate_tensors()
        except RuntimeError:
            interp = Interpreter(model_path=path, num_threads=threads,
                                 experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            interp.allocate_tensors()
        for d in interp.get_input_details():
            interp.set_tensor(d["index"], inputs[d["name"]])
        call = interp.invoke
    for line in sys.stdin:
        n = int(line.split()[1])
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)


class Worker:
    """A runtime in a process of its own, asked for bursts of timed runs."""

    def __init__(self, kind: str, path: str, inputs_npz: str, threads: int):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind, path, inputs_npz,
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, n: int) -> list[float]:
        self.resume()
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("benchmark worker died")
        return json.loads(line)

    def pause(self) -> None:
        """Stop the process (SIGSTOP): an idle runtime's thread pool can spin and steal the cores the
        other runtime is being timed on (ONNX Runtime measured 2-3x slow beside an idle shrinkc worker)."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self):
        self.resume()
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


BURST = 5   # runs per burst in alternate()
MIN_ROUNDS = 4   # rounds of bursts alternate() takes at the least


def alternate(workers: dict[str, Worker], rounds: int, burst: int = BURST, warmup: int = 2,
              gap_s: float = 0.05) -> dict[str, list[float]]:
    """Bursts of runs from each worker in turn; a pause between lets spinning pool threads sleep.

    rounds: as many as a 1-thread timing interleaves (at least MIN_ROUNDS), not fewer.
    NOTE: at 2 threads a neighbour on this machine's second core slows whole bursts for seconds; the
    median over rounds of paired ratios needs most rounds undisturbed. With rounds // 5 (6 rounds) two
    identical libraries were read 0.84x apart, and one library's median at 12.3 ms that the next run
    (more rounds) read at 6.8."""
    rounds = max(MIN_ROUNDS, rounds)
    for w in workers.values():
        for _ in range(warmup):
            w.run(burst)
            w.pause()
            time.sleep(gap_s)
    out = {k: [] for k in workers}
    for _ in range(rounds):
        for k, w in workers.items():
            out[k].extend(w.run(burst))
            w.pause()   # NOTE: only the runtime being timed may run
            time.sleep(gap_s)
    for w in workers.values():
        w.resume()
    return out


def alternate_runtimes(runtimes: dict[str, tuple[str, str]], inputs_npz: str, threads: int,
                       rounds: int) -> dict[str, list[float]]:
    """alternate() over one Worker per {name: (kind, path)}, closed afterwards."""
    workers = {k: Worker(kind, path, inputs_npz, threads) for k, (kind, path) in runtimes.items()}
    try:
        return alternate(workers, rounds)
    finally:
        for w in workers.values():
            w.close()


def bar_chart(path: str, title: str, rows: list[tuple[str, float]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = rows[:30]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.2))
    ax.barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color="#4c72b0")
    ax.set_xlabel("ms per inference")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def line_chart(path: str, title: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 40 else "", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
