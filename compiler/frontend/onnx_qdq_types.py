"""Quantize / dequantize steps TVM's ONNX importer cannot read, rewritten before import into ones it can.

- ONNX Runtime's quantizer writes its own com.microsoft QuantizeLinear / DequantizeLinear where the model's opset
  has no standard op for the type (int4 / uint4 weights, int16 / uint16 activations before opset 21); they compute
  the same values as the standard ops and move to the standard domain.
- A dequantize of constants (weights, biases) in that domain, or of an int4 / uint4 tensor in any (opset 21's
  standard ops take them; TVM cannot hold the packed type), is folded into a float32 initializer:
  (x - zero_point) * scale, per tensor, along `axis`, or in blocks of `block_size` along it, in float32 as the
  op computes it.
"""
from __future__ import annotations

import onnx
from onnx import numpy_helper

from compiler.frontend.dequantize import dequantize
from compiler.frontend.onnx_rewriting import constants, drop_unread_initializers

DOMAIN = "com.microsoft"
OPS = ("QuantizeLinear", "DequantizeLinear")
PACKED = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


def _packed_initializers(g: onnx.GraphProto) -> set[str]:
    return {t.name for t in g.initializer if t.data_type in PACKED}


def has_unreadable_qdq(model: onnx.ModelProto) -> bool:
    packed = _packed_initializers(model.graph)
    return any(n.op_type in OPS and (n.domain == DOMAIN or (n.input and n.input[0] in packed))
               for n in model.graph.node)


def readable_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(the model with standard Q / DQ and those constant dequantizes folded, how many nodes were rewritten)."""
    g = model.graph
    consts, packed = constants(g), _packed_initializers(g)
    kept, count = [], 0
    for node in g.node:
        contrib = node.domain == DOMAIN and node.op_type in OPS
        if not contrib and not (node.op_type == "DequantizeLinear" and node.input[0] in packed):
            kept.append(node)
            continue
        count += 1
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "DequantizeLinear" and all(i in consts for i in node.input if i):
            zero = consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            value = dequantize(consts[node.input[0]], consts[node.input[1]], zero, attrs.get("axis", 1),
                               attrs.get("block_size", 0))
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
