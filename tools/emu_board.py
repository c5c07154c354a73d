"""An emulated aarch64 board: a Debian arm64 rootfs with TVM's runtime, run under qemu-user.

Build once (debootstrap + the aarch64 TVM wheels), pack it as .tar.zst in a cache dir, unpack it
on later builds. `tools/farm.py board ...` starts TVM's rpc_server inside it; this module only
knows the rootfs: building it, mounting what the server needs, and the command that runs it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from targets.errors import ShrinkcError

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DEB_PACKAGES = ["python3", "python3-venv", "python3-pip"]
PY_VERSION = "3.11"  # bookworm's python3; the wheels below are picked for it
WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0", "numpy", "tornado",
          "cloudpickle", "psutil"]
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
VENV = "/opt/tvm-venv"
SITE = f"{VENV}/lib/python{PY_VERSION}/site-packages"
# NOTE: without this library MetaSchedule's measurements fail (random_fill_for_measure not found).
EXTRA_LIB = f"{SITE}/tvm/lib/libtvm_runtime_extra.so"
TAG = "bookworm-arm64-tvm0.27.0.post1-ffi0.1.14.post0"  # change it when the contents change
MARKER = ".shrinkc-board.json"
MOUNTS = ["proc", "dev", "dev/shm"]  # mounted in this order, unmounted in reverse
# Commands inside the rootfs get a clean environment: the host's TMPDIR, venv or PYTHONPATH mean nothing there.
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
              "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive"}


def cache_dir() -> Path:
    """Where the packed rootfs lives (env SHRINKC_BOARD_CACHE, default ~/.cache/shrinkc)."""
    return Path(os.environ.get("SHRINKC_BOARD_CACHE") or Path.home() / ".cache" / "shrinkc")


def tarball() -> Path:
    return cache_dir() / f"rootfs-{TAG}.tar.zst"


def rootfs() -> Path:
    """The unpacked rootfs; kept beside the tarball, never under a test's temp dir."""
    return cache_dir() / f"rootfs-{TAG}"


QEMU_BINFMT_LINE = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")   # qemu-user-static's rule, where binfmt-support is absent


def missing_prerequisites() -> list[str]:
    """What this machine lacks to build or run the board (empty when it can)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (chroot and mount need it)")
    for tool in ("debootstrap", "qemu-aarch64-static", "chroot", "zstd", "tar"):
        if not shutil.which(tool):
            missing.append(tool)
    if not shutil.which("update-binfmts") and not QEMU_BINFMT_LINE.is_file():
        missing.append("update-binfmts")
    if not Path("/proc/sys/fs/binfmt_misc").is_dir():
        missing.append("binfmt_misc in the kernel")
    return missing


def _run(argv: list[str], what: str, log=print, **kw) -> None:
    t0 = time.time()
    log(f"[board] {what}: {' '.join(argv)}")
    if argv[0] == "chroot":
        kw.setdefault("env", CHROOT_ENV)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if proc.returncode:
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        raise ShrinkcError(f"board build: {what} failed (exit {proc.returncode}):\n{tail}",
                           "fix the cause shown, then rerun: python tools/farm.py board build")
    last = proc.stdout.strip().splitlines()[-1:] or [""]
    log(f"[board] {what}: done in {time.time() - t0:.0f} s {last[0][:100]}".rstrip())


def ensure_binfmt(log=print) -> None:
    """Make the kernel run aarch64 ELF files through qemu-aarch64-static."""
    if missing := missing_prerequisites():
        raise ShrinkcError(f"emulated board needs: {', '.join(missing)}",
                           "apt-get install debootstrap qemu-user-static binfmt-support zstd; run as root")
    bm = Path("/proc/sys/fs/binfmt_misc")
    if not (bm / "register").exists():
        _run(["mount", "binfmt_misc", "-t", "binfmt_misc", str(bm)], "mount binfmt_misc", log)
    entry = bm / "qemu-aarch64"
    if entry.exists() and entry.read_text().startswith("enabled"):
        return
    if shutil.which("update-binfmts"):
        _run(["update-binfmts", "--enable", "qemu-aarch64"], "enable qemu-aarch64", log)
    elif entry.exists():
        log("[board] enable qemu-aarch64: echo 1 > " + str(entry))
        entry.write_text("1")
    else:   # no binfmt-support: the rule qemu-user-static ships for systemd-binfmt is the kernel's register format
        log(f"[board] register qemu-aarch64 from {QEMU_BINFMT_LINE}")
        (bm / "register").write_text(QEMU_BINFMT_LINE.read_text().strip())


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest last as the kernel lists them."""
    prefix = str(path.resolve())
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return points


def _remove_tree(path: Path) -> None:
    unmount(path)  # e.g. what an interrupted debootstrap left mounted
    # NOTE: never rm -rf a rootfs with /dev or /proc still bound inside it.
    if mounts_under(path):
        raise ShrinkcError(f"{path} still has mounts: {mounts_under(path)}",
                           "stop its boards first: python tools/farm.py board stop --key KEY")
    shutil.rmtree(path, ignore_errors=False)


def is_built() -> bool:
    return (rootfs() / MARKER).is_file()


