"""QOperator-format quantized ONNX (QLinearConv, QLinearMatMul and ONNX Runtime's com.microsoft QLinear* ops)
rewritten to the QDQ form: the float op between DequantizeLinear and QuantizeLinear.

ONNX Runtime's static quantization with `quant_format=QOperator` (and int8 models of the ONNX model zoo) write
each quantized op as one node on uint8 / int8 tensors, e.g.

    QLinearConv(x, xs, xz, W, Ws, Wz, ys, yz, B)  =  saturate(round((sum (x - xz)(W - Wz) + B) * xs Ws / ys) + yz)

TVM has no converter for most of them. The same op as QDQ,

    QuantizeLinear(Conv(DequantizeLinear(x, xs, xz), (W - Wz) Ws, B xs Ws), ys, yz)

(weights and int32 bias dequantized here, once), computes the same values but for float rounding of the
requantization, which can move single values by one step (so the model carries the quantized --verify tolerance);
the QDQ path then keeps every quantize step as float ops (passes/quantize_steps_in_float.py). Rewritten:
QLinearConv, QLinearMatMul, and from com.microsoft QLinearAdd, QLinearMul, QLinearGlobalAveragePool
(channels first), QLinearSigmoid, QLinearLeakyRelu, QLinearConcat and QGemm (alpha = beta = 1). A node with a
non-constant weight or scale, or another com.microsoft op, is left for the importer to name.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from compiler.frontend.dequantize import dequantize
from compiler.frontend.onnx_rewriting import NodeBuilder, constants, drop_unread_initializers

STANDARD = {"QLinearConv", "QLinearMatMul"}
MICROSOFT = {"QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
             "QLinearConcat", "QGemm"}


def has_qoperators(model: onnx.ModelProto) -> bool:
    return any(n.op_type in STANDARD and n.domain in ("", "ai.onnx")
               or n.op_type in MICROSOFT and n.domain == "com.microsoft" for n in model.graph.node)


class _Rewriter(NodeBuilder):
    def __init__(self, g: onnx.GraphProto):
        super().__init__(g, "qdq")
        self.consts = constants(g)

    def dq(self, x: str, s: str, z: str) -> str:
        return self.op("DequantizeLinear", [x, s] + ([z] if z else []), x + "__dq")

    def q(self, y: str, s: str, z: str, out: str) -> str:
        return self.op("QuantizeLinear", [y, s] + ([z] if z else []), "", output=out)

    def weight(self, w: str, s: str, z: str, axis: int) -> str | None:
        if w not in self.consts or s not in self.consts or (z and z not in self.consts):
            return None
        return self.const(w + "__float", dequantize(self.consts[w], self.consts[s],
                                                    self.consts.get(z) if z else None, axis))

    def bias(self, b: str, x_scale: str, w_scale: str) -> list[str] | None:
        """[the float bias] of an int32 bias `b` (scale x_scale * w_scale, zero point 0); [] without one; None where
        the bias or the input scale is not constant."""
        if not b:
            return []
        if b not in self.consts or x_scale not in self.consts:
            return None
        per_channel = self.consts[w_scale].astype(np.float32).reshape(-1)
        return [self.const(b + "__float", dequantize(self.consts[b], self.consts[x_scale], None, 0) * per_channel)]

    def rewrite(self, node) -> bool:
        """Append the QDQ form of a QOperator node; False (nothing appended) where it cannot be rewritten."""
        ins = list(node.input) + [""] * 9
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        out = node.output[0]
        t = node.op_type
        if t in ("QLinearConv", "QLinearMatMul"):
            conv = t == "QLinearConv"
            w = self.weight(ins[3], ins[4], ins[5], 0 if conv else 1)
            if w is None:
                return False
            extra = self.bias(ins[8], ins[1], ins[4]) if conv else []
            if extra is None:
                return False
            y = self.op("Conv" if conv else "MatMul", [self.dq(*ins[0:3]), w] + extra, out + "__float",
                        **(attrs if conv else {}))
            self.q(y, ins[6], ins[7], out)
            return True
        if t in ("QLinearAdd", "QLinearMul"):
            y = self.op(t[len("QLinear"):], [self.dq(*ins[0:3]), self.dq(*ins[3:6])], out + "__float")
            self.q(y, ins[6], ins[7], out)
            return True
        if t == "QLinearGlobalAveragePool":
            if attrs.get("channels_last", 0):
                return False
            y = self.op("GlobalAveragePool", [self.dq(*ins[0:3])], out + "__float")
            self.q(y, ins[3], ins[4], out)
            return True
        if t in ("QLinearSigmoid", "QLinearLeakyRelu"):
            y = self.op(t[len("QLinear"):], [self.dq(*ins[0:3])], out + "__float", **attrs)
            self.q(y, ins[3], ins[4], out)
            return True
        if t == "QLinearConcat":
            parts = list(node.input[2:])
            xs = [self.dq(*parts[i:i + 3]) for i in range(0, len(parts), 3)]
            y = self.op("Concat", xs, out + "__float", axis=attrs["axis"])
            self.q(y, ins[0], ins[1], out)
            return True
        if t == "QGemm":
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0):
                return False
            w = self.weight(ins[3], ins[4], ins[5], 0 if attrs.get("transB", 0) else 1)
            if w is None:
                return False
            extra = self.bias(ins[6], ins[1], ins[4])
            if extra is None:
                return False
            quantized_out = bool(ins[7])
            y = self.op("Gemm", [self.dq(*ins[0:3]), w] + extra,
                        out + "__float", output=None if quantized_out else out, transB=attrs.get("transB", 0))
            if quantized_out:
                self.q(y, ins[7], ins[8], out)
            return True
        return False


def qoperators_to_qdq(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of the model with its QOperator nodes in QDQ form, and how many were rewritten."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    r = _Rewriter(g)
    nodes, count = [], 0
    for node in g.node:
        known = node.op_type in STANDARD and node.domain in ("", "ai.onnx") or \
            node.op_type in MICROSOFT and node.domain == "com.microsoft"
        start = len(r.nodes)
        if known and r.rewrite(node):
            nodes += r.nodes[start:]
            count += 1
        else:
            del r.nodes[start:]
            nodes.append(node)
    if not count:
        return model, 0
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(r.inits)
    drop_unread_initializers(g)        # the integer weights and biases now folded
    if not any(n.domain == "com.microsoft" for n in g.node):
        keep = [o for o in out.opset_import if o.domain != "com.microsoft"]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out, count
