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

    def row_reduce(reduce, src, name):
        # lane l reduces columns l, l + b, ... (name + "part"), then the b lanes are reduced (name)
        c = te.reduce_axis((0, chunks), "c")
        part = te.compute((*rows, b), lambda *i: reduce(src[(*i[:-1], c * b + i[-1])], axis=c), name=name + "part")
        lane = te.reduce_axis((0, b), "l")
        return te.compute(tuple(rows), lambda *i: reduce(part[(*i, lane)], axis=lane), name=name)

    rmax = row_reduce(te.max, x, "softmax_max")
    e = te.compute(shape, lambda *i: te.exp(x[i] - rmax[i[:-1]]), name="softmax_exp")
    rsum = row_reduce(te.sum, e, "softmax_sum")
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
        for name in ("softmax_sum", "softmax_sumpart", "softmax_exp", "softmax_max", "softmax_maxpart"):
            sch.compute_at(sch.get_sblock(name), row)
        n = int(sch.get(j).extent)
        b = row_lanes(n, spec.vector_lanes)
        for blk in (sch.get_sblock("softmax_exp"), block):     # the two passes over a whole row
            _, jl = sch.split(sch.get_loops(blk)[-1], [None, b])
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
