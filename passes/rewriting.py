"""Binding-by-binding rewriting of a Relax function, and reading constants and calls off it."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from schedules.rule import SCHEDULED_ATTR, static_shape   # NOTE: passes import static_shape from here

rewriter = mutator  # decorate each concrete BindingRewriter subclass with this


def op_name(expr) -> str:
    """'relax.nn.conv2d' for a call of that op, '' for anything else."""
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return str(expr.op.name)
    return ""


def is_const(expr) -> bool:
    return isinstance(expr, tvm.ir.Constant)


def const_np(expr) -> np.ndarray:
    return expr.value.numpy()


def scalar_value(expr) -> float | None:
    """The value of a constant with one element, else None."""
    if not is_const(expr):
        return None
    value = const_np(expr)
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def const(array: np.ndarray) -> relax.Expr:
    # NOTE: the dtype named: without it relax.const makes an int64 array int32 (gather_nd then refuses its indices)
    array = np.ascontiguousarray(array)
    return relax.const(array, str(array.dtype))


def shape_of(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


def resize2d_like(call: relax.Call, data, size=None, **changes) -> relax.Expr:
    """A relax.image.resize2d with `call`'s attributes, on `data`, to `size` (call's own when None), with the
    attributes named in `changes` (layout, rounding_method, ...) replaced."""
    a = call.attrs
    attrs = dict(roi=tuple(float(r) for r in a.roi), layout=str(a.layout), method=str(a.method),
                 coordinate_transformation_mode=str(a.coordinate_transformation_mode),
                 rounding_method=str(a.rounding_method), cubic_alpha=a.cubic_alpha, cubic_exclude=a.cubic_exclude,
                 extrapolation_value=a.extrapolation_value, out_dtype=a.out_dtype)
    return relax.op.image.resize2d(data, call.args[1] if size is None else size, **{**attrs, **changes})


def per_channel_factors(product) -> list[tuple]:
    """The (x, gate) readings, either order, of a relax.multiply whose gate is a per-channel vector of x (a
    squeeze-and-excitation product): the gate's shape is x's with batch, H and W at 1, in NCHW or NCHW{b}c."""
    if op_name(product) != "relax.multiply":
        return []
    found = []
    for x, gate in (product.args, product.args[::-1]):
        xs, gs = static_shape(x), static_shape(gate)
        if xs and gs and len(xs) >= 4 and gs == [1, xs[1], 1, 1, *xs[4:]]:
            found.append((x, gate))
    return found


def channel_vector(expr, channels: int, axis: int = 1, ndim: int = 4) -> np.ndarray | None:
    """A constant that broadcasts along one channel axis only (bias, BN scale), as a [C] vector."""
    if not is_const(expr):
        return None
    v = const_np(expr)
    if v.dtype != np.float32 or v.ndim > ndim:
        return None
    full = v.reshape((1,) * (ndim - v.ndim) + v.shape)
    for i, d in enumerate(full.shape):
        if i != axis and d != 1:
            return None
    if full.shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1), (channels,)).astype(np.float32)


def users_of(func: relax.Function) -> dict:
    """For each variable, the bindings that read it; the function's return is the binding None."""
    users: dict = {}

    def reader(binding):
        def visit(e):
            if isinstance(e, relax.Var):
                users.setdefault(e, []).append(binding)
        return visit

    for block in func.body.blocks:
        for b in block.bindings:
            relax.analysis.post_order_visit(b.value, reader(b))
    relax.analysis.post_order_visit(func.body.body, reader(None))
    return users


