"""The device farm on one machine: TVM's RPC tracker, host RPC servers and emulated aarch64 boards.

    python tools/farm.py tracker start|stop|status [--port 9190] [--host 127.0.0.1]
    python tools/farm.py server start|stop --key KEY [--tracker 127.0.0.1:9190]
    python tools/farm.py board build [--force] | start|stop --key KEY [--tracker ...] | status

Each process runs in its own process group; stop kills the group (rpc_server's popen_worker child
would keep the port). PIDs and logs: SHRINKC_FARM_DIR, default .cache/farm/ under the repo root.
`request_session(key)` gives a `tvm.rpc.RPCSession` or one clear FarmError, never a hang.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
for _p in (str(TOOLS), str(ROOT)):  # emu_board beside us; targets/ when shrinkc is not installed
    if _p not in sys.path:
        sys.path.append(_p)

from targets.errors import ShrinkcError  # noqa: E402
from compiler.remote import FarmError, parse_tracker, registered_keys, request_session, tracker_summary  # noqa: E402,F401

DEFAULT_TRACKER = "127.0.0.1:9190"
BOARD_KEY = "rpi4-emu"
BOARD_START_TIMEOUT = 300.0  # python + TVM import under qemu: tens of seconds on a busy 2-core host
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHILDREN: dict[int, subprocess.Popen] = {}  # processes started by this interpreter, reaped on stop


# ---- state: one JSON record per process ------------------------------------------------------

def state_dir() -> Path:
    path = Path(os.environ.get("SHRINKC_FARM_DIR") or ROOT / ".cache" / "farm")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load(name: str) -> dict | None:
    try:
        return json.loads((state_dir() / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key or ""):
        raise FarmError(f"bad device key {key!r}", "use letters, digits, '.', '_' or '-', e.g. rpi4-emu")
    return key


# ---- process groups --------------------------------------------------------------------------

def _stat(path: Path) -> list[str]:
    """Fields of /proc/.../stat after the command name: state, ppid, pgrp, ..."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ["X", "0", "0"]


def _thread_states(proc: Path) -> list[str]:
    """The state letter of each thread of /proc/PID; [] once the process is gone (it can exit while we look)."""
    try:
        tasks = list((proc / "task").iterdir())
    except OSError:
        return []
    return [_stat(t / "stat")[0] for t in tasks]


def _group_members(pgid: int) -> list[int]:
    """Processes in a process group that still run. NOTE: a multi-threaded process whose main thread
    has exited shows 'Z' while its other threads still hold its sockets, so look at every thread."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(_stat(entry / "stat")[2]) == pgid:
            if any(state not in "ZX" for state in _thread_states(entry)):
                members.append(int(entry.name))
    return members


def _alive(rec: dict | None) -> bool:
    """The record's group still runs, and is ours (a TVM process), not a reused PID."""
    def ours(pid):
        try:
            return b"tvm.exec." in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
    return bool(rec) and any(ours(pid) for pid in _group_members(rec["pid"]))


def _running(rec: dict) -> bool:
    """The record's group still runs. A group this interpreter started counts while any member runs, whatever its
    command line: a process in the middle of exec shows an empty one (the board's chroot turning into qemu did, and
    its start was once called dead)."""
    if rec["pid"] in _CHILDREN:
        return bool(_group_members(rec["pid"]))
    return _alive(rec)


