"""PadChannelPlanes: a sparse 1x1's output is stored as padded planes where every reader can take them.

call_tir(f32_spmm_chw_.., ...) -> [1, C, h, w]   =>   -> [1, C, plane]   (plane = chw_rows.aligned_plane)
A CHW tensor of 14x14 or 7x7 planes (196 or 49 floats) stored plane after plane has most planes start
mid cache line, so most vector loads and stores of the kernels that walk it split across two lines.
FormCHWRegions pads a depthwise conv's output for the sparse 1x1 that reads it; this pass does the same
for the outputs of sparse 1x1 kernels (in MobileNetV2 the blocks' outputs at 14x14 and 7x7): the kernel
writes padded planes where every reader is a kernel that can read them so (`_plane_arg`: a sparse 1x1, as
its x or its residual; a fused sparse 1x1 + depthwise, as its x), and those readers are rebuilt to do so.
A tensor the function returns, or that anything else reads, keeps its shape.
NOTE: runs after FormCHWRegions (it looks for the kernels that pass and SparsifyConv1x1 emit); the
rebuilt kernels keep their knobs, their task keys change (their args say the planes).
"""
from __future__ import annotations

import tvm
from tvm import relax

from passes import changelog
from passes.rewriting import BindingRewriter, op_name, rewrite_main, rewriter
from passes.sparsify_conv1x1 import add_kernel
from schedules import handwritten
from schedules.chw_rows import aligned_plane, planes_shape
from schedules.rule import recipe

NAME = "PadChannelPlanes"
PRODUCER = "spmm_chw"


def _plane_arg(r: dict, position: int, nfields: int) -> str | None:
    """The kernel arg that makes the kernel with recipe r read its input `position` (of nfields) as padded
    planes; None where it cannot. Readers that can: a sparse 1x1 (its x, its residual) and a fused sparse
    1x1 + depthwise (its x)."""
    if r["kind"] in ("spmm_chw", "spmm_dwconv2d_chw") and position == 0 and not r["args"].get("in_plane"):
        return "in_plane"
    if r["kind"] == "spmm_chw" and r["args"]["residual"] and position == nfields - 1:
        return "res_plane"
    return None


def _kernel_call(mod, value) -> tuple[dict, list, str] | None:
    """(recipe, argument fields, symbol) of a call_tir of a kernel schedules/handwritten.py built."""
    if op_name(value) != "relax.call_tir" or not isinstance(value.args[1], relax.Tuple):
        return None
    func = mod[value.args[0]]
    r = recipe(func)
    return (r, list(value.args[1].fields), str(func.attrs["global_symbol"])) if r else None


@rewriter
class _Planes(BindingRewriter):
    def __init__(self, mod, func, spec):
        super().__init__(mod, func)
        self.spec = spec
        # var -> (recipe, argument fields, symbol) of every handwritten kernel call of the input function
        self.calls = {b.var: call for block in func.body.blocks for b in block.bindings
                      if (call := _kernel_call(mod, b.value)) is not None}
        self.padded = self.plan()    # var -> its plane

    def plan(self) -> dict:
        """The sparse 1x1 outputs to pad: planes not whole vectors, every reader one that can take them."""
        padded = {}
        for var, (r, _, _) in self.calls.items():
            if r["kind"] != PRODUCER or r["args"].get("out_plane"):
                continue
            plane = aligned_plane(r["args"]["h"] * r["args"]["w"], r["args"]["lanes"])
            if plane is not None and self.readers_take_planes(var):
                padded[var] = plane
        return padded

    def readers_take_planes(self, var) -> bool:
        users = self.users.get(var, [])
        for user in users:
            call = None if user is None else self.calls.get(user.var)
            if call is None:
                return False
            r, fields, _ = call
            uses = [i for i, f in enumerate(fields) if f.same_as(var)]
            if not uses or any(_plane_arg(r, i, len(fields)) is None for i in uses):
                return False
        return bool(users)

    def rewrite(self, var, value):
        call = self.calls.get(var)
        if call is None:
            return None
        r, old_fields, symbol = call
        updates = {_plane_arg(r, i, len(old_fields)): self.padded[f]
                   for i, f in enumerate(old_fields) if isinstance(f, relax.Var) and f in self.padded}
        if var in self.padded:
            updates["out_plane"] = self.padded[var]
        if not updates:
            return None
        func = handwritten.rebuild(r, self.spec, updates)
        gv, func = add_kernel(self, func)
        out_ty = var.ty
        if var in self.padded:
            _, c, h, w = (int(d) for d in var.ty.shape.values)
            out_ty = relax.TensorType(planes_shape(c, h, w, self.padded[var]), "float32")
        changelog.record(NAME, "padded_planes", var.name, kernel=str(func.attrs["global_symbol"]), replaces=symbol,
                         **updates)
        self.changes.append(f"{var.name}: {', '.join(f'{k}={v}' for k, v in sorted(updates.items()))}")
        return relax.call_tir(gv, relax.Tuple(list(value.args[1].fields)), out_ty)


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class PadChannelPlanes:
    """Store sparse 1x1 outputs as padded planes where all their readers can read them so."""

    def __init__(self, spec):
        self.spec = spec

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Planes, self.spec)[0]
