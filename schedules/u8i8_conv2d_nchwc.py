"""1x1 convolutions of uint8 activations and int8 weights in NCHW{c}c, int32 sums by AVX-512 VNNI (vpdpbusd).

Applies to `relax.nn.conv2d` with a uint8 NCHW{b}c input (b a multiple of 4), a 1x1 int8 kernel OHWI{16}o and
int32 output NCHW16c (passes/compute_quantized_convs_in_int8.py writes them). Legalization repacks the kernel to
[O/16, I/4, 16, 4]: the 16 x 4 int8 values one vpdpbusd multiplies are one 64-byte vector. The inner step
broadcasts 4 input channels of one pixel (4 bytes) and adds their dot products with 4 weights of each of 16
output channels into 16 int32 lanes: 64 multiply-adds an instruction, against 16 for an fp32 FMA. The register
tile is P pixels x OB channel blocks as in f32_conv2d_nchwc; the epilogue (int32 correction, float scale, bias,
the next quantize step) is fused into its write-back.
Knobs: `pixel_tile` (P), `oc_blocks` (OB).
"""
from __future__ import annotations

import numpy as np
from tvm import s_tir, te
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from schedules.f32_conv2d_nchwc import register_tile, register_tiled, row_tile_options
from schedules.rule import KERNEL_ATTR, Scheduled, ScheduleRule, finish_tile, kernel_block, kernel_extents

KIND = "conv2d_u8i8_nchwc"
LANES = 16            # int32 lanes of one vpdpbusd
DOT = 4               # input channels one lane sums
INTRIN = "shrinkc_u8i8i32_dot_16x4_avx512vnni"
# default tile caps: one channel block x up to 14 pixels timed as fast as or faster than 7-8 pixels x 2 blocks and
# the other tiles of knob_space on every MobileNetV2 1x1 shape (Zen 4, ad-hoc interleaved timings of the kernel)
MAX_PIXELS, MAX_OC_BLOCKS = 14, 1


# What one vpdpbusd computes, as the block it replaces reads: 16 int32 lanes, each plus the sum of 4 uint8 x int8
# products. NOTE: written here, not imported from tvm.s_tir.tensor_intrin.x86: importing that package registers
# every target's intrinsics (CUDA's alone took over a minute), on every `import compiler`.
# The description and its implementation take the same buffers (a TensorIntrin pair must):
_A, _B, _C = (T.Buffer((4,), "uint8", offset_factor=1), T.Buffer((16, 4), "int8", offset_factor=1),
              T.Buffer((16,), "int32", offset_factor=1))


@T.prim_func(s_tir=True)
def _dot_16x4(A: _A, B: _B, C: _C) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for lane in T.serial(16):
            for byte in T.serial(4):
                with T.sblock("update"):
                    vl, vb = T.axis.remap("SR", [lane, byte])
                    C[vl] = C[vl] + T.cast(A[vb], "int32") * T.cast(B[vl, vb], "int32")


# NOTE: TVM 0.27's own dot_16x4_vnni passes int32x16 operands, and its LLVM's vpdpbusd takes <64 x i8>: the
# module fails LLVM's verifier. Same description, operands as bytes.
@T.prim_func(s_tir=True)
def _vnni_16x4(A: _A, B: _B, C: _C) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        four = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(four, 16), dtype="int8x64"), B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16")


TensorIntrin.register(INTRIN, _dot_16x4, _vnni_16x4)


def pack_vnni(w: np.ndarray) -> np.ndarray:
    """A 1x1 int8 kernel OHWI16o [O/16, 1, 1, I, 16] -> [O/16, I/4, 16, 4] (4 input channels of an output
    channel side by side)."""
    ob, _, _, cin, bo = w.shape
    return np.ascontiguousarray(w.reshape(ob, cin // DOT, DOT, bo).transpose(0, 1, 3, 2))


def conv2d_u8i8_nchwc(data: te.Tensor, kernel: te.Tensor, strides) -> te.Tensor:
    """out[n, ob, y, x, o] = sum_ci int32(in[n, ci // b, y*s, x*s, ci % b]) * int32(k[ob, ci // 4, o, ci % 4])."""
    sh, sw = (int(v) for v in strides)
    n, cb, h, w, bi = (int(v) for v in data.shape)
    cob = int(kernel.shape[0])
    oh, ow = (h - 1) // sh + 1, (w - 1) // sw + 1
    c = te.reduce_axis((0, cb), "cb")
    g = te.reduce_axis((0, bi // DOT), "g")
    k = te.reduce_axis((0, DOT), "k")
    return te.compute(
        (n, cob, oh, ow, LANES),
        lambda b, ob, y, x, o: te.sum(
            data[b, c, y * sh, x * sw, g * DOT + k].astype("int32")
            * kernel[ob, c * (bi // DOT) + g, o, k].astype("int32"), axis=[c, g, k]),
        name="conv",
        attrs={KERNEL_ATTR: KIND, "kh": 1, "kw": 1, "stride": sh},
    )


def default_tile(oh: int, ow: int, cob: int) -> tuple[int, int]:
    return register_tile(oh, ow, cob, 20, MAX_OC_BLOCKS, MAX_PIXELS)


class U8I8Conv2dNCHWc(ScheduleRule):
    """1x1 uint8 x int8 -> int32 convolutions in NCHW{c}c with a P x OB register tile of vpdpbusd."""

    kind = KIND

    def knob_space(self, func, spec):
        if (found := kernel_extents(func, KIND)) is None:
            return []
        (_, cob, oh, ow, *_), _ = found
        return [{"pixel_tile": p, "oc_blocks": ob} for p in row_tile_options(oh, ow) for ob in (1, 2, 4)
                if cob % ob == 0 and p * ob <= 28]

    def apply(self, func, spec, knobs=None):
        sch = s_tir.Schedule(func)
        conv, _ = kernel_block(sch, KIND)
        if conv is None:
            return None
        n, ob, y, x, o, c, g, k = sch.get_loops(conv)
        _, cob, oh, ow = (int(sch.get(lp).extent) for lp in (n, ob, y, x))
        p, obs = default_tile(oh, ow, cob)
        kn = {"pixel_tile": p, "oc_blocks": obs, **(knobs or {})}
        wb, left = register_tiled(sch, conv, n, ob, y, x, ow, kn, [c, g], [o, k])
        sch.unroll(g)
        finish_tile(sch, conv, wb, c, left, LANES)
        sch.tensorize(o, INTRIN)
        name = f"u8i8_conv1x1_nchw16c_{kn['pixel_tile']}x{kn['oc_blocks'] * LANES}"
        return Scheduled(sch.mod["main"], name, kn)
