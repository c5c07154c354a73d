"""Dynamically quantized ONNX models (ConvInteger, MatMulInteger, DynamicQuantizeLinear) rewritten to float ops.

ONNX Runtime's `quantize_dynamic` turns each Conv / MatMul into

    DynamicQuantizeLinear(x) -> (q uint8, s, z)      s, z from the tensor's min and max at run time
    ConvInteger(q, Wq, z, Wz) -> int32  ->  Cast(float)  ->  Mul(s * Ws)  ->  Add(bias)

TVM has no ConvInteger. The same values in float32: q - z = clip(round(x / s) + z, 0, 255) - z is a whole
number in [-255, 255], Wq - Wz a whole-number constant, and a conv of whole numbers summed in float32 is
exact while the sums stay below 2^24 (rounded like any float conv beyond). So here

    DynamicQuantizeLinear(x)  ->  s = (max(max(x), 0) - min(min(x), 0)) / 255,
                                  z = round(clip(-min(min(x), 0) / s, 0, 255)),
                                  q - z = clip(round(x / s) + z, 0, 255) - z         (all float32)
    ConvInteger(q, Wq, z, Wz) ->  Conv(q - z, float(Wq - Wz))     (float32, whole numbers)
    Cast(to float) of it      ->  Identity

and MatMulInteger with a constant B likewise becomes MatMul. Outputs anything else reads (the uint8 q, an
int32 product read as int) keep their type through a Cast, so the graph's semantics stay those of the model.
round is ties-to-even (ONNX Round), as the ONNX definition of DynamicQuantizeLinear rounds. A ConvInteger
whose weights are not constant is left alone (TVM then names it as an unsupported op).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from compiler.frontend.dequantize import dequantize
from compiler.frontend.onnx_rewriting import NodeBuilder, constants, drop_unread_initializers

INTEGER_OPS = ("ConvInteger", "MatMulInteger")


def has_integer_ops(model: onnx.ModelProto) -> bool:
    return any(n.op_type in INTEGER_OPS for n in model.graph.node)


def _dynamic_quantize(b: NodeBuilder, node) -> dict:
    """Float ops for one DynamicQuantizeLinear: its scale under the original name, q - z (float) for the
    integer ops that read q and z, and uint8 casts under the original names for any other reader."""
    x, (q, s, z) = node.input[0], node.output
    zero, levels = b.const(s + "__zero", np.float32(0)), b.const(s + "__levels", np.float32(255))
    hi = b.op("Max", [b.op("ReduceMax", [x], x + "__max", keepdims=0), zero], x + "__hi")
    lo = b.op("Min", [b.op("ReduceMin", [x], x + "__min", keepdims=0), zero], x + "__lo")
    b.op("Div", [b.op("Sub", [hi, lo], s + "__range"), levels], "", output=s)
    zf = b.op("Round", [b.op("Clip", [b.op("Div", [b.op("Neg", [lo], lo + "__neg"), s], z + "__raw"),
                                      zero, levels], z + "__clipped")], z + "__float")
    qf = b.op("Clip", [b.op("Add", [b.op("Round", [b.op("Div", [x, s], q + "__scaled")], q + "__rounded"), zf],
                            q + "__shifted"), zero, levels], q + "__float")
    centred = b.op("Sub", [qf, zf], q + "__centred")
    b.op("Cast", [qf], "", output=q, to=TensorProto.UINT8)
    b.op("Cast", [zf], "", output=z, to=TensorProto.UINT8)
    return {"z": z, "qf": qf, "centred": centred}


def _centred_input(b: NodeBuilder, x: str, zp: str | None, quantized: dict, consts: dict) -> str:
    """float(x - zp) for an integer op's input: the DynamicQuantizeLinear's q - z where it made both."""
    src = quantized.get(x)
    if src is not None and (zp is None or zp == src["z"]):
        return src["centred"] if zp else src["qf"]
    xf = b.op("Cast", [x], x + "__as_float", to=TensorProto.FLOAT)
    if not zp:
        return xf
    if zp in consts:
        return b.op("Sub", [xf, b.const(zp + "__as_float", consts[zp].astype(np.float32))], x + "__centred")
    return b.op("Sub", [xf, b.op("Cast", [zp], zp + "__as_float", to=TensorProto.FLOAT)], x + "__centred")


def integer_ops_in_float(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of the model with ConvInteger / MatMulInteger (constant weights) and the DynamicQuantizeLinear
    nodes feeding them as float32 ops; and how many integer ops were rewritten."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = constants(g)
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    b = NodeBuilder(g, "float")
    quantized: dict[str, dict] = {}     # q output of a rewritten DynamicQuantizeLinear -> its float parts
    converted, rewritten = {}, 0         # integer op output -> its float twin
    kept = []
    for node in g.node:
        if node.op_type == "DynamicQuantizeLinear" and any(
                r.op_type in INTEGER_OPS and r.input[1] in consts for r in readers.get(node.output[0], [])):
            quantized[node.output[0]] = _dynamic_quantize(b, node)
            continue
        inputs = list(node.input) + [""] * (4 - len(node.input))
        if node.op_type in INTEGER_OPS and inputs[1] in consts:
            x = _centred_input(b, inputs[0], inputs[2] or None, quantized, consts)
            wzp = consts.get(inputs[3]) if inputs[3] else None
            if inputs[3] and wzp is None:
                kept.append(node)
                continue
            conv = node.op_type == "ConvInteger"
            w = b.const(inputs[1] + "__float", dequantize(consts[inputs[1]], 1.0, wzp, 0 if conv else 1))   # W - Wz
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            res = b.op("Conv" if conv else "MatMul", [x, w], node.output[0] + "__float", **(attrs if conv else {}))
            converted[node.output[0]] = res
            b.op("Cast", [res], "", output=node.output[0], to=TensorProto.INT32)
            rewritten += 1
            continue
        to = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("to")
        if node.op_type == "Cast" and node.input[0] in converted and to == TensorProto.FLOAT:
            b.op("Identity", [converted[node.input[0]]], "", output=node.output[0])
            continue
        kept.append(node)
    if not rewritten:
        return model, 0
    nodes = _without_dead(kept + b.nodes, {v.name for v in g.output})
    del g.node[:]
    g.node.extend(_topological(nodes, {t.name for t in g.initializer} | {v.name for v in g.input} |
                               {t.name for t in b.inits}))
    g.initializer.extend(b.inits)
    drop_unread_initializers(g)        # the integer weights and zero points now folded
    return out, rewritten


def _without_dead(nodes: list, outputs: set[str]) -> list:
    """The nodes something reads (another live node or a graph output)."""
    while True:
        read = outputs | {i for n in nodes for i in n.input}
        live = [n for n in nodes if any(o in read for o in n.output)]
        if len(live) == len(nodes):
            return live
        nodes = live


def _topological(nodes: list, available: set[str]) -> list:
    """The nodes in an order where each comes after the producers of its inputs."""
    done, order, pending = set(available) | {""}, [], list(nodes)
    while pending:
        rest = [n for n in pending if not all(i in done for i in n.input)]
        ready = [n for n in pending if all(i in done for i in n.input)]
        if not ready:   # a cycle or a missing input: keep the remaining order, the importer will name it
            return order + rest
        for n in ready:
            done.update(n.output)
        order += ready
        pending = rest
    return order
