"""The device farm (tools/farm.py): tracker, host RPC servers, the emulated aarch64 board, clear errors."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import emu_board  # noqa: E402
import farm  # noqa: E402

AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refuses(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    """A tracker on a free port, with its state in a temp dir; stopped after the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHRINKC_FARM_DIR", str(tmp_path_factory.mktemp("farm")))
        rec = farm.tracker_start(port=free_port())
        yield rec["tracker"]
        farm.tracker_stop()


def tiny_library(target, path: Path) -> Path:
    """relu(x @ w) as a Relax module, compiled for `target` and exported as one .so."""
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Tiny:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 16), "float32")) -> R.Tensor((4, 16), "float32"):
            with R.dataflow():
                y = R.nn.relu(R.matmul(x, w))
                R.output(y)
            return y

    ex = tvm.compile(Tiny, target=tvm.target.Target(target))
    if target == "llvm":
        ex.export_library(str(path))
    else:
        from tvm.support import cc
        ex.export_library(str(path), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    return path


def run_tiny(lib, dev, x, w) -> np.ndarray:
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(lib, dev)
    return vm["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)).numpy()


def check_chw_depthwise_on_board(session, shape, tmp_path: Path) -> None:
    """The CHW depthwise kernel built for rpi4 (NEON, masked loads at the row ends), run on the board,
    against numpy."""
    import tvm

    import compiler.artifact
    import targets
    from schedules.f32_dwconv2d_chw import dwconv2d_chw
    from tests.test_spmm import _dw_ref
    c, h, w, k, s, pads = shape
    spec = targets.resolve("rpi4")
    func = dwconv2d_chw(c, h, w, k, s, list(pads), clip=(0.0, 6.0), lanes=spec.vector_lanes)
    lib = tmp_path / f"dw_{c}_{h}_{w}_{k}_{s}.so"
    compiler.artifact.export_kernel(compiler.artifact.build_kernel(func, spec), str(lib), spec)
    rng = np.random.default_rng(w)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    ref = _dw_ref(x, wt, b, s, list(pads), (0.0, 6.0))
    session.upload(str(lib))
    dev = session.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, wt, b, np.zeros(ref.shape, np.float32))]
    session.load_module(lib.name)["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-5, atol=1e-5)


def run_remote(session, path: Path, x, w) -> np.ndarray:
    session.upload(str(path))
    return run_tiny(session.load_module(path.name), session.cpu(), x, w)


def inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 8)).astype("float32"), rng.standard_normal((8, 16)).astype("float32")


def test_tracker_start_is_idempotent_and_stop_frees_port(tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINKC_FARM_DIR", str(tmp_path))
    port = free_port()
    rec = farm.tracker_start(port=port)
    try:
        assert farm.tracker_start(port=port)["pid"] == rec["pid"]
        status = farm.tracker_status()
        assert status["port"] == port and status["keys"] == {}
        assert (tmp_path / "tracker.json").is_file()
    finally:
        assert farm.tracker_stop()
    assert farm.tracker_status() is None
    assert refuses(port)
    assert not farm._group_members(rec["pid"])
    assert not farm.tracker_stop()  # nothing left to stop


def test_host_server_runs_uploaded_library(tracker, tmp_path):
    import tvm
    rec = farm.server_start("host-x86", tracker, port=free_port())  # a port no one else's server takes
    try:
        assert farm.registered_keys(tracker) == {"host-x86": 1}
        (addr,) = [s["addr"] for s in farm.tracker_summary(tracker)["server_info"]]
        lib = tiny_library("llvm", tmp_path / "tiny_x86.so")
        x, w = inputs()
        got = run_remote(farm.request_session("host-x86", tracker, timeout=20), lib, x, w)
        want = run_tiny(tvm.runtime.load_module(str(lib)), tvm.cpu(), x, w)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_allclose(got, np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)
        # a model of several outputs (TopK's values and indices) through shrinkc's remote runner
        import compiler
        from compiler import remote
        so, _ = compiler.compile_model(str(topk_model(tmp_path / "topk.onnx"))).export(str(tmp_path / "topk.so"))
        meta = compiler.runtime.read_metadata(so)
        feed = {"x": np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)}
        session = farm.request_session("host-x86", tracker, timeout=20)
        (values, indices), times = remote.run_library(session, so, meta, feed, 2)
        want = compiler.load(so).run(feed)
        np.testing.assert_array_equal(indices, want[1])
        np.testing.assert_allclose(values, want[0], rtol=1e-6)
        assert len(times) == 2
    finally:
        assert farm.server_stop("host-x86")
    # Stopping the group also ends rpc_server's popen_worker child, which would keep the port.
    assert not farm._group_members(rec["pid"])
    assert refuses(addr[1])
    assert "host-x86" not in farm.registered_keys(tracker)


