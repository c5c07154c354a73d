"""Matmuls of two computed tensors (attention's Q K^T and weights x V): a register tile of rows x vectors.

out[..., i, j] = sum_k a[..., i, k] * b[..., k, j], the leading (batch) axes equal in both. TVM's own matmul ran
these on the fallback schedule (benchmarks/REAL-EXPORTS-vit-before.md: a small attention network at 0.05x). Each
task keeps P rows x NV vectors of `out` in registers and walks k: per k, NV vector loads of b's row k (contiguous
along j) and P broadcasts of a, P x NV FMAs. Tasks (batch x row tiles x column tiles) run in parallel.
"""
from __future__ import annotations

from tvm import te

from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, best_divisor, finish_tile, tile_in_registers

KIND = "batch_matmul"
ROWS = 4          # rows of the register tile (at most; a divisor of M)
VECTORS = 4       # vectors of the register tile along j (at most; a divisor of N / lanes)


def applies(a_shape: list[int], b_shape: list[int]) -> bool:
    """Ranks of at least 2, equal; the batch axes equal (no broadcasting); inner dimensions matching."""
    return len(a_shape) == len(b_shape) >= 2 and a_shape[:-2] == b_shape[:-2] and a_shape[-1] == b_shape[-2]


def batch_matmul(a: te.Tensor, b: te.Tensor) -> te.Tensor:
    shape_a, shape_b = [int(v) for v in a.shape], [int(v) for v in b.shape]
    k = te.reduce_axis((0, shape_a[-1]), "k")
    return te.compute((*shape_a[:-1], shape_b[-1]),
                      lambda *idx: te.sum(a[(*idx[:-1], k)] * b[(*idx[:-2], k, idx[-1])], axis=k),
                      name="batch_matmul", attrs={KERNEL_ATTR: KIND})


class BatchMatmul(ScheduleRule):
    """Rows x vectors of the output in registers, vectorised along its last axis."""

    kind = KIND

    def apply(self, func, spec, knobs=None):
        if (found := self.kernel(func)) is None:
            return None
        sch, block, _ = found
        *batch, i, j, k = sch.get_loops(block)
        m, n = (int(sch.get(lp).extent) for lp in (i, j))
        lanes = best_divisor(n, spec.vector_lanes)
        nv = best_divisor(n // lanes, VECTORS)
        p = best_divisor(m, ROWS)
        i_o, i_i = sch.split(i, [None, p])
        j_o, j_v, j_l = sch.split(j, [None, nv, lanes])
        sch.reorder(*batch, i_o, j_o, k, i_i, j_v, j_l)
        wb, left = tile_in_registers(sch, block, j_o)
        sch.parallel(sch.fuse(*batch, i_o, j_o))
        sch.unroll(i_i)
        sch.unroll(j_v)
        sch.vectorize(j_l)
        finish_tile(sch, block, wb, k, left, spec.vector_lanes)
        return Scheduled(sch.mod["main"], f"f32_batch_matmul_{p}x{nv * lanes}", {})
