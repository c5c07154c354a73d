"""KeepTilesOnStack: mark small constant-size TIR allocations to stay stack arrays that LLVM keeps in registers.

TVM 0.27's LowerTVMBuiltin turns every allocation that is not `global` scope and under 1 KB into a
TVMBackendAllocWorkspace call (a heap allocation, and then a memset, per tile). A register tile of
21 AVX-512 accumulators is 1344 bytes. Allocations up to MAX_STACK_BYTES get the
`disable_lower_builtin` annotation, so they stay allocas that LLVM promotes to registers.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

NAME = "KeepTilesOnStack"
MAX_STACK_BYTES = 16 * 1024   # per parallel task; TVM's pool threads have megabytes of stack
_ANNOTATION = "disable_lower_builtin"


def _constant_bytes(buffer) -> int | None:
    size = 1
    for d in buffer.shape:
        if not isinstance(d, tirx.IntImm):
            return None
        size *= int(d)
    return size * tvm.DataType(str(buffer.dtype)).bits // 8


def _mark(node):
    # AllocBuffer(tile[21, 16]) -> AllocBuffer(tile[21, 16], {disable_lower_builtin: 1})
    nbytes = _constant_bytes(node.buffer)
    if nbytes is None or nbytes > MAX_STACK_BYTES:
        return node
    annotations = dict(node.annotations) if node.annotations else {}
    annotations[_ANNOTATION] = tirx.IntImm("int32", 1)
    return tirx.AllocBuffer(node.buffer, annotations, node.span)


@tirx.transform.prim_func_pass(opt_level=0, name=NAME)
def KeepTilesOnStack(func, _mod, _ctx):  # noqa: N802 (a pass, named like TVM's)
    """Mark small constant-size TIR allocations to stay stack arrays that LLVM keeps in registers."""
    return tvm_ffi.structural_map(func, [(tirx.AllocBuffer, _mark)])
