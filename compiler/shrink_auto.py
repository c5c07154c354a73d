"""Which blocks' activations `--shrink auto` removes: linearity and top-1 agreement measured on calibration data.

One build serves every measurement: each prunable block's activations become
`x + g * (act(x) - x)` with a run-time gate g (1 keeps the activation, 0 removes it), with
final_activation its output y becomes `y + (1 - g) * (relu6(y) - y)` (PruneActivations' final ReLU6), and the
module also returns, per activation, the share of its inputs where it is not the identity
(outside [0, 6] for ReLU6, below 0 for ReLU). It is built with TVM's default CPU pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from compiler import calibration
from passes import changelog
from passes.merge_linear_chains import MergeLinearChains
from passes.prune_activations import Block, PruneActivations, activation_range, find_blocks, relu6
from passes.rewriting import BindingRewriter, rewriter
from targets.errors import ShrinkcError

NAME = "ChooseBlocks"


@dataclass
class BlockStats:
    """What calibration says about one block."""

    name: str
    layers: list[str]
    nonlinear: list[float]       # per activation: share of inputs where it is not the identity
    agreement_alone: float       # top-1 agreement with the original when only this block loses its activations

    @property
    def linearity(self) -> float:
        return 1.0 - max(self.nonlinear) if self.nonlinear else 1.0


@rewriter
class _Gater(BindingRewriter):
    # relu6(x) => x + g * (relu6(x) - x), and mean(x outside [0, 6]) as an extra output;
    # a block output y in `finals` => y + (1 - g) * (relu6(y) - y)
    def __init__(self, mod, func, acts: dict, finals: dict):
        super().__init__(mod, func)
        self.acts, self.finals, self.shares = acts, finals, []

    def rewrite(self, var, value):
        if var in self.finals:
            y = self.emit(value)
            off = relax.op.subtract(relax.const(1.0, "float32"), self.finals[var])
            return relax.op.add(y, relax.op.multiply(off, relax.op.subtract(self.emit(relu6(y)), y)))
        if var not in self.acts:
            return None
        gate, kind = self.acts[var]
        x = value.args[0]
        act = self.emit(value)
        lo, hi = activation_range(kind)
        outside = relax.op.logical_or(relax.op.less(x, relax.const(lo, "float32")),
                                      relax.op.greater(x, relax.const(hi, "float32")))
        self.shares.append(self.builder_.emit_output(relax.op.mean(relax.op.astype(outside, "float32"))))
        return relax.op.add(x, relax.op.multiply(gate, relax.op.subtract(act, x)))


class GatedModel:
    """The model with one run-time gate per block; `run(feeds, removed)` -> (top-1 per feed, shares)."""

    def __init__(self, mod: tvm.IRModule, blocks: list[Block], final_activation: bool = False):
        func = mod["main"]
        self.blocks = blocks
        self.inputs = [{"name": p.name, "shape": [int(s) for s in p.ty.shape.values], "dtype": str(p.ty.dtype)}
                       for p in func.params]
        gates = [relax.Var(f"gate_{i}", relax.TensorType([], "float32")) for i in range(len(blocks))]
        acts = {a.var: (g, kind) for b, g in zip(blocks, gates) for a, kind in zip(b.acts, b.kinds)}
        finals = {b.output: g for b, g in zip(blocks, gates)} if final_activation else {}
        rw = _Gater(mod, func, acts, finals)
        body = rw.visit_expr(func).body
        body = relax.BlockBuilder().normalize(relax.SeqExpr(body.blocks, relax.Tuple([body.body, *rw.shares])))
        new = relax.Function(list(func.params) + gates, body).with_attr("global_symbol", "main")
        gmod = relax.transform.Normalize()(tvm.IRModule({"main": new}))
        target = tvm.target.Target.from_device("cpu")
        with target:
            ex = tvm.compile(gmod, target, relax_pipeline=relax.get_default_pipeline(target))
        self.vm = relax.VirtualMachine(ex, tvm.cpu(0))
        self._n_shares = len(rw.shares)

    def run(self, feeds: list[dict], removed: set[str]) -> tuple[np.ndarray, np.ndarray]:
        gates = [tvm.runtime.tensor(np.array(0.0 if b.name in removed else 1.0, np.float32)) for b in self.blocks]
        top1, shares = [], np.zeros(self._n_shares)
        f = self.vm["main"]
        for feed in feeds:
            out = f(*[tvm.runtime.tensor(feed[t["name"]]) for t in self.inputs], *gates)
            logits = out[0].numpy()
            top1.append(np.argmax(logits.reshape(logits.shape[0], -1), axis=-1))
            shares += [float(out[1 + i].numpy()) for i in range(self._n_shares)]
        return np.concatenate(top1), shares / max(len(feeds), 1)


def block_stats(mod: tvm.IRModule, calib: dict, final_activation: bool = False
                ) -> tuple[list[BlockStats], GatedModel, list[dict], np.ndarray]:
    """Per prunable block: non-linear share of each activation and agreement when removed alone."""
    blocks = [b for b in find_blocks(mod["main"]) if b.acts]
    if not blocks:
        return [], None, [], np.zeros(0)
    model = GatedModel(mod, blocks, final_activation)
    feeds = calibration.samples(calib, model.inputs)
    ref, shares = model.run(feeds, set())
    stats, k = [], 0
    for b in blocks:
        nonlinear = [float(s) for s in shares[k:k + len(b.acts)]]
        k += len(b.acts)
        alone = float(np.mean(model.run(feeds, {b.name})[0] == ref))
        stats.append(BlockStats(b.name, b.layers, nonlinear, alone))
    return stats, model, feeds, ref


def choose(stats: list[BlockStats], model: GatedModel, feeds, ref, max_drop: float) -> tuple[list[str], float]:
    """Greedy: the most linear blocks first, each kept out only while agreement stays >= 1 - max_drop."""
    removed: list[str] = []
    agreement = 1.0
    for s in sorted(stats, key=lambda s: (-s.linearity, -s.agreement_alone)):
        if s.agreement_alone < 1.0 - max_drop:
            changelog.skip(NAME, s.name, f"alone it drops agreement to {s.agreement_alone:.3f}")
            continue
        trial = float(np.mean(model.run(feeds, set(removed) | {s.name})[0] == ref))
        if trial >= 1.0 - max_drop:
            removed.append(s.name)
            agreement = trial
        else:
            changelog.skip(NAME, s.name, f"with the blocks before it agreement would be {trial:.3f} "
                           f"< {1.0 - max_drop:.3f}")
    return removed, agreement


def mergeable_blocks(mod: tvm.IRModule, names: list[str], cost, final_activation: bool = False) -> set[str]:
    """The blocks whose chain, once their activations are gone, MergeLinearChains merges (measured faster)."""
    blocks = [b for b in find_blocks(mod["main"]) if b.name in names]
    with changelog.collecting() as book:   # NOTE: a trial run; its changes are not the compile's
        MergeLinearChains(cost, select=True)(PruneActivations([b.name for b in blocks], final_activation)(mod))
    changes = book.summary().get("MergeLinearChains", {}).get("changes", [])
    return {b.name for b in blocks if any(set(b.layers) & set(c["layers"]) for c in changes)}


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class AutoPruneActivations:
    """Remove the activations of the blocks that calibration shows can go within the agreement budget."""

    def __init__(self, calib: dict | None, max_drop: float, cost=None, final_activation: bool = False):
        if not calib:
            raise ShrinkcError("--shrink auto needs calibration inputs", "pass --calib FILE.npy or FILE.npz")
        self.calib, self.max_drop, self.cost, self.final = calib, max_drop, cost, final_activation

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        stats, model, feeds, ref = block_stats(mod, self.calib, self.final)
        if not stats:
            return mod
        if self.cost is not None:   # a block whose merge would not be faster loses accuracy for nothing
            faster = mergeable_blocks(mod, [s.name for s in stats], self.cost, self.final)
            for s in stats:
                if s.name not in faster:
                    changelog.skip(NAME, s.name, "its merged conv would not be faster on this target")
            stats = [s for s in stats if s.name in faster]
        removed, agreement = choose(stats, model, feeds, ref, self.max_drop)
        for s in stats:
            changelog.record(NAME, "measured", s.name, linearity=round(s.linearity, 4),
                             agreement_alone=round(s.agreement_alone, 4), removed=s.name in removed)
        changelog.record(NAME, "agreement", "", top1_agreement=round(agreement, 4), samples=len(ref),
                         blocks=removed)
        return PruneActivations(removed, self.final)(mod)

