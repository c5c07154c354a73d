"""`shrinkc tune`: time the knob settings of each kernel of a model, best first where it pays.

Tasks are the fused TIR functions of the model as shrinkc compiles it (every phase up to
ApplySchedules), keyed by schedules.rule.task_key. Each task's default schedule is measured first
(its weighted share of model latency ranks it); then trials go, one at a time, to the task whose
current time x uses, discounted by the trials it already had, is largest. A candidate is one knob
setting of our schedule rules, built alone with our TIR pipeline (compiler/artifact.py) and timed
with seeded random arguments, here or on a board through an RPC tracker (compiler/remote.py); its
outputs must match the default schedule's. Every measurement goes to the database
(compiler/tuning_db.py) at once, and a rerun takes what is there instead of measuring again.
Kernels without knobs (Fallback) are tuned with MetaSchedule by compiler/tune_meta.py.
"""
from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import targets
from compiler import artifact, pipeline
from compiler.tune_meta import MS_TRIALS
from compiler.tuning_db import TuningDB, knobs_from_db, knobs_id, target_key  # noqa: F401 (knobs_from_db: API)
from passes import changelog
from passes.apply_schedules import NAME as APPLY_SCHEDULES
from targets.errors import ShrinkcError

MIN_REPEAT_MS = 40       # each timing repeat runs the kernel at least this long
REPEATS = 3              # the fastest repeat counts (the machine is shared; slower ones are noise)
OUTPUT_RTOL = 1e-3       # a candidate whose outputs differ more from the default schedule's is rejected
TOP_ROWS = 12            # rows of the final gains table
PROGRESS_WIDTH = 120     # the progress line is padded to this width so a shorter one overwrites it


@dataclass
class Task:
    """One distinct fused TIR function, the rule that schedules it, and what tuning found."""

    key: str
    func: object
    rule: object
    name: str                      # the kernel name of its default schedule
    uses: int = 1
    space: list = field(default_factory=list)
    default_s: float | None = None
    best_s: float | None = None
    best_knobs: dict | None = None
    best_name: str = ""
    trials: int = 0
    next: int = 0
    reference: list | None = None  # the default schedule's outputs on the seeded arguments
    constants: dict = field(default_factory=dict)  # parameter index -> the call's constant argument (weights)

    @property
    def weight(self) -> float:
        return self.uses * (self.best_s or 0.0)


# ---- task extraction ---------------------------------------------------------------------------

def lowered_before_schedules(model, spec, inputs: dict | None, options: dict):
    """The model as `compile` lowers it, stopped just before ApplySchedules (fused, unscheduled TIR)."""
    from compiler import driver
    opts = pipeline.Options(**options)
    mod, _info = driver.import_model(model, inputs)
    with changelog.collecting(), spec.tvm_target():
        for _phase, passes in pipeline.phases(spec, opts):
            for p in passes:
                if p.info.name == APPLY_SCHEDULES:
                    return mod
                mod = p(mod)
    raise ShrinkcError("the pipeline has no ApplySchedules step to tune", "report this")


def _call_sites(mod) -> dict:
    """GlobalVar -> (how many call_tir sites call it, the first site's arguments)."""
    from tvm import relax
    sites: dict = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            gv = expr.args[0]
            count, args = sites.get(gv, (0, list(expr.args[1].fields)))
            sites[gv] = (count + 1, args)

    for _gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sites


def _constants(args) -> dict:
    """Parameter index -> numpy value of each constant argument of a call."""
    import tvm
    return {i: a.value.numpy() for i, a in enumerate(args) if isinstance(a, tvm.ir.Constant)}


