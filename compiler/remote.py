"""Boards behind a TVM RPC tracker: sessions that fail with one clear line, libraries and kernels run there.

Talks to the tracker over its own sockets, so every call has a timeout (TVM's client can wait forever
for a board that never frees up). `shrinkc run OUT.so --rpc-tracker H:P --rpc-key K` uploads the
library, runs and times it on the board; `RemoteMeasurer` times tuning candidates the same way.
"""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import tempfile
from collections import Counter

import numpy as np

from targets.errors import ShrinkcError

RUN_REPEAT = 10          # timed runs of `shrinkc run --rpc-tracker` when --repeat is not given
SESSION_TIMEOUT = 60.0   # seconds to wait for a free board


class FarmError(ShrinkcError):
    """A farm problem the user can fix: tracker down, no such board, a board that went away."""


def parse_tracker(tracker: str) -> tuple[str, int]:
    """'host:port' -> (host, port)."""
    host, sep, port = (tracker or "").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FarmError(f"bad tracker address {tracker!r}", "write it as HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)



def _tracker_call(tracker: str, message: list, timeout: float, late: FarmError | None = None):
    """Send one JSON message to a tracker and return its answer, or raise FarmError (`late` on timeout)."""
    from tvm.rpc import base
    host, port = parse_tracker(tracker)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise FarmError(f"{tracker} answered, but it is not a TVM RPC tracker",
                                "point --tracker at the tracker's port")
            base.sendjson(sock, message)
            return base.recvjson(sock)
    except (ConnectionRefusedError, socket.gaierror) as err:
        raise FarmError(f"no RPC tracker at {tracker} ({err.strerror or err})",
                        f"start one: python tools/farm.py tracker start --port {port}") from None
    except (socket.timeout, TimeoutError):
        raise late or FarmError(f"RPC tracker at {tracker} did not answer in {timeout:g} s",
                                "check the address and that it is a TVM RPC tracker") from None
    except OSError as err:
        raise FarmError(f"cannot talk to the RPC tracker at {tracker}: {err}",
                        "check the address and that the tracker runs") from None


def tracker_summary(tracker: str, timeout: float = 5.0) -> dict:
    """The tracker's own summary: {'queue_info': {key: {free, pending}}, 'server_info': [...]}."""
    from tvm.rpc.base import TrackerCode
    answer = _tracker_call(tracker, [TrackerCode.SUMMARY], timeout)
    if answer[0] != TrackerCode.SUCCESS:
        raise FarmError(f"RPC tracker at {tracker} refused a summary: {answer}", "restart the tracker")
    return answer[1]


def registered_keys(tracker: str, timeout: float = 5.0) -> dict[str, int]:
    """Device key -> number of servers registered under it."""
    servers = tracker_summary(tracker, timeout)["server_info"]
    return dict(Counter(info["key"].split(":", 1)[1] for info in servers))  # key: 'server:rpi4-emu'



def request_session(key: str, tracker: str, timeout: float = 60.0,
                    session_timeout: float = 0, priority: int = 1):
    """A tvm.rpc.RPCSession on a board registered under `key`, or FarmError (down, unknown, busy)."""
    from tvm import rpc
    from tvm.rpc.base import TrackerCode
    keys = registered_keys(tracker, min(timeout, 5.0))
    if key not in keys:
        known = ", ".join(sorted(keys)) or "none"
        raise FarmError(f"no board registered as {key!r} at {tracker} (registered: {known})",
                        f"start one: python tools/farm.py board start --key {key}  (or server start)")
    busy = FarmError(f"every board registered as {key!r} at {tracker} stayed busy for {timeout:g} s",
                     "retry later, pass a longer timeout, or start another board under that key")
    answer = _tracker_call(tracker, [TrackerCode.REQUEST, key, "", priority], timeout, late=busy)
    if answer[0] != TrackerCode.SUCCESS:
        raise FarmError(f"RPC tracker at {tracker} refused a board for {key!r}: {answer}", "retry")
    url, port, matchkey = answer[1]
    if session_timeout:
        matchkey += f" -timeout={session_timeout}"
    try:
        return rpc.connect(url, port, matchkey)
    except Exception as err:  # TVM raises its own error types from C++
        raise FarmError(f"board {key!r} at {url}:{port} did not accept the session: {err}".splitlines()[0],
                        f"restart it: python tools/farm.py board|server stop --key {key}, then start") from None


def run_remote(args) -> int:
    """`shrinkc run OUT.so --rpc-tracker H:P --rpc-key K`: upload, run, print outputs and latency."""
    from compiler import runtime
    if not args.rpc_key:
        raise ShrinkcError("--rpc-tracker needs --rpc-key", "pass the boards' key, e.g. --rpc-key rpi4-emu")
    if not os.path.exists(args.library):
        raise ShrinkcError(f"library '{args.library}' does not exist", "compile it first with `shrinkc compile`")
    meta = runtime.read_metadata(args.library)
    inputs = runtime.random_inputs(meta["inputs"], args.seed)
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep or not os.path.exists(path):
            raise ShrinkcError(f"cannot read --input '{item}'", "write it as NAME=FILE.npy with an existing file")
        inputs[name] = np.load(path)
    session = request_session(args.rpc_key, args.rpc_tracker, SESSION_TIMEOUT)
    outputs, times = run_library(session, args.library, meta, inputs, args.repeat or RUN_REPEAT)
    with open(args.library, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    print(f"ran {args.library} (sha256 {digest}) on '{args.rpc_key}' via {args.rpc_tracker}")
    for t, o in zip(meta["outputs"], outputs):
        print(f"{t['name']}: shape {list(o.shape)} {o.dtype} checksum {float(np.sum(o, dtype=np.float64)):.6f}")
    if args.save:
        np.savez(args.save, **{t["name"]: o for t, o in zip(meta["outputs"], outputs)})
        print(f"saved outputs to {args.save}")
    print(f"latency on '{args.rpc_key}' over {len(times)} runs: min {min(times) * 1e3:.3f} ms, "
          f"median {float(np.median(times)) * 1e3:.3f} ms")
    return 0


def check_runtime_functions(session, meta: dict) -> None:
    """Every TVM runtime routine the library calls by name (OUT.json's "runtime") is on the board: one clear error
    naming the first missing one and the library that has it, before anything is uploaded."""
    from compiler import artifact
    for function in meta.get("runtime", {}).get("functions", []):
        try:
            session.get_function(function)
        except Exception:  # NOTE: a name the board lacks raises (AttributeError here, an RPC error from a board)
            lib = artifact.EXTRA_RUNTIME_LIBRARY if function.startswith(artifact.EXTRA_RUNTIME_PREFIXES) else None
            where = f" (in TVM's {lib})" if lib else ""
            raise FarmError(f"the board lacks {function}{where}, which this library calls",
                            f"start its rpc_server with --load-library /path/to/{lib or 'the library that has it'}"
                            " (tools/farm.py's boards do)") from None


def run_library(session, path: str, meta: dict, inputs: dict, repeat: int) -> tuple[list[np.ndarray], list[float]]:
    """Upload OUT.so, run `main` once on the inputs (outputs back as numpy) and time `repeat` runs."""
    import tvm
    from tvm import relax
    name = os.path.basename(path)
    check_runtime_functions(session, meta)
    try:
        session.upload(path, name)
        lib = session.load_module(name)
        dev = session.cpu(0)
        vm = relax.VirtualMachine(lib, dev)
        args = []
        for t in meta["inputs"]:
            if t["name"] not in inputs:
                raise ShrinkcError(f"no data for input '{t['name']}'", f"pass --input {t['name']}=FILE.npy")
            args.append(tvm.runtime.tensor(np.asarray(inputs[t["name"]]).astype(t["dtype"]), dev))
        # NOTE: through set_input / get_outputs, which fetch a tuple's fields one by one: a tuple a remote call returns
        # comes back as an opaque reference (a model with several outputs failed: "not iterable")
        vm.set_input("main", *args)
        vm.invoke_stateful("main")
        outputs = [o.numpy() for o in _fields(vm.get_outputs("main"))]
        timer = vm.time_evaluator("main", dev, number=1, repeat=repeat)
        times = [float(t) for t in timer(*args).results]
    except ShrinkcError:
        raise
    except Exception as err:  # TVM's RPC errors come from C++ as many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
        raise FarmError(f"running '{name}' on the board failed: {first}",
                        "check that it was compiled for that board's target (shrinkc compile --target ...)") from None
    return outputs, times


def _fields(value) -> list:
    """A VM result's tensors in order (get_outputs gives nested tuples for tuples)."""
    return [t for v in value for t in _fields(v)] if isinstance(value, tuple) else [value]


class RemoteMeasurer:
    """Times tuning candidates on a board: cross-linked export, upload, time; one reconnect on failure."""

    def __init__(self, spec, tracker: str, key: str, timeout: float = SESSION_TIMEOUT):
        self.spec, self.tracker, self.key, self.timeout = spec, tracker, key, timeout
        self.where = f"on '{key}' via {tracker}"
        self.session = request_session(key, tracker, timeout)

    def measure(self, kernel, arrays: list[np.ndarray], name: str):
        from compiler import artifact
        from compiler.tune import BoardLost
        with tempfile.TemporaryDirectory() as tmp:
            path = artifact.export_kernel(kernel, os.path.join(tmp, f"{name}.so"), self.spec)
            try:
                return self._measure(path, arrays)
            except Exception:  # a dead board or a failing kernel: another session tells which
                try:
                    self.session = request_session(self.key, self.tracker, self.timeout)
                except FarmError as err:
                    raise BoardLost(str(err)) from None
                return self._measure(path, arrays)

    def _measure(self, path: str, arrays):
        from compiler.tune import time_kernel
        name = os.path.basename(path)
        self.session.upload(path, name)
        try:
            return time_kernel(self.session.load_module(name), arrays, self.session.cpu(0))
        finally:
            self.session.remove(name)

    def close(self) -> None:
        self.session = None
