"""Fully connected layers (x[M, K] @ W[K, N] with constant W, small M): vectorised over N.

Applies to `relax.matmul` whose right operand is a 2-D constant. W is packed at compile time into
[N/T, K, T] panels (T = n_vectors x lanes, N zero-padded), so each task streams one contiguous
panel while T accumulators of the output stay in registers. Knob: `n_vectors` (fixed at packing).
"""
from __future__ import annotations

import numpy as np
from tvm import te

from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, best_divisor, finish_tile, tile_in_registers

KIND = "dense"


def pack_weights(w: np.ndarray, tile: int) -> np.ndarray:
    """[K, N] -> [ceil(N/tile), K, tile], zero-padded."""
    k, n = w.shape
    n_pad = -(-n // tile) * tile
    full = np.zeros((k, n_pad), np.float32)
    full[:, :n] = w
    return np.ascontiguousarray(full.reshape(k, n_pad // tile, tile).transpose(1, 0, 2))


def dense(x: te.Tensor, wp: te.Tensor) -> te.Tensor:
    """out[i, j] = sum_k x[i, k] * wp[j // T, k, j % T], over the padded N."""
    m, k_ = (int(v) for v in x.shape)
    panels, _, tile = (int(v) for v in wp.shape)
    k = te.reduce_axis((0, k_), "k")
    return te.compute((m, panels * tile), lambda i, j: te.sum(x[i, k] * wp[j // tile, k, j % tile], axis=k),
                      name="dense", attrs={KERNEL_ATTR: KIND, "tile": tile})


class Dense(ScheduleRule):
    """Fully connected layers vectorised over the output features."""

    kind = KIND

    def apply(self, func, spec, knobs=None):
        if (found := self.kernel(func)) is None:
            return None
        sch, block, ann = found
        i, j, k = sch.get_loops(block)
        tile = int(ann["tile"])
        lanes = best_divisor(tile, spec.vector_lanes)
        nv = tile // lanes
        j_o, j_v, j_l = sch.split(j, [None, nv, lanes])
        sch.reorder(i, j_o, k, j_v, j_l)
        wb, left = tile_in_registers(sch, block, j_o)
        sch.parallel(sch.fuse(i, j_o))
        sch.unroll(j_v)
        sch.vectorize(j_l)
        finish_tile(sch, block, wb, k, left, spec.vector_lanes)
        return Scheduled(sch.mod["main"], f"f32_dense_{nv * lanes}", {"n_vectors": nv})
