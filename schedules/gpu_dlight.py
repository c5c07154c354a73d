"""CUDA kernels: TVM's dlight GPU rules behind our rule interface; a rule that raises does not apply.

NOTE: dlight's GEMV rule asserts on some 1x1-conv functions (TVM 0.27); trying the next rule is
what ApplyDefaultSchedule should do, so the adapter catches it.
"""
from __future__ import annotations

from tvm import s_tir
from tvm.s_tir import dlight

from schedules.meta_schedule_trace import MetaScheduleTrace
from schedules.rule import Scheduled, ScheduleRule


class DlightRule(ScheduleRule):
    """One dlight GPU rule."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, spec, knobs=None):
        try:
            out = self.rule.apply(func, spec.tvm_target(), False)
        except Exception:
            return None
        if out is None:
            return None
        sch = out[0] if isinstance(out, list) else out
        if not isinstance(sch, s_tir.Schedule):
            return None
        return Scheduled(sch.mod["main"], "", {})


GPU_RULES = [MetaScheduleTrace(), *(DlightRule(r) for r in (dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                                          dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()))]
