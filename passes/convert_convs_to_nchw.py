"""ConvertConvsToNCHW: convs in NHWC/OHWI (TFLite) become NCHW/OIHW, transposed convs NCHW/IOHW; a model already
in NCHW is left alone."""
from __future__ import annotations

import tvm
from tvm import relax

# NOTE: TVM's ConvertLayout infers a layout for every op of the function, and some it cannot handle
# (tuples from Dropout, 5-D stacks, ...) crash it even when no conv needs converting: run it only
# where a conv really is in another layout.


LAYOUTS = {"relax.nn.conv2d": ("OIHW", "NCHW"), "relax.nn.conv2d_transpose": ("IOHW", "NCHW")}


def _convs_not_nchw(func: relax.Function) -> bool:
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in LAYOUTS:
            a = expr.attrs
            if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", *LAYOUTS[expr.op.name]):
                found.append(expr)

    relax.analysis.post_order_visit(func.body, visit)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="ConvertConvsToNCHW")
class ConvertConvsToNCHW:
    """Convs in NHWC/OHWI (TFLite) become NCHW/OIHW, transposed convs NCHW/IOHW; NCHW models are left alone."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        if not any(isinstance(f, relax.Function) and _convs_not_nchw(f) for f in mod.functions.values()):
            return mod
        return relax.transform.ConvertLayout({op: ["NCHW", kernel] for op, (kernel, _) in LAYOUTS.items()})(mod)