def extract_tasks(model, spec, inputs: dict | None = None, meta_schedule: bool = True, **options) -> list[Task]:
    """The distinct kernels of the model for `spec`, each with its rule, uses and knob space.

    A kernel no rule of ours has knobs for gets one MetaSchedule step (MS_TRIALS trials) as its
    only candidate beyond the default, when `meta_schedule`."""
    from tvm import tirx
    from schedules.handwritten import HANDWRITTEN, recipe
    from schedules.rule import is_library_call, is_scheduled, task_key
    rules = _rules(spec)
    mod = lowered_before_schedules(model, spec, inputs, options)
    sites = _call_sites(mod)
    tasks: dict[str, Task] = {}
    with spec.tvm_target():
        for gv, func in mod.functions.items():
            # NOTE: a kernel a pass emits already scheduled is tuned through the knobs it was built with
            # (schedules/handwritten.py), timed on the weights of its first call (sparse indices must be real)
            handwritten = recipe(func) is not None
            if not isinstance(func, tirx.PrimFunc) or (is_scheduled(func) and not handwritten) \
                    or is_library_call(func):
                continue
            key = task_key(func)
            uses, args = sites.get(gv, (0, []))
            if key in tasks:
                tasks[key].uses += uses
                continue
            for rule in [HANDWRITTEN] if handwritten else rules:
                done = rule.apply(func, spec)
                if done is not None:
                    space = _ordered_space(rule.knob_space(func, spec), done.knobs, key)
                    if meta_schedule and not rule.kind:
                        space.append({"meta_schedule": MS_TRIALS})
                    tasks[key] = Task(key, func, rule, done.name or gv.name_hint, uses, space,
                                      constants=_constants(args) if handwritten else {})
                    break
    return [t for t in tasks.values() if t.uses]


def _rules(spec) -> list:
    if spec.is_cpu:
        from schedules.registry import CPU_RULES
        return CPU_RULES
    from schedules.gpu_dlight import GPU_RULES
    return GPU_RULES


def _ordered_space(space: list[dict], default: dict, key: str) -> list[dict]:
    """The default knobs first, then the rest in an order fixed by the task (resumable runs agree)."""
    if not space:
        return [default] if default else [{}]
    rest = [k for k in ({**default, **s} for s in space) if knobs_id(k) != knobs_id(default)]
    unique = list({knobs_id(k): k for k in rest}.values())
    random.Random(key).shuffle(unique)
    return [default, *unique]


# ---- measuring one candidate -------------------------------------------------------------------

def random_args(func, seed: str) -> list[np.ndarray]:
    """Seeded random data for each buffer parameter of a PrimFunc (outputs too: they are overwritten)."""
    rng = np.random.default_rng(int(seed, 16) % 2**32)
    out = []
    for p in func.params:
        buf = func.buffer_map[p] if hasattr(func, "buffer_map") and p in func.buffer_map else p
        shape = [int(s) for s in buf.shape]
        out.append(rng.uniform(-1, 1, size=shape).astype(str(buf.dtype)))
    return out


def task_arrays(task: Task) -> list[np.ndarray]:
    """The arguments a task's candidates are timed on: seeded random data, the call's constants (a sparse
    kernel's weights and indices) where it has them."""
    arrays = random_args(task.func, task.key)
    for i, value in task.constants.items():
        arrays[i] = value.astype(arrays[i].dtype).reshape(arrays[i].shape)
    return arrays


class LocalMeasurer:
    """Times kernels on this machine."""

    where = "here"

    def __init__(self, spec):
        import tvm
        if not spec.runs_here():
            raise ShrinkcError(f"'{spec.name}' kernels cannot be timed on this machine",
                               "tune on a board: pass --rpc-tracker HOST:PORT --rpc-key KEY")
        self.dev = tvm.cuda(0) if spec.is_gpu else tvm.cpu(0)

    def measure(self, kernel, arrays: list[np.ndarray], name: str) -> tuple[float, list[np.ndarray]]:
        return time_kernel(kernel.jit(), arrays, self.dev)

    def close(self) -> None:
        pass


def time_kernel(kernel, arrays: list[np.ndarray], dev) -> tuple[float, list[np.ndarray]]:
    """(fastest repeat's seconds per run, the arguments after the runs) of `main` on `dev`."""
    import tvm
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    timer = kernel.time_evaluator("main", dev, number=1, repeat=REPEATS, min_repeat_ms=MIN_REPEAT_MS)
    result = timer(*args)
    return float(min(result.results)), [a.numpy() for a in args]


