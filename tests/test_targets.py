"""Named targets resolve to TVM targets; aarch64 libraries are aarch64 ELF; CUDA compiles and exports."""
from __future__ import annotations

import shutil
import struct

import pytest

import compiler
import targets
import zoo
from targets.errors import ShrinkcError

EM_AARCH64, EM_X86_64 = 183, 62


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


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_compiles_and_exports(tiny, tmp_path):
    cm = compiler.compile_model(tiny, "cuda")
    so, meta = cm.export(str(tmp_path / "cuda.so"))
    assert elf_machine(so) == EM_X86_64   # host code; the kernels ride inside
    if not cm.spec.runs_here():
        with pytest.raises(ShrinkcError, match="cannot run on this machine"):
            cm.run()


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
