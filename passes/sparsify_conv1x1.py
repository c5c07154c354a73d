"""SparsifyConv1x1: run mostly-zero 1x1 convs as block-sparse CHW kernels with compressed weights.

conv2d_1x1(x, W) [-> add(bias)] [-> clip / relu] [-> add(residual)]
  =>  call_tir(f32_spmm_chw_PxB, x, row_ptr, col, val, bias [, residual])
Applies to batch-1 NCHW 1x1 stride-1 convs (groups 1) with constant weights of which at least
`sparse_min` are zero (XNNPACK's 2/3 rule). The block shape (1, 2, 4 or 8 output channels non-zero
together) comes from the block fill; the dense weights leave the module. Where the cost interface
measures (the target runs here), a layer goes sparse only when the sparse kernel is measured
faster than our dense 1x1; elsewhere the zero share alone decides.
With `plane_share` < 1 only the layers whose input planes (H x W) are at most that share of the model's
largest 1x1 input plane are candidates: the late, low-resolution part of a CHW region, which the pipeline
tries alone where the whole region measured slower than dense or gained little (KeepIfFaster's fallbacks).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.convert_to_blocked_layout import block_const, ceil_to, channel_block, channel_pad, pack_kernel
from passes.merge_linear_chains import var_layer_name
from passes.rewriting import BindingRewriter, channel_vector, const, const_np, is_const, op_name, rewrite_main, \
    latencies, rewriter
from schedules.chw_rows import HSWISH, SILU, planes_shape
from schedules import handwritten
from schedules.f32_spmm_chw import BLOCKS, block_fill, default_k_chunk, encode_bsr

NAME = "SparsifyConv1x1"
SPARSE_MIN = 2 / 3          # least share of zero weights for a sparse 1x1 (XNNPACK's rule)
BLOCK_MIN_FILL = 0.75       # a block shape is used when its blocks are at least this full
BLOCK_TRY_FILL = 0.5        # ... or, where the cost interface measures, tried from this fill up


# why a mostly-zero 1x1 conv of a batch > 1 stays dense, and what to do (the CLI repeats it once per model)
BATCH_ONE = ("the sparse CHW kernels serve batch 1 (export the model with batch 1, or with a dynamic batch, which "
             "shrinkc compiles as 1)")


def conv1x1_weights(value, any_batch: bool = False) -> np.ndarray | None:
    """[Cout, Cin] weights of a batch-1 (any_batch: any batch) NCHW/OIHW 1x1 stride-1 groups-1 f32 conv with
    constant weights."""
    if op_name(value) != "relax.nn.conv2d":
        return None
    a = value.attrs
    x, w = value.args
    if not is_const(w) or str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" \
            or str(a.out_layout) != "NCHW" or int(a.groups) != 1:
        return None
    if any(int(s) != 1 for s in a.strides) or any(int(d) != 1 for d in a.dilation) \
            or any(int(p) != 0 for p in a.padding):
        return None
    wt = const_np(w)
    xs = x.ty.shape
    if wt.dtype != np.float32 or wt.shape[2:] != (1, 1) or xs is None or len(xs.values) != 4 \
            or not all(isinstance(d, tvm.tirx.IntImm) for d in xs.values) or (int(xs.values[0]) != 1
                                                                              and not any_batch):
        return None
    return wt[:, :, 0, 0]


def _clip_bounds(value) -> tuple[float, float] | None:
    name = op_name(value)
    if name == "relax.clip":
        return _scalar(value.args[1]), _scalar(value.args[2])
    if name == "relax.nn.relu":
        return 0.0, float(np.finfo(np.float32).max)
    return None


def _scalar(e) -> float:
    v = e.value
    return float(v.value if hasattr(v, "value") else v)


def _is_scalar(e, value: float) -> bool:
    return is_const(e) and const_np(e).size == 1 and np.isclose(float(const_np(e).reshape(())), value, rtol=1e-6)


def _sixth_of(value, var) -> bool:
    """value is var / 6 or var * (1/6)."""
    a = value.args if isinstance(value, relax.Call) else []
    if op_name(value) == "relax.divide":
        return a[0].same_as(var) and _is_scalar(a[1], 6.0)
    return op_name(value) == "relax.multiply" and any(
        x.same_as(var) and _is_scalar(y, 1 / 6) for x, y in ((a[0], a[1]), (a[1], a[0])))


def _product_of(value, u, v) -> bool:
    """value is u * v (either order)."""
    if op_name(value) != "relax.multiply":
        return False
    a, b = value.args
    return (a.same_as(u) and b.same_as(v)) or (a.same_as(v) and b.same_as(u))


def hard_swish(rw: BindingRewriter, var) -> relax.Var | None:
    """The input var of var's hard swish, x * clip(x + 3, 0, 6) / 6 for x = var, as importers write it:
    x * (clip(..) / 6) (ONNX HardSwish), (x * clip(..)) / 6 (TFLite), with * (1/6) in place of / 6, or
    x * clip(x / 6 + 0.5, 0, 1) (x times ONNX HardSigmoid, as older torch exports write it); where the
    swish's steps are all that read var and each other. None where var is not so followed."""
    users = rw.users.get(var, [])
    if len(users) != 2 or None in users:
        return None
    for first in users:
        step = rw.only_user(first.var)
        if step is None:
            continue
        if op_name(first.value) == "relax.add" and first.value.args[0].same_as(var) \
                and _is_scalar(first.value.args[1], 3.0) and _clip_bounds(step.value) == (0.0, 6.0):
            return _times_and_sixth(rw, step.var, var)
        if _sixth_of(first.value, var) and op_name(step.value) == "relax.add" \
                and step.value.args[0].same_as(first.var) and _is_scalar(step.value.args[1], 0.5):
            clip = rw.only_user(step.var)
            mul = rw.only_user(clip.var) if clip is not None and _clip_bounds(clip.value) == (0.0, 1.0) else None
            return mul.var if mul is not None and _product_of(mul.value, clip.var, var) else None
    return None


