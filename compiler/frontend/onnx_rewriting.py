"""Helpers of the ONNX-level rewrites done before import (onnx_integer_ops, onnx_qoperators)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def constants(g: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The graph's initializers and Constant nodes' values by name."""
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return consts


class NodeBuilder:
    """New nodes and initializers for a graph, under names the graph does not use yet; node names end in `tag`."""

    def __init__(self, g: onnx.GraphProto, tag: str):
        self.tag, self.nodes, self.inits = tag, [], []
        self.taken = {o for n in g.node for o in n.output} | {t.name for t in g.initializer} | \
            {v.name for v in g.input}

    def name(self, base: str) -> str:
        k, out = 0, base
        while out in self.taken:
            k += 1
            out = f"{base}_{k}"
        self.taken.add(out)
        return out

    def const(self, base: str, value) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, output: str | None = None, **attrs) -> str:
        """A node writing `output`, or a fresh name made from `base`; returns the name."""
        out = output or self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{out}__{self.tag}", **attrs))
        return out


def drop_unread_initializers(g: onnx.GraphProto) -> None:
    """Remove the initializers no node or graph output reads (weights a rewrite replaced by float copies)."""
    read = {i for n in g.node for i in n.input} | {v.name for v in g.output}
    for t in [t for t in g.initializer if t.name not in read]:
        g.initializer.remove(t)