def test_a_board_without_the_routines_a_library_calls_is_named_before_upload(tmp_path):
    """OUT.json's runtime functions are looked up on the board first: a missing one is one clear error naming it,
    the library that has it and --load-library; nothing is uploaded."""
    from tvm import rpc

    from compiler import remote
    session = rpc.LocalSession()
    remote.check_runtime_functions(session, {"runtime": {"functions": ["tvm.contrib.sort.topk"]}})   # present here
    remote.check_runtime_functions(session, {})                                                    # older OUT.json
    missing = {"runtime": {"functions": ["tvm.contrib.sort.topk", "tvm.contrib.sort.not_on_this_board"]}}
    with pytest.raises(remote.FarmError, match=r"lacks tvm\.contrib\.sort\.not_on_this_board \(in TVM's "
                       r"libtvm_runtime_extra\.so\)") as err:
        remote.run_library(session, str(tmp_path / "never_read.so"), missing, {}, 1)
    assert "--load-library" in err.value.fix


def test_busy_board_times_out_with_a_clear_error(tracker):
    farm.server_start("host-busy", tracker)
    try:
        held = farm.request_session("host-busy", tracker)
        t0 = time.time()
        with pytest.raises(farm.FarmError, match="stayed busy for 1 s"):
            farm.request_session("host-busy", tracker, timeout=1)
        assert time.time() - t0 < 5
        del held
    finally:
        farm.server_stop("host-busy")


def test_a_process_that_exits_while_we_look_is_not_running():
    """server stop scans /proc while the group's processes exit: a vanished PID reads as no threads (a
    FileNotFoundError from its task folder once failed a stop)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert farm._thread_states(Path(f"/proc/{gone.pid}")) == []
    states = farm._thread_states(Path(f"/proc/{os.getpid()}"))
    assert states and all(s in "RSD" for s in states)        # this test's own threads run or sleep


def test_a_start_that_fails_stops_what_its_leader_left_running(tmp_path, monkeypatch):
    """The emulated board once failed at start while its group kept running and kept the rootfs mounts busy: the
    check that a group is ours (a TVM command line) failed, so nothing was stopped. A group this interpreter
    started is stopped whatever its members' command lines say."""
    monkeypatch.setenv("SHRINKC_FARM_DIR", str(tmp_path))
    left = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])"
    rec = farm._spawn("leaves-a-child", [sys.executable, "-c", left])
    farm._CHILDREN[rec["pid"]].wait(timeout=30)
    assert farm._group_members(rec["pid"])  # the child sleeps on after its leader exited
    with pytest.raises(farm.FarmError, match="not ready after 2 s"):
        farm._wait("a test process", rec, lambda: False, timeout=2)
    assert not farm._group_members(rec["pid"])