def silu(rw: BindingRewriter, var) -> relax.Var | None:
    """The var of var's SiLU, x * sigmoid(x) for x = var (either order), as exporters write SiLU / swish
    (Sigmoid and Mul), where the two steps are all that read var and the product all that reads the
    sigmoid. None where var is not so followed."""
    users = rw.users.get(var, [])
    if len(users) != 2 or None in users:
        return None
    for first in users:
        if op_name(first.value) == "relax.sigmoid" and first.value.args[0].same_as(var):
            mul = rw.only_user(first.var)
            if mul is not None and _product_of(mul.value, first.var, var):
                return mul.var
    return None


def _times_and_sixth(rw: BindingRewriter, cur, x):
    """The var after the two steps that follow cur = relu6(x + 3): the scaling by 1/6 and the product with
    x, in either order; None where they do not follow."""
    steps: set = set()
    while len(steps) < 2:
        step = rw.only_user(cur)
        if step is not None and "sixth" not in steps and _sixth_of(step.value, cur):
            steps.add("sixth")
        elif step is not None and "times" not in steps and _product_of(step.value, cur, x):
            steps.add("times")
        else:
            return None
        cur = step.var
    return cur


def epilogue_chain(rw: BindingRewriter, conv_var, cout: int, residual: bool = True) -> dict:
    """What follows a conv, each step the only user of the one before: bias add, clip/relu, residual add,
    clip/relu (after the add, as in BlazeFace's blocks).

    Returns {"last": the chain's last input var, "bias": [cout] or None, "clip": (lo, hi), HSWISH, SILU or None,
    "residual": the other operand of the residual add (an input var) or None, "clip2": (lo, hi) after the
    residual add or None, "name": the layer's name (the bias add's when the importer named that one after the
    model's node)}."""
    plan = {"last": conv_var, "bias": None, "clip": None, "residual": None, "clip2": None, "name": conv_var.name}
    var, stage = conv_var, 0
    while True:
        swish = next(((kind, out) for kind, find in ((HSWISH, hard_swish), (SILU, silu))
                      if (out := find(rw, var)) is not None), None) if stage <= 1 else None
        if swish is not None:
            (plan["clip"], plan["last"]), var, stage = swish, swish[1], 2
            continue
        user = rw.only_user(var)
        if not isinstance(user, relax.VarBinding):
            return plan
        v = user.value
        name = op_name(v)
        other = None
        if name == "relax.add":
            a, b = v.args
            other = b if a.same_as(var) else a if b.same_as(var) else None
        if stage == 0 and other is not None and channel_vector(other, cout) is not None:
            plan["bias"], stage = channel_vector(other, cout), 1
            plan["name"] = var_layer_name(conv_var, user.var)
        elif stage <= 1 and _clip_bounds(v) is not None and v.args[0].same_as(var):
            plan["clip"], stage = _clip_bounds(v), 2
        elif residual and stage <= 2 and other is not None and not is_const(other) \
                and [int(d) for d in other.ty.shape.values] == [int(d) for d in user.var.ty.shape.values]:
            plan["residual"], stage = other, 3
            padded = rw.bound.get(other)
            if padded is not None and op_name(padded) == "relax.nn.pad" and channel_pad(padded) \
                    and rw.only_user(other) is not None and rw.only_user(other).var.same_as(user.var):
                # a shortcut that appends zero channels (BlazeFace): the kernel reads it unpadded
                plan["residual"] = padded.args[0]
                plan["res_channels"] = int(padded.args[0].ty.shape.values[1])
        elif stage == 3 and _clip_bounds(v) is not None and v.args[0].same_as(var):
            plan["clip2"], stage = _clip_bounds(v), 4
        else:
            return plan
        plan["last"], var = user.var, user.var
        if stage == 4:
            return plan


