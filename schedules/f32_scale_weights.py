"""Conv weights scaled per input channel by a runtime vector (a squeeze-and-excitation gate), already scheduled.

out[o, 0, 0, i, oo] = w[o, 0, 0, i, oo] * g[0, i / bi, 0, 0, i % bi]: OHWI{bo}o 1x1 weights times a gate in
NCHW{bi}c (passes/fold_gate_into_conv_weights.py). Output blocks in parallel, vectorised over bo.
"""
from __future__ import annotations

import tvm
from tvm.script import tirx as T

from schedules.rule import SCHEDULED_ATTR


def kernel_name(bo: int) -> str:
    return f"f32_scale_weights_ohwi{bo}o"


def scale_weights(cob: int, cin: int, bo: int, bi: int) -> tvm.tirx.PrimFunc:
    """The kernel for [cob, 1, 1, cin, bo] weights and a [1, cin / bi, 1, 1, bi] gate; opaque to fusion (fused
    into the conv that reads it, it would run once per pixel)."""
    @T.prim_func
    def func(w: T.Buffer((cob, 1, 1, cin, bo), "float32"), g: T.Buffer((1, cin // bi, 1, 1, bi), "float32"),
             out: T.Buffer((cob, 1, 1, cin, bo), "float32")):
        T.func_attr({"tirx.noalias": True})
        for o in T.parallel(cob):
            for i in T.serial(cin):
                for oo in T.vectorized(bo):
                    out[o, 0, 0, i, oo] = w[o, 0, 0, i, oo] * g[0, i // bi, 0, 0, i % bi]
    return func.with_attr("global_symbol", kernel_name(bo)).with_attr(SCHEDULED_ATTR, 1).with_attr("op_pattern", 8)
