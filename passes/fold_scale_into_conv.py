"""FoldScaleIntoConv: fold per-channel scale and shift after a conv (BN, bias, mul/add) into its weights and one bias."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, channel_vector, const, const_np, is_const, op_name, rewrite_main, rewriter

NAME = "FoldScaleIntoConv"
_AFFINE_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


def _tensor_and_const(call):
    a, b = call.args
    if is_const(b) and not is_const(a):
        return a, b
    if is_const(a) and not is_const(b) and op_name(call) in ("relax.add", "relax.multiply"):
        return b, a
    return None, None


@rewriter
class _Folder(BindingRewriter):
    # conv2d(x, W) -> sub/div/mul/add by per-channel constants  =>  conv2d(x, W*s) -> add(t)
    def __init__(self, mod, func):
        super().__init__(mod, func)
        self.aliases: set = set()   # chain steps now folded away
        self.shift_at: dict = {}    # last chain step -> its total shift

    def chain_after(self, conv_var, channels: int):
        """The single-use per-channel affine ops that follow a conv, as (binding, op, vector)."""
        chain, cur = [], conv_var
        while True:
            b = self.only_user(cur)
            if b is None or op_name(b.value) not in _AFFINE_OPS:
                return chain
            src, c = _tensor_and_const(b.value)
            vec = channel_vector(c, channels) if src is not None and src.same_as(cur) else None
            if vec is None or list(b.value.ty.shape.values) != list(conv_var.ty.shape.values):
                return chain
            chain.append((b, op_name(b.value), vec))
            cur = b.var

    def rewrite(self, var, value):
        if var in self.aliases:
            return _tensor_and_const(value)[0]
        if var in self.shift_at:
            src = _tensor_and_const(value)[0]
            return relax.op.add(src, const(self.shift_at[var].reshape(1, -1, 1, 1)))
        if op_name(value) != "relax.nn.conv2d" or not is_const(value.args[1]):
            return None
        if str(value.attrs.kernel_layout) != "OIHW" or str(value.attrs.out_layout) != "NCHW":
            return None
        channels = int(var.ty.shape.values[1])
        chain = self.chain_after(var, channels)
        if not chain:
            return None
        scale, shift = np.ones(channels, np.float32), np.zeros(channels, np.float32)
        for _, op, vec in chain:
            if op == "relax.add":
                shift = shift + vec
            elif op == "relax.subtract":
                shift = shift - vec
            elif op == "relax.multiply":
                scale, shift = scale * vec, shift * vec
            else:
                scale, shift = scale / vec, shift / vec
        self.aliases.update(b.var for b, _, _ in chain[:-1])
        self.shift_at[chain[-1][0].var] = shift
        if len(chain) > 1 or chain[0][1] != "relax.add":  # a lone bias add is already canonical
            changelog.record(NAME, "folded_scale_shift", var.name, ops=len(chain))
        weight = (const_np(value.args[1]) * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
        return relax.Call(value.op, [value.args[0], const(weight)], value.attrs)


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class FoldScaleIntoConv:
    """Fold per-channel scale and shift after a conv (BN, bias, mul/add) into its weights and one bias."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = rewrite_main(mod, _Folder)[0]
        return relax.transform.CanonicalizeBindings()(mod)
