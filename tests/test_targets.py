"""Named targets resolve to TVM targets; aarch64 libraries are aarch64 ELF; CUDA exports carry nvcc-built kernels."""
from __future__ import annotations

import shutil
import struct

import pytest

import compiler
import targets
import zoo
from conftest import run_cli, save
from targets.errors import ShrinkcError

EM_AARCH64, EM_X86_64, EM_CUDA = 183, 62, 190


def elf_machine(path) -> int:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF"
    return struct.unpack("<H", head[18:20])[0]


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("mobilenet_v2", width=0.35, resolution=32, num_classes=5)


def test_named_targets_are_data():
    host = targets.resolve(None)
    assert host.name == "x86" and host.tvm["kind"] == "llvm" and host.vector_lanes in (4, 8, 16)
    rpi = targets.resolve("rpi4")
    assert rpi.tvm["mcpu"] == "cortex-a72" and rpi.tvm["mtriple"] == "aarch64-linux-gnu"
    assert targets.resolve("cuda:sm_86").tvm == {"kind": "cuda", "arch": "sm_86"}
    custom = targets.resolve('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}')
    assert custom.is_aarch64 and custom.tvm["mcpu"] == "cortex-a55"
    with pytest.raises(ShrinkcError, match="unknown target 'pdp11'"):
        targets.resolve("pdp11")
    with pytest.raises(ShrinkcError, match="CUDA architecture"):
        targets.resolve("cuda:volta")


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu)")
@pytest.mark.parametrize("name", ["rpi4", "pixel"])
def test_aarch64_libraries(name, tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("SHRINKC_ANDROID_CC", raising=False)
    monkeypatch.delenv("ANDROID_NDK_HOME", raising=False)
    cm = compiler.compile_model(tiny, name)
    so, meta = cm.export(str(tmp_path / f"{name}.so"))
    assert elf_machine(so) == EM_AARCH64
    if name == "pixel":
        assert "aarch64-linux-gnu-g++" in cm.spec.warning   # the fallback is said out loud
    with pytest.raises(ShrinkcError, match="cannot run on this machine"):
        cm.run()


def test_host_library_is_x86(tiny, tmp_path):
    so, _ = compiler.compile_model(tiny).export(str(tmp_path / "h.so"))
    assert elf_machine(so) == EM_X86_64


# -- CUDA: the exported library holds a fatbin (SASS for sm_XX + PTX), in the layout TVM's CUDA loader reads --

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed (CUDA toolkit)")
CUDA_LOADER = "ffi.Module.load_from_bytes.cuda"
FATBIN_MAGIC, FATBIN_ELF, FATBIN_PTX = 0xBA55ED50, 2, 1


class Reader:
    """Reads what TVM's BytesOutStream wrote: little-endian u64 sizes before strings and vectors."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def raw(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "serialized module ends early"
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def u64(self) -> int:
        return struct.unpack("<Q", self.raw(8))[0]

    def str(self) -> bytes:
        return self.raw(self.u64())


def parse_cuda_module(data: bytes) -> tuple[str, dict, bytes]:
    """A serialized CUDA module, read field by field as CUDAModuleLoadFromBytes does: fmt, fmap, code."""
    r = Reader(data)
    fmt = r.str().decode()
    fmap = {}
    for _ in range(r.u64()):
        key, name = r.str().decode(), r.str().decode()
        n_args = r.u64()
        r.raw(4 * n_args)                  # one DLDataType per argument
        tags = [r.str().decode() for _ in range(r.u64())]   # launch parameters (blockIdx.x, ...)
        r.raw(4 * r.u64())                 # one extra tag per argument
        assert key == name and tags
        fmap[key] = n_args
    code = r.str()
    assert r.pos == len(data), "bytes left after the code field"
    return fmt, fmap, code


def fatbin_entries(code: bytes) -> list[tuple[int, int, bytes]]:
    """(kind, sm arch, payload) of each entry: kind 2 is an ELF cubin, kind 1 PTX."""
    magic, _, header, size = struct.unpack_from("<IHHQ", code, 0)
    assert magic == FATBIN_MAGIC and header + size == len(code)
    out, pos = [], header
    while pos < len(code):
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", code, pos)
        arch = struct.unpack_from("<I", code, pos + 28)[0]
        out.append((kind, arch, code[pos + entry_header:pos + entry_header + payload]))
        pos += entry_header + payload
    assert pos == len(code)
    return out


def elf_functions(elf: bytes) -> set[str]:
    """Names of the function symbols in an ELF64 file (a cubin's kernels)."""
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = set()
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 2:                   # SHT_SYMTAB
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize):
            st_name, st_info = struct.unpack_from("<IB", elf, at)
            if st_info & 0xF == 2:         # STT_FUNC
                start = strtab + st_name
                names.add(elf[start:elf.index(b"\0", start)].decode())
    return names


def cuda_modules_in(so_path: str) -> list[bytes]:
    """Load OUT.so with TVM's own loader; return the bytes it hands to the CUDA module loader."""
    import tvm
    import tvm_ffi
    seen = []

    def capture(data):
        seen.append(bytes(data))
        return tvm_ffi.get_global_func("runtime.SourceModuleCreate")("", "cuda")

    tvm_ffi.register_global_func(CUDA_LOADER, capture)
    try:
        lib = tvm.runtime.load_module(so_path)
    finally:
        tvm_ffi.remove_global_func(CUDA_LOADER)
    assert lib.kind == "relax.VMExecutable" and [m.kind for m in lib.imports] == ["library"]
    return seen


def tvm_cuda_runtime_loaded() -> bool:
    import tvm  # noqa: F401  (loads TVM's backends, the CUDA runtime where the driver is)
    import tvm_ffi
    return tvm_ffi.get_global_func(CUDA_LOADER, allow_missing=True) is not None


@needs_nvcc
@pytest.mark.skipif("tvm_cuda_runtime_loaded()", reason="TVM's CUDA runtime is loaded here, so TVM compiles the "
                    "kernels itself; test_cuda_library_runs_on_gpu covers this machine")
@pytest.mark.parametrize("target,sm", [("cuda", 80), ("cuda:sm_86", 86)])
def test_cuda_export_carries_compiled_kernels(target, sm, tiny, tmp_path):
    import tvm_ffi
    from compiler import cuda_device_code
    cm = compiler.compile_model(tiny, target)
    so, _ = cm.export(str(tmp_path / "cuda.so"))
    assert elf_machine(so) == EM_X86_64   # host code; the kernels ride inside
    # what TVM's codegen made without a GPU driver: CUDA C source, fmt "cuda"
    blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(cm.executable.mod).numpy().tobytes()
    (before,) = [data for kind, data in cuda_device_code.split_library_bin(blob)[2] if kind == "cuda"]
    fmt0, fmap0, source = parse_cuda_module(before)
    assert fmt0 == "cuda" and b"__global__" in source
    # what the exported library hands TVM's CUDA loader: the same kernel table, a fatbin as the code
    (after,) = cuda_modules_in(so)
    fmt, fmap, code = parse_cuda_module(after)
    assert fmt == "fatbin" and fmap == fmap0 and len(fmap) > 10
    entries = fatbin_entries(code)
    cubins = [payload for kind, arch, payload in entries if kind == FATBIN_ELF and arch == sm]
    assert len(cubins) == 1 and cubins[0][:4] == b"\x7fELF"
    assert struct.unpack_from("<H", cubins[0], 18)[0] == EM_CUDA
    assert set(fmap) <= elf_functions(cubins[0])   # every kernel the host launches is in the cubin
    assert {arch for kind, arch, _ in entries if kind == FATBIN_PTX} == {sm}   # PTX for newer GPUs
    assert all(arch == sm for _, arch, _ in entries)
    assert cm.metadata()["runtime"]["libraries"] == ["libtvm_runtime.so", "libtvm_runtime_cuda.so"]


def test_the_runtime_libraries_a_board_needs_follow_target_and_routines():
    """OUT.json's runtime libraries: the runtime alone; its CUDA part for a CUDA library (whose kernels load through
    it); the extra part for a library that calls TVM's sort routines by name."""
    from compiler import artifact
    assert artifact.runtime_needs([], targets.resolve("rpi4")) == {"functions": [], "libraries": ["libtvm_runtime.so"]}
    assert artifact.runtime_needs(["tvm.contrib.sort.argsort"], targets.resolve("cuda"))["libraries"] == [
        "libtvm_runtime.so", "libtvm_runtime_cuda.so", "libtvm_runtime_extra.so"]


def test_library_bin_round_trips(tiny):
    import tvm_ffi
    from compiler import cuda_device_code
    cm = compiler.compile_model(tiny)
    blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(cm.executable.mod).numpy().tobytes()
    indptr, children, entries = cuda_device_code.split_library_bin(blob)
    assert [kind for kind, _ in entries] == ["relax.VMExecutable", "_lib"]
    assert cuda_device_code.join_library_bin(indptr, children, entries) == blob
    with pytest.raises(ValueError):
        cuda_device_code.split_library_bin(blob[:-1])


def test_cuda_without_nvcc_is_one_clear_error(tiny, tmp_path, monkeypatch):
    from compiler import cuda_device_code
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ShrinkcError, match="nvcc .* is not on PATH"):
        compiler.compile_model(tiny, "cuda")
    with pytest.raises(ShrinkcError, match="nvcc .* is not on PATH"):
        cuda_device_code.compile_kernels("__global__ void k() {}", targets.resolve("cuda:sm_87"))


