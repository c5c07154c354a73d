"""Silence TVM's native noise (per-constant 'Scope Saving/Loaded' warnings, a failed import's half-built BlockBuilder)
while keeping other native messages."""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
import traceback

_NOISE = ("Warning: Scope Saving:", "Warning: Scope Loaded:")


def quiet_scope_warnings():
    """Redirect fd 2 around a native call; re-print what it wrote, minus the per-constant noise."""
    return quiet_native_warnings(_NOISE)


@contextlib.contextmanager
def quiet_native_warnings(noise: tuple[str, ...]):
    """Redirect fd 2 around a native call; re-print what it wrote, minus the lines holding any of `noise`."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreter): nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not any(n in line for n in noise):
                    print(line, file=sys.stderr)


def released(err: Exception) -> Exception:
    """err without the frames it was raised through: an importer's frames hold its half-built BlockBuilder, whose
    destruction (at exit, after the one-line error) printed TVM's native 'BlockBuilder destroyed with remaining
    blocks!'. The frames go now, that warning dropped; their traceback stays as text in `err.dropped_traceback`
    (what --debug prints)."""
    err.dropped_traceback = "".join(traceback.format_exception(err))
    with quiet_native_warnings(("BlockBuilder destroyed with remaining blocks",)):
        err.__traceback__ = err.__context__ = err.__cause__ = None    # NOTE: frames freed by refcount go here,
        gc.collect()                                                   # those in cycles here
    return err
