"""The whole compile pipeline as ONE list of phases; each step is a pass from passes/ or TVM's own."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import tvm
from tvm import relax

from compiler.shrink_auto import AutoPruneActivations
from passes import changelog
from passes.apply_schedules import ApplySchedules
from passes.cancel_layout_permutes import CancelLayoutPermutes
from passes.convert_convs_to_nchw import ConvertConvsToNCHW
from passes.compute_convs_by_winograd import ComputeConvsByWinograd
from passes.compute_quantized_convs_in_int8 import ComputeQuantizedConvsInInt8
from passes.convert_to_blocked_layout import ConvertToBlockedLayout
from passes.fold_constants_numpy import FoldConstantsNumpy
from passes.fold_gate_into_conv_weights import FoldGateIntoConvWeights
from passes.fold_pad_into_conv import FoldPadIntoConv
from passes.fold_scale_into_conv import FoldScaleIntoConv
from passes.form_chw_regions import FormCHWRegions
from passes.keep_if_faster import KeepIfFaster
from passes.merge_linear_chains import MergeLinearChains
from passes.pad_channel_planes import PadChannelPlanes
from passes.pointwise_matmuls_to_convs import PointwiseMatmulsToConvs
from passes.prelu_as_min_max import PReluAsMinMax
from passes.prune_activations import PruneActivations
from passes.quantize_steps_in_float import QuantizeStepsInFloat
from passes.skip_padding_taps import SkipPaddingTaps
from passes.slice_one_pixel_resizes import SliceOnePixelResizes
from passes.square_as_multiply import SquareAsMultiply
from passes.sparsify_conv1x1 import SparsifyConv1x1
from passes.sparsify_dense import SparsifyDense
from passes.split_transposed_convs import SplitTransposedConvs
from schedules import registry
from targets import TargetSpec, errors

# Where a model's whole CHW region measures slower than dense: its late parts tried alone, the 1x1 convs on planes
# up to these shares of the largest 1x1 input plane (MobileNet at 224: 28x28 and 14x14 and smaller).
LATE_PLANES = (1 / 16, 1 / 64)


@dataclass
class Options:
    """What the user asked for on the command line (and what tuning found)."""

    shrink: str = "merge"           # off | merge | auto
    sparse: str = "auto"            # off | auto
    sparse_min: float = 2 / 3
    max_drop: float = 0.01
    shrink_blocks: list[str] = field(default_factory=list)
    final_activation: bool = False  # a ReLU6 after each block whose activations are removed (DepthShrinker)
    calib: dict | None = None
    knobs: dict = field(default_factory=dict)   # kernel knobs by task key, from a tuning database
    dump_dir: str | None = None
    cost: object = None             # compiler.cost.Cost, made on first use; tests may pass a stand-in


def phases(spec: TargetSpec, opts: Options) -> list[tuple[str, list]]:
    """The pipeline. Target-dependent steps are written inline."""
    cost = _cost(spec, opts)   # NOTE: the one cost interface, for passes that decide by measured speed
    return [
        # Phase 1. Graph cleanup: constants folded, BN / bias / explicit pads folded into convs.
        ("cleanup", [
            relax.transform.Normalize(),
            ConvertConvsToNCHW(),   # NOTE: every later pass sees NCHW convs with OIHW weights
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            SliceOnePixelResizes(),  # NOTE: before FoldConstant, which legalizes them with TVM's (divides by zero)
            FoldConstantsNumpy(),
            relax.transform.FoldConstant(),
            QuantizeStepsInFloat(),  # NOTE: after weights' dequantize is folded; activations' steps go float
            SquareAsMultiply(),
            PointwiseMatmulsToConvs(),   # NOTE: before CancelLayoutPermutes, which cancels the transposes it adds
            PReluAsMinMax(),         # NOTE: before CancelLayoutPermutes, which moves a TFLite PReLU's ops to NCHW
            CancelLayoutPermutes(),  # NOTE: the NHWC ops ConvertConvsToNCHW left between convs run NCHW
            FoldPadIntoConv(),
            FoldScaleIntoConv(),
            SplitTransposedConvs(),  # NOTE: after FoldScaleIntoConv: its convs are ordinary convs from here on
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ]),
        # Phase 2. Shrink depth: linear conv chains become one conv where that is faster (DepthShrinker).
        ("shrink", [] if opts.shrink == "off" else [
            PruneActivations(opts.shrink_blocks, opts.final_activation),
            *([AutoPruneActivations(opts.calib, opts.max_drop, cost, opts.final_activation)]
              if opts.shrink == "auto" else []),
            MergeLinearChains(cost, select=True),
            relax.transform.DeadCodeElimination(),
        ]),
        # Phase 3. Sparsity: mostly-zero 1x1 convs -> block-sparse CHW kernels, mostly-zero fully connected
        # layers -> sparse matrix-vector kernels (compressed weights).
        # NOTE: the CHW regions are kept only if the whole model measures faster (layer gains can be lost at
        # region borders); failing that, the fastest of their late (low-resolution) parts alone that is. A sparse
        # fully connected layer changes no layout: its own measurement decides.
        ("sparse", [KeepIfFaster(_sparse_regions(spec, cost, opts), cost, "SparseRegions",
                                 fallbacks=[(f"the part on planes up to 1/{round(1 / share)} of the largest",
                                             _sparse_regions(spec, cost, opts, share)) for share in LATE_PLANES]),
                    SparsifyDense(spec, cost, opts.sparse_min)]
         if opts.sparse == "auto" and spec.is_cpu else []),
        # Phase 4. Lower: layouts, kernels, fusion, schedules.
        ("lower", _lower_cpu(spec, opts) if spec.is_cpu else _lower_gpu(spec, opts)),
    ]


def _sparse_regions(spec: TargetSpec, cost, opts: Options, plane_share: float = 1.0) -> list:
    """Sparse 1x1 convs and the CHW regions around them (only the 1x1 convs on planes up to plane_share of the
    model's largest 1x1 input plane, for KeepIfFaster's fallbacks)."""
    return [SparsifyConv1x1(spec, cost, opts.sparse_min, plane_share), FormCHWRegions(spec), PadChannelPlanes(spec)]


def _cost(spec: TargetSpec, opts: Options):
    """The cost interface speed-dependent passes ask (made once per compile)."""
    if opts.cost is None:
        from compiler.cost import Cost
        opts.cost = Cost(spec)
    return opts.cost


def _lower_cpu(spec: TargetSpec, opts: Options) -> list:
    return [
        SkipPaddingTaps(),   # NOTE: before ConvertToBlockedLayout, which keeps its slices and concats blocked
        ConvertToBlockedLayout(spec.kernel_defaults.get("block_lanes", spec.vector_lanes),
                               pad=spec.kernel_defaults.get("pad_channels", spec.isa == "avx512")),
        relax.transform.FoldConstant(),
        FoldGateIntoConvWeights(),   # NOTE: needs the blocked constant weights ConvertToBlockedLayout wrote
        # NOTE: after FoldGateIntoConvWeights: a conv whose weights a gate scales at run time stays float
        *([ComputeQuantizedConvsInInt8()] if spec.int8_dot == "avx512_vnni" else []),
        ComputeConvsByWinograd(spec.kernel_defaults.get("winograd_min_channels")),
        relax.backend.DispatchSortScan(),   # NOTE: topk / sort / argsort / cumsum have no LegalizeOps rule
        relax.transform.LegalizeOps(registry.cpu_legalize_map(spec.vector_lanes)),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        ApplySchedules(registry.CPU_RULES, spec, opts.knobs),
        relax.transform.DeadCodeElimination(),
    ]


def _lower_gpu(spec: TargetSpec, opts: Options) -> list:
    from schedules.gpu_dlight import GPU_RULES
    return [
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        ApplySchedules(GPU_RULES, spec, opts.knobs),
    ]


def run(mod: tvm.IRModule, spec: TargetSpec, opts: Options) -> tuple[tvm.IRModule, dict, dict]:
    """Run every phase; returns the lowered module, what each pass changed, and phase timings."""
    timings: dict[str, float] = {}
    with changelog.collecting() as book, spec.tvm_target():
        for phase, passes in phases(spec, opts):
            t0 = time.perf_counter()
            for p in passes:
                try:
                    mod = p(mod)
                except Exception as err:  # NOTE: a ShrinkcError raised in a pass arrives as RuntimeError
                    err = errors.restored(err)
                    err.shrinkc_where = (phase, _pass_name(p))   # for the CLI's one-line internal error
                    raise err from None
            timings[phase] = round(time.perf_counter() - t0, 3)
            if opts.dump_dir:
                os.makedirs(opts.dump_dir, exist_ok=True)
                with open(os.path.join(opts.dump_dir, f"{len(timings)}_{phase}.py"), "w") as f:
                    f.write(mod.script(show_meta=False))
    return mod, book.summary(), timings


def _pass_name(p) -> str:
    info = getattr(p, "info", None)
    return str(info.name) if info is not None else type(p).__name__