def test_a_start_is_judged_by_its_group_not_its_command_line(tmp_path, monkeypatch):
    """The emulated board's start was called dead ("exited at start", empty log) when the first look found its
    process inside exec (chroot becoming qemu: an empty command line, so not recognisably TVM's). A group this
    interpreter started runs while any member runs; here one whose command line never names TVM."""
    monkeypatch.setenv("SHRINKC_FARM_DIR", str(tmp_path))
    rec = farm._spawn("plain", [sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.time()
    try:
        farm._wait("a plain process", rec, lambda: time.time() - t0 > 1.0, timeout=30)
    finally:
        farm._stop("plain")
    assert not farm._group_members(rec["pid"])


def test_a_server_that_fails_to_register_says_whether_the_tracker_answers(tracker, tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINKC_FARM_DIR", str(tmp_path))  # the tracker's record stays in the fixture's folder
    with pytest.raises(farm.FarmError, match=f"(?s)exited at start.*bye.*The tracker at {tracker} still answers"):
        farm._start_server("server-never", "never", tracker, [sys.executable, "-c", "print('bye')"], timeout=30)


def test_unknown_key_names_what_is_registered(tracker):
    with pytest.raises(farm.FarmError, match=r"no board registered as 'nope' .*registered: none") as err:
        farm.request_session("nope", tracker, timeout=2)
    assert "farm.py" in err.value.fix


def test_unreachable_tracker_fails_fast():
    port = free_port()  # nothing listens there
    t0 = time.time()
    with pytest.raises(farm.FarmError, match=f"no RPC tracker at 127.0.0.1:{port}") as err:
        farm.request_session("rpi4-emu", f"127.0.0.1:{port}", timeout=5)
    assert time.time() - t0 < 5
    assert f"tracker start --port {port}" in err.value.fix


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHRINKC_FARM_DIR", str(tmp_path))
    assert farm.main(["tracker", "status"]) == 1
    assert "no tracker running" in capsys.readouterr().out
    assert farm.main(["server", "start", "--key", "k", "--tracker", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no RPC tracker at") and len(err.strip().splitlines()) == 1
    assert farm.main(["server", "start", "--key", "bad key!"]) == 2
    assert "bad device key" in capsys.readouterr().err
    with pytest.raises(farm.FarmError, match="bad tracker address"):
        farm.parse_tracker("localhost")


@pytest.mark.slow
@pytest.mark.skipif(bool(emu_board.missing_prerequisites()),
                    reason=f"emulated board needs: {', '.join(emu_board.missing_prerequisites())}")
def test_emulated_aarch64_board_matches_x86(tracker, tmp_path):
    """Cross-compiled for cortex-a72, run under qemu through the tracker; equal to the x86 build."""
    import tvm
    farm.board_build()  # minutes the first time, seconds from the cached tarball
    rec = farm.board_start(farm.BOARD_KEY, tracker)
    root = emu_board.rootfs()
    try:
        lib = tiny_library(AARCH64, tmp_path / "tiny_a64.so")
        assert open(lib, "rb").read(20)[18] == 0xB7  # e_machine: EM_AARCH64
        x, w = inputs()
        got = run_remote(farm.request_session(farm.BOARD_KEY, tracker, timeout=120), lib, x, w)
        x86 = tiny_library("llvm", tmp_path / "tiny_x86.so")
        want = run_tiny(tvm.runtime.load_module(str(x86)), tvm.cpu(), x, w)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        session = farm.request_session(farm.BOARD_KEY, tracker, timeout=120)
        for shape in [(4, 14, 14, 3, 1, (1, 1, 1, 1)), (3, 9, 20, 3, 2, (0, 0, 1, 1)), (2, 7, 7, 5, 1, (2, 2, 2, 2)),
                      (2, 6, 37, 5, 2, (2, 2, 2, 2))]:
            check_chw_depthwise_on_board(session, shape, tmp_path)
    finally:
        assert farm.board_stop(farm.BOARD_KEY)
    assert not farm._group_members(rec["pid"])
    assert not emu_board.processes_inside(root)
    assert not emu_board.mounts_under(root)


def test_board_prerequisites_name_the_binfmt_tool(monkeypatch, tmp_path):
    """Without binfmt-support's update-binfmts the board registers qemu from qemu-user-static's own rule file; where
    neither is there, missing_prerequisites names update-binfmts (before, the build stopped on a FileNotFoundError
    after its checks had passed)."""
    which = emu_board.shutil.which
    monkeypatch.setattr(emu_board.shutil, "which", lambda tool: None if tool == "update-binfmts" else which(tool))
    monkeypatch.setattr(emu_board, "QEMU_BINFMT_LINE", tmp_path / "absent.conf")
    assert "update-binfmts" in emu_board.missing_prerequisites()
    rule = tmp_path / "qemu-aarch64.conf"
    rule.write_text(":qemu-aarch64:M::\\x7fELF:\\xff\\xff\\xff\\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF\n")
    monkeypatch.setattr(emu_board, "QEMU_BINFMT_LINE", rule)
    assert "update-binfmts" not in emu_board.missing_prerequisites()


def topk_model(path: Path) -> Path:
    """conv -> global average pool -> the 5 largest of 32 scores (values and int64 indices), saved at path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = (np.random.default_rng(0).standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("TopK", ["f", "k"], ["v", "i"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("i", TensorProto.INT64, None)],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([5], np.int64), "k")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path
