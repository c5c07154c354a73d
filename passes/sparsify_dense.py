"""SparsifyDense: run mostly-zero fully connected layers as sparse matrix-vector kernels with compressed weights.

matmul(x[1, K], W[K, N]) [-> add(bias[N])]  =>  call_tir(f32_spmv_perm_16x32 | f32_spmv_sell_R, x, <weights>, bias)
conv2d(x[1, K, 1, 1], W[N, K, 1, 1]) [-> add(bias)]  =>  reshape, the same call, reshape to [1, N, 1, 1]
Applies to batch-1 f32 matmuls whose right operand is a 2-D constant (what ONNX Gemm / MatMul and
Relax's linear leave after cleanup), and to 1x1 convs on a 1x1 plane (Keras' MobileNetV3 heads and
squeeze-excite convs: matrix-vector products that SparsifyConv1x1 leaves alone, its kernels being
vectorised over pixels), with at least `sparse_min` zeros. Two kernels, each with its own
compressed weights (the dense weights leave the module): on AVX-512, f32_spmv_perm (per slice of 16
rows and chunk of 32 inputs, the inputs picked from registers by a permute; schedules/f32_spmv_perm.py);
on every CPU, f32_spmv_sell (sliced-ELL, inputs gathered; schedules/f32_spmv_sell.py). Where the cost
interface measures, every kernel the target has is timed and a layer goes sparse only when the fastest
is faster than our dense fully connected kernel; elsewhere the first kernel of `kernels(spec)` is taken
when the zero share is high enough.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.merge_linear_chains import var_layer_name
from passes.rewriting import BindingRewriter, channel_vector, const, const_np, is_const, op_name, rewrite_main, \
    latencies, rewriter
from passes.sparsify_conv1x1 import SPARSE_MIN, add_kernel, conv1x1_weights
from schedules import f32_spmv_perm, f32_spmv_sell
from schedules.f32_spmv_perm import encode_perm, spmv_perm
from schedules.f32_spmv_sell import encode_sell, spmv_sell

NAME = "SparsifyDense"
ROW_VECTORS = (1, 2)        # output rows per slice of the sell kernel, in vectors


def kernels(spec) -> list[tuple[str, int]]:
    """The sparse kernels a layer may run on `spec`, as (kind, output rows per slice), the usually
    fastest first: ("perm", 16) on AVX-512, then ("sell", rows) for each of ROW_VECTORS."""
    sell = [("sell", v * spec.vector_lanes) for v in ROW_VECTORS]
    return ([("perm", f32_spmv_perm.ROWS)] if spec.isa == f32_spmv_perm.ISA else []) + sell


def kernel_name(kernel: tuple[str, int]) -> str:
    kind, rows = kernel
    return f32_spmv_perm.kernel_name() if kind == "perm" else f32_spmv_sell.kernel_name(rows)


def dense_weights(value) -> np.ndarray | None:
    """[N, K] weights (output rows x inputs) of a batch-1 f32 matmul x[1, K] @ W[K, N] with constant W."""
    if op_name(value) != "relax.matmul":
        return None
    x, w = value.args
    if not is_const(w) or x.ty.shape is None or len(x.ty.shape.values) != 2:
        return None
    wt = const_np(w)
    m = x.ty.shape.values[0]
    if wt.ndim != 2 or wt.dtype != np.float32 or str(x.ty.dtype) != "float32" \
            or not isinstance(m, tvm.tirx.IntImm) or int(m) != 1:
        return None
    return np.ascontiguousarray(wt.T)


def point_conv_weights(value) -> np.ndarray | None:
    """[N, K] weights of a batch-1 f32 NCHW 1x1 conv (constant weights) on a 1x1 plane: x[1, K, 1, 1]."""
    w = conv1x1_weights(value)
    if w is None or [int(d) for d in value.args[0].ty.shape.values[2:]] != [1, 1]:
        return None
    return np.ascontiguousarray(w)


@rewriter
class _Sparsifier(BindingRewriter):
    def __init__(self, mod, func, spec, cost, sparse_min):
        super().__init__(mod, func)
        self.spec, self.cost, self.sparse_min = spec, cost, sparse_min
        self.plans: dict = {}     # the bias add's input var -> plan

    def rewrite(self, var, value):
        if var in self.plans:
            return self.emit_sparse(self.plans.pop(var))
        w, ndim = dense_weights(value), 2
        if w is None:
            w, ndim = point_conv_weights(value), 4
        if w is None:
            return None
        plan = {"w": w, "x": value.args[0], "bias": None, "name": var.name, "ndim": ndim}
        user = self.only_user(var)
        if isinstance(user, relax.VarBinding) and op_name(user.value) == "relax.add":
            a, b = user.value.args
            other = b if a.same_as(var) else a if b.same_as(var) else None
            bias = channel_vector(other, w.shape[0], axis=1, ndim=ndim) if other is not None else None
            if bias is not None:
                plan.update(bias=bias, name=var_layer_name(var, user.var), last=user.var)
        zeros = 1.0 - np.count_nonzero(w) / w.size
        if zeros < self.sparse_min:
            changelog.skip(NAME, plan["name"], f"sparse fully connected skipped: {zeros:.0%} zeros "
                                               f"< {self.sparse_min:.0%}")
            return None
        plan["zeros"] = zeros
        choice = self.choose(plan)
        if choice is None:
            return None
        plan.update(choice)
        if "last" in plan:
            self.plans[plan["last"]] = plan
            return None
        return self.emit_sparse(plan)

    def choose(self, plan) -> dict | None:
        """The sparse kernel, and whether it beats dense (measured where the cost interface measures)."""
        options = kernels(self.spec)
        if self.cost is None or not getattr(self.cost, "enabled", False):
            return {"kernel": options[0], "speedup": None}
        dense, *sparse = latencies(self.cost, [(dense_layer_module(plan), dense_key(plan))]
                                   + [(sparse_layer_module(plan, kernel), None) for kernel in options])
        timed = dict(zip(options, sparse))
        best = min(timed, key=timed.get)
        if timed[best] >= dense:
            changelog.skip(NAME, plan["name"], f"sparse fully connected skipped: {plan['zeros']:.0%} zeros but "
                                               f"sparse {timed[best] * 1e6:.0f} us >= dense {dense * 1e6:.0f} us")
            return None
        return {"kernel": best, "speedup": round(dense / timed[best], 2)}

    def emit_sparse(self, plan):
        n, k = plan["w"].shape
        x = plan["x"] if _ndim(plan) == 2 else self.emit(relax.op.reshape(plan["x"], [1, k]))
        func, args = _sparse_call_parts(plan, plan["kernel"], x)
        gv, func = add_kernel(self, func)
        changelog.record(NAME, "sparse", plan["name"], zeros=round(plan["zeros"], 3), block=1, block_fill=1.0,
                         kernel=str(func.attrs["global_symbol"]), speedup=plan["speedup"])
        y = relax.call_tir(gv, args, relax.TensorType([1, n], "float32"))
        return y if _ndim(plan) == 2 else relax.op.reshape(self.emit(y), [1, n, 1, 1])


def _sparse_call_parts(plan, kernel, x):
    """The kernel ((kind, rows) from kernels()) and its arguments: x, the compressed weights, bias."""
    n, k = plan["w"].shape
    kind, rows = kernel
    if kind == "perm":
        weights = encode_perm(plan["w"])
        func = spmv_perm(k, n, len(weights[1]))
    else:
        weights = encode_sell(plan["w"], rows)
        func = spmv_sell(k, n, rows, len(weights[1]), str(weights[1].dtype))
    bias = plan["bias"] if plan["bias"] is not None else np.zeros(n, np.float32)
    return func.with_attr("op_pattern", 8), relax.Tuple([x, *map(const, weights), const(bias)])   # opaque: never fused


def _ndim(plan) -> int:
    """The layer's input rank: 2 for a fully connected layer (a plan may leave it out), 4 for a conv on a 1x1 plane."""
    return plan.get("ndim", 2)


