"""ConvertToBlockedLayout: put convs and the ops between them in channel-blocked NCHW{c}c layout."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, const, const_np, is_const, op_name, rewrite_main, rewriter

NAME = "ConvertToBlockedLayout"

UNARY = {"relax.clip", "relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu",
         "relax.exp", "relax.negative", "relax.abs", "relax.sqrt", "relax.nn.leakyrelu"}
BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum"}
REDUCE = {"relax.mean", "relax.sum", "relax.max"}


def channel_block(channels: int, lanes: int) -> int | None:
    """The channel block for a tensor of `channels`: the widest of lanes, lanes/2, ..., 4 dividing it."""
    b = lanes
    while b >= 4:
        if channels % b == 0:
            return b
        b //= 2
    return None


def conv_layouts(call: relax.Call, cout: int, lanes: int) -> tuple[int | None, int] | None:
    """(input block or None for NCHW input, output block) for one NCHW conv2d, or None to keep NCHW."""
    a = call.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or not is_const(call.args[1]):
        return None
    groups = int(a.groups)
    cin = int(call.args[1].ty.shape[1]) * groups
    bo = channel_block(cout, lanes)
    if bo is None:
        return None
    if groups == 1:
        return channel_block(cin, lanes), bo   # narrow inputs (an RGB image) stay NCHW
    if groups == cin == cout:
        return bo, bo
    return None  # grouped convs that are not depthwise stay NCHW


def pack_kernel(w: np.ndarray, block: int) -> np.ndarray:
    """OIHW -> OHWI{block}o: [O/b, KH, KW, I, b], the output-channel vector innermost."""
    o, i, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(o // block, block, i, kh, kw).transpose(0, 3, 4, 2, 1))


def block_const(v: np.ndarray, block: int) -> np.ndarray:
    """A [1,C,1,1]-broadcastable or [1,C,H,W] constant in NCHW{block}c."""
    n, c, h, w = v.shape
    return np.ascontiguousarray(v.reshape(n, c // block, block, h, w).transpose(0, 1, 3, 4, 2))


@rewriter
class _Blocker(BindingRewriter):
    def __init__(self, mod, func, lanes):
        super().__init__(mod, func)
        self.lanes = lanes
        self.block: dict = {}       # new var -> channel block of its NCHW{c}c layout
        self.cache: dict = {}       # (var, block or 0) -> converted var

    # --- conversions ------------------------------------------------------------------------
    def to_block(self, x, b: int):
        if is_const(x):
            v = const_np(x)
            return const(block_const(v.reshape((1,) * (4 - v.ndim) + v.shape), b)) if v.ndim else x
        if self.block.get(x) == b:
            return x
        key = (x, b)
        if key not in self.cache:
            src = self.to_nchw(x)
            self.cache[key] = self.emit(relax.op.layout_transform(
                src, index_map=lambda n, c, h, w: (n, c // b, h, w, c % b)), "to_nchw%dc" % b)
            self.block[self.cache[key]] = b
        return self.cache[key]

    def to_nchw(self, x):
        b = self.block.get(x) if isinstance(x, relax.Var) else None
        if not b:
            return x
        if (x, 0) not in self.cache:
            self.cache[(x, 0)] = self.emit(relax.op.layout_transform(
                x, index_map=lambda n, cb, h, w, c: (n, cb * b + c, h, w)), "to_nchw")
        return self.cache[(x, 0)]

    def finish(self, var, expr, b):
        """Bind a blocked result; outputs of the function go back to NCHW."""
        if isinstance(var, relax.DataflowVar):
            self.pending_block = b
            return expr
        return self.to_nchw(self._bind_blocked(expr, b, var.name))

    def _bind_blocked(self, expr, b, name):
        v = self.emit(expr, name)
        self.block[v] = b
        return v

    # --- rules ------------------------------------------------------------------------------
    def rewrite(self, var, value):
        self.pending_block = None
        name = op_name(value)
        if name == "relax.nn.conv2d":
            return self.conv(var, value)
        args = list(value.args) if isinstance(value, relax.Call) else []
        blocked = [a for a in args if isinstance(a, relax.Var) and self.block.get(a)]
        tensors = [a for a in args if isinstance(a.ty, relax.TensorType)]
        if blocked and name in UNARY and len(tensors) == 1:
            return self.finish(var, relax.Call(value.op, args, value.attrs), self.block[args[0]])
        if blocked and name in BINARY and self.broadcasts_per_channel(var, value):
            b = self.block[blocked[0]]
            return self.finish(var, relax.Call(value.op, [self.to_block(a, b) for a in args], value.attrs), b)
        if blocked and name in REDUCE and len(tensors) == 1 and self.spatial_keepdims(var, value):
            return self.finish(var, relax.Call(value.op, [args[0]], value.attrs), self.block[args[0]])
        if blocked and isinstance(value, relax.Call):
            return relax.Call(value.op, [self.to_nchw(a) for a in args], value.attrs, value.ty_args)
        if isinstance(value, relax.Tuple):
            return relax.Tuple([self.to_nchw(f) for f in value.fields])
        return None

    def conv(self, var, value):
        blocks = conv_layouts(value, int(var.ty.shape[1]), self.lanes)
        x = value.args[0]
        if blocks is None:
            changelog.skip(NAME, var.name, "channels not a multiple of 4, or a grouped conv: kept NCHW")
            return relax.Call(value.op, [self.to_nchw(x), value.args[1]], value.attrs)
        bi, bo = blocks
        a = value.attrs
        data = self.to_block(x, bi) if bi else self.to_nchw(x)
        call = relax.op.nn.conv2d(data, const(pack_kernel(const_np(value.args[1]), bo)), strides=a.strides,
                                  padding=a.padding, dilation=a.dilation, groups=int(a.groups),
                                  data_layout=f"NCHW{bi}c" if bi else "NCHW", kernel_layout=f"OHWI{bo}o",
                                  out_layout=f"NCHW{bo}c")
        return self.finish(var, call, bo)

    def nchw_shape(self, x) -> list[int]:
        shape = [int(d) for d in x.ty.shape.values]
        b = self.block.get(x) if isinstance(x, relax.Var) else None
        return [shape[0], shape[1] * shape[4], shape[2], shape[3]] if b else shape

    def broadcasts_per_channel(self, var, value) -> bool:
        out = [int(d) for d in var.ty.shape.values]
        if len(out) != 4:
            return False
        for a in value.args:
            shape = self.nchw_shape(a)
            if not shape or shape in ([1], [1, 1, 1, 1]):
                continue  # scalars broadcast in any layout
            full = [1] * (4 - len(shape)) + shape
            if full[1] != out[1] or full[0] != out[0] or any(f not in (1, o) for f, o in zip(full[2:], out[2:])):
                return False
        return True

    @staticmethod
    def spatial_keepdims(var, value) -> bool:
        axes = sorted(int(x) % 4 for x in value.attrs.axis) if value.attrs.axis is not None else []
        return axes == [2, 3] and bool(value.attrs.keepdims) and len(var.ty.shape.values) == 4

    def visit_var_binding_(self, binding):
        super().visit_var_binding_(binding)
        if self.pending_block:
            self.block[self.get_var_remap(binding.var)] = self.pending_block
            self.pending_block = None


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class ConvertToBlockedLayout:
    """Put convs and the ops between them in channel-blocked NCHW{c}c layout (c up to the vector lanes)."""

    def __init__(self, lanes: int):
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Blocker, self.lanes)[0]