def add_kernel(rw: BindingRewriter, func):
    """Add a scheduled PrimFunc to the rewriter's module under a unique name (f32_spmm_chw_64x1_3)."""
    names = {gv.name_hint for gv in rw.builder_.get().get_global_vars()}
    base = str(func.attrs["global_symbol"])
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    func = func.with_attr("global_symbol", name)
    return rw.builder_.add_func(func, name), func


@rewriter
class _Sparsifier(BindingRewriter):
    def __init__(self, mod, func, spec, cost, sparse_min, max_pixels=None):
        super().__init__(mod, func)
        self.spec, self.cost, self.sparse_min, self.max_pixels = spec, cost, sparse_min, max_pixels
        self.plans: dict = {}     # input var of the chain's last binding -> plan

    def rewrite(self, var, value):
        if var in self.plans:
            plan = self.plans.pop(var)
            if plan["residual"] is not None:
                plan["residual"] = self.visit_expr(plan["residual"])
            return self.emit_sparse(var, plan)
        w = conv1x1_weights(value, any_batch=True)
        if w is None:
            return None
        zeros = 1.0 - np.count_nonzero(w) / w.size
        cout, cin = w.shape
        plan = epilogue_chain(self, var, cout)
        batch = int(value.args[0].ty.shape.values[0])
        if batch != 1:
            if zeros >= self.sparse_min:
                changelog.skip(NAME, plan["name"], f"sparse 1x1 skipped: {zeros:.0%} zeros but batch {batch}; "
                                                   f"{BATCH_ONE}")
            return None
        if zeros < self.sparse_min:
            changelog.skip(NAME, plan["name"], f"sparse 1x1 skipped: {zeros:.0%} zeros < {self.sparse_min:.0%}")
            return None
        _, _, h, wd = (int(d) for d in value.args[0].ty.shape.values)
        if self.max_pixels is not None and h * wd > self.max_pixels:
            changelog.skip(NAME, plan["name"], f"sparse 1x1 skipped: {h}x{wd} plane, above the {self.max_pixels} "
                                               "pixels of the late part of the model tried alone")
            return None
        if h * wd == 1:   # a matrix-vector product: our kernels here are vectorised over pixels
            changelog.skip(NAME, plan["name"], "sparse 1x1 skipped: 1x1 plane, left to SparsifyDense's "
                                               "matrix-vector kernels")
            return None
        plan.update(w=w, x=value.args[0], h=h, wd=wd, zeros=zeros, conv=plan["name"])
        choice = self.choose(plan)
        if choice is None:
            return None
        plan.update(choice)
        if plan["last"].same_as(var):
            return self.emit_sparse(var, plan)
        self.plans[plan["last"]] = plan
        return None

    # --- which block shape, and whether sparse beats dense ----------------------------------
    def choose(self, plan) -> dict | None:
        w = plan["w"]
        cout = w.shape[0]
        fills = {b: block_fill(w, b) for b in BLOCKS if cout % b == 0}
        measure = self.cost is not None and getattr(self.cost, "enabled", False)
        floor = BLOCK_TRY_FILL if measure else BLOCK_MIN_FILL
        blocks = [b for b in BLOCKS if b in fills and (b == 1 or fills[b] >= floor)]
        if not measure:
            b = blocks[0]
            return {"block": b, "fill": fills[b], "speedup": None}
        dense, *sparse = latencies(self.cost, [(dense_layer_module(plan, self.spec), dense_key(plan))]
                                   + [(sparse_layer_module(plan, b, self.spec), None) for b in blocks])
        timed = dict(zip(blocks, sparse))
        b = min(timed, key=timed.get)
        if timed[b] >= dense:
            changelog.skip(NAME, plan["conv"], f"sparse 1x1 skipped: {plan['zeros']:.0%} zeros but sparse "
                                               f"{timed[b] * 1e6:.0f} us >= dense {dense * 1e6:.0f} us")
            return None
        return {"block": b, "fill": fills[b], "speedup": round(dense / timed[b], 2)}

    def emit_sparse(self, var, plan):
        func, args = _sparse_call_parts(plan, plan["block"], self.spec, plan["x"], plan["residual"])
        gv, func = add_kernel(self, func)
        changelog.record(NAME, "sparse", plan["conv"], zeros=round(plan["zeros"], 3), block=plan["block"],
                         block_fill=round(plan["fill"], 3), kernel=str(func.attrs["global_symbol"]),
                         speedup=plan["speedup"])
        return relax.call_tir(gv, args, relax.TensorType([1, plan["w"].shape[0], plan["h"], plan["wd"]], "float32"))


