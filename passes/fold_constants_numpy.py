"""FoldConstantsNumpy: evaluate elementwise and reshaping ops on constants with numpy, at compile time.

TVM's FoldConstant compiles a kernel per folded op (MobileNetV2 with BN: ~10 s); the ops that
decomposed batch-norms and exporters' constant subgraphs leave behind are cheap in numpy. Ops not
listed here are left to TVM's FoldConstant, which runs after this pass.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes.rewriting import BindingRewriter, const, const_np, is_const, op_name, rewrite_main, rewriter

NAME = "FoldConstantsNumpy"

_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
           "relax.divide": np.divide, "relax.maximum": np.maximum, "relax.minimum": np.minimum,
           "relax.power": np.power}
_UNARY = {"relax.sqrt": np.sqrt, "relax.rsqrt": lambda x: 1 / np.sqrt(x), "relax.negative": np.negative,
          "relax.exp": np.exp, "relax.abs": np.abs}


def _shape(value) -> list[int] | None:
    try:
        return [int(v) for v in value.ty.shape.values]
    except (AttributeError, TypeError):
        return None


@rewriter
class _Evaluator(BindingRewriter):
    # add(const, const) => const; expand_dims(const) => const; ...
    def rewrite(self, var, value):
        name = op_name(value)
        args = list(value.args) if isinstance(value, relax.Call) else []
        tensors = [a for a in args if isinstance(a.ty, relax.TensorType)]
        if not name or not tensors or not all(is_const(a) for a in tensors):
            return None
        out_shape = _shape(var)
        if out_shape is None or str(var.ty.dtype) not in ("float32", "float16", "int64", "int32"):
            return None
        dtype = np.dtype(str(var.ty.dtype))
        vals = [const_np(a) for a in tensors]
        if name in _BINARY and len(vals) == 2:
            out = _BINARY[name](vals[0], vals[1])
        elif name in _UNARY and len(vals) == 1:
            out = _UNARY[name](vals[0])
        elif name in ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.broadcast_to"):
            out = np.broadcast_to(vals[0], out_shape) if name == "relax.broadcast_to" else vals[0].reshape(out_shape)
        elif name == "relax.permute_dims":
            axes = value.attrs.axes
            out = np.transpose(vals[0], [int(a) for a in axes] if axes is not None else None)
        elif name == "relax.astype":
            out = vals[0]
        else:
            return None
        out = np.asarray(out).astype(dtype)
        return const(out.reshape(out_shape)) if list(out.shape) != out_shape and out.size == np.prod(out_shape) \
            else const(out) if list(out.shape) == out_shape else None


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class FoldConstantsNumpy:
    """Evaluate elementwise and reshaping ops on constants with numpy, at compile time."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Evaluator)[0]
