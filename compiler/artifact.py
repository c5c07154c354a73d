"""Build the lowered module for its target and write OUT.so + OUT.json atomically (weights inside)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile

import tvm
from tvm import relax
from tvm.tirx import compilation_pipeline

from compiler import cuda_device_code
from compiler.native_log import quiet_scope_warnings
from passes.keep_tiles_on_stack import KeepTilesOnStack
from schedules import f32_exp_lowering  # noqa: F401  (registers vector exp / sigmoid for LLVM targets)
from targets import TargetSpec
from targets.errors import ShrinkcError

VERSION = "0.1.0"
_BUILD_CONFIG = {"s_tir.LoopPartition": {"partition_const_loop": True}}
# TVM runtime routines that live in the wheel's libtvm_runtime_extra.so, not in libtvm_runtime.so: a board with the
# runtime alone lacks them (its rpc_server needs --load-library of that library, a deployment the library itself)
EXTRA_RUNTIME_LIBRARY = "libtvm_runtime_extra.so"
EXTRA_RUNTIME_PREFIXES = ("tvm.contrib.sort.", "tvm.contrib.random.")


def _finalize_passes(spec: TargetSpec) -> tvm.transform.Pass:
    """The VM lowering TVM runs after our pipeline (memory planning, shape lowering)."""
    if spec.is_gpu:
        from tvm.relax.backend.cuda import pipeline as backend
    else:
        from tvm.relax.backend.cpu_generic import pipeline as backend
    target = spec.tvm_target()
    return tvm.transform.Sequential(backend.dataflow_lower_passes(target) + backend.finalize_passes(target))


def check_toolchain(spec: TargetSpec) -> None:
    """A missing cross compiler (or nvcc) is one clear error naming what to install."""
    if spec.is_gpu:
        if shutil.which("nvcc") is None:
            raise ShrinkcError("nvcc (the CUDA compiler) is not on PATH",
                               "install the CUDA toolkit and put its bin/ on PATH")
        return
    cc = spec.cross_compiler or "g++"
    if shutil.which(cc) is None and not os.path.exists(cc):
        raise ShrinkcError(f"cross compiler '{cc}' for target '{spec.name}' is not installed",
                           f"install {spec.compiler_package or 'a C++ compiler'}"
                           + (f" (apt-get install {spec.compiler_package})" if spec.compiler_package.startswith("g++") else "")
                           + " or pass --cc")


def _tir_pipeline():
    """TVM's S-TIR lowering, then KeepTilesOnStack before the builtins are lowered."""
    from tvm.s_tir.pipeline import default_s_tir_pipeline
    main, finalize_host, finalize_device = default_s_tir_pipeline()
    return tvm.transform.Sequential([main, KeepTilesOnStack]), finalize_host, finalize_device


compilation_pipeline.register_tir_pipeline("shrinkc", _tir_pipeline)


def runtime_functions(mod: tvm.IRModule) -> list[str]:
    """The TVM runtime routines (tvm.contrib.*) the lowered module calls by name: topi's CPU topk / sort / argsort
    (te.extern, a library-call PrimFunc) or a Relax call of an extern function."""
    from schedules.rule import is_library_call
    names = set()
    for func in mod.functions.values():
        if isinstance(func, tvm.tirx.PrimFunc):
            if is_library_call(func):
                names.update(re.findall(r'"(tvm\.contrib\.[\w.]+)"', func.script()))
        elif isinstance(func, relax.Function):
            def visit(expr):
                if isinstance(expr, relax.ExternFunc) and str(expr.global_symbol).startswith("tvm.contrib."):
                    names.add(str(expr.global_symbol))
            relax.analysis.post_order_visit(func.body, visit)
    return sorted(names)


def runtime_needs(functions: list[str], spec: TargetSpec) -> dict:
    """OUT.json's "runtime": the routines the library calls by name and the TVM runtime libraries a board needs (a
    CUDA library's kernels load through the wheel's libtvm_runtime_cuda.so)."""
    extra = any(f.startswith(EXTRA_RUNTIME_PREFIXES) for f in functions)
    return {"functions": list(functions),
            "libraries": ["libtvm_runtime.so"] + ["libtvm_runtime_cuda.so"] * spec.is_gpu
            + [EXTRA_RUNTIME_LIBRARY] * extra}


