"""TIR kernels and schedule rules (see rule.py for how a function finds its schedule)."""
import tvm

# TVM 0.27 registers tirx.nearbyint (the lowering of relax.round: ONNX Round, QuantizeStepsInFloat's rounding,
# LLVM's nearbyint) without TVectorizable, so VectorizeLoop scalarised every vector loop holding one and LLVM
# vectorised the scalar loop across the outer one with gathers and scatters. Its neighbours (round, floor, exp)
# carry the attribute; LLVM has nearbyint on vectors.
if tvm.ir.Op.get("tirx.nearbyint").get_attr("TVectorizable") is None:
    tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)
