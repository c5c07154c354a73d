"""Everything without a kernel of its own: elementwise loop nests vectorised and parallelised,
reductions parallel over their outputs. Always applies; it is the last rule."""
from __future__ import annotations

from tvm import s_tir

from schedules.rule import Scheduled, ScheduleRule, schedule_injective, top_blocks


class Fallback(ScheduleRule):
    """Vectorise and parallelise whatever loop nests a function has."""

    def apply(self, func, spec, knobs=None):
        sch = s_tir.Schedule(func)
        for block in top_blocks(sch):
            iters = sch.get(block).iter_vars
            try:
                if all(int(iv.iter_type) == 0 for iv in iters):  # all data-parallel
                    schedule_injective(sch, block, spec.vector_lanes)
                else:
                    loops = sch.get_loops(block)
                    spatial = [lp for lp, iv in zip(loops, iters) if int(iv.iter_type) == 0]
                    if spatial and spatial == loops[:len(spatial)]:
                        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
            except Exception:  # leave a nest we cannot transform as it is: correct, just slower
                continue
        return Scheduled(sch.mod["main"], "", {})