@needs_nvcc
def test_nvcc_failure_is_one_clear_error():
    from compiler import cuda_device_code
    with pytest.raises(ShrinkcError, match=r"nvcc could not compile the CUDA kernels for sm_80: .*error"):
        cuda_device_code.compile_kernels('extern "C" __global__ void k(float* a) { a[0] = nope; }',
                                         targets.resolve("cuda"))


@needs_nvcc
def test_cuda_run_and_verify_say_no_gpu(tiny, tmp_path, capsys):
    if targets.resolve("cuda").runs_here():
        pytest.skip("this machine has a CUDA GPU; test_cuda_library_runs_on_gpu runs the library")
    model = save(tiny, tmp_path, "tiny.onnx")
    out = tmp_path / "m.so"
    code, stdout, _ = run_cli(["compile", model, "-o", out, "--target", "cuda", "--verify"], capsys)
    assert code == 0
    assert [line for line in stdout.splitlines() if line.startswith("verify")] == [
        "verify: skipped, a 'cuda' library does not run on this machine (run it on a machine with an NVIDIA GPU "
        "(sm_80 or newer) and TVM's CUDA runtime (libtvm_runtime_cuda.so))"]
    code, _, err = run_cli(["run", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a CUDA library and this machine has no CUDA GPU" in err
    with pytest.raises(ShrinkcError, match=r"cannot run on this machine \(no CUDA GPU found\)"):
        compiler.compile_model(tiny, "cuda").run()


@needs_nvcc
@pytest.mark.skipif("not targets.resolve('cuda').runs_here()", reason="no CUDA GPU here; the CUDA library is "
                    "checked structurally by test_cuda_export_carries_compiled_kernels")
def test_cuda_library_runs_on_gpu(tiny, tmp_path):
    import tvm
    from compiler import runtime, verify
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    so, _ = compiler.compile_model(tiny, f"cuda:{arch}").export(str(tmp_path / "gpu.so"))
    runner = compiler.load(so)
    inputs = runtime.random_inputs(runner.inputs)
    refs = verify.reference_outputs("onnx", tiny.SerializeToString(), inputs)
    results = verify.compare([t["name"] for t in runner.outputs], runner.run(inputs), refs)
    assert all(r.ok for r in results), [r.line() for r in results]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-objdump") is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="aarch64 binutils/g++ not installed (apt-get install g++-aarch64-linux-gnu)")
def test_aarch64_hot_loops_use_neon_fma(tiny, tmp_path):
    """The conv kernels of an rpi4 library are NEON FMA vector code (fmla on .4s lanes)."""
    import subprocess
    so, _ = compiler.compile_model(tiny, "rpi4").export(str(tmp_path / "neon.so"))
    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", so], capture_output=True, text=True, check=True).stdout
    conv = [block for block in dis.split("\n\n") if "f32_conv1x1" in block.split("\n", 1)[0]]
    assert conv, "no conv1x1 kernel symbol in the disassembly"
    fmla = sum(block.count("fmla\tv") for block in conv)
    assert fmla >= 8 and ".4s" in "".join(conv)
