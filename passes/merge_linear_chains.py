"""MergeLinearChains: replace a chain of convs with nothing non-linear between them by one conv, exactly.

conv(1x1) -> +b1 -> dwconv(kxk, s, p) -> +b2 -> conv(1x1) -> +b3 [-> + x]  =>  conv(kxk, s, p) -> + c

The merged weight composes the kernels (passes/conv_algebra.py); the constant c = chain(0) is
computed exactly in float64 and becomes a bias when it is the same at every pixel, else a
[1, C, OH, OW] constant added after the conv (zero padding of an intermediate with a bias in
it differs from padding the input). A residual add becomes an identity on the centre tap.
With `select`, a chain is merged only where the cost interface says the merged conv is faster.
"""
from __future__ import annotations

import re

import numpy as np
import tvm
from tvm import relax

from passes import changelog
from passes.conv_algebra import ConvStep, NotExact, merge
from passes.rewriting import BindingRewriter, channel_vector, const, const_np, is_const, op_name, rewrite_main, \
    latencies, rewriter, shape_of

NAME = "MergeLinearChains"
MAX_FLOP_GROWTH = 2.5   # merged conv may need at most this many times the chain's FLOPs (else not timed)
MIN_SPEEDUP = 1.05      # measured: merge only when the chain takes this many times the merged conv's time
SPATIAL_CONST_RTOL = 1e-6   # c is a per-channel bias when it varies less than this over the pixels


class _Node:
    """One conv binding and the bias add after it."""

    def __init__(self, conv, bias, step: ConvStep):
        self.conv, self.bias, self.step = conv, bias, step

    @property
    def out(self):
        return (self.bias or self.conv).var

    @property
    def name(self) -> str:
        return layer_name(self.conv, self.bias)


def layer_name(conv, bias) -> str:
    """The conv's variable name, or the bias add's when the importer named that one after the node."""
    return var_layer_name(conv.var, bias.var if bias is not None else None)


def var_layer_name(conv_var, bias_var) -> str:
    """layer_name from the two bindings' variables (bias_var None: no bias add)."""
    if bias_var is not None and re.fullmatch(r"[lg]v\d*", conv_var.name):
        return bias_var.name
    return conv_var.name


def _conv_step(binding) -> tuple[ConvStep | None, str]:
    """The ConvStep of a conv binding, or None and why it cannot take part in a merge."""
    v = binding.value
    a = v.attrs
    if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
        return None, "not an NCHW/OIHW conv"
    if any(int(d) != 1 for d in a.dilation):
        return None, "dilated conv"
    if str(binding.var.ty.dtype) != "float32":
        return None, "not float32"
    w = const_np(v.args[1]).astype(np.float64)
    groups, cin = int(a.groups), shape_of(v.args[0])[1]
    depthwise = groups > 1
    if depthwise and not (groups == cin == w.shape[0] and w.shape[1] == 1):
        return None, f"grouped conv with {groups} groups is not depthwise"
    ishape, oshape = shape_of(v.args[0]), shape_of(binding.var)
    pad = tuple(int(p) for p in a.padding)
    return ConvStep(w, (int(a.strides[0]), int(a.strides[1])), pad, depthwise, (ishape[2], ishape[3]),
                    (oshape[2], oshape[3]), None, binding.var.name), ""