def spmm_kernel(cin: int, cout: int, h: int, w: int, block: int, nnzb: int, clip, residual: bool, col_dtype: str,
                spec, in_plane: int | None = None, scale: bool = False, out_plane: int | None = None,
                res_plane: int | None = None, clip2=None, res_channels: int | None = None):
    """The f32_spmm_chw kernel of a layer, with the target's pixel tile (opaque: never fused; tunable:
    schedules/handwritten.py). scale: x comes with a per-channel scale to apply (an SE gate)."""
    args = {"cin": cin, "cout": cout, "h": h, "w": w, "block": block, "nnzb": max(1, nnzb), "clip": clip,
            "residual": residual, "lanes": spec.vector_lanes, "col_dtype": col_dtype, "in_plane": in_plane}
    if scale:    # NOTE: only where set, so the task keys of unscaled kernels stay those of tuning databases
        args["scale"] = True
    if clip2 is not None:    # (likewise) a clip after the residual add
        args["clip2"] = [float(clip2[0]), float(clip2[1])]
    if res_channels:         # (likewise) a residual with fewer channels (zeros appended)
        args["res_channels"] = int(res_channels)
    for key, plane in (("out_plane", out_plane), ("res_plane", res_plane)):
        if plane:    # (likewise) PadChannelPlanes
            args[key] = plane
    k_chunk = default_k_chunk(cin, cout, h * w, block, spec)
    if k_chunk:  # (likewise) the weights are encoded in chunks of input channels: _sparse_call_parts
        args["k_chunk"] = k_chunk
    return handwritten.build("spmm_chw", args, spec)


