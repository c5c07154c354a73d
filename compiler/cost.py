"""Cost: the one interface speed-dependent passes ask ("is this rewrite faster on the target?").

A pass builds two tiny Relax modules (before and after its rewrite) and compares
`cost.latency(before)` with `cost.latency(after)`. Where the target runs on this machine the module
is lowered by shrinkc's own phase 4 and timed (median of a few runs); elsewhere, or with
SHRINKC_COST=off, a roofline estimate from FLOPs and bytes stands in. Measurements are cached on
disk per (target, key), so a model compiled twice measures nothing the second time.

Passes take a Cost as a constructor argument (passes/ may not import compiler/); tests may hand
them any object with `latency(mod, key=None) -> float` and `enabled`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import tvm
from tvm import relax

from targets import TargetSpec

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "shrinkc")
REPEAT = 15          # timed runs per measurement (the median is kept)
WARMUP = 3
# Roofline constants for the estimate: FMA pipes per core, clock, and sustained memory bandwidth.
FMA_PIPES, CLOCK_HZ, EFFICIENCY, BYTES_PER_S = 2, 2.0e9, 0.5, 10e9


class Cost:
    """Latency of small Relax modules on `spec`: measured where possible, cached, else estimated."""

    def __init__(self, spec: TargetSpec, cache_dir: str | None = CACHE_DIR, enabled: bool | None = None):
        self.spec = spec
        if enabled is None:
            enabled = os.environ.get("SHRINKC_COST", "measure") != "off" and spec.runs_here() and spec.is_cpu
        self.enabled = enabled
        self._path = os.path.join(cache_dir, "costs.json") if cache_dir else None
        self._kernels = kernels_version(spec)   # NOTE: reads schedules/ once, not per latency() call
        self._cache = self._read_cache()
        self.measured = 0   # measurements made by this object (not cache hits)

    # --- public ---------------------------------------------------------------------------
    def latency(self, mod: tvm.IRModule, key: str | None = None) -> float:
        """Seconds for one call of mod["main"] on the target (measured or estimated, cached)."""
        return self.latencies([(mod, key)])[0]

    def latencies(self, items: list[tuple[tvm.IRModule, str | None]], together: bool = False) -> list[float]:
        """latency() of each (module, key); the ones not cached are measured together, run by run in turn, so
        that a slow phase of a shared machine hits all the candidates of a decision alike. together: where any
        is not cached, all are measured now (a decision that must not weigh a time from another moment)."""
        if not self.enabled:
            return [estimate(mod, self.spec) for mod, _ in items]
        keys = [f"{self._target_key()}|{key or structural_key(mod)}" for mod, key in items]
        missing = any(k not in self._cache for k in keys)
        todo = {k: mod for k, (mod, _) in zip(keys, items) if k not in self._cache or (together and missing)}
        if todo:
            self._cache.update(zip(todo, self._measure(list(todo.values()))))
            self.measured += len(todo)
            self._write_cache()
        return [self._cache[k] for k in keys]

    # --- measuring ------------------------------------------------------------------------
    def _measure(self, mods: list[tvm.IRModule]) -> list[float]:
        fns = [runnable(mod, self.spec) for mod in mods]
        for _ in range(WARMUP):
            for f in fns:
                f()
        times = [[] for _ in fns]
        for _ in range(REPEAT):
            for f, t in zip(fns, times):
                t0 = time.perf_counter()
                f()
                t.append(time.perf_counter() - t0)
        return [float(np.median(t)) for t in times]

    def _target_key(self) -> str:
        # NOTE: a latency holds only for the kernels that were timed: the schedules' source and the
        # target's kernel defaults are part of the key, so changing either re-measures
        return (json.dumps(self.spec.tvm, sort_keys=True) + f"|threads={os.environ.get('TVM_NUM_THREADS', 'all')}"
                + f"|kernels={self._kernels}")

    def _read_cache(self) -> dict:
        if not self._path or not os.path.exists(self._path):
            return {}
        try:
            with open(self._path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}       # a damaged cache only costs re-measuring

    def _write_cache(self) -> None:
        if not self._path:
            return
        try:
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            merged = {**self._read_cache(), **self._cache}
            tmp = f"{self._path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(merged, f)
            os.replace(tmp, self._path)
        except OSError:
            pass            # a read-only home only costs re-measuring


def kernels_version(spec: TargetSpec) -> str:
    """A short hash of the schedules' source files and `spec.kernel_defaults`."""
    h = hashlib.sha256(json.dumps(spec.kernel_defaults, sort_keys=True).encode())
    import schedules
    root = os.path.dirname(os.path.abspath(schedules.__file__))
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:12]


def lowered(mod: tvm.IRModule, spec: TargetSpec) -> tvm.IRModule:
    """mod after our phase 4 (scheduled TIR kernels called from Relax), as a measurement needs it."""
    from compiler import pipeline
    from passes import changelog
    lower = dict(pipeline.phases(spec, pipeline.Options()))["lower"]
    with spec.tvm_target(), changelog.collecting():   # NOTE: a measurement's lowering is not the compile's
        for p in lower:
            mod = p(mod)
    return mod


def runnable(mod: tvm.IRModule, spec: TargetSpec, seed: int = 0):
    """mod["main"] lowered by our phase 4, built for `spec` (which must run here), as a no-argument
    function that calls it on fixed random inputs."""
    from compiler import artifact
    mod = lowered(mod, spec)
    dev = tvm.cpu(0)
    vm = relax.VirtualMachine(artifact.build(mod, spec), dev)
    args = [tvm.runtime.tensor(a, dev) for a in random_args(mod["main"], seed)]
    f = vm["main"]
    return lambda: f(*args)


def structural_key(mod: tvm.IRModule) -> str:
    """A stable key for a module: hash of its printed IR with the constants' bytes."""
    h = hashlib.sha256(mod.script(show_meta=False).encode())
    for c in _constants(mod["main"]):
        h.update(c.value.numpy().tobytes() if hasattr(c.value, "numpy") else str(c.value).encode())
    return h.hexdigest()[:24]


def random_args(func: relax.Function, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    args = []
    for p in func.params:
        shape = [int(s) for s in p.ty.shape.values]
        args.append(rng.uniform(-1, 1, size=shape).astype(str(p.ty.dtype)))
    return args


def estimate(mod: tvm.IRModule, spec: TargetSpec) -> float:
    """Roofline seconds: conv/matmul FLOPs at the target's vector FMA rate plus bytes touched."""
    flops, nbytes = 0.0, 0.0
    for call in _calls(mod["main"]):
        out = call.ty
        if not isinstance(out, relax.TensorType) or out.shape is None:
            continue
        out_elems = float(np.prod([int(s) for s in out.shape.values]))
        nbytes += 4 * out_elems
        name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
        if name == "relax.nn.conv2d":
            w = [int(s) for s in call.args[1].ty.shape.values]
            flops += 2 * out_elems * float(np.prod(w[1:]))     # OIHW: I/groups * KH * KW per output
            nbytes += 4 * float(np.prod(w))
        elif name == "relax.matmul":
            k = int(call.args[0].ty.shape.values[-1])
            flops += 2 * out_elems * k
        else:
            flops += out_elems
    peak = spec.vector_lanes * 2 * FMA_PIPES * CLOCK_HZ * EFFICIENCY
    return flops / peak + nbytes / BYTES_PER_S


def _calls(func: relax.Function) -> list[relax.Call]:
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


def _constants(func: relax.Function) -> list[tvm.ir.Constant]:
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, tvm.ir.Constant) else None)
    return found