@rewriter
class _Merger(BindingRewriter):
    def __init__(self, mod, func, cost, select):
        super().__init__(mod, func)
        self.cost, self.select = cost, select
        self.plans: dict = {}   # var whose binding becomes the merged conv -> (nodes, residual binding)
        self.timed: dict = {}   # chain label -> (chain seconds, merged seconds), from the cost
        self._plan(func)

    # --- finding chains ------------------------------------------------------------------
    def _plan(self, func):
        nodes: dict = {}   # conv var -> _Node
        for block in func.body.blocks:
            for b in block.bindings:
                if op_name(b.value) == "relax.nn.conv2d" and is_const(b.value.args[1]):
                    bias = self._bias_after(b.var, shape_of(b.var)[1])
                    step, why = _conv_step(b)
                    if step is None:
                        changelog.skip(NAME, layer_name(b, bias), why)
                        continue
                    if bias is not None:
                        step.bias = channel_vector(self._const_arg(bias.value), step.out_channels).astype(np.float64)
                    nodes[b.var] = _Node(b, bias, step)
        following = {}
        for n in nodes.values():
            user = self.only_user(n.out)
            if user is not None and user.var in nodes and user.value.args[0].same_as(n.out):
                following[n.conv.var] = nodes[user.var]
        starts = set(nodes) - {n.conv.var for n in following.values()}
        for start in [v for v in nodes if v in starts]:
            run = [nodes[start]]
            while run[-1].conv.var in following:
                run.append(following[run[-1].conv.var])
            if len(run) > 1:
                self._plan_run(run)

    def _const_arg(self, value):
        a, b = value.args
        return b if is_const(b) else a

    def _bias_after(self, conv_var, channels: int):
        user = self.only_user(conv_var)
        if user is None or op_name(user.value) != "relax.add":
            return None
        a, b = user.value.args
        other = b if a.same_as(conv_var) else a
        if not is_const(other) or channel_vector(other, channels) is None:
            return None
        return user

    def _residual_after(self, run):
        """The add(out, x) after the run's last node, where x is the run's input, or None."""
        user = self.only_user(run[-1].out)
        if user is None or op_name(user.value) != "relax.add":
            return None
        x = run[0].conv.value.args[0]
        a, b = user.value.args
        other = b if a.same_as(run[-1].out) else a
        if not other.same_as(x) or shape_of(other) != shape_of(user.var):
            return None
        return user

    # --- choosing what to merge ----------------------------------------------------------
    def _plan_run(self, run):
        """Pick non-overlapping segments of the run (2+ convs) with the most gain (weighted intervals)."""
        residual = self._residual_after(run)
        n = len(run)
        gains = {}
        for i in range(n):
            for j in range(i + 1, n):
                whole = i == 0 and j == n - 1
                g = self._gain(run[i:j + 1], residual if whole else None, log=whole)
                if g is not None and g > 0:
                    gains[(i, j)] = (g, residual if whole else None)
        best = [(0.0, [])] * (n + 1)   # best[k]: best plan over run[:k]
        for k in range(1, n + 1):
            best[k] = best[k - 1]
            for i in range(k - 1):
                if (i, k - 1) in gains and best[i][0] + gains[(i, k - 1)][0] > best[k][0]:
                    best[k] = (best[i][0] + gains[(i, k - 1)][0], best[i][1] + [(i, k - 1)])
        for i, j in best[n][1]:
            res = gains[(i, j)][1]
            end = res.var if res is not None else run[j].out
            self.plans[end] = (run[i:j + 1], res)

    def _gain(self, seg, res, log: bool) -> float | None:
        """What merging seg saves (seconds, or convs removed without selection); None if it cannot merge.

        Only a whole run logs why it was declined (its sub-chains are tried silently)."""
        label = "+".join(n.name for n in seg)
        skip = changelog.skip if log else (lambda *a: None)
        try:
            merged, c, folded = merge([n.step for n in seg], res is not None)
        except NotExact as err:
            skip(NAME, label, str(err))
            return None
        if not self.select:
            return float(len(seg) - 1)
        chain_flops = sum(n.step.flops() for n in seg)
        if merged.flops() > MAX_FLOP_GROWTH * chain_flops:
            skip(NAME, label, f"merged conv needs {merged.flops() / chain_flops:.1f}x the FLOPs "
                 f"(> {MAX_FLOP_GROWTH})")
            return None
        if self.cost is None:   # no cost interface: fewer FLOPs decides
            if merged.flops() >= chain_flops:
                skip(NAME, label, f"merged conv needs {merged.flops() / chain_flops:.2f}x the FLOPs (no cost model)")
                return None
            return 1e-12 * (chain_flops - merged.flops())
        before, after = latencies(self.cost, [(_chain_module(seg, res), None),
                                              (_merged_module(seg[0], merged, c, res is not None and not folded), None)])
        self.timed[label] = (before, after)
        if before < MIN_SPEEDUP * after:
            skip(NAME, label, f"merged conv not faster: {after * 1e3:.3f} ms vs {before * 1e3:.3f} ms "
                 f"(needs {MIN_SPEEDUP}x)")
            return None
        return before - after

    # --- rewriting -----------------------------------------------------------------------
    def rewrite(self, var, value):
        if var not in self.plans:
            return None
        seg, res = self.plans[var]
        merged, c, folded = merge([n.step for n in seg], res is not None)
        x = self.visit_expr(seg[0].conv.value.args[0])
        out = _emit_merged(self.emit, x, seg[0], merged, c, res is not None and not folded)
        timed = self.timed.get("+".join(n.name for n in seg))
        ms = {"chain_ms": round(timed[0] * 1e3, 4), "merged_ms": round(timed[1] * 1e3, 4)} if timed else {}
        changelog.record(NAME, "merged_chain", seg[0].name, layers=[n.name for n in seg], **ms,
                         shape=list(merged.weight.shape), stride=list(merged.stride), padding=list(merged.pad),
                         groups=merged.in_channels if merged.depthwise else 1, residual_folded=folded,
                         bias="per-channel" if _bias_vector(c) is not None else "per-pixel")
        return out


