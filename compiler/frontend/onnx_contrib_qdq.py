"""ONNX Runtime's com.microsoft QuantizeLinear / DequantizeLinear read as the standard ops, rewritten before import.

ONNX Runtime's quantizer writes its own-domain Q / DQ where the model's opset has no standard op for the type
(int4 / uint4 weights, int16 / uint16 activations before opset 21); they compute the same values as the
standard ops. A dequantize of constants (weights, biases) is folded here into a float32 initializer:
(x - zero_point) * scale along `axis`, in float32 as the op computes it (int4 has no type in TVM). The others
move to the standard domain.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from compiler.frontend.onnx_rewriting import constants, drop_unread_initializers

DOMAIN = "com.microsoft"
OPS = ("QuantizeLinear", "DequantizeLinear")


def has_contrib_qdq(model: onnx.ModelProto) -> bool:
    return any(n.domain == DOMAIN and n.op_type in OPS for n in model.graph.node)


def _dequantized(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int) -> np.ndarray:
    shape = [1] * x.ndim
    if scale.size > 1:
        shape[axis % x.ndim] = -1
    x = x.astype(np.float32)
    if zero is not None:
        x = x - zero.astype(np.float32).reshape(shape)
    return (x * scale.astype(np.float32).reshape(shape)).astype(np.float32)


def contrib_qdq_to_standard(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(the model with standard Q / DQ and constant dequantizes folded, how many contrib nodes were rewritten)."""
    g = model.graph
    consts = constants(g)
    kept, count = [], 0
    for node in g.node:
        if node.domain != DOMAIN or node.op_type not in OPS:
            kept.append(node)
            continue
        count += 1
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.op_type == "DequantizeLinear" and all(i in consts for i in node.input if i):
            zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            value = _dequantized(consts[node.input[0]], consts[node.input[1]], zero, axis)
            g.initializer.append(numpy_helper.from_array(value, node.output[0]))
            continue
        node.domain = ""
        kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    drop_unread_initializers(g)
    if not any(n.domain == DOMAIN for n in g.node):
        for o in [o for o in model.opset_import if o.domain == DOMAIN]:
            model.opset_import.remove(o)
    return model, count
