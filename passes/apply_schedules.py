"""ApplySchedules: schedule every fused TIR function with the first rule that applies, and name it after its kernel."""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.relax.expr_functor import PyExprMutator, mutator

from passes import changelog
from schedules.handwritten import HANDWRITTEN, recipe
from schedules.rule import SCHEDULED_ATTR, is_library_call, is_scheduled, task_key
from targets.errors import ShrinkcError

NAME = "ApplySchedules"


@mutator
class _Renamer(PyExprMutator):
    # call_tir(fused_conv2d_add_clip, ...)  =>  call_tir(f32_conv1x1_nchw16c_7x48, ...)
    def __init__(self, mod, renames):
        super().__init__(mod)
        self.renames = renames

    def visit_global_var_(self, op):
        return self.renames.get(op, op)


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class ApplySchedules:
    """Schedule every fused TIR function with the first rule that applies, and name it after its kernel.

    `rules` come from schedules/ (in order), `spec` is the TargetSpec, `knobs` maps a kernel's
    task key (schedules.rule.task_key of the unscheduled function) to knob overrides (from tuning).
    Kernels a pass built already scheduled (schedules/handwritten.py) are left alone, or rebuilt with the
    knobs tuning found for them."""

    def __init__(self, rules, spec, knobs: dict | None = None):
        self.rules, self.spec, self.knobs = rules, spec, knobs or {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        funcs, renames = {}, {}
        # a kernel a pass built keeps its name unless tuning rebuilds it (then it is named like the others)
        retune = {gv: self.knobs.get(task_key(f)) for gv, f in mod.functions.items()
                  if self.knobs and recipe(f) is not None}      # NOTE: also runs in every cost measurement
        retune = {gv: knobs for gv, knobs in retune.items() if knobs}
        taken = {gv.name_hint for gv, f in mod.functions.items() if is_scheduled(f) and gv not in retune}
        for gv, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc) or (is_scheduled(func) and gv not in retune) \
                    or is_library_call(func):
                funcs[gv] = func
                continue
            if gv in retune:
                done = HANDWRITTEN.apply(func, self.spec, retune[gv])
            else:
                done, knobs = None, self.knobs.get(task_key(func)) if self.knobs else None
                for rule in self.rules:
                    done = rule.apply(func, self.spec, knobs)
                    if done is not None:
                        break
                if done is None:
                    raise ShrinkcError(f"no schedule applies to kernel '{gv.name_hint}' on target '{self.spec.name}'",
                                       "report the model and target; try --target x86 meanwhile")
                if done.name:
                    changelog.record(NAME, done.name.split("_")[1], gv.name_hint, kernel=done.name, knobs=done.knobs)
            new = done.func.with_attr(SCHEDULED_ATTR, 1)
            name = done.name or gv.name_hint
            unique, i = name, 1
            while unique in taken:
                unique, i = f"{name}_{i}", i + 1
            taken.add(unique)
            renames[gv] = unique
            if gv in retune:
                changelog.record(NAME, "retuned", gv.name_hint, kernel=unique, knobs=done.knobs)
            funcs[gv] = new.with_attr("global_symbol", unique)
        bb = relax.BlockBuilder(tvm.IRModule({}, attrs=mod.attrs))
        new_gvs = {}
        for gv, func in funcs.items():  # PrimFuncs first; add_func gives their GlobalVars types
            if isinstance(func, tirx.PrimFunc):
                new_gvs[gv] = bb.add_func(func, renames.get(gv, gv.name_hint))
        for gv, func in funcs.items():
            if isinstance(func, relax.Function):
                bb.add_func(_Renamer(mod, new_gvs).visit_expr(func), gv.name_hint)
            elif not isinstance(func, tirx.PrimFunc):
                bb.add_func(func, gv.name_hint)
        return bb.get()