def _spawn(name: str, argv: list[str], env: dict | None = None, **extra) -> dict:
    """Start argv as the leader of a new process group (setsid), logging to NAME.log."""
    log = state_dir() / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    _CHILDREN[proc.pid] = proc
    rec = {"name": name, "pid": proc.pid, "argv": argv, "log": str(log), "started": time.time(), **extra}
    (state_dir() / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def _stop(name: str, timeout: float = 10.0) -> bool:
    """SIGTERM the record's process group, SIGKILL what is left after `timeout`; True if it ran."""
    rec = _load(name)
    (state_dir() / f"{name}.json").unlink(missing_ok=True)
    if not rec:
        return False
    # NOTE: a group this interpreter started is ours even where _alive cannot tell (its leader gone, what is left
    # unrecognised): while any member runs, Linux does not hand its PGID to another process
    pgid, ran = rec["pid"], _running(rec)
    if ran:
        _kill_group(pgid, timeout)
    if (child := _CHILDREN.pop(pgid, None)) is not None:
        child.poll()
    return ran


def _kill_group(pgid: int, timeout: float) -> None:
    """SIGTERM the group, SIGKILL what is left after `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while _group_members(pgid) and time.time() < deadline:
            time.sleep(0.1)
        if not _group_members(pgid):
            break


def _log_tail(rec: dict, lines: int = 8) -> str:
    log = Path(rec["log"])
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def _wait(what: str, rec: dict, ready, timeout: float) -> None:
    """Poll ready() until true; stop the process and explain if it dies, time runs out or ready() fails."""
    deadline = time.time() + timeout
    try:
        while not ready():
            if not _running(rec):
                raise FarmError(f"{what} exited at start; its log ({rec['log']}) ends:\n{_log_tail(rec)}",
                                "fix what the log says and start it again")
            if time.time() > deadline:
                raise FarmError(f"{what} not ready after {timeout:.0f} s; stopped it. Log ends:\n{_log_tail(rec)}",
                                "see the log; a busy machine may need a longer timeout")
            time.sleep(0.3)
    except BaseException:
        _stop(rec["name"])
        raise


# ---- talking to a tracker: compiler/remote.py (tracker_summary, registered_keys, request_session) -----

def wait_for_key(key: str, tracker: str = DEFAULT_TRACKER, timeout: float = 30.0) -> None:
    """Block until a server registers under `key`; FarmError after `timeout` seconds."""
    deadline = time.time() + timeout
    while key not in registered_keys(tracker):
        if time.time() > deadline:
            raise FarmError(f"no server registered as {key!r} at {tracker} within {timeout:g} s",
                            f"start one: python tools/farm.py server start --key {key}")
        time.sleep(0.3)


# ---- tracker and host servers ----------------------------------------------------------------

def tracker_start(port: int = 9190, host: str = "127.0.0.1", timeout: float = 20.0) -> dict:
    """Start TVM's rpc_tracker (or return the running one); returns its record."""
    if _alive(rec := _load("tracker")):
        if rec["port"] != port:
            raise FarmError(f"a tracker already runs on port {rec['port']}", "python tools/farm.py tracker stop")
        return rec
    addr = f"{host}:{port}"
    if _answers(addr):
        raise FarmError(f"another RPC tracker already serves {addr}", "use it, stop it, or pick another --port")
    # --port-end port+1: bind exactly `port` or fail, never drift to the next free one.
    rec = _spawn("tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                             "--port-end", str(port + 1)], host=host, port=port, tracker=addr)
    _wait(f"RPC tracker on {addr}", rec, lambda: _answers(addr), timeout)
    return rec


def _answers(tracker: str) -> bool:
    try:
        tracker_summary(tracker, timeout=2.0)
        return True
    except FarmError:
        return False


def tracker_stop() -> bool:
    return _stop("tracker")


def tracker_status() -> dict | None:
    """The running tracker's record plus 'keys' (what is registered), or None."""
    if not _alive(rec := _load("tracker")):
        return None
    try:
        rec["keys"] = registered_keys(rec["tracker"])
    except FarmError as err:
        rec["error"] = str(err)
    return rec


def _start_server(name: str, key: str, tracker: str, argv: list[str], timeout: float, env=None) -> dict:
    if _alive(rec := _load(name)):
        return rec
    before = registered_keys(tracker).get(key, 0)  # fails clearly now if the tracker is down
    rec = _spawn(name, argv, env=env, key=key, tracker=tracker)
    try:
        _wait(f"RPC server {key!r}", rec, lambda: registered_keys(tracker).get(key, 0) > before, timeout)
    except FarmError as err:  # say whether the tracker it was to register with is still there
        state = "still answers" if _answers(tracker) else "no longer answers (see the tracker's log)"
        raise FarmError(f"{err.what}\nThe tracker at {tracker} {state}.", err.fix) from None
    return rec


def server_start(key: str, tracker: str = DEFAULT_TRACKER, timeout: float = 30.0, port: int = 9090,
                 instance: str = "") -> dict:
    """Start an x86 rpc_server on this host (first free port from `port` on), registered under `key`;
    `instance` names a second (third...) server under the same key."""
    argv = [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", tracker, "--key", _check_key(key),
            "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 100)]
    return _start_server(_server_name(key, instance), key, tracker, argv, timeout)


def server_stop(key: str, instance: str = "") -> bool:
    return _stop(_server_name(key, instance))


def _server_name(key: str, instance: str) -> str:
    return f"server-{_check_key(key)}" + (f"-{_check_key(instance)}" if instance else "")


# ---- emulated boards ---------------------------------------------------------------------------

def board_build(force: bool = False, log=print) -> Path:
    import emu_board
    return emu_board.build(force=force, log=log)


def board_start(key: str = BOARD_KEY, tracker: str = DEFAULT_TRACKER, timeout: float = BOARD_START_TIMEOUT,
                log=print) -> dict:
    """Start rpc_server inside the aarch64 rootfs under qemu, registered under `key`."""
    import emu_board
    if _alive(rec := _load(f"board-{_check_key(key)}")):
        return rec
    if not emu_board.is_built() and not emu_board.tarball().is_file():
        raise FarmError("the emulated board's rootfs is not built", "python tools/farm.py board build")
    registered_keys(tracker)  # a down tracker fails here, before anything is mounted
    root = emu_board.build(log=log)  # unpacks the cached tarball if needed
    emu_board.mount(root, log)
    try:
        return _start_server(f"board-{key}", key, tracker, emu_board.server_argv(root, key, tracker),
                             timeout, env=emu_board.CHROOT_ENV)
    except BaseException:
        emu_board.unmount(root, log)
        raise


def board_stop(key: str = BOARD_KEY, log=print) -> bool:
    import emu_board
    ran = _stop(f"board-{_check_key(key)}")
    if emu_board.rootfs().is_dir():
        emu_board.unmount(emu_board.rootfs(), log)
    return ran


def board_status() -> dict:
    import emu_board
    records = [_load(path.stem) for path in state_dir().glob("board-*.json")]
    boards = {r["key"]: {"pid": r["pid"], "alive": _alive(r), "tracker": r["tracker"]} for r in records if r}
    return {"built": emu_board.is_built(), "rootfs": str(emu_board.rootfs()), "tarball": str(emu_board.tarball()),
            "cached": emu_board.tarball().is_file(), "mounts": emu_board.mounts_under(emu_board.rootfs()),
            "missing": emu_board.missing_prerequisites(), "boards": boards}


# ---- CLI -------------------------------------------------------------------------------------

def _cli(args) -> int:
    if args.what == "tracker":
        if args.action == "start":
            rec = tracker_start(args.port, args.host)
            print(f"tracker running on {rec['tracker']} (pid {rec['pid']}, log {rec['log']})")
        elif args.action == "stop":
            print("tracker stopped" if tracker_stop() else "no tracker was running")
        else:
            rec = tracker_status()
            print(json.dumps(rec, indent=1) if rec else "no tracker running")
            return 0 if rec else 1
    elif args.what == "server":
        if args.action == "start":
            rec = server_start(args.key, args.tracker)
            print(f"server {args.key!r} registered at {args.tracker} (pid {rec['pid']}, log {rec['log']})")
        else:
            print(f"server {args.key!r} stopped" if server_stop(args.key) else f"no server {args.key!r} was running")
    else:
        t0 = time.time()
        if args.action == "build":
            print(f"rootfs ready: {board_build(args.force)} ({time.time() - t0:.0f} s)")
        elif args.action == "start":
            rec = board_start(args.key, args.tracker)
            print(f"board {args.key!r} registered at {args.tracker} in {time.time() - t0:.0f} s "
                  f"(pid {rec['pid']}, log {rec['log']})")
        elif args.action == "stop":
            print(f"board {args.key!r} stopped" if board_stop(args.key) else f"no board {args.key!r} was running")
        else:
            print(json.dumps(board_status(), indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="farm.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    tracker = sub.add_parser("tracker", help="TVM's RPC tracker")
    tracker.add_argument("action", choices=["start", "stop", "status"])
    tracker.add_argument("--port", type=int, default=9190)
    tracker.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    for name, actions, key, about in (("server", ["start", "stop"], None, "x86 RPC server on this host"),
                                      ("board", ["build", "start", "stop", "status"], BOARD_KEY, "emulated aarch64 board (qemu)")):
        p = sub.add_parser(name, help=about)
        p.add_argument("action", choices=actions)
        p.add_argument("--key", required=key is None, default=key, help="device key in the tracker")
        p.add_argument("--tracker", default=DEFAULT_TRACKER, help="HOST:PORT of the tracker")
        if name == "board":
            p.add_argument("--force", action="store_true", help="build: rebuild from scratch, ignore the cache")
    args = parser.parse_args(argv)
    try:
        return _cli(args)
    except ShrinkcError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
