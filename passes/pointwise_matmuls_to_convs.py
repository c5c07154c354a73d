"""PointwiseMatmulsToConvs: a matmul that applies one weight matrix to every pixel (or token) is a 1x1 conv.

Channel-last MLPs (ConvNeXt's blocks: Linear layers on [1, H, W, C] tensors; token MLPs and attention's
projections on [1, L, C] or [L, 1, C]) reach Relax as `matmul(x, W)` with a constant [K, N] W and x of rank 3 or
more (rank 2, a classifier's [1, K], is the fully connected kernel's). TVM computes those with its generic matmul
on the fallback schedule (ConvNeXt-T at 0.02x ONNX Runtime's speed, benchmarks/REAL-EXPORTS-convnext-before.md);
as a 1x1 conv they run the target's conv kernels, and the bias add, activation and scale after them fold and fuse
as after any conv:

    matmul(x[1, H, W, K], W[K, N])  =>  permute_dims(conv2d(permute_dims(x, NCHW), W^T[N, K, 1, 1]), NHWC)
    matmul(x[.., K], W[K, N])       =>  the same on x viewed as [1, pixels, 1, K] (rank 3 and up: tokens)

NOTE: phase 1 before CancelLayoutPermutes, which moves the ops between such convs to NCHW and cancels the
transposes between them; after FoldConstant (W may be a folded transpose of an initializer).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, const_np, is_const, op_name, rewrite_main, rewriter, static_shape

NAME = "PointwiseMatmulsToConvs"
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


@rewriter
class _ToConv(BindingRewriter):
    def rewrite(self, var, value):
        if op_name(value) != "relax.matmul":
            return None
        x, w = value.args
        xs, ws = static_shape(x), static_shape(w)
        if xs is None or ws is None or len(ws) != 2 or not is_const(w) or len(xs) < 3 \
                or x.ty.dtype != "float32" or w.ty.dtype != "float32" or var.ty.dtype != "float32":
            return None
        k, n = ws
        pixels = int(np.prod(xs[:-1]))
        weights = relax.const(np.ascontiguousarray(const_np(w).T.reshape(n, k, 1, 1)))
        image = len(xs) == 4 and xs[0] == 1
        if not image:        # [.., K] as [1, pixels, 1, K] (tokens, however the exporter shaped them)
            x = self.emit(relax.op.reshape(x, (1, pixels, 1, k)), "tokens")
        nchw = self.emit(relax.op.permute_dims(x, TO_NCHW), "to_nchw")
        conv = self.emit(relax.op.nn.conv2d(nchw, weights), var.name + "_conv")
        changelog.record(NAME, "matmul_to_conv1x1", var.name, pixels=pixels, k=k, n=n)
        out = relax.op.permute_dims(conv, TO_NHWC)
        if not image:
            out = relax.op.reshape(self.emit(out, "to_nhwc"), (*xs[:-1], n))
        # NOTE: the binding's value is a call (a transpose or reshape), not a variable: later passes read ops
        return out


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class PointwiseMatmulsToConvs:
    """Compute matmuls of a constant weight matrix over every pixel or token of one image as 1x1 convs."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _ToConv)[0]
