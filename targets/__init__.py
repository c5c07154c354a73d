"""What each target is, as data: TVM target, cross compiler, ISA facts and kernel defaults.

This is the only place that knows a board by name. Everything else asks a `TargetSpec` for facts
(`vector_lanes`, `is_cpu`, ...) and never branches on `spec.name`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace

from targets.errors import ShrinkcError


@dataclass(frozen=True)
class TargetSpec:
    """One compilation target."""

    name: str
    tvm: dict                       # TVM target JSON (for CUDA: the device target, host in `host`)
    description: str
    isa: str                        # "avx512", "avx2", "neon", "cuda"
    vector_lanes: int               # fp32 lanes of one vector register
    vector_registers: int           # architectural vector registers
    threads: int                    # cores the library is built and tuned for
    cross_compiler: str | None = None   # None: the host's `g++`
    compiler_package: str = ""      # what to install when the cross compiler is missing
    host: dict | None = None        # host target for device code (CUDA)
    notes: str = ""
    kernel_defaults: dict = field(default_factory=dict)  # knob overrides for the schedules
    warning: str = ""               # said once at compile time (a fallback was taken)
    int8_dot: str = ""              # "avx512_vnni": quantized 1x1 convs sum uint8 x int8 in int32 (vpdpbusd)

    @property
    def is_cpu(self) -> bool:
        return self.tvm.get("kind") == "llvm"

    @property
    def is_gpu(self) -> bool:
        return self.tvm.get("kind") == "cuda"

    @property
    def triple(self) -> str:
        return (self.host or self.tvm).get("mtriple", "")

    @property
    def is_aarch64(self) -> bool:
        return self.triple.startswith(("aarch64", "arm64"))

    def runs_here(self) -> bool:
        """Can a library for this target be loaded and run on this machine (no emulator, no GPU)?"""
        import platform
        machine = platform.machine()
        if self.is_gpu:
            return _have_cuda_device()
        return (machine == "x86_64" and self.triple.startswith("x86_64")) or (
            machine in ("aarch64", "arm64") and self.is_aarch64)

    def run_hint(self) -> str:
        """Where a library for this target runs, for messages on machines where it does not."""
        if self.is_gpu:
            return (f"run it on a machine with an NVIDIA GPU ({self.tvm.get('arch', 'sm_80')} or newer) "
                    "and TVM's CUDA runtime (libtvm_runtime_cuda.so)")
        return "run it on the board (or through `shrinkc run --rpc-tracker`)"

    def tvm_target(self):
        import tvm
        if self.host is not None:
            return tvm.target.Target(self.tvm, host=self.host)
        return tvm.target.Target(self.tvm)

    def to_json(self) -> dict:
        return {"name": self.name, "tvm": self.tvm, "host": self.host, "isa": self.isa,
                "vector_lanes": self.vector_lanes, "threads": self.threads,
                "cross_compiler": self.cross_compiler}


def _have_cuda_device() -> bool:
    try:
        import tvm
        return bool(tvm.cuda(0).exist)
    except Exception:
        return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _host_mcpu() -> str:
    import tvm
    try:
        return str(tvm.target.Target.from_device("cpu").attrs.get("mcpu", "")) or "x86-64-v3"
    except Exception:
        return "x86-64-v3"


def x86_kernel_defaults(isa: str, mcpu: str = "") -> dict:
    """Schedule defaults chosen by timing on x86 (Zen 4; Zen 5's 1x1 convs differ, below). With AVX-512
    every input broadcast folds into its FMA ({1to16}), so a register tile of one 16-channel block x up
    to 8 pixels keeps the FMA pipes full; on Zen 4 tiles of 2-4 blocks timed slower on every MobileNetV2
    1x1 shape, and with the new tile MobileNetV2 went from 0.91x to 0.80x of ONNX Runtime's time at 1
    thread (`tools/bench.py models` on that host). With such tiles, stride-1 kxk convs read
    their zero padding through guarded loads rather than a padded copy (an interleaved A/B on DS-F
    MobileNetV2-1.4, not a bench.py page). AVX2 has not been measured: it keeps the generic choice."""
    if isa != "avx512":
        return {}
    # Winograd F(2x2, 3x3) for 3x3 stride-1 convs with >= 16 channels in and out: faster than the direct
    # kernel on every merged DS-F MobileNetV2-1.4 shape, 56x56x32 to 7x7x224 (an ad-hoc single-conv A/B);
    # with it DS-F MobileNetV2-1.4 merged went from 1.41x to 1.82x at 1 thread (benchmarks/RESULTS-shrink.md).
    defaults = {"max_oc_blocks": 1, "max_pixel_tile": 8, "padded_copy": False, "winograd_min_channels": 16}
    if mcpu == "znver4":
        # sparse 1x1 convs walk their input channels in chunks (schedules/f32_spmm_chw.default_k_chunk) on 7x7 and
        # 14x14 planes: on Zen 4 chunks of 96-192 channels ran MobileNetV2's 7x7 and 14x14 project convs faster
        # alone (85% zeros), the 28x28 and 56x56 ones not; with both, the 85%-sparse model was faster at 1 thread
        # than with 7x7 chunks only or none; a 32 KiB share and Zen 5's fused-kernel and accumulator choices were
        # not faster there. Chunked layers take 64-pixel tiles (four on a 14x14 plane, chunks of 192): the 14x14
        # project convs with 384-576 input channels faster alone than in two 128-pixel tiles with chunks of 104,
        # the model the same at 1 thread and a little faster at 2 (ad-hoc interleaved A/Bs)
        defaults["spmm_chunk_bytes"] = 49152
        defaults["spmm_chunk_tiles"] = 4
        defaults["spmm_chunk_pixels"] = 64
        # partial sums of up to 8 shares: 320 -> 1280 at 7x7 in two chunks of 160 (default_k_chunk's timings)
        defaults["spmm_chunk_sums"] = 8
        # sparse expand convs on planes of two or more pixel tiles: one task per tile (default_tile_tasks' timings)
        defaults["spmm_tile_tasks"] = True
    if mcpu == "znver5":
        # Zen 5 runs 512-bit FMAs at full width, two a cycle (Zen 4 splits each in two halves). `shrinkc tune` on
        # a Zen 5 host (benchmarks/RESULTS-tune.md, its run with the Zen 4 defaults: 1.15x) picked 2 channel
        # blocks x 7-8 pixels without unrolling the input-channel block for nearly every MobileNetV2 1x1 conv.
        # 1x1 only: with them for every conv, DS-F MobileNetV2-1.4's merged 3x3 convs ran slower (its merged /
        # unmerged speed-up fell from 1.68x to 1.43x at 1 thread in a `bench.py shrink` run, not committed).
        defaults["conv1x1"] = {"max_oc_blocks": 2, "conv2d_nchwc": {"unroll_ci": False}}
        # the CHW first conv of sparse models, fused with block 0's depthwise conv: 4 first-conv channels per
        # task ran faster than 8 (Zen 4's choice) alone and inside 85%-sparse MobileNetV2 (unfused, ad-hoc
        # interleaved A/Bs on a Zen 5 host); fused, 4 channels x 4 depthwise rows per step timed fastest of
        # 2-4 channels x 1-4 rows on MobileNetV2's pair alone (ad hoc, interleaved)
        defaults["conv2d_dwconv2d_chw"] = {"out_block": 4, "rows": 4}
        # the fused expand + depthwise kernel: `shrinkc tune` there picked 2-8 channel blocks per task and 3-4
        # rows per step for most of 85%-sparse MobileNetV2's; 3 rows x 2 blocks as the default made the whole
        # model faster at 1 and 2 threads, as fast as the tuned library (ad-hoc interleaved A/Bs)
        defaults["spmm_dwconv2d_chw"] = {"rows": 3, "group": 2}
        # sparse 1x1 convs with many input channels walk them in chunks whose pixel tile fits in this many bytes
        # (the whole 48 KiB L1: 192 channels of a 7x7 tile); schedules/f32_spmm_chw.default_k_chunk. Against 32 KiB
        # (128 channels): MobileNetV2's 960-channel 7x7 layers faster alone at 1 and 2 threads (chunks of 160-320
        # alike, 32-64 much slower), and the 85%-sparse model a little faster at both (ad-hoc interleaved A/Bs)
        defaults["spmm_chunk_bytes"] = 49152
        # accumulator vectors per sparse 1x1 task (block x pixel vectors) of project convs: 16 of the 32 registers
        # ran faster than the generic third on the 28x28-112x112 project convs of 85%-sparse MobileNetV2, blocks
        # 1, 2 and 4 (ad-hoc interleaved timings of single kernels); schedules/f32_spmm_chw.default_pixel_tile
        defaults["spmm_accumulators"] = 16
    return defaults


def x86_host() -> TargetSpec:
    """This machine, its vector ISA detected from /proc/cpuinfo."""
    flags = _cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    isa = "avx512" if avx512 else "avx2" if "avx2" in flags else "sse"
    threads = os.cpu_count() or 1
    mcpu = _host_mcpu()
    # NOTE: LLVM emits vpdpbusd only for a named CPU that has it (the generic fallback mcpu has no AVX-512)
    vnni = avx512 and "avx512_vnni" in flags and mcpu != "x86-64-v3"
    return TargetSpec(
        name="x86",
        tvm={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu, "num-cores": threads},
        description="this machine (x86-64), features detected",
        isa=isa,
        vector_lanes=16 if avx512 else 8 if "avx2" in flags else 4,
        vector_registers=32 if avx512 else 16,
        threads=threads,
        notes="builds for this CPU's exact features; run it on the same kind of CPU",
        kernel_defaults=x86_kernel_defaults(isa, mcpu),
        int8_dot="avx512_vnni" if vnni else "",
    )


def rpi4() -> TargetSpec:
    return TargetSpec(
        name="rpi4",
        # TVM's raspberry-pi/4b-aarch64 tag: Cortex-A72, aarch64, NEON, 4 cores
        tvm={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"],
             "num-cores": 4},
        description="Raspberry Pi 4 (Cortex-A72, aarch64 Linux, NEON)",
        isa="neon", vector_lanes=4, vector_registers=32, threads=4,
        cross_compiler="aarch64-linux-gnu-g++", compiler_package="g++-aarch64-linux-gnu",
        notes="runs on 64-bit Raspberry Pi OS / Debian arm64 with the TVM runtime",
        kernel_defaults={"block_lanes": 8},
    )


def android_compiler() -> str | None:
    """The Android NDK clang to link Pixel libraries with, from the environment, if set."""
    cc = os.environ.get("SHRINKC_ANDROID_CC")
    if cc:
        return cc
    ndk = os.environ.get("ANDROID_NDK_HOME") or os.environ.get("ANDROID_NDK_ROOT")
    if ndk:
        path = os.path.join(ndk, "toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android28-clang++")
        if os.path.exists(path):
            return path
    return None


def pixel() -> TargetSpec:
    ndk = android_compiler()
    triple = "aarch64-linux-android" if ndk else "aarch64-linux-gnu"
    return TargetSpec(
        name="pixel",
        tvm={"kind": "llvm", "mtriple": triple, "mcpu": "cortex-a76", "mattr": ["+neon"], "num-cores": 4},
        description="Pixel-class phone (Cortex-A76 big cores, aarch64)",
        isa="neon", vector_lanes=4, vector_registers=32, threads=4,
        cross_compiler=ndk or "aarch64-linux-gnu-g++",
        compiler_package="the Android NDK (set SHRINKC_ANDROID_CC or ANDROID_NDK_HOME)" if ndk
        else "g++-aarch64-linux-gnu",
        notes="links with the Android NDK clang from SHRINKC_ANDROID_CC / ANDROID_NDK_HOME or --cc; "
              "without one, falls back to aarch64-linux-gnu-g++ (a glibc library: aarch64 Linux, not Android)",
        kernel_defaults={"block_lanes": 8},
        warning="" if ndk else "no Android NDK clang found (SHRINKC_ANDROID_CC, ANDROID_NDK_HOME or --cc): "
                               "linking with aarch64-linux-gnu-g++, a glibc library for aarch64 Linux, not Android",
    )


def cuda(arch: str = "sm_80") -> TargetSpec:
    return TargetSpec(
        name="cuda" if arch == "sm_80" else f"cuda:{arch}",
        tvm={"kind": "cuda", "arch": arch},
        host={"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
        description=f"NVIDIA GPU ({arch}), device code compiled with nvcc",
        isa="cuda", vector_lanes=1, vector_registers=0, threads=1,
        compiler_package="the CUDA toolkit (nvcc)",
        notes="compiles and exports without a GPU; running and verifying need one",
    )


NAMED = {"x86": x86_host, "rpi4": rpi4, "pixel": pixel, "cuda": cuda}


def resolve(target: str | dict | None, cc: str | None = None) -> TargetSpec:
    """A name from `shrinkc targets` (or cuda:sm_XX), a TVM target JSON dict / string, a TargetSpec, or None (host)."""
    if isinstance(target, TargetSpec):
        spec = target
    elif target is None or target == "":
        spec = x86_host()
    elif isinstance(target, dict) or (isinstance(target, str) and target.strip().startswith("{")):
        spec = _from_json(target)
    elif target.startswith("cuda:"):
        arch = target.split(":", 1)[1]
        if not arch.startswith("sm_") or not arch[3:].isdigit():
            raise ShrinkcError(f"unknown CUDA architecture '{arch}'", "use cuda:sm_XX, for example cuda:sm_80")
        spec = cuda(arch)
    elif target in NAMED:
        spec = NAMED[target]()
    else:
        raise ShrinkcError(f"unknown target '{target}'",
                           f"use one of {', '.join(NAMED)} (see `shrinkc targets`) or a TVM target JSON dict")
    if cc:
        spec = replace(spec, cross_compiler=cc, warning="")
    return spec


def _from_json(target: str | dict) -> TargetSpec:
    try:
        d = json.loads(target) if isinstance(target, str) else dict(target)
        import tvm
        tvm.target.Target(d)
    except Exception as err:
        raise ShrinkcError(f"cannot read target JSON {target!r}: {str(err).splitlines()[0][:120]}",
                           'write it like {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}') from None
    kind = d.get("kind")
    if kind == "cuda":
        arch = d.get("arch", "sm_80")   # nvcc compiles for it: never leave it to TVM's guess
        return replace(cuda(arch), tvm={**d, "arch": arch})
    if kind != "llvm":
        raise ShrinkcError(f"target kind '{kind}' is not supported", "use an llvm (CPU) or cuda target")
    triple = d.get("mtriple", "x86_64-linux-gnu")
    if triple.startswith(("aarch64", "arm64")):
        base = rpi4()
        return replace(base, name="custom-aarch64", tvm=d, description="custom aarch64 target",
                       threads=int(d.get("num-cores", base.threads)))
    return _x86_from_target(d)


def _x86_from_target(d: dict) -> TargetSpec:
    """An x86 target described by JSON: its vector ISA read from LLVM's view of its mcpu/mattr."""
    import tvm
    from tvm.target import codegen
    target = tvm.target.Target(d)
    avx512 = bool(codegen.target_has_features("avx512f", target))
    avx2 = bool(codegen.target_has_features("avx2", target))
    threads = int(d.get("num-cores", os.cpu_count() or 1))
    isa = "avx512" if avx512 else "avx2" if avx2 else "sse"
    vnni = avx512 and bool(codegen.target_has_features("avx512vnni", target))
    return TargetSpec(name="custom-x86", tvm=d, description="custom x86 target", isa=isa,
                      vector_lanes=16 if avx512 else 8 if avx2 else 4, vector_registers=32 if avx512 else 16,
                      threads=threads, kernel_defaults=x86_kernel_defaults(isa, str(d.get("mcpu", ""))),
                      int8_dot="avx512_vnni" if vnni else "")


def describe_all() -> list[dict]:
    rows = []
    for name, make in NAMED.items():
        spec = make()
        rows.append({"name": name, "tvm": spec.tvm, "host": spec.host, "cross_compiler": spec.cross_compiler,
                     "compiler_package": spec.compiler_package, "notes": spec.notes,
                     "description": spec.description})
    return rows
