"""FormCHWRegions: keep the depthwise convs next to sparse CHW 1x1 kernels in CHW, so layouts do not churn.

dwconv2d(x, W) [-> add(bias)] [-> clip / relu]  =>  call_tir(f32_dwconv3x3s1_chw_32, x, W, bias)
for batch-1 NCHW depthwise 3x3/5x5 stride-1/2 convs whose input comes from a sparse 1x1 kernel or
whose result goes to one. ConvertToBlockedLayout leaves call_tir kernels in NCHW, so a chain
sparse 1x1 -> depthwise -> sparse 1x1 runs without layout transforms; transforms stay at the
region borders (next to dense convs, which keep their blocked kernels).
A sparse 1x1 (without residual) whose only reader is the depthwise conv is fused with it:
call_tir(f32_spmm1x1_dwconv3x3s2_chw_64x2, x, row_ptr, col, val, bias1, W, bias2), so the expanded
tensor never goes to memory.
A depthwise kernel whose only reader is a sparse 1x1 writes its planes padded to whole vectors
([1, C, plane], chw_rows.output_planes) and that 1x1 kernel is rebuilt to read them so: with 14x14 or
7x7 planes (196 or 49 floats) most planes would start mid cache line, and every vector load of the
1x1's inner loop would split across two lines.
The network's first conv (dense, at most MAX_CIN input channels) whose only reader is such a
depthwise conv is fused with it: call_tir(f32_conv3x3s2_dwconv3x3s1_chw_112x4x4, x, W1, bias1, W, bias)
reads the NCHW input and writes CHW, so the region starts at the model's input, and the first conv's
output never goes to memory. A first conv whose readers are all CHW kernels, but not that depthwise conv alone
(BlazeFace's stem also feeds block 0's shortcut), runs in CHW by itself: call_tir(f32_conv5x5s2_chw_64x1x4, ...).
A max pool (no padding) of a sparse kernel's output stays CHW: call_tir(f32_maxpool2x2s2_chw_16, x).
NOTE: runs after SparsifyConv1x1 (it looks for its kernels).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, const, const_np, is_const, op_name, per_channel_factors, \
    rewrite_main, rewriter, shape_of
from passes.sparsify_conv1x1 import add_kernel, epilogue_chain
from schedules.chw_rows import STRIDES, aligned_plane, planes_shape
from schedules.f32_maxpool2d_chw import KERNELS as MAXPOOL_KERNELS
from schedules import handwritten
from schedules.rule import recipe
from schedules.f32_conv2d_dwconv2d_chw import MAX_CIN
from schedules.f32_spmm_chw import decode_bsr, encode_bsr, kernel_clip

NAME = "FormCHWRegions"
SPARSE_KERNEL = "f32_spmm_chw"
KERNEL_SIZES = (3, 5)


def _is_sparse_call(expr) -> bool:
    return op_name(expr) == "relax.call_tir" and expr.args[0].name_hint.startswith(SPARSE_KERNEL)


def _conv_weights(value, depthwise: bool) -> np.ndarray | None:
    """[O, I, k, k] weights of a batch-1 NCHW/OIHW conv the CHW kernels cover (k 3/5, one stride 1/2, no
    dilation): depthwise (groups == channels) or dense with at most MAX_CIN input channels."""
    if op_name(value) != "relax.nn.conv2d":
        return None
    a = value.attrs
    x, w = value.args
    if not is_const(w) or str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" \
            or str(a.out_layout) != "NCHW" or x.ty.shape is None:
        return None
    wt = const_np(w)
    shape = [int(d) if isinstance(d, tvm.tirx.IntImm) else -1 for d in x.ty.shape.values]
    o, k = wt.shape[0], wt.shape[2]
    if depthwise:
        channels_ok = int(a.groups) == o and len(shape) == 4 and shape[1] == o and wt.shape[1] == 1
    else:
        channels_ok = int(a.groups) == 1 and len(shape) == 4 and shape[1] == wt.shape[1] <= MAX_CIN
    if not channels_ok or shape[0] != 1 or wt.shape[3] != k or k not in KERNEL_SIZES or wt.dtype != np.float32:
        return None
    strides = {int(s) for s in a.strides}
    if len(strides) != 1 or strides.pop() not in STRIDES or any(int(d) != 1 for d in a.dilation):
        return None
    return wt


def depthwise_weights(value) -> np.ndarray | None:
    """[C, 1, k, k] weights of a depthwise conv f32_dwconv2d_chw covers."""
    return _conv_weights(value, depthwise=True)


def first_conv_weights(value) -> np.ndarray | None:
    """[O, I, k, k] weights of a dense conv with few input channels (a network's first) that
    f32_conv2d_dwconv2d_chw covers."""
    return _conv_weights(value, depthwise=False)


@rewriter
class _Regions(BindingRewriter):
    def __init__(self, mod, func, spec):
        super().__init__(mod, func)
        self.spec = spec
        self.plans: dict = {}
        self.planes: dict = {}    # depthwise output (input function's var) -> its padded plane
        self.first_convs: dict = {}   # a first conv's output (input function's var) -> its plan, fused into its reader

    def rewrite(self, var, value):
        if var in self.plans:
            plan = self.plans.pop(var)
            return self.emit_first_conv(plan) if "first_conv" in plan else self.emit(var, plan)
        if _is_sparse_call(value) and self.bound[var].args[1].fields[0] in self.planes:
            return self.read_padded_planes(var, value)
        if _is_sparse_call(value) and self.se_gate(var) is not None:
            return self.scale_by_gate(var, value)
        if op_name(value) == "relax.nn.max_pool2d":
            return self.max_pool(var, value)
        w = depthwise_weights(value)
        if w is None:
            return self.first_conv(var, value)
        plan = epilogue_chain(self, var, w.shape[0], residual=False)
        x_in = self.bound[var].args[0]       # the input function's variable (value's are remapped)
        if not self.depthwise_goes_chw(var, w.shape[0]):
            changelog.skip(NAME, plan["name"], "depthwise conv not next to a sparse 1x1: stays blocked")
            return None
        plan.update(w=w, x=value.args[0], x_in=x_in, attrs=value.attrs, conv=plan["name"], out_ty=plan["last"].ty)
        if plan["last"].same_as(var):
            return self.emit(var, plan)
        self.plans[plan["last"]] = plan
        return None

    def depthwise_goes_chw(self, var, c: int) -> bool:
        """The depthwise conv bound to (input) var reads a sparse kernel's output or feeds one (directly, or
        through a squeeze-and-excitation product)."""
        src = self.bound.get(self.bound[var].args[0])
        last = epilogue_chain(self, var, c, residual=False)["last"]
        excited = self.excited(last)
        user = self.only_user(last if excited is None else excited)
        feeds_sparse = isinstance(user, relax.VarBinding) and _is_sparse_call(user.value)
        return (src is not None and _is_sparse_call(src)) or feeds_sparse

    def excited(self, var):
        """The var of x * gate for x = var where a mean over x's H and W and that product by a per-channel
        gate are all that read x (squeeze-and-excitation, MobileNetV3): None where not. The product stays
        an NCHW elementwise op (ConvertToBlockedLayout keeps a full NCHW operand as it is)."""
        users = self.users.get(var, [])
        if len(users) != 2 or None in users:
            return None
        by_op = {op_name(u.value): u for u in users}
        mean, mul = by_op.get("relax.mean"), by_op.get("relax.multiply")
        if mean is None or mul is None or not mean.value.args[0].same_as(var):
            return None
        gate = [a for a in mul.value.args if not a.same_as(var)]
        shape = [int(d) for d in var.ty.shape.values]
        if len(gate) != 1 or gate[0].ty.shape is None \
                or [int(d) for d in gate[0].ty.shape.values] != [1, shape[1], 1, 1]:
            return None
        return mul.var

    def first_conv(self, var, value):
        """A dense conv with few input channels (a network's first) whose only reader is a depthwise conv
        that goes CHW: computed in CHW too, so no layout transform sits between them."""
        w = first_conv_weights(value)
        if w is None:
            return None
        plan = epilogue_chain(self, var, w.shape[0], residual=False)
        user = self.only_user(plan["last"])
        fused = isinstance(user, relax.VarBinding) and depthwise_weights(user.value) is not None \
            and self.depthwise_goes_chw(user.var, w.shape[0])
        if not fused and not self.read_in_chw(plan["last"]):
            return None
        plan.update(first_conv=True, standalone=not fused, w=w, x=value.args[0], attrs=value.attrs,
                    conv=plan["name"], out_ty=plan["last"].ty)
        if plan["last"].same_as(var):
            return self.emit_first_conv(plan)
        self.plans[plan["last"]] = plan
        return None

    def max_pool(self, var, value):
        """A max pool (no padding, square window of 2 or 3, stride 1 or 2) of a sparse kernel's output stays in
        CHW (f32_maxpool2d_chw): one output row a vector of pixels at a time, not TVM's pixel at a time."""
        src = self.bound.get(self.bound[var].args[0])
        a = value.attrs
        ks, strides = {int(v) for v in a.pool_size}, {int(v) for v in a.strides}
        shape = [int(d) for d in value.args[0].ty.shape.values] if value.args[0].ty.shape is not None else []
        if src is None or not _is_sparse_call(src) or str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW" \
                or len(ks) != 1 or len(strides) != 1 or any(int(v) for v in a.padding) \
                or any(int(v) != 1 for v in a.dilation) or bool(a.ceil_mode) or len(shape) != 4 or shape[0] != 1:
            return None
        k, stride = ks.pop(), strides.pop()
        if k not in MAXPOOL_KERNELS or stride not in STRIDES or min(shape[2:]) < k:
            return None
        func = handwritten.build("maxpool2d_chw", {"c": shape[1], "h": shape[2], "w": shape[3], "k": k,
                                                   "stride": stride, "lanes": self.spec.vector_lanes}, self.spec)
        gv, func = add_kernel(self, func)
        changelog.record(NAME, "max_pool_chw", var.name, kernel=str(func.attrs["global_symbol"]))
        return relax.call_tir(gv, relax.Tuple([value.args[0]]), var.ty)

    def read_in_chw(self, var) -> bool:
        """Every reader of (input) var is a sparse kernel or a depthwise conv that goes CHW (a first conv whose
        output also feeds a block's shortcut, as BlazeFace's)."""
        def goes_chw(u) -> bool:
            if not isinstance(u, relax.VarBinding):
                return False
            w = depthwise_weights(u.value)
            return _is_sparse_call(u.value) or (w is not None and self.depthwise_goes_chw(u.var, w.shape[0]))

        users = self.users.get(var, [])
        return bool(users) and all(goes_chw(u) for u in users)

    def emit_first_conv(self, plan):
        """Fused: nothing, the depthwise conv that reads the first conv computes it (fuse_with_first_conv); its
        bindings stay as they are until then and are dropped as dead. Standalone: the conv in CHW
        (f32_conv2d_chw), its epilogue's clip fused."""
        if not plan["standalone"]:
            self.first_convs[plan["last"]] = plan
            return None
        _, cin, h, wd = (int(d) for d in plan["x"].ty.shape.values)
        k, stride, pads = _kxk(plan)
        func = handwritten.build("conv2d_chw", {
            "cin": cin, "c": plan["w"].shape[0], "h": h, "w": wd, "k": k, "stride": stride, "pads": pads,
            "clip": plan["clip"], "lanes": self.spec.vector_lanes, "out_plane": None}, self.spec)
        return self.call_kernel(plan, func, "first_conv_chw", [plan["x"]])

    def emit(self, var, plan):
        self.pad_planes(plan)
        fused = self.fuse_with_first_conv(plan)
        if fused is None:
            fused = self.fuse_with_expand(plan)
        if fused is not None:
            return fused
        _, c, h, wd = (int(d) for d in plan["x"].ty.shape.values)
        k, stride, pads = _kxk(plan)
        func = handwritten.build("dwconv2d_chw", {"c": c, "h": h, "w": wd, "k": k, "stride": stride, "pads": pads,
                                                  "clip": plan["clip"], "lanes": self.spec.vector_lanes,
                                                  "out_plane": plan["plane"]}, self.spec)
        return self.call_kernel(plan, func, "chw", [plan["x"]])

    def pad_planes(self, plan) -> None:
        """plan["plane"]: the padded plane the depthwise conv writes, where its only reader is a sparse 1x1
        that reads it as its input x (None: planes as they are)."""
        _, c, oh, ow = (int(d) for d in plan["out_ty"].shape.values)
        user = self.only_user(plan["last"])
        reads_x_only = (isinstance(user, relax.VarBinding) and _is_sparse_call(user.value)
                        and sum(a.same_as(plan["last"]) for a in user.value.args[1].fields) == 1
                        and user.value.args[1].fields[0].same_as(plan["last"]))
        plan["plane"] = aligned_plane(oh * ow, self.spec.vector_lanes) if reads_x_only else None
        if plan["plane"] is not None:
            self.planes[plan["last"]] = plan["plane"]
            plan["out_ty"] = relax.TensorType(planes_shape(c, oh, ow, plan["plane"]), "float32")

    def read_padded_planes(self, var, value):
        """The sparse 1x1 bound to var, rebuilt to read its input x as padded planes (pad_planes)."""
        x_in = self.bound[var].args[1].fields[0]
        return self.rebuild_spmm(var, value, list(value.args[1].fields), "padded_planes", in_plane=self.planes[x_in])

    def se_gate(self, var):
        """(x, gate) where the sparse 1x1 bound to var is the only reader of its input x * gate, gate a
        [1, C, 1, 1] vector (a squeeze-and-excitation product, see `excited`); None otherwise."""
        x_in = self.bound[var].args[1].fields[0]
        product = self.bound.get(x_in)
        if op_name(product) != "relax.multiply" or self.only_user(x_in) is None:
            return None
        full = [int(d) for d in x_in.ty.shape.values]
        return next(((x, gate) for x, gate in per_channel_factors(product)
                     if shape_of(x) == full and len(full) == 4 and isinstance(gate, relax.Var)), None)

    def scale_by_gate(self, var, value):
        """The sparse 1x1 bound to var, rebuilt to read x and the gate of its input x * gate and scale each
        weight by its input channel's gate: the product is never written."""
        x, gate = (self.visit_expr(v) for v in self.se_gate(var))
        fields = list(value.args[1].fields)
        fields = [x, *fields[1:5], gate, *fields[5:]]
        return self.rebuild_spmm(var, value, fields, "se_gate", scale=True)

    def rebuild_spmm(self, var, value, fields: list, what: str, **updates):
        """call_tir of the sparse 1x1 bound to var with its kernel built again from its recipe with `updates`
        (in_plane: reading padded planes; scale: scaling by a gate), on the arguments `fields`; noted as `what`."""
        old = self.builder_.get()[value.args[0]]
        func = handwritten.rebuild(recipe(old), self.spec, updates)
        gv, func = add_kernel(self, func)
        changelog.record(NAME, what, var.name, kernel=str(func.attrs["global_symbol"]),
                         replaces=str(old.attrs["global_symbol"]),
                         **({"plane": updates["in_plane"]} if "in_plane" in updates else {}))
        return relax.call_tir(gv, relax.Tuple(fields), var.ty)

    def call_kernel(self, plan, func, what: str, inputs: list, **details):
        """call_tir(func, *inputs, W, bias) in place of the plan's conv and its epilogue, noted as `what`."""
        gv, func = add_kernel(self, func)
        w = plan["w"]
        bias = plan["bias"] if plan["bias"] is not None else np.zeros(w.shape[0], np.float32)
        changelog.record(NAME, what, plan["conv"], kernel=str(func.attrs["global_symbol"]), **details)
        return relax.call_tir(gv, relax.Tuple([*inputs, const(w), const(bias)]), plan["out_ty"])

    def fuse_with_first_conv(self, plan):
        """first conv -> this depthwise conv (first_conv planned it): one kernel that never writes the first
        conv's output to memory (f32_conv2d_dwconv2d_chw)."""
        first = self.first_convs.pop(plan["x_in"], None)
        if first is None:
            return None
        _, cin, h, wd = (int(d) for d in first["x"].ty.shape.values)
        k1, stride1, pads1 = _kxk(first)
        k, stride, pads = _kxk(plan)
        func = handwritten.build("conv2d_dwconv2d_chw", {
            "cin": cin, "c": plan["w"].shape[0], "h": h, "w": wd, "k1": k1, "stride1": stride1, "pads1": pads1,
            "clip1": first["clip"], "k": k, "stride": stride, "pads": pads, "clip": plan["clip"],
            "lanes": self.spec.vector_lanes, "out_plane": plan["plane"]}, self.spec)
        bias1 = first["bias"] if first["bias"] is not None else np.zeros(first["w"].shape[0], np.float32)
        return self.call_kernel(plan, func, "fused_first_conv", [first["x"], const(first["w"]), const(bias1)],
                                first_conv=first["conv"])

    def fuse_with_expand(self, plan):
        """sparse 1x1 (no residual) -> this depthwise conv, where the conv is the 1x1's only reader:
        one kernel that never writes the expanded tensor to memory (f32_spmm_dwconv2d_chw)."""
        src = self.bound.get(plan["x_in"])
        if src is None or not _is_sparse_call(src) or len(src.args[1].fields) != 5 \
                or self.only_user(plan["x_in"]) is None:
            return None
        x, row_ptr, col, val, bias1 = src.args[1].fields
        in_plane = self.planes.get(x)     # x itself written padded by a depthwise kernel before (MobileNetV1)
        _, cin, h, wd = (int(d) for d in x.ty.shape.values)      # the input function's x: [1, cin, h, w]
        x = self.visit_expr(x)
        spmm = self.builder_.get()[src.args[0]]
        val_np, col_np = const_np(val), const_np(col)
        c, block = plan["w"].shape[0], val_np.shape[1]
        if len(const_np(row_ptr)) != c // block + 1:    # encoded in chunks of input channels: the fused kernel walks rows
            row_ptr, col_np, val_np = encode_bsr(decode_bsr(const_np(row_ptr), col_np, val_np, c, cin), block)
            row_ptr, col, val = const(row_ptr), const(col_np), const(val_np)
        k, stride, pads = _kxk(plan)
        func = handwritten.build("spmm_dwconv2d_chw", {
            "cin": cin, "c": c, "h": h, "w": wd, "block": block, "nnzb": len(col_np),
            "k": k, "stride": stride, "pads": pads, "clip1": kernel_clip(spmm),
            "clip": plan["clip"], "lanes": self.spec.vector_lanes, "col_dtype": str(col_np.dtype),
            "out_plane": plan["plane"], "in_plane": in_plane}, self.spec)
        return self.call_kernel(plan, func, "fused", [x, row_ptr, col, val, bias1],
                                expand=str(spmm.attrs["global_symbol"]))


def _kxk(plan) -> tuple:
    """(kernel size, stride, [top, left, bottom, right] padding) of the plan's conv."""
    a = plan["attrs"]
    return plan["w"].shape[2], int(a.strides[0]), [int(p) for p in a.padding]


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class FormCHWRegions:
    """Keep the depthwise convs next to sparse CHW 1x1 kernels in CHW, so layouts do not churn."""

    def __init__(self, spec):
        self.spec = spec

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Regions, self.spec)[0]
