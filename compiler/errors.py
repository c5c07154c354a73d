"""The user-facing error type, re-exported for the compiler's callers (defined in targets/errors.py)."""
from targets.errors import ShrinkcError

__all__ = ["ShrinkcError"]
