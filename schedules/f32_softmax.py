"""Softmax along the last axis (attention's weights over the keys), one row per task, in vectors.

out[r, j] = exp(x[r, j] - max_j x[r, :]) / sum_j exp(x[r, j] - max_j x[r, :]), topi's formula, with the two row
reductions written as lanes-wide partial reductions (lane l takes columns l, l + lanes, ...) and then one over
the lanes, so every pass over the row is vector arithmetic (exp is schedules/f32_exp_lowering.py's). Rows run in
parallel; a row's exponentials stay in a buffer of its own. TVM's softmax on the fallback schedule was the largest
kernel of a small attention network once its matmuls were fast (an ad-hoc per-kernel profile).
"""
from __future__ import annotations

from tvm import te

from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule

KIND = "softmax"


def row_lanes(n: int, lanes: int) -> int:
    """The widest power of two up to `lanes` dividing the row length."""
    b = lanes
    while n % b:
        b //= 2
    return b


def softmax_rows(x: te.Tensor, lanes: int) -> te.Tensor:
    shape = [int(v) for v in x.shape]
    *rows, n = shape
    b = row_lanes(n, lanes)
    chunks = n // b

    c1 = te.reduce_axis((0, chunks), "c1")
    maxpart = te.compute((*rows, b), lambda *i: te.max(x[(*i[:-1], c1 * b + i[-1])], axis=c1), name="softmax_maxpart")
    l1 = te.reduce_axis((0, b), "l1")
    rmax = te.compute(tuple(rows), lambda *i: te.max(maxpart[(*i, l1)], axis=l1), name="softmax_max")
    e = te.compute(shape, lambda *i: te.exp(x[i] - rmax[i[:-1]]), name="softmax_exp")
    c2 = te.reduce_axis((0, chunks), "c2")
    sumpart = te.compute((*rows, b), lambda *i: te.sum(e[(*i[:-1], c2 * b + i[-1])], axis=c2), name="softmax_sumpart")
    l2 = te.reduce_axis((0, b), "l2")
    rsum = te.compute(tuple(rows), lambda *i: te.sum(sumpart[(*i, l2)], axis=l2), name="softmax_sum")
    return te.compute(shape, lambda *i: e[i] / rsum[i[:-1]], name="softmax_norm", attrs={KERNEL_ATTR: KIND})


class SoftmaxRows(ScheduleRule):
    """One task per row; the row's passes vectorised over its lanes."""

    kind = KIND

    def apply(self, func, spec, knobs=None):
        if (found := self.kernel(func)) is None:
            return None
        sch, block, _ = found
        *rows, j = sch.get_loops(block)
        row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
        names = ["softmax_sum", "softmax_sumpart", "softmax_exp", "softmax_max", "softmax_maxpart"]
        for name in names:
            sch.compute_at(sch.get_sblock(name), row)
        n = int(sch.get(j).extent)
        b = row_lanes(n, spec.vector_lanes)
        for name in ("softmax_exp",):
            *_, jj = sch.get_loops(sch.get_sblock(name))
            _, jl = sch.split(jj, [None, b])
            sch.vectorize(jl)
        _, jl = sch.split(j, [None, b])
        sch.vectorize(jl)
        # NOTE: a row of one lane (odd length) or of one vector (one chunk): the partial reductions have a loop
        # of extent 1, which compute_at drops; they are left as they are
        partials = [sch.get_sblock(name) for name in ("softmax_maxpart", "softmax_sumpart")] \
            if b > 1 and n // b > 1 else []
        for blk in partials:
            *_, lane, c = sch.get_loops(blk)
            sch.reorder(c, lane)
            sch.vectorize(lane)
        sch.parallel(row)
        # NOTE: decompose_reduction after every vectorize / parallel on the block (schedules/rule.finish_tile)
        for blk in partials:
            init = sch.decompose_reduction(blk, sch.get_loops(blk)[-2])
            sch.vectorize(sch.get_loops(init)[-1])
        return Scheduled(sch.mod["main"], f"f32_softmax_rows_{b}", {})
