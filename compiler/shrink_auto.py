"""Which blocks' activations `--shrink auto` removes: linearity and top-1 agreement measured on calibration data.

One build serves every measurement: each prunable block's activation act(x) becomes
`l(x) + g * (act(x) - l(x))` with a run-time gate g (1 keeps the activation, 0 removes it) and a run-time
per-channel affine map l(x) = a * x + b (the identity unless fitted), with final_activation its output y
becomes `y + (1 - g) * (relu6(y) - y)` (PruneActivations' final ReLU6), and the module also returns, per
activation, the share of its inputs where it is not the identity (outside [0, 6] for ReLU6, below 0 for
ReLU) and the per-channel moments of x and act(x) that the least-squares fit of a, b needs.
It is built with TVM's default CPU pipeline.

Removing an activation replaces it by a linear map; the identity is one choice, the per-channel affine map
closest to the activation on the calibration data (least squares: a = cov(x, act(x)) / var(x),
b = mean(act(x)) - a mean(x)) is a better one and still folds into the conv before it, so the block stays
one linear chain that MergeLinearChains merges exactly. A block's second activation is fitted with its first
already replaced, and each block with the blocks removed before it in place.
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
                                 # (replaced by their fitted affine maps, as auto mode would)

    @property
    def linearity(self) -> float:
        return 1.0 - max(self.nonlinear) if self.nonlinear else 1.0


@rewriter
class _Gater(BindingRewriter):
    # act(x) => l(x) + g * (act(x) - l(x)) with l(x) = a * x + b, plus extra outputs per activation:
    # mean(x outside the identity range) and the per-channel means of x, x * x, act(x), x * act(x);
    # a block output y in `finals` => y + (1 - g) * (relu6(y) - y)
    def __init__(self, mod, func, acts: dict, finals: dict):
        super().__init__(mod, func)
        self.acts, self.finals, self.extra = acts, finals, []

    def rewrite(self, var, value):
        if var in self.finals:
            y = self.emit(value)
            off = relax.op.subtract(relax.const(1.0, "float32"), self.finals[var])
            return relax.op.add(y, relax.op.multiply(off, relax.op.subtract(self.emit(relu6(y)), y)))
        if var not in self.acts:
            return None
        gate, scale, shift, kind = self.acts[var]
        x = value.args[0]
        act = self.emit(value)
        lo, hi = activation_range(kind)
        outside = relax.op.logical_or(relax.op.less(x, relax.const(lo, "float32")),
                                      relax.op.greater(x, relax.const(hi, "float32")))
        out = self.builder_.emit_output
        self.extra.append(out(relax.op.mean(relax.op.astype(outside, "float32"))))
        for t in (x, relax.op.multiply(x, x), act, relax.op.multiply(x, act)):
            self.extra.append(out(relax.op.mean(t if isinstance(t, relax.Var) else self.emit(t), axis=[0, 2, 3])))
        lin = self.emit(relax.op.add(relax.op.multiply(x, scale), shift))
        return relax.op.add(lin, relax.op.multiply(gate, relax.op.subtract(act, lin)))


_MOMENTS = 4   # mean x, x * x, act(x), x * act(x)


def fit_affine(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (a, b) minimising mean((act(x) - a x - b)^2), from the moments [4, C]; a = 1 where x is constant."""
    mx, mxx, mf, mxf = (m.astype(np.float64) for m in moments)
    var, cov = mxx - mx * mx, mxf - mx * mf
    flat = var <= 1e-5 * np.maximum(mxx, 1e-30)   # NOTE: the moments are float32 sums: below this, rounding
    a = np.where(flat, 1.0, cov / np.where(flat, 1.0, var))
    return a.astype(np.float32), (mf - a * mx).astype(np.float32)


