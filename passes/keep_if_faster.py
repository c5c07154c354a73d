"""KeepIfFaster: run a group of passes and keep what they did only if the whole function measures faster.

A guard for rewrites whose layer-by-layer gains can be eaten by what they do to their neighbours
(sparse 1x1 kernels pull depthwise convs into CHW and add layout transforms at region borders).
The cost interface times the module before and after; with measuring off (targets that do not
run here, SHRINKC_COST=off) the group's result is kept as the passes decided.
`fallbacks`: smaller versions of the group (lists of passes), tried where the whole group measured slower or
gained less than FALLBACK_BELOW: each is run on the module as it was before, all are measured together with it
and the whole group's result (again), and the fastest is kept if it beats the module by min_gain (for sparse
regions: the model's late, low-resolution part alone, where the CHW kernels gain most and the region's costly
high-resolution borders are left out).
"""
from __future__ import annotations

import tvm
import tvm_ffi

from passes import changelog
from passes.rewriting import latencies

MIN_GAIN = 1.0      # after must be faster than before by at least this factor
FALLBACK_BELOW = 1.25   # the fallbacks are tried (against the whole) where the whole gains less than this


@tvm.ir.transform.module_pass(opt_level=0, name="KeepIfFaster")
class KeepIfFaster:
    """Run a group of passes and keep what they did only if the whole function measures faster."""

    def __init__(self, passes: list, cost, name: str, min_gain: float = MIN_GAIN,
                 fallbacks: list[tuple[str, list]] | None = None):
        """fallbacks: (label for the report, passes) for each smaller version of the group."""
        self.passes, self.cost, self.name, self.min_gain = passes, cost, name, min_gain
        self.fallbacks = fallbacks or []

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        since = changelog.checkpoint()
        after = _run(self.passes, mod)
        if _same(after, mod) or self.cost is None or not getattr(self.cost, "enabled", False):
            return after
        # NOTE: together: a whole-model time cached by an earlier compile is from another phase of the machine
        t_before, t_after = latencies(self.cost, [(mod, None), (after, None)], together=True)
        if t_after * self.min_gain < t_before and (not self.fallbacks or t_after * FALLBACK_BELOW <= t_before):
            return self._keep(after, t_before, t_after)
        whole = changelog.cut(since)          # the whole group's changes and skips, out of the book for now
        trials, takens = [("the whole", after)], [whole]
        for label, passes in self.fallbacks:
            mark = changelog.checkpoint()
            out = _run(passes, mod)
            taken = changelog.cut(mark)
            if not _same(out, mod) and not any(_same(out, t[1]) for t in trials):
                trials.append((label, out))
                takens.append(taken)
        times = [t_after]
        if len(trials) > 1:       # NOTE: all measured again, together: the first two times are from another moment
            t_before, *times = latencies(self.cost, [(mod, None)] + [(t[1], None) for t in trials], together=True)
        why = f"whole model {times[0] * 1e3:.2f} ms with the rewrite, {t_before * 1e3:.2f} ms without" + \
            "".join(f"; {t[0]} alone {x * 1e3:.2f} ms" for t, x in zip(trials[1:], times[1:]))
        best = min(range(len(trials)), key=times.__getitem__)
        if times[best] * self.min_gain < t_before:
            changelog.paste(takens[best])
            if best:
                changelog.skip(self.name, "main", f"{why}: {trials[best][0]} kept")
            return self._keep(trials[best][1], t_before, times[best], *((trials[best][0], times[0]) if best else ()))
        why += ": dropped"
        changelog.paste(whole)
        changelog.retract(since[0], f"{self.name}: {why}")
        changelog.skip(self.name, "main", why)
        return mod

    def _keep(self, out: tvm.IRModule, t_before: float, t_after: float, part: str | None = None,
              t_whole: float | None = None) -> tvm.IRModule:
        """Record the kept result; part: the fallback's label, t_whole: the whole group's time beside it."""
        changelog.record(self.name, "kept", "main",
                         **({"part": part, "whole_ms": round(t_whole * 1e3, 3)} if part else {}),
                         before_ms=round(t_before * 1e3, 3), after_ms=round(t_after * 1e3, 3),
                         speedup=round(t_before / t_after, 2))
        return out


def _run(passes: list, mod: tvm.IRModule) -> tvm.IRModule:
    for p in passes:
        mod = p(mod)
    return mod


def _same(a: tvm.IRModule, b: tvm.IRModule) -> bool:
    return a.same_as(b) or tvm_ffi.structural_equal(a, b)