def _sparse_call_parts(plan, block, spec, x, residual):
    """The kernel and its arguments: x, row_ptr, col, val, bias (, residual)."""
    w = plan["w"]
    cout, cin = w.shape
    row_ptr, col, val = encode_bsr(w, block, default_k_chunk(cin, cout, plan["h"] * plan["wd"], block, spec))
    func = spmm_kernel(cin, cout, plan["h"], plan["wd"], block, len(col), plan["clip"], residual is not None,
                       str(col.dtype), spec, in_plane=plan.get("in_plane"), out_plane=plan.get("out_plane"),
                       res_plane=plan.get("res_plane"), clip2=plan.get("clip2"),
                       res_channels=plan.get("res_channels"))
    bias = plan["bias"] if plan["bias"] is not None else np.zeros(cout, np.float32)
    args = [x, const(row_ptr), const(col), const(val), const(bias)]
    if residual is not None:
        args.append(residual)
    return func, relax.Tuple(args)


def _layer_params(plan, sparse: bool = True):
    """The layer's x and residual (None) as params; sparse: the residual as the spmm reads it (res_channels)."""
    cout, cin = plan["w"].shape
    x = relax.Var("x", relax.TensorType(planes_shape(cin, plan["h"], plan["wd"], plan.get("in_plane")), "float32"))
    res = None
    if plan["residual"] is not None:
        res_c = (plan.get("res_channels") or cout) if sparse else cout
        res = relax.Var("res", relax.TensorType(planes_shape(res_c, plan["h"], plan["wd"], plan.get("res_plane")),
                                                "float32"))
    return x, res


def _blocks(spec, cin: int, cout: int) -> tuple[int | None, int | None]:
    """The channel blocks ConvertToBlockedLayout gives this conv's input and output (None: NCHW)."""
    lanes = spec.kernel_defaults.get("block_lanes", spec.vector_lanes)
    pad = spec.kernel_defaults.get("pad_channels", spec.isa == "avx512")

    def block_for(channels):
        return lanes if pad and channels >= lanes // 2 else channel_block(channels, lanes)
    return (block_for(cin) if cin >= 8 else None), block_for(cout)


def dense_key(plan) -> str:
    """The cost key of a dense layer: its shape and epilogue, not its weights (a dense kernel's speed does
    not depend on them), so layers of one shape share one measurement, within a model and across models."""
    cout, cin = plan["w"].shape
    return (f"dense1x1|{cin}x{cout}@{plan['h']}x{plan['wd']}|bias={plan['bias'] is not None}|clip={plan['clip']}"
            f"|residual={plan['residual'] is not None}" + (f"|clip2={plan['clip2']}" if plan.get("clip2") else ""))


