"""CUDA exports carry kernels compiled by nvcc (a fatbin for the target's sm_XX), not CUDA C source.

Why this exists (TVM 0.27, PyPI wheel):
- `target.build.cuda` hands its CUDA C source to the factory `ffi.Module.create.cuda`. That factory
  lives in `libtvm_runtime_cuda.so`, which needs the GPU driver (`libcuda.so.1`); where it loads,
  it compiles the source through `tvm_callback_cuda_compile` and makes a real CUDA module. Where it
  does not load (no driver, as on a build machine), codegen returns a `CUDAFallbackModuleNode` of
  kind "cuda" whose payload is the source itself (fmt "cuda"). Setting TVM_CUDA_COMPILE_MODE changes
  nothing there: the callback is never called.
- That payload serializes like a real CUDA module, `[fmt: str][fmap][code: bytes]`. A CUDA runtime
  that loads fmt "cuda" must compile it again at every load, and can only do so when a Python TVM
  with `tvm_callback_cuda_compile` (NVRTC or nvcc) is present; a runtime-only deployment fails.

So at export we rebuild the library blob TVM embeds in OUT.so (`__tvm_ffi__library_bin`) ourselves:
TVM serializes the module tree (`runtime.ModulePackImportsToTensor`), we swap every CUDA entry whose
fmt is "cuda" for `[fmt "fatbin"][the same fmap bytes][nvcc's fatbin]`, and write the blob as a C
file that g++ links in place of TVM's own packed-imports object (`export_library(fpack_imports=)`).
The fmap bytes are copied verbatim, never re-encoded. The fatbin holds SASS for sm_XX and PTX for
compute_XX (newer GPUs JIT the PTX). The CUDA loader only compiles when fmt is "cuda"; any other fmt
goes straight to `cuModuleLoadData`, which takes a fatbin.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct

import numpy as np

from targets import TargetSpec
from targets.errors import ShrinkcError

FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)
COMPILED_FORMAT = "fatbin"
_ARCH = re.compile(r"sm_(\d+[a-z]?)")
_compiled: dict[tuple[str, str], bytes] = {}   # (sha256 of the source, arch) -> fatbin


def device_arch(spec: TargetSpec) -> str:
    arch = str(spec.tvm.get("arch", ""))
    if not _ARCH.fullmatch(arch):
        raise ShrinkcError(f"CUDA target has no usable 'arch' ({arch!r})", "use cuda:sm_XX, for example cuda:sm_80")
    return arch


def gencode(arch: str) -> list[str]:
    """SASS for this exact architecture plus PTX that newer GPUs can JIT."""
    n = _ARCH.fullmatch(arch).group(1)
    return ["-gencode", f"arch=compute_{n},code=[sm_{n},compute_{n}]"]


def compile_kernels(source: str, spec: TargetSpec) -> bytes:
    """CUDA C source -> fatbin with nvcc; cached per source and arch.

    TVM's compile_cuda picks the flags, as on a GPU machine in nvcc mode (-O3, --use_fast_math
    unless TVM_CUDA_NVCC_NO_FAST_MATH is set)."""
    arch = device_arch(spec)
    key = (hashlib.sha256(source.encode()).hexdigest(), arch)
    if key in _compiled:
        return _compiled[key]
    if shutil.which("nvcc") is None:
        raise ShrinkcError("nvcc (the CUDA compiler) is not on PATH", "install the CUDA toolkit and put its bin/ on PATH")
    from tvm.support import nvcc
    try:
        with spec.tvm_target():
            binary = bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=gencode(arch), compiler="nvcc"))
    except (RuntimeError, OSError, ValueError) as err:
        # compile_cuda's message is the whole source, then "Compilation error:", then nvcc's output
        out = str(err).rsplit("Compilation error:", 1)[-1].strip().splitlines() or [type(err).__name__]
        line = next((x for x in out if "error" in x.lower() or "fatal" in x.lower()), out[-1]).strip()
        raise ShrinkcError(f"nvcc could not compile the CUDA kernels for {arch}: {line[:200]}",
                           "check that `nvcc --list-gpu-arch` lists this architecture, or pick another cuda:sm_XX") from None
    if not binary.startswith(FATBIN_MAGIC):
        raise ShrinkcError(f"nvcc returned no fatbin for {arch}", "check the CUDA toolkit installation (nvcc --version)")
    if len(_compiled) >= 8:
        _compiled.clear()
    _compiled[key] = binary
    return binary


# -- the library blob: <nbytes u64> <indptr vec<u64>> <children vec<u64>> then per module
#    <kind str> [<bytes str>] ("_lib", the host code's place in the tree, has no bytes) --

def _u64(buf: bytes, pos: int) -> tuple[int, int]:
    if pos + 8 > len(buf):
        raise ValueError("library blob ends early")
    return struct.unpack_from("<Q", buf, pos)[0], pos + 8


def _str(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = _u64(buf, pos)
    if pos + n > len(buf):
        raise ValueError("library blob ends early")
    return buf[pos:pos + n], pos + n


def _put(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def split_library_bin(blob: bytes) -> tuple[list[int], list[int], list[tuple[str, bytes | None]]]:
    """The import tree (CSR) and each module's (kind, serialized bytes or None for "_lib")."""
    nbytes, pos = _u64(blob, 0)
    if nbytes != len(blob) - 8:
        raise ValueError(f"library blob says {nbytes} bytes, holds {len(blob) - 8}")
    vecs = []
    for _ in range(2):
        n, pos = _u64(blob, pos)
        vecs.append(list(struct.unpack_from(f"<{n}Q", blob, pos)))
        pos += 8 * n
    entries = []
    for _ in range(len(vecs[0]) - 1):
        kind, pos = _str(blob, pos)
        data = None
        if kind != b"_lib":
            data, pos = _str(blob, pos)
        entries.append((kind.decode(), data))
    if pos != len(blob):
        raise ValueError(f"{len(blob) - pos} bytes left after the last module")
    return vecs[0], vecs[1], entries


