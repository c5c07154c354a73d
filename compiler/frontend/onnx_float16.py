"""float16 ONNX models computed in float32: the graph widened, its float16 inputs and outputs kept.

A model exported in half precision (torch `.half()`, a float16 converter) has float16 weights, activations
and casts. CPUs without float16 arithmetic compute such a model in float32 anyway (ONNX Runtime's CPU
provider inserts casts around the ops it has no float16 kernel for). Here the whole graph becomes float32
(weights, constants, casts to float16, value types) and Casts at its borders keep the model's signature:
the library takes and returns float16 as the model says.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def has_float16(model: onnx.ModelProto) -> bool:
    g = model.graph
    return any(t.data_type == F16 for t in g.initializer) or any(
        v.type.tensor_type.elem_type == F16 for v in [*g.input, *g.output])


def _widen_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_type != F16:
        return t
    return numpy_helper.from_array(numpy_helper.to_array(t).astype("float32"), t.name)


def widen_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model computing in float32, with Casts from / to its float16 inputs and outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for i, t in enumerate(g.initializer):
        g.initializer[i].CopyFrom(_widen_tensor(t))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(_widen_tensor(a.t))
            elif a.name == "to" and node.op_type == "Cast" and a.i == F16:
                a.i = F32
    for v in g.value_info:
        if v.type.tensor_type.elem_type == F16:
            v.type.tensor_type.elem_type = F32
    inits = {t.name for t in g.initializer}
    rename: dict[str, str] = {}
    casts_in = []
    for v in g.input:
        if v.type.tensor_type.elem_type == F16 and v.name not in inits:
            rename[v.name] = v.name + "__float32"
            casts_in.append(helper.make_node("Cast", [v.name], [rename[v.name]], to=F32, name=v.name + "__widen"))
    for node in g.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
    casts_out = []
    for v in g.output:
        if v.type.tensor_type.elem_type == F16:
            wide = v.name + "__float32"
            for node in g.node:
                node.output[:] = [wide if n == v.name else n for n in node.output]
                node.input[:] = [wide if n == v.name else n for n in node.input]
            src = rename.get(v.name, wide)     # an input passed straight through to an output
            casts_out.append(helper.make_node("Cast", [src], [v.name], to=F16, name=v.name + "__narrow"))
    nodes = casts_in + list(g.node) + casts_out
    del g.node[:]
    g.node.extend(nodes)
    return out
