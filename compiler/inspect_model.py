"""`shrinkc inspect`: a model's inputs, outputs and op counts, read straight from the file."""
from __future__ import annotations

from collections import Counter

import numpy as np

from targets.errors import ShrinkcError


def _onnx(path: str) -> list[str]:
    from compiler.frontend.onnx_import import load_onnx
    from onnx import numpy_helper
    model = load_onnx(path)
    inits = {t.name: t for t in model.graph.initializer}
    lines = [f"ONNX model {path} (opset {max(o.version for o in model.opset_import)}, producer "
             f"'{model.producer_name or '?'}')"]
    for vi in model.graph.input:
        if vi.name not in inits:
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
            lines.append(f"  input  {vi.name}: {'x'.join(map(str, dims))}")
    for vi in model.graph.output:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]
        lines.append(f"  output {vi.name}: {'x'.join(map(str, dims)) or '?'}")
    ops = Counter(n.op_type for n in model.graph.node)
    lines.append("  ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    kinds = Counter()
    zeros = []
    for n in model.graph.node:
        if n.op_type != "Conv" or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if group > 1 and group == w.shape[0] and w.shape[1] == 1:
            kinds[f"depthwise {w.shape[2]}x{w.shape[3]}"] += 1
        elif w.shape[2:] == (1, 1):
            kinds["1x1"] += 1
            zeros.append(float(np.mean(w == 0)))
        else:
            kinds[f"dense {w.shape[2]}x{w.shape[3]}"] += 1
    if kinds:
        lines.append("  convs: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    if zeros:
        lines.append(f"  1x1 weight zeros: mean {np.mean(zeros):.0%}, max {max(zeros):.0%}, "
                     f"{sum(z >= 2 / 3 for z in zeros)} of {len(zeros)} at >= 67%")
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    lines.append(f"  parameters: {params / 1e6:.2f} M")
    return lines


def _tflite(path: str) -> list[str]:
    import tflite
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ShrinkcError(f"'{path}' is not a TFLite model (no TFL3 identifier)", "pass a .tflite file")
    model = tflite.Model.GetRootAsModel(buf, 0)
    graph = model.Subgraphs(0)
    names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    ops = Counter()
    for i in range(graph.OperatorsLength()):
        code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        ops[names.get(builtin, str(builtin)) if builtin != tflite.BuiltinOperator.CUSTOM
            else "CUSTOM:" + (code.CustomCode() or b"?").decode()] += 1
    lines = [f"TFLite model {path} ({graph.OperatorsLength()} ops)"]
    for kind, n, get in (("input ", graph.InputsLength(), graph.Inputs), ("output", graph.OutputsLength(), graph.Outputs)):
        for j in range(n):
            t = graph.Tensors(get(j))
            lines.append(f"  {kind} {t.Name().decode()}: {'x'.join(str(d) for d in t.ShapeAsNumpy())}")
    lines.append("  ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    sparse = sum(1 for j in range(graph.TensorsLength()) if graph.Tensors(j).Sparsity() is not None)
    if sparse:
        lines.append(f"  sparse weight tensors: {sparse}")
    return lines


def describe(path: str) -> str:
    from compiler.driver import detect_format
    return "\n".join(_tflite(path) if detect_format(path) == "tflite" else _onnx(path))