def build(force: bool = False, log=print) -> Path:
    """The board's rootfs, ready to chroot into: as it is, unpacked from the cache, or built."""
    root = rootfs()
    if is_built() and not force:
        log(f"[board] rootfs ready at {root}")
        return root
    ensure_binfmt(log)
    work = root.with_name(root.name + ".partial")
    for stale in (work, root):
        if stale.exists():
            _remove_tree(stale)
    work.mkdir(parents=True)
    if tarball().is_file() and not force:
        _run(["tar", "--numeric-owner", "-I", "zstd -T0", "-xpf", str(tarball()), "-C", str(work)],
             f"unpack {tarball()}", log)
    else:
        _bootstrap(work, log)
        _pack(work, log)
    work.rename(root)
    return root


def _bootstrap(work: Path, log) -> None:
    """debootstrap in two stages (the second under qemu), then the TVM venv from aarch64 wheels."""
    _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
          f"--include={','.join(DEB_PACKAGES)}", SUITE, str(work), MIRROR], "debootstrap stage 1", log)
    shutil.copy2(shutil.which("qemu-aarch64-static"), work / "usr/bin/qemu-aarch64-static")
    _run(["chroot", str(work), "/debootstrap/debootstrap", "--second-stage"], "debootstrap stage 2 (emulated)", log)
    # The venv sees Debian's pip (system site packages) but gets its wheels from the host's pip:
    # resolving and unpacking natively takes seconds where pip under qemu takes minutes.
    _run(["chroot", str(work), "/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", VENV],
         "create venv (emulated)", log)
    site = work / SITE.lstrip("/")
    if not site.is_dir():
        raise ShrinkcError(f"board build: {site} missing; the rootfs's python is not {PY_VERSION}",
                           f"update PY_VERSION in {__file__}")
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-warn-script-location", "--target", str(site),
          "--only-binary=:all:", "--implementation", "cp", "--python-version", PY_VERSION, *platforms, *WHEELS],
         "install aarch64 wheels", log)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for f in (work / junk).glob("*"):
            if f.is_file():
                f.unlink()
    with mounted(work, log):
        _run(["chroot", str(work), f"{VENV}/bin/python", "-c",
              "import tvm, tvm.rpc, numpy; print(tvm.__version__, numpy.__version__)"],
             "check tvm imports (emulated)", log)
    (work / MARKER).write_text(json.dumps({"tag": TAG, "wheels": WHEELS, "built": time.ctime()}) + "\n")


def _pack(work: Path, log) -> None:
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = tarball().with_name(tarball().name + ".tmp")
    _run(["tar", "--numeric-owner", "-I", "zstd -T0", "-cf", str(tmp), "-C", str(work), "."],
         f"pack {tarball()}", log)
    tmp.rename(tarball())
    log(f"[board] cached {tarball()} ({tarball().stat().st_size / 2**20:.0f} MiB)")


def mount(root: Path, log=print) -> None:
    """Bind what a server needs: /proc, /dev (kept from sending mounts back to the host), /dev/shm."""
    ensure_binfmt(log)
    steps = {"proc": [["mount", "-t", "proc", "proc"]],
             "dev": [["mount", "--bind", "/dev"], ["mount", "--make-rslave"]],
             "dev/shm": [["mount", "-t", "tmpfs", "tmpfs"]]}
    have = set(mounts_under(root))
    for sub in MOUNTS:
        point = root / sub
        if str(point.resolve()) in have:
            continue
        point.mkdir(parents=True, exist_ok=True)
        for argv in steps[sub]:
            proc = subprocess.run([*argv, str(point)], capture_output=True, text=True)
            if proc.returncode:
                unmount(root, log)  # what was mounted before this step
                raise ShrinkcError(f"cannot mount /{sub} in {root}: {proc.stderr.strip()}",
                                   "run as root on a machine that allows mounts")
    log(f"[board] mounted /{', /'.join(MOUNTS)} in {root}")


def processes_inside(root: Path) -> list[int]:
    """PIDs whose root directory is this rootfs (a board's server and its workers)."""
    target, pids = str(root.resolve()), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == target:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def unmount(root: Path, log=print) -> None:
    """Undo `mount`, unless a process still runs inside the rootfs (another board)."""
    if processes_inside(root):
        log(f"[board] {root} still in use; mounts kept")
        return
    for point in reversed(mounts_under(root)):
        proc = subprocess.run(["umount", point], capture_output=True, text=True)
        if proc.returncode:
            subprocess.run(["umount", "--lazy", point], capture_output=True)
    if left := mounts_under(root):
        raise ShrinkcError(f"could not unmount {left}", f"umount --lazy {' '.join(left)}")


@contextlib.contextmanager
def mounted(root: Path, log=print):
    """The rootfs mounted for the duration of a `with` block."""
    mount(root, log)
    try:
        yield root
    finally:
        unmount(root, log)


def server_argv(root: Path, key: str, tracker: str, port: int = 9090) -> list[str]:
    """The command that runs TVM's rpc_server inside the rootfs, emulated, registered under `key`."""
    return ["chroot", str(root), f"{VENV}/bin/python", "-m", "tvm.exec.rpc_server", "--tracker", tracker,
            "--key", key, "--host", "127.0.0.1", "--port", str(port), "--load-library", EXTRA_LIB]
