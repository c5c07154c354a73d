"""Kernels tuned by MetaSchedule: replay the schedule trace a tuning record holds.

Applies only when the knobs from a tuning database carry a `trace` (TVM JSON text of the trace;
compiler/tune_meta.py wrote it
for a kernel our own rules have no knobs for); otherwise, or when the trace no longer fits the
function, it declines and the usual rules schedule the kernel.
"""
from __future__ import annotations

import tvm
from tvm import s_tir

from passes import changelog
from schedules.rule import Scheduled, ScheduleRule


class MetaScheduleTrace(ScheduleRule):
    """Replay a MetaSchedule trace from the tuning database."""

    def apply(self, func, spec, knobs=None):
        if not knobs or "trace" not in knobs:
            return None
        sch = s_tir.Schedule(func)
        try:
            s_tir.schedule.Trace.apply_json_to_schedule(tvm.ir.load_json(knobs["trace"]), sch)
        except Exception as err:  # a stale record: the default schedule is still correct
            changelog.skip("MetaScheduleTrace", "", f"trace does not replay: {str(err).strip()[:120]}")
            return None
        changelog.record("MetaScheduleTrace", "replayed", "", trace_bytes=len(knobs["trace"]))
        return Scheduled(sch.mod["main"], "", {k: v for k, v in knobs.items() if k != "trace"})