def join_library_bin(indptr: list[int], children: list[int], entries: list[tuple[str, bytes | None]]) -> bytes:
    body = b"".join(struct.pack("<Q", len(v)) + struct.pack(f"<{len(v)}Q", *v) for v in (indptr, children))
    body += b"".join(_put(kind.encode()) + (b"" if data is None else _put(data)) for kind, data in entries)
    return struct.pack("<Q", len(body)) + body


def cuda_payload(data: bytes) -> tuple[str, bytes]:
    """A serialized CUDA module -> (fmt, everything after it: the fmap bytes, then the code)."""
    fmt, pos = _str(data, 0)
    return fmt.decode(), data[pos:]


def _device_sources(mod) -> list[bytes]:
    out, stack = [], [mod]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(m.inspect_source("cuda").encode())
        stack.extend(m.imports)
    return out


def _with_fatbin(data: bytes, sources: list[bytes], spec: TargetSpec) -> bytes:
    """[fmt "cuda"][fmap][code: source] -> [fmt "fatbin"][fmap, same bytes][code: fatbin]."""
    _, rest = cuda_payload(data)
    # the code field comes last; its text is the module's source, so the fmap is what precedes it
    source = next((s for s in sources if rest.endswith(_put(s))), None)
    if source is None:
        raise ShrinkcError("cannot find the CUDA source in the serialized CUDA module (TVM's format changed?)",
                           "report the TVM version; export with a CUDA-enabled TVM on a GPU machine meanwhile")
    fmap = rest[:len(rest) - len(_put(source))]
    return _put(COMPILED_FORMAT.encode()) + fmap + _put(compile_kernels(source.decode(), spec))


def library_bin(mod, spec: TargetSpec) -> tuple[bytes, int]:
    """TVM's serialized module tree with CUDA source payloads compiled; (blob, entries compiled)."""
    import tvm_ffi
    blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()
    try:
        indptr, children, entries = split_library_bin(blob)
        fmts = [cuda_payload(data)[0] if kind == "cuda" else None for kind, data in entries]
    except ValueError as err:
        raise ShrinkcError(f"TVM's serialized library has an unexpected layout ({err})",
                           "report the TVM version; export with a CUDA-enabled TVM on a GPU machine meanwhile") from None
    sources, done = None, 0
    for i, (kind, data) in enumerate(entries):
        if fmts[i] == "cuda":
            sources = sources if sources is not None else _device_sources(mod)
            entries[i] = (kind, _with_fatbin(data, sources, spec))
            done += 1
    return join_library_bin(indptr, children, entries), done


def compile_device_code(mod, spec: TargetSpec) -> int:
    """Compile the CUDA kernels now (nvcc errors surface at compile time; export reuses the result)."""
    return library_bin(mod, spec)[1]


def write_c(blob: bytes, path: str, symbol: str) -> None:
    """The blob as one exported C array, written as string literals (g++ reads those ~15x faster)."""
    hexdigits = np.frombuffer(b"0123456789abcdef", np.uint8)
    arr = np.frombuffer(blob, np.uint8)
    esc = np.empty((arr.size, 4), np.uint8)
    esc[:, 0], esc[:, 1] = ord("\\"), ord("x")   # every byte is \xHH, so no escape runs into the next
    esc[:, 2], esc[:, 3] = hexdigits[arr >> 4], hexdigits[arr & 15]
    flat = esc.tobytes()
    with open(path, "wb") as f:
        f.write(b'#ifdef __cplusplus\nextern "C" {\n#endif\n')
        f.write(b"extern const unsigned char %s[];\n" % symbol.encode())
        # one byte more than the blob for the literal's NUL (C++ insists); the loader reads nbytes
        f.write(b"const unsigned char %s[%d] =\n" % (symbol.encode(), len(blob) + 1))
        for i in range(0, len(flat), 256):
            f.write(b'"' + flat[i:i + 256] + b'"\n')
        f.write(b';\n#ifdef __cplusplus\n}\n#endif\n')


def pack_imports(spec: TargetSpec):
    """An `export_library(fpack_imports=...)` that embeds the blob with compiled kernels."""
    def fpack(mod, is_system_lib, symbol_prefix, workspace_dir):
        if is_system_lib or symbol_prefix:
            raise ShrinkcError("CUDA libraries cannot be exported as a system library", "export a shared library")
        import tvm_ffi
        blob, _ = library_bin(mod, spec)
        path = os.path.join(workspace_dir, "shrinkc_devc.c")
        write_c(blob, path, tvm_ffi.get_global_func("runtime.ModuleImportsBlobName")())
        return path
    return fpack