def _same_outputs(got: list[np.ndarray], ref: list[np.ndarray]) -> bool:
    for g, r in zip(got, ref):
        scale = float(np.max(np.abs(r))) if r.size else 0.0
        if not np.allclose(g, r, rtol=OUTPUT_RTOL, atol=OUTPUT_RTOL * max(scale, 1.0)):
            return False
    return True


class BoardLost(Exception):
    """The measuring board went away and no other board under its key took over."""


# ---- the tuning loop ---------------------------------------------------------------------------

@dataclass
class TuneResult:
    tasks: list[Task]
    measured: int = 0          # new measurements written by this run
    reused: int = 0            # measurements taken from the database
    trials: int = 0
    stopped: str = ""          # why the run ended early ("", "interrupted", "time budget", "board lost: ...")
    untuned_s: float = 0.0
    tuned_s: float = 0.0


class Tuner:
    """Runs the trials of one `shrinkc tune`; every measurement goes to the database first."""

    def __init__(self, tasks, spec, db: TuningDB, measurer, out=None, meta: dict | None = None, observer=None):
        self.tasks, self.spec, self.db, self.measurer = tasks, spec, db, measurer
        self.meta = meta or {}    # tracker, key, builders for MetaSchedule
        self.out = out or sys.stderr
        self.observer = observer  # called (trials, elapsed s, model estimate s) once baselines are in
        self.deadline: float | None = None
        self.target = target_key(spec)
        self.done = db.measured(self.target)
        self.result = TuneResult(tasks)
        self.t0 = time.time()
        self.spent_measuring = 0.0

    def candidate(self, task: Task, knobs: dict) -> dict:
        """The record for (task, knobs): from the database, or measured now and appended."""
        ident = (task.key, knobs_id(knobs))
        if ident in self.done:
            self.result.reused += 1
            return self.done[ident]
        t0 = time.time()
        rec = {"target": self.target, "task": task.key, "knobs": knobs, "latency_s": None, "error": "",
               "where": self.measurer.where}
        try:
            if "meta_schedule" in knobs:
                func, rec["trace"] = self._meta_schedule(task, knobs["meta_schedule"])
                rec["name"] = f"{task.name} (MetaSchedule)"
            else:
                done = task.rule.apply(task.func, self.spec, knobs or None)
                func, rec["name"] = done.func, done.name or task.name
            kernel = artifact.build_kernel(func, self.spec)
            arrays = task_arrays(task)
            latency, outputs = self.measurer.measure(kernel, arrays, f"{task.key}_{len(self.done)}")
            if task.reference is None and knobs_id(knobs) != knobs_id(task.space[0]):
                task.reference = self._reference(task, arrays)
        except BoardLost:
            raise
        except Exception as err:  # a knob setting a schedule cannot take is a failed trial, not a crash
            rec["error"] = _first_line(err)
        else:
            if task.reference is not None and not _same_outputs(outputs, task.reference):
                rec["error"] = "outputs differ from the default schedule's"
            else:
                rec["latency_s"] = latency
                task.reference = task.reference or outputs
        self.db.append(rec)
        self.done[ident] = rec
        self.result.measured += 1
        self.spent_measuring += time.time() - t0
        return rec

    def _meta_schedule(self, task: Task, trials: int):
        from compiler.tune_meta import tune_kernel
        self.out.write(f"\r[tune] MetaSchedule: {trials} trials on {task.name}".ljust(PROGRESS_WIDTH))
        self.out.flush()
        found = tune_kernel(task.func, self.spec, os.path.join(self.db.path, "meta_schedule", task.key), trials,
                            **self.meta)
        if found is None:
            raise RuntimeError("MetaSchedule found no schedule that builds and runs")
        return found

    def _reference(self, task: Task, arrays) -> list[np.ndarray]:
        done = task.rule.apply(task.func, self.spec, task.space[0] or None)
        return self.measurer.measure(artifact.build_kernel(done.func, self.spec), arrays, f"{task.key}_ref")[1]

    def _take(self, task: Task, rec: dict) -> None:
        lat = rec.get("latency_s")
        if isinstance(lat, (int, float)) and lat > 0 and (task.best_s is None or lat < task.best_s):
            task.best_s, task.best_knobs, task.best_name = lat, rec["knobs"], rec.get("name", task.name)

    def run(self, trials: int, budget_s: float | None) -> TuneResult:
        res = self.result
        deadline = self.deadline = self.t0 + budget_s if budget_s else None
        try:
            # 1. the default schedule of every task: the untuned model, and the ranking
            for task in sorted(self.tasks, key=lambda t: t.name):
                rec = self.candidate(task, task.space[0])
                task.next = 1
                self._take(task, rec)
                task.default_s = task.best_s
                self.progress(trials)
            res.untuned_s = self.model_estimate()
            self.observe()
            # 2. trials where they pay: largest (uses x best time) / (1 + trials so far)
            while res.trials < trials:
                if deadline and time.time() > deadline:
                    res.stopped = "time budget"
                    break
                left = trials - res.trials
                open_tasks = [t for t in self.tasks if t.next < len(t.space) and t.best_s
                              and _cost(t.space[t.next]) <= left]
                if not open_tasks:
                    break
                task = max(open_tasks, key=lambda t: (t.weight / (1 + t.trials), t.key))
                knobs = task.space[task.next]
                task.next += 1
                task.trials += _cost(knobs)
                res.trials += _cost(knobs)
                self._take(task, self.candidate(task, knobs))
                self.progress(trials)
                self.observe()
        except KeyboardInterrupt:
            res.stopped = "interrupted"
        except BoardLost as err:
            res.stopped = f"board lost: {err}"
        finally:
            self.measurer.close()
        res.untuned_s = res.untuned_s or self.model_estimate(default=True)
        res.tuned_s = self.model_estimate()
        self.out.write("\n")
        return res

    def model_estimate(self, default: bool = False) -> float:
        """Sum over tasks of uses x (best or default) kernel time: the model latency without VM overhead."""
        return sum(t.uses * ((t.default_s if default else t.best_s) or 0.0) for t in self.tasks)

    def observe(self) -> None:
        if self.observer is not None:
            self.observer(self.result.trials, time.time() - self.t0, self.model_estimate())

    def progress(self, trials: int) -> None:
        """One status line, rewritten in place: a bar, trials, best model estimate, ETA (within the budget)."""
        res = self.result
        done_tasks = sum(1 for t in self.tasks if t.default_s is not None or t.best_s is not None)
        steps, done = len(self.tasks) + trials, done_tasks + res.trials
        left = None
        if res.measured:
            per = self.spent_measuring / res.measured
            left = (steps - done) * per
        if self.deadline:
            budget_left = max(0.0, self.deadline - time.time())
            left = budget_left if left is None else min(left, budget_left)
            spent = time.time() - self.t0
            done, steps = max(done / steps, spent / (spent + budget_left)), 1  # whichever ends the run first
        line = f"[tune] {_bar(done / max(steps, 1))} kernels {done_tasks}/{len(self.tasks)} trials {res.trials}/{trials}"
        if res.untuned_s:
            line += f"  best model ~{_ms(self.model_estimate())} (untuned {_ms(res.untuned_s)})"
        if left is not None:
            line += f"  ETA {_duration(left)}"
        line += f"  new {res.measured} reused {res.reused}"
        self.out.write("\r" + line.ljust(PROGRESS_WIDTH))
        self.out.flush()


