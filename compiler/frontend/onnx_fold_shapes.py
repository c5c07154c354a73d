"""Fold the shape arithmetic exporters leave in ONNX graphs, once the input shapes are pinned.

torch.onnx and tf2onnx write `x.size()`-style code as Shape -> Gather -> Unsqueeze -> Concat -> Reshape
(channel shuffles, flattens, dynamic-batch reshapes). With every input shape fixed these are constants;
TVM's importer cannot always see that (Gather on a Shape crashes it), so they become initializers here.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Ops evaluated at compile time when all their inputs are known and small.
FOLDABLE = {"Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Mul", "Add", "Sub", "Div", "Floor",
            "Ceil", "Range", "Equal", "Where", "Reshape", "Identity", "ConstantOfShape", "Expand", "Min", "Max",
            "Sqrt", "ReduceProd", "Tile", "Not", "Less", "Greater", "Neg", "Abs", "Mod"}
MAX_ELEMENTS = 4096   # larger constants (weights) are left to the compiler's own folding
MAX_ROUNDS = 100   # each round unlocks at least one more reshape; ShuffleNet needs one per block


def _static_shapes(model: onnx.ModelProto, pins: dict[str, list[int]]) -> dict[str, list[int]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for vi in m.graph.input:
        if vi.name in pins:
            dims = vi.type.tensor_type.shape.dim
            for d, v in zip(dims, pins[vi.name]):
                d.Clear()
                d.dim_value = int(v)
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # a model shape inference cannot follow: fold nothing from it
        return {}
    shapes = {}
    for vi in [*m.graph.input, *m.graph.value_info, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and all(
                d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [int(d.dim_value) for d in dims]
    return shapes


def _shape_value(node, shape: list[int]) -> np.ndarray:
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end], np.int64)


def fold_shape_subgraphs(model: onnx.ModelProto, pins: dict[str, list[int]]) -> tuple[onnx.ModelProto, int]:
    """(model with its shape arithmetic folded into initializers, number of nodes folded)."""
    total = 0
    for _ in range(MAX_ROUNDS):   # NOTE: a folded Reshape shape lets inference see the next Shape's input
        model, folded = _fold_once(model, pins)
        total += folded
        if not folded:
            break
    return model, total


def _fold_once(model: onnx.ModelProto, pins: dict[str, list[int]]) -> tuple[onnx.ModelProto, int]:
    from onnx.reference import ReferenceEvaluator
    shapes = _static_shapes(model, pins)
    known = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    keep, folded = [], 0
    for node in model.graph.node:
        value = None
        if node.op_type == "Shape" and node.input[0] in shapes:
            value = [_shape_value(node, shapes[node.input[0]])]
        elif node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            try:
                value = [ReferenceEvaluator(node).run(None, {})[0]]
            except Exception:
                value = None
        elif node.op_type in FOLDABLE and node.domain in ("", "ai.onnx") and all(
                (not i) or (i in known and known[i].size <= MAX_ELEMENTS) for i in node.input):
            try:
                value = ReferenceEvaluator(node).run(None, {i: known[i] for i in node.input if i})
            except Exception:
                value = None
        if value is None or any(np.asarray(v).size > MAX_ELEMENTS * 16 for v in value):
            keep.append(node)
            continue
        for name, v in zip(node.output, value):
            known[name] = np.asarray(v)
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(v), name))
        folded += 1
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(keep)
    return model, folded
