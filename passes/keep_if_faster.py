"""KeepIfFaster: run a group of passes and keep what they did only if the whole function measures faster.

A guard for rewrites whose layer-by-layer gains can be eaten by what they do to their neighbours
(sparse 1x1 kernels pull depthwise convs into CHW and add layout transforms at region borders).
The cost interface times the module before and after; with measuring off (targets that do not
run here, SHRINKC_COST=off) the group's result is kept as the passes decided.
"""
from __future__ import annotations

import tvm
import tvm_ffi

from passes import changelog
from passes.rewriting import latencies

MIN_GAIN = 1.0      # after must be faster than before by at least this factor


@tvm.ir.transform.module_pass(opt_level=0, name="KeepIfFaster")
class KeepIfFaster:
    """Run a group of passes and keep what they did only if the whole function measures faster."""

    def __init__(self, passes: list, cost, name: str, min_gain: float = MIN_GAIN):
        self.passes, self.cost, self.name, self.min_gain = passes, cost, name, min_gain

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        since = changelog.mark()
        after = mod
        for p in self.passes:
            after = p(after)
        if after.same_as(mod) or tvm_ffi.structural_equal(after, mod) or self.cost is None \
                or not getattr(self.cost, "enabled", False):
            return after
        t_before, t_after = latencies(self.cost, [(mod, None), (after, None)])
        if t_after * self.min_gain < t_before:
            changelog.record(self.name, "kept", "main", before_ms=round(t_before * 1e3, 3),
                             after_ms=round(t_after * 1e3, 3), speedup=round(t_before / t_after, 2))
            return after
        why = f"whole model {t_after * 1e3:.2f} ms with the rewrite >= {t_before * 1e3:.2f} ms without: dropped"
        changelog.retract(since, f"{self.name}: {why}")
        changelog.skip(self.name, "main", why)
        return mod