def _bar(fraction: float, width: int = 16) -> str:
    filled = int(round(min(max(fraction, 0.0), 1.0) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _ms(seconds: float) -> str:
    """Milliseconds with 3 significant digits (tiny test models run in microseconds)."""
    return f"{seconds * 1e3:.3g} ms"


def _cost(knobs: dict) -> int:
    """Trials a candidate spends: one, or the MetaSchedule trials it stands for."""
    return int(knobs.get("meta_schedule", 1))


def _duration(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[-1] if text else type(err).__name__)[:200]


def gains_table(res: TuneResult, rows: int = TOP_ROWS) -> str:
    """Per-task gains, the tasks that weigh most first."""
    tasks = sorted(res.tasks, key=lambda t: -(t.uses * (t.default_s or 0.0)))
    lines = [f"{'kernel (tuned)':<40} {'uses':>4} {'default ms':>10} {'tuned ms':>9} {'gain':>6} {'trials':>6}"]
    for t in tasks[:rows]:
        d, b = t.default_s or 0.0, t.best_s or 0.0
        gain = f"{d / b:.2f}x" if d and b else "-"
        lines.append(f"{(t.best_name or t.name)[:40]:<40} {t.uses:>4} {d * 1e3:>10.3f} {b * 1e3:>9.3f} {gain:>6} "
                     f"{t.trials:>6}")
    if len(tasks) > rows:
        rest = tasks[rows:]
        d = sum(t.uses * (t.default_s or 0) for t in rest)
        b = sum(t.uses * (t.best_s or 0) for t in rest)
        lines.append(f"{f'({len(rest)} more kernels)':<40} {'':>4} {d * 1e3:>10.3f} {b * 1e3:>9.3f} "
                     f"{(f'{d / b:.2f}x' if b else '-'):>6}")
    if res.untuned_s and res.tuned_s:
        lines.append(f"model estimate (sum of kernels): {res.untuned_s * 1e3:.3f} ms -> {res.tuned_s * 1e3:.3f} ms "
                     f"({res.untuned_s / res.tuned_s:.2f}x)")
    return "\n".join(lines)


def tune(model, target=None, *, db: str, trials: int = 64, time_budget_min: float | None = None,
         rpc_tracker: str | None = None, rpc_key: str | None = None, builders: int = 1,
         inputs: dict | None = None, cc: str | None = None, out=None, meta_schedule: bool = True,
         observer=None, **options) -> TuneResult:
    """Tune `model` for `target`, writing measurements to the database folder `db`.

    observer(trials, elapsed_s, model_estimate_s) is called once the default schedules are measured
    and after each trial (tools/bench_tune.py draws its curve from it)."""
    out = out or sys.stderr
    spec = targets.resolve(target, cc)
    artifact.check_toolchain(spec)
    if trials < 0:
        raise ShrinkcError(f"--trials {trials} is negative", "pass --trials 0 or more")
    database = TuningDB(db, create=True)
    database.records()  # warns about corrupt lines once, up front
    measurer = _measurer(spec, rpc_tracker, rpc_key)
    try:
        tasks = extract_tasks(model, spec, inputs, meta_schedule, **options)
    except BaseException:
        measurer.close()
        raise
    out.write(f"[tune] {len(tasks)} kernels for '{spec.name}' ({target_key(spec)}), measured "
              f"{measurer.where}; database {database.file}\n")
    meta = {"tracker": rpc_tracker, "key": rpc_key, "builders": builders}
    res = Tuner(tasks, spec, database, measurer, out, meta, observer).run(trials, time_budget_min * 60 if time_budget_min else None)
    out.write(gains_table(res) + "\n")
    out.write(f"[tune] {res.measured} new measurements, {res.reused} from the database"
              + (f"; stopped early ({res.stopped}), every finished measurement is in the database"
                 if res.stopped else "") + "\n")
    return res


def _measurer(spec, rpc_tracker: str | None, rpc_key: str | None):
    if rpc_tracker or rpc_key:
        if not (rpc_tracker and rpc_key):
            raise ShrinkcError("--rpc-tracker and --rpc-key go together", "pass both, e.g. "
                               "--rpc-tracker 127.0.0.1:9190 --rpc-key rpi4-emu")
        from compiler.remote import RemoteMeasurer
        return RemoteMeasurer(spec, rpc_tracker, rpc_key)
    return LocalMeasurer(spec)


def cmd_tune(args, compile_kwargs: dict) -> int:
    """The CLI's `tune` subcommand."""
    from compiler import runtime
    runtime.set_threads(args.threads)
    kw = dict(compile_kwargs)
    kw.pop("tuning_db", None)
    target = kw.pop("target")
    res = tune(args.model, target, db=args.db, trials=args.trials, time_budget_min=args.time_budget,
               rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, builders=args.builders, **kw)
    if res.stopped == "interrupted":
        return 130
    if res.stopped.startswith("board lost"):
        return 3
    return 0