def _bias_vector(c: np.ndarray) -> np.ndarray | None:
    """c [C, OH, OW] as a per-channel vector when it is the same at every pixel."""
    v = c.reshape(c.shape[0], -1)
    spread = np.max(np.abs(v - v[:, :1])) if v.size else 0.0
    return v[:, 0] if spread <= SPATIAL_CONST_RTOL * max(float(np.max(np.abs(v))), 1e-30) else None


def _emit_merged(emit, x, first: _Node, merged: ConvStep, c: np.ndarray, add_input: bool):
    """Emit conv(x, merged) + c (+ x); returns the last expression (not yet bound)."""
    a = first.conv.value.attrs
    groups = merged.in_channels if merged.depthwise else 1
    out = relax.op.nn.conv2d(x, const(merged.weight.astype(np.float32)), strides=list(merged.stride),
                             padding=list(merged.pad), dilation=[1, 1], groups=groups, data_layout="NCHW",
                             kernel_layout="OIHW", out_layout="NCHW", out_dtype=a.out_dtype)
    vec = _bias_vector(c)
    if vec is None:
        out = relax.op.add(emit(out, first.name + "_merged"), const(c[None].astype(np.float32)))
    elif np.any(vec != 0):
        out = relax.op.add(emit(out, first.name + "_merged"), const(vec.reshape(1, -1, 1, 1).astype(np.float32)))
    if add_input:
        out = relax.op.add(emit(out), x)
    return out


def _module(x_shape, body) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.emit_output(body(bb, x))
        bb.emit_func_output(gv)
    return bb.get()


def _chain_module(seg, res) -> tvm.IRModule:
    """The chain as it is, as a module of its own (input x) for timing."""
    def body(bb, x):
        cur, old = x, seg[0].conv.value.args[0]
        for n in seg:
            for b in (n.conv, n.bias):
                if b is not None:
                    args = [cur if arg.same_as(old) else arg for arg in b.value.args]
                    old, cur = b.var, bb.emit(relax.Call(b.value.op, args, b.value.attrs))
        return relax.op.add(cur, x) if res is not None else cur
    return _module(shape_of(seg[0].conv.value.args[0]), body)


def _merged_module(first: _Node, merged: ConvStep, c, add_input: bool) -> tvm.IRModule:
    return _module(shape_of(first.conv.value.args[0]),
                   lambda bb, x: _emit_merged(bb.emit, x, first, merged, c, add_input))


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class MergeLinearChains:
    """Replace a chain of convs with nothing non-linear between them by one conv, exactly."""

    def __init__(self, cost=None, select: bool = True):
        self.cost = cost        # anything with latency(mod) -> seconds; None: compare FLOPs instead
        self.select = select    # False: merge every chain that merges exactly (tests)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return rewrite_main(mod, _Merger, self.cost, self.select)[0]