def vm_mode(spec: TargetSpec, profiling: bool = False) -> str:
    """How the model's Relax function runs: "compiled" (native code calling the kernels; on CPUs, where
    the bytecode interpreter's per-call cost showed in end-to-end times) or "bytecode" (interpreted; it
    has the per-call hooks Runner.profile times kernels with; CUDA keeps it, untested the other way)."""
    return "bytecode" if profiling or spec.is_gpu else "compiled"


def build(mod: tvm.IRModule, spec: TargetSpec, profiling: bool = False) -> relax.VMExecutable:
    """Compile the lowered module for the target (host code for CUDA included); profiling: see vm_mode."""
    if spec.is_gpu:
        # where the GPU driver loads, TVM compiles the kernels itself, through this callback mode
        os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")  # NVRTC needs cuda-bindings; nvcc does not
    with spec.tvm_target(), tvm.transform.PassContext(opt_level=3, config=_BUILD_CONFIG):
        executable = relax.build(mod, target=spec.tvm_target(), relax_pipeline=_finalize_passes(spec),
                                 tir_pipeline="shrinkc" if spec.is_cpu else "default",
                                 exec_mode=vm_mode(spec, profiling))
    if spec.is_gpu:
        # NOTE: without a GPU driver TVM keeps the kernels as CUDA C source; nvcc compiles them here
        # (errors surface now) and write() embeds the fatbin (see compiler/cuda_device_code.py)
        cuda_device_code.compile_device_code(executable.mod, spec)
    return executable


def build_kernel(func: tvm.tirx.PrimFunc, spec: TargetSpec):
    """One scheduled PrimFunc alone, as `main`, compiled the way `build` compiles it (for tuning)."""
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    with spec.tvm_target(), tvm.transform.PassContext(opt_level=3, config=_BUILD_CONFIG):
        return tvm.compile(mod, target=spec.tvm_target(), tir_pipeline="shrinkc" if spec.is_cpu else "default")


def export_kernel(kernel, path: str, spec: TargetSpec) -> str:
    """A kernel from build_kernel as a shared library for the target (cross-linked)."""
    kwargs = {"fcompile": _fcompile(spec)} if _fcompile(spec) else {}
    with quiet_scope_warnings():
        kernel.export_library(path, **kwargs)
    return path


def _fcompile(spec: TargetSpec):
    if spec.is_gpu or not spec.cross_compiler:
        return None
    from tvm.support import cc
    return cc.cross_compiler(spec.cross_compiler)


def write(executable, metadata: dict, out_path: str, spec: TargetSpec) -> tuple[str, str]:
    """Write OUT.so and OUT.json next to it; never leave a partial file behind."""
    out_path = os.path.abspath(out_path)
    out_dir = os.path.dirname(out_path)
    if not os.path.isdir(out_dir):
        raise ShrinkcError(f"output directory '{out_dir}' does not exist", "create it or choose another -o path")
    json_path = os.path.splitext(out_path)[0] + ".json"
    fd, tmp_so = tempfile.mkstemp(prefix=".shrinkc-", suffix=".so", dir=out_dir)
    os.close(fd)
    tmp_json = tmp_so[:-3] + ".json"
    try:
        try:
            kwargs = {"fcompile": _fcompile(spec)} if _fcompile(spec) else {}
            if spec.is_gpu:
                kwargs["fpack_imports"] = cuda_device_code.pack_imports(spec)
            with quiet_scope_warnings():
                executable.export_library(tmp_so, **kwargs)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
            first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            raise ShrinkcError(f"linking the library for '{spec.name}' failed: {first[:200]}",
                               f"check that {spec.cross_compiler or 'g++'} works for this target") from None
        metadata = dict(metadata, library=os.path.basename(out_path), size_bytes=os.path.getsize(tmp_so))
        with open(tmp_json, "w") as f:
            json.dump(metadata, f, indent=1, default=str)
        os.replace(tmp_json, json_path)
        os.replace(tmp_so, out_path)
    finally:
        for p in (tmp_so, tmp_json):
            if os.path.exists(p):
                os.remove(p)
    return out_path, json_path
