"""Multiply-accumulates of PyNET's convolutions, counted from the Keras graph (the benchmarks' GFLOP/s)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ConvLayer, MultiConvBlock, UpConv, graph_inputs, level_output, scale_of  # noqa: E402


def conv_macs(model, height, width, level=None, batch=1):
    """Multiply-accumulates of every convolution of ``model`` for a packed input of
    ``height`` x ``width``, counted from the layers' shapes: k*k*Cin*Cout per output pixel
    of a convolution and per input pixel of a transposed one. ``level=None`` counts all the
    outputs' graphs (what the reference counts, 335.8 GMAC at 224 x 224), a level only what
    its output needs."""
    outputs = model.outputs if level is None else [level_output(model, level)]
    memo, counted, todo, total = {}, set(), list(outputs), 0
    while todo:
        tensor = todo.pop()
        if id(tensor) in counted:
            continue
        counted.add(id(tensor))
        op, inputs = graph_inputs(tensor)
        todo.extend(inputs)
        if not inputs:
            continue
        scale = scale_of(inputs[0], memo)
        cin = int(inputs[0].shape[-1])
        pixels = batch * int(height * scale) * int(width * scale)
        if isinstance(op, MultiConvBlock):
            total += pixels * sum(size * size * (cin + op.filters) * op.filters
                                  for size in range(3, op.max_size + 1, 2))
        elif isinstance(op, ConvLayer):
            total += pixels * op.kernel_size ** 2 * cin * op.filters
        elif isinstance(op, UpConv):
            total += pixels * 9 * cin * op.filters
    return total
