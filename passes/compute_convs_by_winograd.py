"""ComputeConvsByWinograd: dense 3x3 and 5x5 stride-1 convs become Winograd kernels where the target says so.

conv2d_3x3(x, W)  =>  call_tir(conv2d_winograd_nchwc, x, U)     U = G W G^T, F(2x2, 3x3): 16 multiplies per 4 outputs
conv2d_5x5(x, W)  =>  call_tir(conv2d_winograd_nchwc, x, U)     F(4x4, 5x5): 64 multiplies per 16 outputs, not 400

Applies to float32 blocked (NCHW{b}c / OHWI{b}o) convs with constant weights, groups 1, stride 1, no dilation and
at least the target's `kernel_defaults["winograd_min_channels"]` channels in and out (below that the
transforms' memory traffic outweighs the saved multiplies; None: no Winograd). The kernel: schedules/
f32_conv2d_winograd_nchwc.py; the bias, residual and activation fuse into its output transform later, as for
any conv. The merged 5x5 convs of DepthShrinker blocks (EfficientNet-Lite) are such convs.

Accuracy. A Winograd result's rounding error scales with the sizes of the products it sums (|W| |x|), not with
the output's own size. F(2x2, 3x3)'s transforms are additions of +-1 terms: about twice a direct conv's error,
kept for every such conv. F(4x4, 5x5)'s transforms have entries up to 10.5 and 1/8: its error was about 1e-5
of the output's peak on single convs of 40-224 channels (one-off checks); but where an activation clips the
output (a ReLU6 after a conv whose sums reach +-75 with unit weights) the error measured against the clipped
peak of 6 reached 2.4e-4, past the 1e-4 every lossless rewrite keeps. So F(4x4, 5x5) is used only where the
conv's output reaches no clipping: every reader, through additions and multiplications (bias, residual,
scale), slices and reshapes, is a linear op (a conv, a matmul, a pooling mean, a concat) or the function's
result. Other 5x5 convs keep the direct kernel, with the reason in the log.
NOTE: after ConvertToBlockedLayout (the weights are blocked constants) and before LegalizeOps, which would
otherwise make every conv a direct one.
"""
from __future__ import annotations

import tvm
from tvm import relax

from passes import changelog
from passes.fold_gate_into_conv_weights import layer_name
from passes.rewriting import BindingRewriter, is_const, op_name, rewrite_main, rewriter, shape_of, static_shape
from schedules.f32_conv2d_winograd_nchwc import TRANSFORMS, conv2d_winograd_nchwc, transform_weights

NAME = "ComputeConvsByWinograd"
# reading a conv's output through these keeps it linear in the conv's output (or a part of it)
ARITHMETIC = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.reshape",
              "relax.permute_dims", "relax.layout_transform", "relax.strided_slice", "relax.split"}
# readers that neither clip nor bend: the error stays relative to what they compute
LINEAR_READERS = {"relax.nn.conv2d", "relax.matmul", "relax.mean", "relax.nn.avg_pool2d", "relax.concat",
                  "relax.nn.adaptive_avg_pool2d"}
CLIP_SENSITIVE = {5}       # kernel sides whose transform is used only where nothing clips the output


@rewriter
class _Rewrite(BindingRewriter):
    def __init__(self, mod, func, min_channels: int):
        super().__init__(mod, func)
        self.min_channels = min_channels

    def rewrite(self, var, value):
        if op_name(value) != "relax.nn.conv2d" or not self._eligible(var, value):
            return None
        x, w = value.args
        kside = shape_of(w)[1]
        f = TRANSFORMS[kside]
        if kside in CLIP_SENSITIVE and (reader := self._bending_reader(var)):
            changelog.skip(NAME, layer_name(value, x), f"F({f.m}x{f.m}, {kside}x{kside}) not used: the output "
                           f"reaches {reader}, which could leave its rounding error above 1e-4 of what it passes on")
            return None
        changelog.record(NAME, f"winograd{f.m}x{f.m}", layer_name(value, x))
        u = relax.const(transform_weights(w.value.numpy()))
        return self.builder_.call_te(conv2d_winograd_nchwc, x, u, padding=value.attrs.padding,
                                     primfunc_name_hint="conv2d")

    def _eligible(self, var, value) -> bool:
        a, (x, w) = value.attrs, value.args
        if not is_const(w) or len(static_shape(x) or []) != 5 or len(static_shape(w) or []) != 5 \
                or not str(a.kernel_layout).startswith("OHWI") or len(str(a.out_layout)) <= 4 \
                or str(a.data_layout) != str(a.out_layout) or x.ty.dtype != "float32" or var.ty.dtype != "float32":
            return False
        cob, kh, kw, cin, bo = shape_of(w)
        return int(a.groups) == 1 and kh == kw and kh in TRANSFORMS and all(int(s) == 1 for s in a.strides) \
            and all(int(d) == 1 for d in a.dilation) and min(cin, cob * bo) >= self.min_channels

    def _bending_reader(self, var) -> str:
        """The first reader of var's value, through arithmetic, that is not linear ('' where none is)."""
        todo, seen = [var], set()
        while todo:
            v = todo.pop()
            for binding in self.users.get(v, []):
                if binding is None:                 # the function's result
                    continue
                name = op_name(binding.value)
                if name in ARITHMETIC or isinstance(binding.value, (relax.Var, relax.TupleGetItem)):  # aliases, parts
                    if binding.var not in seen:
                        seen.add(binding.var)
                        todo.append(binding.var)
                elif name not in LINEAR_READERS:
                    return name or type(binding.value).__name__
        return ""


@tvm.ir.transform.module_pass(opt_level=0, name=NAME)
class ComputeConvsByWinograd:
    """Compute eligible 3x3 / 5x5 stride-1 convs by Winograd (`min_channels` in and out at least; None: none)."""

    def __init__(self, min_channels: int | None):
        self.min_channels = min_channels

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        if self.min_channels is None:
            return mod
        return rewrite_main(mod, _Rewrite, self.min_channels)[0]