def dense_key(plan) -> str:
    """The cost key of the dense layer: its shape only (a dense kernel's speed does not depend on the weights)."""
    n, k = plan["w"].shape
    kind = "densefc" if _ndim(plan) == 2 else "denseconv1x1@1x1"
    return f"{kind}|{k}x{n}|bias={plan['bias'] is not None}"


def _layer_function(plan, body) -> tvm.IRModule:
    x = relax.Var("x", relax.TensorType([1, plan["w"].shape[1]] + [1, 1] * (_ndim(plan) == 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def dense_layer_module(plan) -> tvm.IRModule:
    """The dense layer as phase 4 runs it: matmul with the constant [K, N] weights (or the 1x1 conv), then
    the bias add."""
    def body(bb, x):
        if _ndim(plan) == 2:
            y, bias_shape = bb.emit(relax.op.matmul(x, const(plan["w"].T))), [-1]
        else:
            y, bias_shape = bb.emit(relax.op.nn.conv2d(x, const(plan["w"][:, :, None, None]))), [1, -1, 1, 1]
        return relax.op.add(y, const(plan["bias"].reshape(bias_shape))) if plan["bias"] is not None else y
    return _layer_function(plan, body)


def sparse_layer_module(plan, kernel) -> tvm.IRModule:
    """The layer as one call of `kernel` ((kind, rows) from kernels())."""
    def body(bb, x):
        n, k = plan["w"].shape
        x = x if _ndim(plan) == 2 else bb.emit(relax.op.reshape(x, [1, k]))
        func, args = _sparse_call_parts(plan, kernel, x)
        gv = bb.add_func(func, func.attrs["global_symbol"])
        y = relax.call_tir(gv, args, relax.TensorType([1, n], "float32"))
        return y if _ndim(plan) == 2 else relax.op.reshape(bb.emit(y), [1, n, 1, 1])
    return _layer_function(plan, body)


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class SparsifyDense:
    """Run mostly-zero fully connected layers as sparse matrix-vector kernels with compressed weights."""

    def __init__(self, spec, cost=None, sparse_min: float = SPARSE_MIN):
        self.spec, self.cost, self.sparse_min = spec, cost, sparse_min

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Sparsifier, self.spec, self.cost, self.sparse_min)[0]
