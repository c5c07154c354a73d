"""Everything without a kernel of its own: elementwise loop nests vectorised and parallelised,
reductions parallel over their outputs. Always applies; it is the last rule.

An elementwise nest walks its output in memory order (its loops reordered by the stride each has in the
written buffer), so a layout transform or transpose writes whole vectors and gathers its reads, instead
of reading in order and scattering every lane to another plane (a blocked -> NCHW transform at a CHW
region's border ran several times slower that way).
"""
from __future__ import annotations

import math

from tvm import s_tir, sym, tirx

from schedules.rule import MIN_PARALLEL, Scheduled, ScheduleRule, schedule_injective, top_blocks


class Fallback(ScheduleRule):
    """Vectorise and parallelise whatever loop nests a function has."""

    def apply(self, func, spec, knobs=None):
        sch = s_tir.Schedule(func)
        for block in top_blocks(sch):
            iters = sch.get(block).iter_vars
            try:
                if all(int(iv.iter_type) == 0 for iv in iters):  # all data-parallel
                    if not in_write_order(sch, block, spec.vector_lanes):
                        schedule_injective(sch, block, spec.vector_lanes)
                else:
                    loops = sch.get_loops(block)
                    spatial = [lp for lp, iv in zip(loops, iters) if int(iv.iter_type) == 0]
                    if spatial and spatial == loops[:len(spatial)] \
                            and not lanes_inside_reduction(sch, block, len(spatial), spec.vector_lanes):
                        sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
            except Exception:  # leave a nest we cannot transform as it is: correct, just slower
                continue
        return Scheduled(sch.mod["main"], "", {})


def write_strides(sch: s_tir.Schedule, block) -> list[int] | None:
    """For each loop of a perfect nest whose loops each bind one block variable: that variable's stride in
    the block's (single) written buffer; None where that is not known."""
    b = sch.get(block)
    loops = sch.get_loops(block)
    realize = sch.get(loops[-1]).body if loops else None
    if len(b.writes) != 1 or not isinstance(realize, s_tir.SBlockRealize):
        return None
    region, buf = b.writes[0].region, b.writes[0].source
    flat = None
    for r, dim in zip(region, buf.shape):
        flat = r.min if flat is None else flat * dim + r.min
    loop_vars = [sch.get(lp).loop_var for lp in loops]
    bound = {}
    for iv, value in zip(b.iter_vars, realize.iter_values):
        for i, lv in enumerate(loop_vars):
            if isinstance(value, tirx.Var) and value.same_as(lv):
                bound[i] = iv.var
    if len(bound) != len(loops):
        return None
    strides = []
    for i in range(len(loops)):
        coef = sym.detect_linear_equation(flat, [bound[i]])
        if len(coef) != 2 or not isinstance(coef[0], tirx.IntImm):
            return None
        strides.append(int(coef[0]))
    return strides


def in_write_order(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """Reorder an elementwise nest by write_strides, largest first (leave it where they are not known).
    Where that changed the order and the innermost loop fills whole vectors, schedule it too: the
    innermost loop vectorised, the others fused and parallel (no index arithmetic across a fused
    innermost loop); True when scheduled."""
    loops = sch.get_loops(block)
    strides = write_strides(sch, block)
    if strides is None or len(loops) < 2:
        return False
    order = sorted(range(len(loops)), key=lambda i: -strides[i])
    if order == list(range(len(loops))):
        return False
    loops = [loops[i] for i in order]
    sch.reorder(*loops)
    if int(sch.get(loops[-1]).extent) % lanes:
        return False
    outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
    _, vec = sch.split(loops[-1], [None, lanes])
    sch.vectorize(vec)
    if math.prod(int(sch.get(lp).extent) for lp in sch.get_loops(block)) >= MIN_PARALLEL:
        sch.parallel(outer)
    return True


def lanes_inside_reduction(sch: s_tir.Schedule, block, n_spatial: int, lanes: int) -> bool:
    """A reduction whose innermost output axis is contiguous and one vector wide (a pool over a channel-blocked
    tensor): that axis moved inside the reduction loops and vectorised, the other output axes fused and
    parallel, the initial value split off; True when scheduled."""
    loops = sch.get_loops(block)
    strides = write_strides(sch, block)
    if strides is None or n_spatial < 2 or strides[n_spatial - 1] != 1 \
            or int(sch.get(loops[n_spatial - 1]).extent) != lanes:
        return False
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    sch.reorder(*spatial[:-1], *reduce, spatial[-1])
    sch.parallel(sch.fuse(*spatial[:-1]) if n_spatial > 2 else spatial[0])
    sch.vectorize(spatial[-1])
    init = sch.decompose_reduction(block, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return True
