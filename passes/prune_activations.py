"""PruneActivations: remove the activations of named inverted residual blocks, so their convs become one linear chain.

expand -> +b -> relu6 -> dwconv -> +b -> relu6 -> project  =>  expand -> +b -> dwconv -> +b -> project
With final_activation (`--final-activation`), one ReLU6 goes after the block's output instead (after the
project conv, or after the residual add): DepthShrinker's "final activation", which keeps a non-linearity
per merged block; MergeLinearChains then merges the block and the ReLU6 becomes the merged conv's epilogue.
Lossy: which blocks go is
chosen from calibration data (compiler/shrink_auto.py) or named by the user (--shrink-blocks).
Auto mode also passes `fits`: per block and activation a per-channel (a, b) fitted on the calibration data;
such an activation becomes a * x + b, folded into the conv + bias before it (conv(W * a) + (bias * a + b)),
so the block is still one linear chain; without a fit it becomes the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.fold_scale_into_conv import FoldScaleIntoConv
from passes.merge_linear_chains import layer_name
from passes.rewriting import (BindingRewriter, channel_vector, const, const_np, is_const, op_name, rewrite_main,
                              rewriter, users_of)
from targets.errors import ShrinkcError

NAME = "PruneActivations"


@dataclass
class Block:
    """An inverted residual block: its convs' layer names and its activation bindings (by variable)."""

    name: str
    layers: list[str]
    acts: list = field(default_factory=list)        # activation VarBindings, expand's first
    kinds: list[str] = field(default_factory=list)  # "relu6" / "relu" per activation
    output: object = None                           # the var of the block's result (project + bias, + residual)


def activation_kind(value) -> str:
    """'relu6' for clip(x, 0, 6), 'relu' for relu or clip(x, 0, inf); '' for anything else."""
    name = op_name(value)
    if name == "relax.nn.relu":
        return "relu"
    if name == "relax.clip":
        lo, hi = float(value.args[1].value), float(value.args[2].value)
        if lo == 0.0 and hi == 6.0:
            return "relu6"
        if lo == 0.0 and hi > 3.0e38:
            return "relu"
    return ""


def activation_range(kind: str) -> tuple[float, float]:
    """Where the activation is the identity."""
    return (0.0, 6.0) if kind == "relu6" else (0.0, float("inf"))


def _is_1x1(value) -> bool:
    if op_name(value) != "relax.nn.conv2d" or int(value.attrs.groups) != 1:
        return False
    return [int(d) for d in value.args[1].ty.shape.values[2:]] == [1, 1]


def find_blocks(func: relax.Function) -> list[Block]:
    """Inverted residual blocks in a phase-1 function: [1x1 conv -> (bias) -> act ->] depthwise conv ->
    (bias) -> act? -> 1x1 conv. Named by the common prefix of their layer names (block3_dw -> block3)."""
    bound, users = {}, users_of(func)
    for block in func.body.blocks:
        for b in block.bindings:
            bound[b.var] = b

    def only_user(var):
        u = users.get(var, [])
        return u[0] if len(u) == 1 else None

    def after_bias(conv_b):   # (last binding of conv + bias, bias binding or None)
        u = only_user(conv_b.var)
        if u is not None and op_name(u.value) == "relax.add" and any(is_const(a) for a in u.value.args):
            return u, u
        return conv_b, None

    def producer(var):
        return bound.get(var) if isinstance(var, relax.Var) else None

    def expand_before(var):    # the 1x1 conv binding whose (biased) output is var
        b = producer(var)
        if b is not None and op_name(b.value) == "relax.add" and any(is_const(a) for a in b.value.args):
            b = producer(next(a for a in b.value.args if not is_const(a)))
        return b if b is not None and _is_1x1(b.value) else None

    blocks = []
    for dw in bound.values():
        if op_name(dw.value) != "relax.nn.conv2d" or int(dw.value.attrs.groups) == 1:
            continue
        acts, kinds, layers = [], [], []
        act_in = producer(dw.value.args[0])
        expand = None
        if act_in is not None and activation_kind(act_in.value):
            expand = expand_before(act_in.value.args[0])
            if expand is not None:
                acts.append(act_in)
                kinds.append(activation_kind(act_in.value))
        elif act_in is not None:
            expand = expand_before(dw.value.args[0])
        if expand is not None:
            layers.append(layer_name(expand, after_bias(expand)[1]))
        dw_out, dw_bias = after_bias(dw)
        layers.append(layer_name(dw, dw_bias))
        nxt = only_user(dw_out.var)
        if nxt is not None and activation_kind(nxt.value):
            acts.append(nxt)
            kinds.append(activation_kind(nxt.value))
            nxt = only_user(nxt.var)
        if nxt is None or not _is_1x1(nxt.value):
            continue
        out, bias = after_bias(nxt)
        layers.append(layer_name(nxt, bias))
        block_in = (expand or dw).value.args[0]
        res = only_user(out.var)
        if res is not None and op_name(res.value) == "relax.add" and any(a.same_as(block_in) for a in res.value.args):
            out = res
        prefix = os.path.commonprefix(layers).rstrip("_./") if len(layers) > 1 else ""
        blocks.append(Block(prefix or layers[0], layers, acts, kinds, out.var))
    return blocks