class GatedModel:
    """The model with one run-time gate per block and a run-time affine map per activation.

    `run(feeds, removed, fits)` -> (top-1 per feed, non-linear share per activation, moments per activation);
    fits: {activation index: (a, b)}, the identity for the others."""

    def __init__(self, mod: tvm.IRModule, blocks: list[Block], final_activation: bool = False):
        func = mod["main"]
        self.blocks = blocks
        self.inputs = [{"name": p.name, "shape": [int(s) for s in p.ty.shape.values], "dtype": str(p.ty.dtype)}
                       for p in func.params]
        gates = [relax.Var(f"gate_{i}", relax.TensorType([], "float32")) for i in range(len(blocks))]
        self.channels = [int(a.value.args[0].ty.shape.values[1]) for b in blocks for a in b.acts]
        affine = [relax.Var(f"{ab}_{i}", relax.TensorType([1, c, 1, 1], "float32"))
                  for i, c in enumerate(self.channels) for ab in ("scale", "shift")]
        pairs = iter(zip(affine[0::2], affine[1::2]))
        acts = {a.var: (g, *next(pairs), kind) for b, g in zip(blocks, gates) for a, kind in zip(b.acts, b.kinds)}
        finals = {b.output: g for b, g in zip(blocks, gates)} if final_activation else {}
        rw = _Gater(mod, func, acts, finals)
        body = rw.visit_expr(func).body
        body = relax.BlockBuilder().normalize(relax.SeqExpr(body.blocks, relax.Tuple([body.body, *rw.extra])))
        new = relax.Function(list(func.params) + gates + affine, body).with_attr("global_symbol", "main")
        gmod = relax.transform.Normalize()(tvm.IRModule({"main": new}))
        target = tvm.target.Target.from_device("cpu")
        with target:
            ex = tvm.compile(gmod, target, relax_pipeline=relax.get_default_pipeline(target))
        self.vm = relax.VirtualMachine(ex, tvm.cpu(0))

    def run(self, feeds: list[dict], removed: set[str], fits: dict | None = None):
        fits = fits or {}
        gates = [tvm.runtime.tensor(np.array(0.0 if b.name in removed else 1.0, np.float32)) for b in self.blocks]
        affine = []
        for i, c in enumerate(self.channels):
            a, b = fits.get(i, (np.ones(c, np.float32), np.zeros(c, np.float32)))
            affine += [tvm.runtime.tensor(np.asarray(a, np.float32).reshape(1, c, 1, 1)),
                       tvm.runtime.tensor(np.asarray(b, np.float32).reshape(1, c, 1, 1))]
        n = len(self.channels)
        top1, shares, moments = [], np.zeros(n), [np.zeros((_MOMENTS, c)) for c in self.channels]
        f = self.vm["main"]
        for feed in feeds:
            out = f(*[tvm.runtime.tensor(feed[t["name"]]) for t in self.inputs], *gates, *affine)
            logits = out[0].numpy()
            top1.append(np.argmax(logits.reshape(logits.shape[0], -1), axis=-1))
            for i in range(n):
                k = 1 + i * (1 + _MOMENTS)
                shares[i] += float(out[k].numpy())
                moments[i] += np.stack([out[k + 1 + m].numpy() for m in range(_MOMENTS)])
        count = max(len(feeds), 1)
        return np.concatenate(top1), shares / count, [m / count for m in moments]

    def act_indices(self, name: str) -> list[int]:
        """Indices of a block's activations, in the order run() numbers them."""
        k = 0
        for b in self.blocks:
            if b.name == name:
                return list(range(k, k + len(b.acts)))
            k += len(b.acts)
        return []

    def fit_block(self, feeds, name: str, removed: set[str], fits: dict, moments: list | None = None) -> dict:
        """fits plus the least-squares affine maps of block `name`'s activations, each measured with the
        blocks in `removed` (their fits in place) and the block's earlier activations already replaced.
        moments: those run() returned for exactly (removed, fits), if at hand (saves the first run)."""
        fits = dict(fits)
        idx = self.act_indices(name)
        for j, i in enumerate(idx):
            if j or moments is None:
                # NOTE: removing `name` with only its first j activations fitted: the j-th sees its real input
                part = {k: v for k, v in fits.items() if k not in idx[j:]}
                moments = self.run(feeds, removed | ({name} if j else set()), part)[2]
            fits[i] = fit_affine(moments[i])
        return fits