def dense_layer_module(plan, spec) -> tvm.IRModule:
    """The dense layer as our phase 4 runs it inside a network: conv -> bias -> clip -> residual in
    NCHW{b}c, reading and writing blocked tensors (so no layout transforms are timed with it)."""
    w = plan["w"]
    cout, cin = w.shape
    bi, bo = _blocks(spec, cin, cout)
    if bi is None or bo is None:
        return _nchw_dense_layer_module(plan)
    shape_in = [1, ceil_to(cin, bi) // bi, plan["h"], plan["wd"], bi]
    shape_out = [1, ceil_to(cout, bo) // bo, plan["h"], plan["wd"], bo]
    x = relax.Var("x", relax.TensorType(shape_in, "float32"))
    res = relax.Var("res", relax.TensorType(shape_out, "float32")) if plan["residual"] is not None else None
    bb = relax.BlockBuilder()
    with bb.function("main", [x] + ([res] if res is not None else [])):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, const(pack_kernel(w[:, :, None, None], bo, ceil_to(cin, bi))),
                                           data_layout=f"NCHW{bi}c", kernel_layout=f"OHWI{bo}o",
                                           out_layout=f"NCHW{bo}c"))
            y = _epilogue(bb, y, plan, res, lambda v: block_const(v.reshape(1, -1, 1, 1), bo, cout))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _epilogue(bb, y, plan, res, bias_const):
    if plan["bias"] is not None:
        y = bb.emit(relax.op.add(y, const(bias_const(plan["bias"]))))
    if plan["clip"] == HSWISH:
        six = relax.const(6.0, "float32")
        gate = bb.emit(relax.op.clip(bb.emit(relax.op.add(y, relax.const(3.0, "float32"))), 0.0, 6.0))
        y = bb.emit(relax.op.multiply(y, bb.emit(relax.op.divide(gate, six))))
    elif plan["clip"] == SILU:
        y = bb.emit(relax.op.multiply(y, bb.emit(relax.op.sigmoid(y))))
    elif plan["clip"] is not None:
        y = bb.emit(relax.op.clip(y, *plan["clip"]))
    if res is not None:
        y = bb.emit(relax.op.add(y, res))
    if plan.get("clip2") is not None:
        y = bb.emit(relax.op.clip(y, *plan["clip2"]))
    return y


def _nchw_dense_layer_module(plan) -> tvm.IRModule:
    x, res = _layer_params(plan, sparse=False)
    bb = relax.BlockBuilder()
    with bb.function("main", [x] + ([res] if res is not None else [])):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, const(plan["w"][:, :, None, None])))
            y = _epilogue(bb, y, plan, res, lambda v: v.reshape(1, -1, 1, 1))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def sparse_layer_module(plan, block, spec) -> tvm.IRModule:
    """The layer as one spmm call (`block` output channels per BSR block). plan: w [Cout, Cin], h, wd,
    bias ([Cout] or None), clip ((lo, hi) or None), residual (None, or anything: a residual input), and
    optionally in_plane (its input as padded planes, as FormCHWRegions gives it after a depthwise conv),
    out_plane and res_plane (its output and residual so, as PadChannelPlanes stores them)."""
    x, res = _layer_params(plan)
    bb = relax.BlockBuilder()
    with bb.function("main", [x] + ([res] if res is not None else [])):
        func, args = _sparse_call_parts(plan, block, spec, x, res)
        gv = bb.add_func(func, func.attrs["global_symbol"])
        with bb.dataflow():
            out = bb.emit_output(relax.call_tir(gv, args, relax.TensorType(
                planes_shape(plan["w"].shape[0], plan["h"], plan["wd"], plan.get("out_plane")), "float32")))
        bb.emit_func_output(out)
    return bb.get()


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class SparsifyConv1x1:
    """Run mostly-zero 1x1 convs as block-sparse CHW kernels with compressed weights."""

    def __init__(self, spec, cost=None, sparse_min: float = SPARSE_MIN, plane_share: float = 1.0):
        self.spec, self.cost, self.sparse_min, self.plane_share = spec, cost, sparse_min, plane_share

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        max_pixels = None
        if self.plane_share < 1:
            planes = conv1x1_planes(mod)
            if not planes:
                return mod
            max_pixels = int(max(planes) * self.plane_share)
        return rewrite_main(mod, _Sparsifier, self.spec, self.cost, self.sparse_min, max_pixels)[0]


def conv1x1_planes(mod: tvm.IRModule) -> list[int]:
    """H x W of the input of every 1x1 conv with constant weights (conv1x1_weights) in the module's functions."""
    planes = []
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        for block in getattr(func.body, "blocks", []):
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and conv1x1_weights(b.value) is not None:
                    _, _, h, w = (int(d) for d in b.value.args[0].ty.shape.values)   # checked there
                    planes.append(h * w)
    return planes