class BindingRewriter(PyExprMutator):
    """Visit bindings in order; `rewrite(var, value)` returns a replacement expression or None.

    `rewrite` gets the input variable (its `.ty` is the original type) and the value with its
    arguments remapped but not re-normalized. `self.producer(v)` gives the
    (rewritten) expression bound to a variable; `self.users[v]` lists the bindings of the input
    function that read the (input) variable v, to look ahead; `self.bound[v]` is the input function's value
    of its variable v.
    Replaced bindings that become unused are dropped by `rewrite_main`.
    NOTE: each concrete subclass must be decorated with `@rewriter` (TVM's `mutator`), this base not.
    """

    def __init__(self, mod: tvm.IRModule, func: relax.Function):
        super().__init__(mod)
        self.users = users_of(func)
        self.bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        self._old_of_new: dict = {}
        self.changes: list[str] = []

    def rewrite(self, var: relax.Var, value: relax.Expr) -> relax.Expr | None:
        return None

    def producer(self, var) -> relax.Expr | None:
        if not isinstance(var, relax.Var):
            return None
        return self.lookup_binding(var)

    def only_user(self, var) -> relax.VarBinding | None:
        """The one binding of the input function that reads `var`, if exactly one does."""
        users = self.users.get(var, [])
        return users[0] if len(users) == 1 else None

    def emit(self, expr: relax.Expr, name: str = "") -> relax.Var:
        """Emit a helper binding (inside the current dataflow block)."""
        return self.builder_.emit(expr, name_hint=name)

    def _const_or_var(self, var):
        new = self.get_var_remap(var)
        if new is None:  # not rebound here (a function parameter)
            return var
        bound = self.lookup_binding(new)
        return bound if is_const(bound) else new

    def visit_var_(self, op):  # uses of a variable bound to a constant see the constant itself
        return self._const_or_var(op)

    def visit_dataflow_var_(self, op):
        return self._const_or_var(op)

    def remap(self, value: relax.Expr) -> relax.Expr:
        """The value with its variables replaced by their rewritten versions, not re-normalized
        (a rewritten argument may have a new shape, as in a layout change)."""
        if isinstance(value, relax.Call):
            return relax.Call(value.op, [self.visit_expr(a) for a in value.args], value.attrs, value.ty_args)
        return self.visit_expr(value)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = self.remap(binding.value)
        new_value = self.rewrite(binding.var, value)
        if new_value is None:
            new_value = value
        name = binding.var.name
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(new_value, name_hint=name)
        else:
            new_var = self.builder_.emit_output(new_value, name_hint=name)
        self._old_of_new[new_var] = binding.var
        self.set_var_remap(binding.var, new_var)


def rewrite_main(mod: tvm.IRModule, rewriter_cls, *args) -> tuple[tvm.IRModule, list[str]]:
    """Run a BindingRewriter over every Relax function; drop dead bindings; return changes made."""
    changes: list[str] = []
    out = mod
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function):
            continue
        rw = rewriter_cls(out, func, *args)
        new_func = rw.visit_expr(func)
        new_func = relax.analysis.remove_all_unused(new_func)
        known = {g.name_hint for g in out.get_global_vars()}
        added = [(g, f) for g, f in rw.builder_.get().functions.items() if g.name_hint not in known]  # new kernels
        out = _with_func(out, gv, new_func)
        for g, f in added:
            out[g] = f
        changes.extend(rw.changes)
    return _without_unused_kernels(out), changes


def _without_unused_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """mod without our scheduled kernels that no Relax function calls any more (a kernel whose call was
    fused into another's: TVM's dead code elimination keeps it, as it has a global symbol)."""
    used = {g.name_hint for f in mod.functions.values() if isinstance(f, relax.Function)
            for g in relax.analysis.all_global_vars(f)}
    unused = [g for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)
              and f.attrs is not None and SCHEDULED_ATTR in f.attrs and g.name_hint not in used]
    if not unused:
        return mod
    return tvm.IRModule({g: f for g, f in mod.functions.items() if g not in unused}, attrs=mod.attrs)


def _with_func(mod: tvm.IRModule, gv, func) -> tvm.IRModule:
    new = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    new[gv] = func
    return new


def latencies(cost, items: list, together: bool = False) -> list[float]:
    """The cost interface's latencies of [(module, key or None)]: measured together where it can (run by run
    in turn, so a slow phase of the machine hits every candidate of a decision alike), else one by one.
    together: where the interface caches and any is not cached, all are measured now (Cost.latencies)."""
    if hasattr(cost, "latencies"):
        return cost.latencies(items, together=together)
    return [cost.latency(mod, key) for mod, key in items]
