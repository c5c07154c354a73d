"""TIR kernels and schedule rules (see rule.py for how a function finds its schedule)."""
import inspect

import tvm

# TVM 0.27 registers tirx.nearbyint (the lowering of relax.round: ONNX Round, QuantizeStepsInFloat's rounding,
# LLVM's nearbyint) without TVectorizable, so VectorizeLoop scalarised every vector loop holding one and LLVM
# vectorised the scalar loop across the outer one with gathers and scatters. Its neighbours (round, floor, exp)
# carry the attribute; LLVM has nearbyint on vectors.
if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
    tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)

# TVMScript finds the parser a T.macro call belongs to with inspect.getouterframes, which reads a source line for
# every frame on the stack: each macro call inside a kernel built from a pass (a stack hundreds of frames deep)
# took tens of milliseconds, most of a sparse model's compile time (an spmm kernel makes ~17 macro calls).
# The same search, the first frame out whose globals hold the parser, walked without reading any source:
from tvm.script.parser.core.parser import ScriptMacro as _ScriptMacro  # noqa: E402


def _find_parser_def(self):
    frame = inspect.currentframe()
    while frame is not None:
        parser = frame.f_globals.get(_ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{_ScriptMacro.parser_object_name} not available")


if hasattr(_ScriptMacro, "_find_parser_def"):
    _ScriptMacro._find_parser_def = _find_parser_def
