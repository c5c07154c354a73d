"""The one exception type a user can cause; the CLI prints it as one line and exits 2.

It lives at the bottom of the import graph (targets/) so every layer can raise it.
"""
from __future__ import annotations

import contextvars

_LAST: contextvars.ContextVar["ShrinkcError | None"] = contextvars.ContextVar("shrinkc_last_error", default=None)


class ShrinkcError(Exception):
    """A problem with the user's input or machine, with the fix to apply.

    `what` names the problem (the file, the op and node, the target, ...), `fix` says what to do.
    """

    def __init__(self, what: str, fix: str = ""):
        self.what = what
        self.fix = fix
        super().__init__(f"{what}" + (f" (fix: {fix})" if fix else ""))
        _LAST.set(self)


def restored(err: Exception) -> Exception:
    """The ShrinkcError behind `err` when a TVM pass raised one (it crosses TVM's FFI as a RuntimeError)."""
    last = _LAST.get()
    if isinstance(err, ShrinkcError) or last is None or str(last) not in str(err):
        return err
    return last