def block_stats(mod: tvm.IRModule, calib: dict, final_activation: bool = False
                ) -> tuple[list[BlockStats], GatedModel, list[dict], np.ndarray, list]:
    """Per prunable block: non-linear share of each activation and agreement when removed alone (replaced by
    their fitted affine maps). Also returns the model, the feeds, the reference top-1 answers and the
    moments of the unchanged model (what choose() starts from)."""
    blocks = [b for b in find_blocks(mod["main"]) if b.acts]
    if not blocks:
        return [], None, [], np.zeros(0), []
    model = GatedModel(mod, blocks, final_activation)
    feeds = calibration.samples(calib, model.inputs)
    ref, shares, moments = model.run(feeds, set())
    stats, k = [], 0
    for b in blocks:
        nonlinear = [float(s) for s in shares[k:k + len(b.acts)]]
        k += len(b.acts)
        fits = model.fit_block(feeds, b.name, set(), {}, moments)
        alone = float(np.mean(model.run(feeds, {b.name}, fits)[0] == ref))
        stats.append(BlockStats(b.name, b.layers, nonlinear, alone))
    return stats, model, feeds, ref, moments


def choose(stats: list[BlockStats], model: GatedModel, feeds, ref, max_drop: float, moments: list
           ) -> tuple[list[str], float, dict]:
    """Greedy: the most linear blocks first, each kept out only while agreement stays >= 1 - max_drop.
    moments: those of the unchanged model (block_stats). Returns the blocks, the agreement, and
    {block: [(a, b) per activation]}."""
    removed: list[str] = []
    agreement, fits = 1.0, {}    # NOTE: moments are always those of the model as removed and fits leave it
    for s in sorted(stats, key=lambda s: (-s.linearity, -s.agreement_alone)):
        if s.agreement_alone < 1.0 - max_drop:
            changelog.skip(NAME, s.name, f"alone it drops agreement to {s.agreement_alone:.3f}")
            continue
        trial_fits = model.fit_block(feeds, s.name, set(removed), fits, moments)
        top1, _, trial_moments = model.run(feeds, set(removed) | {s.name}, trial_fits)
        trial = float(np.mean(top1 == ref))
        if trial >= 1.0 - max_drop:
            removed.append(s.name)
            agreement, fits, moments = trial, trial_fits, trial_moments
        else:
            changelog.skip(NAME, s.name, f"with the blocks before it agreement would be {trial:.3f} "
                           f"< {1.0 - max_drop:.3f}")
    return removed, agreement, {name: [fits[i] for i in model.act_indices(name)] for name in removed}


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
        stats, model, feeds, ref, moments = block_stats(mod, self.calib, self.final)
        if not stats:
            return mod
        if self.cost is not None:   # a block whose merge would not be faster loses accuracy for nothing
            faster = mergeable_blocks(mod, [s.name for s in stats], self.cost, self.final)
            for s in stats:
                if s.name not in faster:
                    changelog.skip(NAME, s.name, "its merged conv would not be faster on this target")
            stats = [s for s in stats if s.name in faster]
        removed, agreement, fits = choose(stats, model, feeds, ref, self.max_drop, moments)
        for s in stats:
            changelog.record(NAME, "measured", s.name, linearity=round(s.linearity, 4),
                             agreement_alone=round(s.agreement_alone, 4), removed=s.name in removed)
        changelog.record(NAME, "agreement", "", top1_agreement=round(agreement, 4), samples=len(ref),
                         blocks=removed)
        return PruneActivations(removed, self.final, fits)(mod)

