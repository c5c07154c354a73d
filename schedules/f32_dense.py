"""Fully connected layers (x[M, K] @ W[K, N] with constant W, small M): vectorised over N.

Applies to `relax.matmul` whose right operand is a 2-D constant. Each task keeps `n_vectors`
accumulator vectors of N in registers while streaming K. Knob: `n_vectors`.
"""
from __future__ import annotations

from tvm import s_tir, te

from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, best_divisor, inline_epilogue, kernel_block, \
    schedule_injective

KIND = "dense"


def dense(x: te.Tensor, w: te.Tensor) -> te.Tensor:
    m, k_ = (int(v) for v in x.shape)
    n = int(w.shape[1])
    k = te.reduce_axis((0, k_), "k")
    return te.compute((m, n), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="dense",
                      attrs={KERNEL_ATTR: KIND})


class Dense(ScheduleRule):
    """Fully connected layers vectorised over the output features."""

    kind = KIND

    def apply(self, func, spec, knobs=None):
        sch = s_tir.Schedule(func)
        block, _ = kernel_block(sch, KIND)
        if block is None:
            return None
        i, j, k = sch.get_loops(block)
        n = int(sch.get(j).extent)
        lanes = spec.vector_lanes
        if n % lanes:
            lanes = best_divisor(n, lanes)
        nv = (knobs or {}).get("n_vectors", best_divisor(n // lanes, 4))
        j_o, j_v, j_l = sch.split(j, [None, nv, lanes])
        sch.reorder(i, j_o, k, j_v, j_l)
        wb = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(wb, j_o)
        left = inline_epilogue(sch, wb, j_o)
        sch.parallel(sch.fuse(i, j_o))
        sch.unroll(j_v)
        if lanes > 1:
            sch.vectorize(j_l)
            sch.vectorize(sch.get_loops(wb)[-1])
        sch.decompose_reduction(block, k)
        for blk in left:
            schedule_injective(sch, blk, spec.vector_lanes)
        return Scheduled(sch.mod["main"], f"f32_dense_{nv * lanes}", {"n_vectors": nv})