def match_blocks(blocks: list[Block], names: list[str]) -> tuple[list[Block], list[str]]:
    """The blocks a user named (by block name or any of its layers), and the names that matched none."""
    chosen, unknown = [], []
    for n in names:
        hit = [b for b in blocks if n == b.name or n in b.layers]
        if not hit:
            unknown.append(n)
        chosen += [b for b in hit if b not in chosen]
    return chosen, unknown


def relu6(x) -> relax.Expr:
    return relax.op.clip(x, 0.0, 6.0)


@rewriter
class _Pruner(BindingRewriter):
    # relu6(x) => x for the named blocks' activations, or with a fit (a, b): conv -> +bias -> relu6 =>
    # conv(W * a) -> +(bias * a + b), the affine map folded into the conv before it (names kept);
    # with final_activation, out => relu6(out) for the blocks' outputs
    def __init__(self, mod, func, names, final_activation: bool, fits: dict):
        super().__init__(mod, func)
        self.drop, self.final = {}, set()   # activation var -> its replacement's (a, b), or None: the identity
        self.scale, self.shift = {}, {}     # conv var -> a, bias add var -> (a, b): fits folded in place
        bound = {b.var: b for blk in func.body.blocks for b in blk.bindings}
        for b in match_blocks(find_blocks(func), names)[0]:
            for i, act in enumerate(b.acts):
                fit = fits[b.name][i] if b.name in fits else None
                self.drop[act.var] = None if fit is not None and self._fold(bound, act, fit) else fit
            if final_activation and b.acts:
                self.final.add(b.output)
            changelog.record(NAME, "removed_activations", b.name, activations=len(b.acts), layers=b.layers,
                             final_activation=final_activation and bool(b.acts), fitted=b.name in fits)

    def _fold(self, bound, act, fit) -> bool:
        """Plan folding (a, b) into the conv + bias add that produce the activation's input; False if they
        are not a single-use conv -> bias add (then a * x + b is emitted and FoldScaleIntoConv folds it).
        NOTE: folded here, not by FoldScaleIntoConv, because that pass binds the folded bias to the last
        step's variable, the activation's, and the layer would be renamed (block3_expand -> block3_expand_relu6)
        in the report and for --shrink-blocks."""
        bias = bound.get(act.value.args[0])
        if bias is None or op_name(bias.value) != "relax.add" or not self._only_reader(bias.var, act):
            return False
        src = next((a for a in bias.value.args if not is_const(a)), None)
        conv = bound.get(src)
        if conv is None or op_name(conv.value) != "relax.nn.conv2d" or not self._only_reader(conv.var, bias) \
                or not is_const(conv.value.args[1]) or str(conv.value.attrs.kernel_layout) != "OIHW" \
                or channel_vector(next(a for a in bias.value.args if is_const(a)), len(fit[0])) is None:
            return False
        self.scale[conv.var] = fit[0]
        self.shift[bias.var] = fit
        return True

    def _only_reader(self, var, binding) -> bool:
        user = self.only_user(var)
        return user is not None and user.var.same_as(binding.var)

    def rewrite(self, var, value):
        if var in self.scale:
            w = const_np(value.args[1])
            return relax.Call(value.op, [value.args[0], const(w * self.scale[var].reshape(-1, 1, 1, 1))],
                              value.attrs)
        if var in self.shift:
            a, b = self.shift[var]
            src = next(x for x in value.args if not is_const(x))
            bias = channel_vector(next(x for x in value.args if is_const(x)), len(a))
            return relax.op.add(src, const((bias * a + b).astype(np.float32).reshape(1, -1, 1, 1)))
        if var in self.drop:
            x, fit = value.args[0], self.drop[var]
            if fit is None:
                return x
            c = int(x.ty.shape.values[1])
            return relax.op.add(self.emit(relax.op.multiply(x, const(np.reshape(fit[0], (1, c, 1, 1))))),
                                const(np.reshape(fit[1], (1, c, 1, 1))))
        if var in self.final:
            return relu6(self.emit(value))
        return None


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class PruneActivations:
    """Remove the activations of named inverted residual blocks, so their convs become one linear chain."""

    def __init__(self, blocks: list[str], final_activation: bool = False, fits: dict | None = None):
        self.blocks, self.final_activation, self.fits = list(blocks), final_activation, dict(fits or {})

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if not self.blocks:
            return mod
        found = find_blocks(mod["main"])
        unknown = match_blocks(found, self.blocks)[1]
        if unknown:
            names = ", ".join(b.name for b in found[:8]) + (", ..." if len(found) > 8 else "")
            raise ShrinkcError(f"--shrink-blocks: no block named {', '.join(unknown)}",
                               f"use block names from `shrinkc analyze` ({names or 'this model has none'})")
        mod = rewrite_main(mod, _Pruner, self.blocks, self.final_activation, self.fits)[0]
        mod = relax.transform.CanonicalizeBindings()(mod)
        # NOTE: the fitted maps fold into the conv before each activation, so each block is one linear chain again
        return FoldScaleIntoConv()(mod) if self.fits else mod
