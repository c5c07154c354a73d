"""MetaSchedule for the kernels our rules have no knobs for (Fallback): tune one, keep its best trace.

`shrinkc tune` spends MS_TRIALS MetaSchedule trials on such a kernel as one step of its budget:
XGBoost cost model, LocalBuilder (cross-linking .so export when the target needs it, so a board
needs no compiler) and LocalRunner here or RPCRunner through the tracker. MetaSchedule's own JSON
database lives in DIR/meta_schedule/<task>/. The winning schedule's trace goes into the tuning
record, so `compile --tuning-db` replays it (schedules/f32_fallback.py) without MetaSchedule.
"""
from __future__ import annotations

import functools
import logging
import os
import tempfile

MS_TRIALS = 16            # MetaSchedule trials per kernel, one step of the tuning budget
MS_BUILD_TIMEOUT = 120.0  # NOTE: the default 30 s killed a third of the builds on a busy 2-core host
MS_RUN_TIMEOUT = 120.0


def _export_cross(cross_compiler: str, rt_mod) -> str:
    """MetaSchedule's f_export: a .so linked by the cross compiler (runs in a builder worker)."""
    from tvm.support import cc
    path = os.path.join(tempfile.mkdtemp(prefix="shrinkc-ms-"), "candidate.so")
    rt_mod.export_library(path, fcompile=cc.cross_compiler(cross_compiler))
    return path


def _runner(tracker: str | None, key: str | None):
    from tvm.s_tir import meta_schedule as ms
    if not tracker:
        return ms.runner.LocalRunner(timeout_sec=MS_RUN_TIMEOUT)
    from compiler.remote import parse_tracker
    host, port = parse_tracker(tracker)
    return ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                                   session_timeout_sec=MS_RUN_TIMEOUT))


def _builder_init() -> None:
    """In each builder process: candidates get the exp / sigmoid lowering the final compile uses."""
    from schedules import f32_exp_lowering  # noqa: F401


def tune_kernel(func, spec, work_dir: str, trials: int = MS_TRIALS, tracker: str | None = None,
                key: str | None = None, builders: int = 1, seed: int = 0):
    """MetaSchedule's best schedule of `func` after `trials` trials: (PrimFunc, trace as JSON text) or None."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    target = spec.tvm_target()
    export = functools.partial(_export_cross, spec.cross_compiler) if spec.cross_compiler else None
    builder = ms.builder.LocalBuilder(max_workers=max(1, builders), timeout_sec=MS_BUILD_TIMEOUT, f_export=export,
                                      initializer=_builder_init)
    os.makedirs(work_dir, exist_ok=True)
    # its console log would bury the progress line; the full log stays in work_dir/logs
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    database = ms.tune_tir(mod, target, work_dir, max_trials_global=trials, num_trials_per_iter=min(trials, 8),
                           builder=builder, runner=_runner(tracker, key), cost_model="xgb", seed=seed,
                           num_tuning_cores=max(1, builders))
    sch = database.query_schedule(mod, target, workload_name="main")
    if sch is None:
        return None
    return sch.mod["main"].without_attr("global_symbol"), str(tvm.ir.save_json(sch.trace.as_json()))
