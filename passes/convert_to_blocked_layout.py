"""ConvertToBlockedLayout: put convs and the ops between them in channel-blocked NCHW{c}c layout.

Every tensor between convs gets a channel block b: its channels split into C/b vectors of b lanes
(NCHW{b}c), so kernels load and store whole vectors. With `pad=True` a tensor whose channels are
not a multiple of the vector lanes is padded with channels nobody reads (24 -> 32 for 16 lanes):
worth it where half-width vectors run at half rate (AVX-512 on Intel); so is a conv's output with
fewer channels than fill vectors of 4 (a detector head's 2 or 6 scores). The pad channels hold
finite junk: every conv weight reading them is zero, conversions back to NCHW drop them, and zero
channels appended by a Pad mask them first.

A reduction over the channels of a tensor without pad lanes (a LayerNorm's mean and variance) is one over its
blocks and lanes: one value per pixel, [N, 1, H, W, 1] ("block 1"), which broadcasts against blocks of any size as
it is; so does any one-channel tensor an op combines with a wider one (a spatial attention map).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, const, const_np, is_const, op_name, resize2d_like, rewrite_main, \
    rewriter, static_shape

NAME = "ConvertToBlockedLayout"

UNARY = {"relax.clip", "relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu",
         "relax.exp", "relax.erf", "relax.negative", "relax.abs", "relax.nn.leakyrelu", "relax.round"}
BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum"}
# NaN on some finite inputs: blocked only where no lanes are padding (pad lanes hold junk a zero weight must cancel)
UNPADDED = {"relax.sqrt", "relax.rsqrt", "relax.log", "relax.power"}
REDUCE = {"relax.mean": relax.op.mean, "relax.sum": relax.op.sum, "relax.max": relax.op.max, "relax.min": relax.op.min}
POOLS = {"relax.nn.max_pool2d": relax.op.nn.max_pool2d, "relax.nn.avg_pool2d": relax.op.nn.avg_pool2d}


def channel_pad(value) -> int | None:
    """Channels a zero `relax.nn.pad` of a 4-D tensor appends after the last one, if that is all it pads."""
    a = value.attrs
    widths = [int(v) for v in a.pad_width]
    if len(widths) != 8 or str(a.pad_mode) != "constant" or float(a.pad_value) != 0.0 \
            or any(widths[i] for i in (0, 1, 2, 4, 5, 6, 7)) or widths[3] <= 0:
        return None
    return widths[3]


def channel_block(channels: int, lanes: int) -> int | None:
    """The widest of lanes, lanes/2, ..., 4 that divides `channels`."""
    b = lanes
    while b >= 4:
        if channels % b == 0:
            return b
        b //= 2
    return None


def ceil_to(n: int, b: int) -> int:
    return -(-n // b) * b


def pack_kernel(w: np.ndarray, block: int, in_channels: int) -> np.ndarray:
    """OIHW -> OHWI{block}o: [O/b, KH, KW, I, b] with O and I zero-padded to their padded sizes."""
    o, i, kh, kw = w.shape
    full = np.zeros((ceil_to(o, block), in_channels, kh, kw), np.float32)
    full[:o, :i] = w
    return np.ascontiguousarray(full.reshape(-1, block, in_channels, kh, kw).transpose(0, 3, 4, 2, 1))


def merge_groups(w: np.ndarray, groups: int, block: int) -> np.ndarray:
    """OIHW weights of a grouped conv (C channels in `groups` groups of width g, g dividing `block`) -> the
    weights of the same conv as ceil(C / block) groups of `block` channels: [ceil_to(C, block), block, KH, KW],
    each group's g x g weights on the diagonal of its block, zeros elsewhere (and for padding channels)."""
    c, g, kh, kw = w.shape
    full = np.zeros((ceil_to(c, block), block, kh, kw), np.float32)
    for o in range(c):
        first = (o // g) * g - (o // block) * block      # the group's first input channel, within its block
        full[o, first:first + g] = w[o]
    return full


def block_const(v: np.ndarray, block: int, channels: int, fill: float = 0.0) -> np.ndarray:
    """A [1,C,1,1]-broadcastable or [1,C,H,W] constant in NCHW{block}c, channels padded with `fill`."""
    n, c, h, w = v.shape
    if c == 1:
        v = np.broadcast_to(v, (n, channels, h, w))
        c = channels
    full = np.full((n, ceil_to(c, block), h, w), fill, np.float32)
    full[:, :c] = v
    return np.ascontiguousarray(full.reshape(n, -1, block, h, w).transpose(0, 1, 3, 4, 2))


@rewriter
class _Blocker(BindingRewriter):
    def __init__(self, mod, func, lanes, pad):
        super().__init__(mod, func)
        self.lanes, self.pad = lanes, pad
        self.layout: dict = {}      # new var -> (block, true channels) of its NCHW{b}c layout
        self.cache: dict = {}       # (var, block or 0) -> converted var
        self.stacked: dict = {}     # new var -> (block, true channels): blocked tensors stacked by spatial_interleave
        self.pending_stack = None

    def block_for(self, channels: int) -> int | None:
        if self.pad and channels >= self.lanes // 2:
            return self.lanes
        return channel_block(channels, self.lanes)

    # --- conversions ------------------------------------------------------------------------
    def to_block(self, x, b: int, channels: int, fill: float = 0.0):
        if is_const(x):
            v = const_np(x)
            if v.size == 1:     # one value (a TFLite scale of shape [1]) broadcasts in any layout, as a scalar does
                return x
            return const(block_const(v.reshape((1,) * (4 - v.ndim) + v.shape), b, channels, fill))
        if self.nchw_shape(x) in ([], [1], [1, 1, 1, 1]):   # a scalar broadcasts in any layout
            return x
        if channels > 1 and self.nchw_shape(x)[1:2] == [1]:
            # one value per pixel (a channel reduction's, a spatial attention map): [N, 1, H, W, 1] broadcasts
            # against blocks of any size (a one-channel tensor in a padded block would pair lane with lane)
            return x if self.layout.get(x) == (1, 1) else self.emit(relax.op.expand_dims(self.to_nchw(x), [4]),
                                                                    "per_pixel")
        if self.layout.get(x, (0,))[0] == b:
            return x
        if (x, b) not in self.cache:
            src = self.to_nchw(x)
            pad = 0.0 if ceil_to(channels, b) != channels else None
            self.cache[(x, b)] = self.emit(relax.op.layout_transform(
                src, index_map=lambda n, c, h, w: (n, c // b, h, w, c % b), pad_value=pad), "to_nchw%dc" % b)
            self.layout[self.cache[(x, b)]] = (b, channels)
        return self.cache[(x, b)]

    def to_nchw(self, x):
        if isinstance(x, relax.Tuple):    # call_tir's arguments
            return relax.Tuple([self.to_nchw(f) for f in x.fields])
        if not isinstance(x, relax.Var) or x not in self.layout:
            return x
        b, channels = self.layout[x]
        if (x, 0) not in self.cache:
            if channels < b:
                # a few channels in one padded block (a head's scores, a mask): only their lanes are read, so the
                # transform moves those, not the whole padded block
                lanes = self.emit(relax.op.strided_slice(x, axes=[4], begin=[0], end=[channels]), "unpad")
                y = self.emit(relax.op.layout_transform(lanes, index_map=lambda n, cb, h, w, c: (n, c, h, w)),
                              "to_nchw")
            else:
                y = self.emit(relax.op.layout_transform(x, index_map=lambda n, cb, h, w, c: (n, cb * b + c, h, w)),
                              "to_nchw")
                if ceil_to(channels, b) != channels:
                    y = self.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[channels]), "unpad")
            self.cache[(x, 0)] = y
        return self.cache[(x, 0)]

    def finish(self, var, expr, b, channels):
        """Bind a blocked result; outputs of the function go back to NCHW."""
        if isinstance(var, relax.DataflowVar):
            self.pending = (b, channels)
            return expr
        v = self.emit(expr, var.name)
        self.layout[v] = (b, channels)
        return self.to_nchw(v)

    @staticmethod
    def spatial_axes(axes) -> list[int] | None:
        """The axes (a Tuple of PrimValues) of a 4-D op as 2 / 3 where they are all H or W, else None."""
        if not isinstance(axes, relax.Tuple):
            return None
        out = [int(v.value) % 4 for v in axes.fields]
        return out if out and all(a in (2, 3) for a in out) else None

    def spatial_concat(self, var, value) -> bool:
        """A concat along H or W of 4-D tensors held in the same blocks."""
        fields = value.args[0].fields if isinstance(value.args[0], relax.Tuple) else []
        if not fields or len(var.ty.shape.values) != 4 or int(value.attrs.axis) % 4 not in (2, 3):
            return False
        return all(isinstance(f, relax.Var) and f in self.layout for f in fields) \
            and len({self.layout[f] for f in fields}) == 1

    def spatial_interleave(self, var, value) -> bool:
        """A stack of 4-D tensors held in the same blocks on a new axis after H or W, read only by a reshape that
        merges the new axis into that one: their pixels interleaved along H or W."""
        fields = value.args[0].fields if isinstance(value.args[0], relax.Tuple) else []
        shape = [int(d) for d in var.ty.shape.values]
        axis = int(value.attrs.axis) % 5 if len(shape) == 5 else None
        if not fields or axis not in (3, 4) or not all(isinstance(f, relax.Var) and f in self.layout for f in fields) \
                or len({self.layout[f] for f in fields}) != 1:
            return False
        user = self.only_user(var)
        if user is None or op_name(user.value) != "relax.reshape":
            return False
        return static_shape(user.var) == shape[:axis - 1] + [shape[axis - 1] * shape[axis]] + shape[axis + 1:]

    def whole_block_slice(self, var, args) -> tuple[int, int] | None:
        """(first block, end block) of a strided_slice of a 4-D blocked tensor along channels alone, step 1,
        from a block boundary to a block boundary or to the last channel; else None."""
        if len(var.ty.shape.values) != 4 or not isinstance(args[1], relax.Tuple):
            return None
        axes = [int(v.value) % 4 for v in args[1].fields]
        begin, end, *step = ([int(v.value) for v in t.fields] for t in args[2:])
        b, channels = self.layout[args[0]]
        if axes != [1] or (step and step[0] != [1]):
            return None
        lo, hi = (min(max(v + channels if v < 0 else v, 0), channels) for v in (begin[0], end[0]))
        if lo % b or (hi % b and hi != channels) or hi <= lo:
            return None
        return lo // b, -(-hi // b)

    def whole_blocks_concat(self, var, value) -> bool:
        """A channel concat of 4-D tensors held in one block size, each a whole number of blocks."""
        fields = value.args[0].fields if isinstance(value.args[0], relax.Tuple) else []
        if not fields or len(var.ty.shape.values) != 4 or int(value.attrs.axis) % 4 != 1:
            return False
        if not all(isinstance(f, relax.Var) and f in self.layout for f in fields):
            return False
        blocks = {self.layout[f][0] for f in fields}
        return len(blocks) == 1 and all(self.layout[f][1] % self.layout[f][0] == 0 for f in fields)

    # --- rules ------------------------------------------------------------------------------
    def rewrite(self, var, value):
        self.pending = None
        name = op_name(value)
        if name == "relax.nn.conv2d":
            return self.conv(var, value)
        if name == "relax.call_tir":     # kernels placed by earlier phases read and write NCHW
            return relax.Call(value.op, [self.to_nchw(a) for a in value.args], value.attrs, value.ty_args)
        args = list(value.args) if isinstance(value, relax.Call) else []
        blocked = [a for a in args if isinstance(a, relax.Var) and a in self.layout]
        tensors = [a for a in args if isinstance(a.ty, relax.TensorType)]
        if blocked and len(tensors) == 1 and (name in UNARY or name in UNPADDED and not self.padded(args[0])):
            return self.finish(var, relax.Call(value.op, args, value.attrs), *self.layout[args[0]])
        widest = max(blocked, key=lambda a: self.layout[a][1]) if blocked else None   # not a per-pixel operand
        if blocked and (name in BINARY or name in UNPADDED and not any(self.padded(a) for a in blocked)) \
                and self.binary_ok(var, value) and not self.scales_nchw(var, value) \
                and self.layout[widest][1] == int(var.ty.shape.values[1]):
            b, channels = self.layout[widest]
            new_args = [self.to_block(a, b, channels, 1.0 if name == "relax.divide" and i == 1 else 0.0)
                        for i, a in enumerate(args)]
            return self.finish(var, relax.Call(value.op, new_args, value.attrs), b, channels)
        if blocked and name in POOLS and str(value.attrs.layout) == "NCHW" \
                and str(value.attrs.out_layout) == "NCHW":
            b, channels = self.layout[args[0]]
            a = value.attrs
            call = POOLS[name](args[0], a.pool_size, a.strides, a.padding, a.dilation, a.ceil_mode,
                               a.count_include_pad, layout=f"NCHW{b}c", out_layout=f"NCHW{b}c")
            return self.finish(var, call, b, channels)
        if blocked and name == "relax.image.resize2d" and str(value.attrs.layout) == "NCHW" \
                and isinstance(var, relax.DataflowVar):
            # per pixel the same weights for every channel: blocked, it reads and writes whole channel vectors.
            # NOTE: a model's output stays NCHW (its input is converted, the smaller tensor when upsampling)
            b, channels = self.layout[args[0]]
            return self.finish(var, resize2d_like(value, args[0], args[1], layout=f"NCHW{b}c"), b, channels)
        if blocked and name == "relax.nn.pad" and channel_pad(value) is not None:
            return self.finish(var, *self.pad_channels(args[0], channel_pad(value)))
        if blocked and name in REDUCE and len(tensors) == 1 and self.spatial_keepdims(var, value):
            # NOTE: axes spelled positively: -1/-2 of the 5-D blocked tensor are its lanes and W
            return self.finish(var, REDUCE[name](args[0], axis=[2, 3], keepdims=True), *self.layout[args[0]])
        if blocked and name in REDUCE and len(tensors) == 1 and self.channel_keepdims(var, value) \
                and not self.padded(args[0]):
            # over channels (a LayerNorm's mean and variance): over the blocks and their lanes, one value per pixel
            # ([N, 1, H, W, 1], block 1), which broadcasts against blocked tensors as it is
            return self.finish(var, REDUCE[name](args[0], axis=[1, 4], keepdims=True), 1, 1)
        if blocked and name in REDUCE and len(tensors) == 1 and self.whole_tensor(value, args[0]):
            # every element of a tensor without padding channels: the same value in any layout
            return relax.Call(value.op, args, value.attrs)
        if blocked and name == "relax.strided_slice" and len(var.ty.shape.values) == 4 \
                and (axes := self.spatial_axes(args[1])) is not None:
            # H / W are the same axes of a blocked tensor (SkipPaddingTaps' slices)
            ints = [[int(v.value) for v in t.fields] for t in args[2:]]
            call = relax.op.strided_slice(args[0], axes, *ints)
            return self.finish(var, call, *self.layout[args[0]])
        if blocked and name == "relax.strided_slice" and (blocks := self.whole_block_slice(var, args)) is not None:
            # channels from a block boundary to one (or to the last channel): those blocks (C2f / CSP splits)
            b, channels = self.layout[args[0]]
            call = relax.op.strided_slice(args[0], [1], [blocks[0]], [blocks[1]])
            return self.finish(var, call, b, int(var.ty.shape.values[1]))
        if name == "relax.concat" and self.spatial_concat(var, value):
            fields = value.args[0].fields
            return self.finish(var, relax.op.concat(list(fields), axis=int(value.attrs.axis) % 4),
                               *self.layout[fields[0]])
        if name == "relax.concat" and self.whole_blocks_concat(var, value):
            # channels of whole blocks one after another (SqueezeNet's fire modules): blocks one after another
            fields = value.args[0].fields
            b = self.layout[fields[0]][0]
            return self.finish(var, relax.op.concat(list(fields), axis=1), b, int(var.ty.shape.values[1]))
        if name == "relax.stack" and self.spatial_interleave(var, value):
            # pixels interleaved along H / W (SplitTransposedConvs' phases): the same axes of the blocked tensors
            fields = value.args[0].fields
            self.pending_stack = self.layout[fields[0]]
            return relax.op.stack(list(fields), axis=int(value.attrs.axis) % 5)
        if name == "relax.reshape" and isinstance(args[0], relax.Var) and args[0] in self.stacked:
            b, channels = self.stacked[args[0]]
            n, _, h, w = (int(d) for d in var.ty.shape.values)
            return self.finish(var, relax.op.reshape(args[0], (n, ceil_to(channels, b) // b, h, w, b)), b, channels)
        # NOTE: a Tuple argument (concat, call_tir) may hold blocked tensors too: they go back to NCHW
        in_tuples = [f for a in args if isinstance(a, relax.Tuple) for f in a.fields
                     if isinstance(f, relax.Var) and f in self.layout]
        if (blocked or in_tuples) and isinstance(value, relax.Call):
            return relax.Call(value.op, [self.to_nchw(a) for a in args], value.attrs, value.ty_args)
        if isinstance(value, relax.Tuple):
            return relax.Tuple([self.to_nchw(f) for f in value.fields])
        return None

    def conv(self, var, value):
        a = value.attrs
        x, w = value.args
        cout, groups = int(var.ty.shape[1]), int(a.groups)
        cin = int(w.ty.shape[1]) * groups
        bo = self.block_for(cout)
        depthwise = groups > 1 and groups == cin == cout
        # a grouped conv whose groups are whole channel blocks (RegNet's group width 16): block-diagonal in NCHW{b}c
        blockwise = groups > 1 and not depthwise and bo is not None and self.block_for(cin) == bo \
            and (cin // groups) % bo == 0 and (cout // groups) % bo == 0
        # groups of half a block (RegNetY's group width 8 in blocks of 16): the two groups of a block merged into
        # one block-diagonal group, zeros between them (twice the multiply-adds, in the blocked kernel); narrower
        # groups would multiply them more and stay NCHW
        narrow = groups > 1 and not depthwise and not blockwise and bo is not None and cin == cout \
            and self.block_for(cin) == bo and 2 * (cin // groups) == bo
        if bo is None and self.pad and not depthwise:   # a few outputs (a detector head's scores): one padded vector
            bo = self.lanes
        why = ""
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or not is_const(w):
            why = "not an NCHW/OIHW conv with constant weights"
        elif bo is None:
            why = f"{cout} output channels do not fill vectors of 4"
        elif groups > 1 and not depthwise and not blockwise and not narrow:
            why = "grouped conv that is not depthwise, its groups not whole channel blocks"
        if why:
            changelog.skip(NAME, var.name, f"kept NCHW: {why}")
            return relax.Call(value.op, [self.to_nchw(x), w], value.attrs)
        if narrow:
            w, groups, blockwise = const(merge_groups(const_np(w), groups, bo)), ceil_to(cin, bo) // bo, True
            changelog.record(NAME, "merged_narrow_groups", var.name)
        bi = bo if depthwise else self.block_for(cin) if cin >= 8 else None
        data = self.to_block(x, bi, cin) if bi else self.to_nchw(x)
        in_channels = 1 if depthwise else (bo if narrow else cin // groups) if blockwise else \
            (ceil_to(cin, bi) if bi else cin)
        call = relax.op.nn.conv2d(data, const(pack_kernel(const_np(w), bo, in_channels)), strides=a.strides,
                                  padding=a.padding, dilation=a.dilation,
                                  groups=ceil_to(cout, bo) if depthwise else groups,
                                  data_layout=f"NCHW{bi}c" if bi else "NCHW", kernel_layout=f"OHWI{bo}o",
                                  out_layout=f"NCHW{bo}c")
        return self.finish(var, call, bo, cout)

    def pad_channels(self, x, extra: int):
        """Zero channels appended to a blocked tensor (a wider residual block's shortcut): the lanes past its
        channels in its last block become zeros (they may hold pad junk), whole zero blocks follow."""
        b, channels = self.layout[x]
        blocks, new_blocks = ceil_to(channels, b) // b, ceil_to(channels + extra, b) // b
        if channels % b:
            keep = (np.arange(blocks * b) < channels).reshape(1, blocks, 1, 1, b)
            x = self.emit(relax.op.where(const(keep), x, const(np.zeros((), np.float32))), "chpad_mask")
        if new_blocks > blocks:
            x = relax.op.nn.pad(x, [0, 0, 0, new_blocks - blocks] + [0, 0] * 3, pad_value=0.0)
        return x, b, channels + extra

    def nchw_shape(self, x) -> list[int]:
        if isinstance(x, relax.Var) and x in self.layout:
            shape = [int(d) for d in x.ty.shape.values]
            return [shape[0], self.layout[x][1], shape[2], shape[3]]
        return [int(d) for d in x.ty.shape.values]

    def binary_ok(self, var, value) -> bool:
        """Operands are the output's shape or broadcast per channel or per pixel (one channel); a divisor is not a
        padded tensor."""
        out = [int(d) for d in var.ty.shape.values]
        if len(out) != 4:
            return False
        for i, a in enumerate(value.args):
            shape = self.nchw_shape(a)
            if not shape or shape in ([1], [1, 1, 1, 1]):
                continue  # scalars broadcast in any layout
            full = [1] * (4 - len(shape)) + shape
            if full[1] not in (1, out[1]) or full[0] != out[0] \
                    or any(f not in (1, o) for f, o in zip(full[2:], out[2:])):
                return False
            if op_name(value) == "relax.divide" and i == 1 and not is_const(a) and self.pad \
                    and (full[1] > 1 and (a not in self.layout or self.padded(a))
                         or any(self.padded(v) for v in value.args if isinstance(v, relax.Var) and v in self.layout)):
                # x / pad-junk, or pad-junk / a value per pixel that may be 0, could be inf or NaN, and 0 * NaN
                # poisons the next conv: only where neither has pad lanes (a LayerNorm's)
                return False
        return True

    def padded(self, x) -> bool:
        """A blocked tensor whose last block has lanes past its channels."""
        b, channels = self.layout[x]
        return ceil_to(channels, b) != channels

    def scales_nchw(self, var, value) -> bool:
        """An NCHW tensor of the output's shape times (plus, ...) blocked per-channel vectors (a squeeze-and-
        excitation gate): computed in NCHW, so only the small vectors change layout."""
        out = [int(d) for d in var.ty.shape.values]
        big = [a for a in value.args if isinstance(a, relax.Var) and a not in self.layout
               and self.nchw_shape(a) == out]
        small = all(self.nchw_shape(a)[2:] == [1, 1] for a in value.args
                    if isinstance(a, relax.Var) and a in self.layout)
        return bool(big) and small

    def whole_tensor(self, value, x) -> bool:
        """A reduction over all axes, without keepdims, of a blocked tensor with no padding channels."""
        b, channels = self.layout[x]
        return value.attrs.axis is None and not bool(value.attrs.keepdims) and ceil_to(channels, b) == channels

    @staticmethod
    def channel_keepdims(var, value) -> bool:
        axes = [int(x) % 4 for x in value.attrs.axis] if value.attrs.axis is not None else []
        return axes == [1] and bool(value.attrs.keepdims) and len(var.ty.shape.values) == 4

    @staticmethod
    def spatial_keepdims(var, value) -> bool:
        axes = sorted(int(x) % 4 for x in value.attrs.axis) if value.attrs.axis is not None else []
        return axes == [2, 3] and bool(value.attrs.keepdims) and len(var.ty.shape.values) == 4

    def visit_var_binding_(self, binding):
        super().visit_var_binding_(binding)
        if self.pending:
            self.layout[self.get_var_remap(binding.var)] = self.pending
            self.pending = None
        if self.pending_stack:
            self.stacked[self.get_var_remap(binding.var)] = self.pending_stack
            self.pending_stack = None


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class ConvertToBlockedLayout:
    """Put convs and the ops between them in channel-blocked NCHW{c}c layout (c up to the vector lanes)."""

    def __init__(self, lanes: int, pad: bool = False):
        self.lanes, self.pad = lanes, pad

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Blocker, self.lanes, self.pad)[0]
