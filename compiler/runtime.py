"""Load an exported library with the TVM runtime, run it, time it, and profile it per kernel."""
from __future__ import annotations

import json
import os
import time

import numpy as np

from compiler.native_log import quiet_scope_warnings
from targets.errors import ShrinkcError


def set_threads(n: int | None) -> None:
    """TVM sizes its thread pool once, from TVM_NUM_THREADS: call before the first run."""
    if n:
        os.environ["TVM_NUM_THREADS"] = str(int(n))


def random_inputs(inputs: list, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random data of each declared input's shape and dtype (floats in [-1, 1))."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in inputs:
        name, shape, dtype = (t["name"], t["shape"], t["dtype"]) if isinstance(t, dict) else (t.name, t.shape, t.dtype)
        if np.issubdtype(np.dtype(dtype), np.floating):
            out[name] = rng.uniform(-1, 1, size=shape).astype(dtype)
        else:
            out[name] = rng.integers(0, 10, size=shape).astype(dtype)
    return out


class Runner:
    """A loaded model: `run(inputs)` returns the outputs as numpy arrays, in declared order."""

    def __init__(self, module, metadata: dict, device=None):
        import tvm
        from tvm import relax
        self.metadata = metadata
        self.device = device or (tvm.cuda(0) if metadata.get("target", {}).get("tvm", {}).get("kind") == "cuda"
                                 else tvm.cpu(0))
        self.module = module
        self.vm = relax.VirtualMachine(module, self.device)
        self.inputs = metadata["inputs"]
        self.outputs = metadata["outputs"]

    def _args(self, inputs: dict[str, np.ndarray]):
        import tvm
        args = []
        for t in self.inputs:
            if t["name"] not in inputs:
                raise ShrinkcError(f"no data for input '{t['name']}'", f"pass --input {t['name']}=FILE.npy")
            a = np.asarray(inputs[t["name"]])
            if list(a.shape) != list(t["shape"]):
                raise ShrinkcError(f"input '{t['name']}' has shape {list(a.shape)}, the library takes {t['shape']}",
                                   "recompile with --input NAME:SHAPE for this shape")
            args.append(tvm.runtime.tensor(a.astype(t["dtype"]), self.device))
        return args

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.vm["main"](*self._args(inputs))
        return [o.numpy() for o in (out if isinstance(out, (list, tuple)) or hasattr(out, "__len__")
                                    and not hasattr(out, "numpy") else [out])]

    def time(self, inputs: dict[str, np.ndarray], repeat: int = 50, warmup: int = 5) -> list[float]:
        """Latencies in seconds of `repeat` runs after `warmup` runs."""
        args = self._args(inputs)
        f = self.vm["main"]
        for _ in range(warmup):
            f(*args)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            f(*args)
            self.device.sync()
            times.append(time.perf_counter() - t0)
        return times

    def profile(self, inputs: dict[str, np.ndarray], repeat: int = 20) -> list[dict]:
        """Per kernel: total ms per inference and calls, measured around each VM call."""
        if self.metadata.get("vm") == "compiled":
            raise ShrinkcError("this library runs its model as compiled code, which has no per-kernel hooks to "
                               "profile with", "compile it with compile_model(..., profiling=True)")
        args = self._args(inputs)
        acc: dict = {}
        start = {}

        def instrument(func, name, before, ret, *a):
            now = time.perf_counter()
            if before:
                start["t"] = now
            else:
                acc.setdefault(str(name), []).append(now - start["t"])
            return 0

        from tvm import relax
        vm = relax.VirtualMachine(self.module, self.device)  # a VM of its own: the hook stays on it
        f = vm["main"]
        f(*args)
        vm.set_instrument(instrument)
        for _ in range(repeat):
            f(*args)
        rows = [{"kernel": k, "ms": 1e3 * sum(v) / repeat, "calls": len(v) // repeat} for k, v in acc.items()]
        return sorted(rows, key=lambda r: -r["ms"])


def read_metadata(path: str) -> dict:
    json_path = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(json_path):
        raise ShrinkcError(f"metadata file '{json_path}' is missing", "keep OUT.json next to OUT.so (shrinkc writes both)")
    with open(json_path) as f:
        return json.load(f)


def load(path: str, device=None) -> Runner:
    """Load OUT.so (with OUT.json beside it) for running on this machine."""
    import tvm
    if not os.path.exists(path):
        raise ShrinkcError(f"library '{path}' does not exist", "compile it first with `shrinkc compile`")
    metadata = read_metadata(path)
    target = metadata.get("target", {})
    if target.get("tvm", {}).get("kind") == "cuda":
        import targets
        spec = targets.resolve(target["tvm"])
        if not spec.runs_here():
            raise ShrinkcError(f"'{path}' is a CUDA library and this machine has no CUDA GPU", spec.run_hint())
    try:
        with quiet_scope_warnings():
            module = tvm.runtime.load_module(os.path.abspath(path))
    except Exception as err:
        first = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        raise ShrinkcError(f"cannot load '{path}' on this machine: {first}",
                           f"it was built for '{metadata.get('target', {}).get('name', '?')}'; run it there "
                           "(or through --rpc-tracker)") from None
    return Runner(module, metadata, device)
