"""Run a TensorFlow Lite graph as a plain PyTorch module.

Two halves:

* ``read_tflite(path)`` parses a ``.tflite`` flatbuffer (with the PyPI ``tflite`` parser, no
  TensorFlow) into a JSON-able *graph description* and a dict of weights already in torch's
  NCHW layout. Constant sub-graphs (``DENSIFY`` of sparse weights, ``DEQUANTIZE`` of fp16
  weights) are evaluated here, exactly: densifying only moves values and fp16 → fp32 is exact.
  TFLite semantics that differ from torch (NHWC axes, 'SAME' padding that pads more at the
  bottom/right on stride 2, fused activations hidden in op options, resize sampling flags,
  depth-to-space channel order) are resolved into explicit torch-side options here, so that
* ``TFLiteGraph`` can be a readable module of real torch layers (``nn.Conv2d`` & co.) that
  walks a static op list. It has no Python control flow on tensor values, so it traces,
  compiles and exports to ONNX.

Activations are NCHW throughout; tensors of other ranks keep TFLite's axis order.

Quantised graphs (uint8/int8, per-tensor activations; weights per-tensor or per-channel) keep
their integer weights as stored, and the module reproduces the integer arithmetic that LiteRT's
default CPU path (XNNPACK) runs: each activation is carried as a float tensor holding the
integer ``q - zero_point``, every op accumulates exactly (integers below 2**24 are exact in
float32) and requantises with XNNPACK's rounding rules, so the outputs are LiteRT's own to the
last bit wherever those rules hold (checked op by op for MOSAIC R4, see dense.ports.mosaic).
Quantised outputs are returned dequantised; a quantised input is quantised on the way in.

The reader is :mod:`dense.ports.tflite_reader`, the quantised layers and TFLite's bilinear
resize are :mod:`dense.ports.tflite_quant`; this module holds ``TFLiteGraph`` and its float
layers, and ``read_tflite`` is importable from here as well.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dense.ports.tflite_quant import (
    Dequantize,
    QAdd,
    QAvgPool2d,
    QConv2d,
    Quantize,
    Requantize,
    ResizeBilinearGather,
    _f32,
)

# The reader lives in dense.ports.tflite_reader, the quantised layers in tflite_quant; the names
# callers imported from here stay importable from here.
from dense.ports.tflite_reader import _Reader as _Reader
from dense.ports.tflite_reader import read_tflite as read_tflite

# ---------------------------------------------------------------------------------------------
# The torch module


def _activation(name: str) -> nn.Module:
    layers = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "tanh": nn.Tanh}
    if name == "relu_n1_to_1":
        return nn.Hardtanh(-1.0, 1.0)
    return layers[name]()


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with TFLite's possibly asymmetric 'SAME' padding and fused activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int],
                 stride: list[int], dilation: list[int], groups: int, padding: list[int],
                 activation: str) -> None:
        left, right, top, bottom = padding
        symmetric = left == right and top == bottom
        super().__init__(in_channels, out_channels, tuple(kernel_size), tuple(stride),
                         padding=(top, left) if symmetric else 0, dilation=tuple(dilation),
                         groups=groups)
        self.extra_pad = None if symmetric else (left, right, top, bottom)
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return self.act(super().forward(x))


class Binary(nn.Module):
    """Element-wise ADD / MUL with a fused activation (NCHW broadcasting = NHWC broadcasting
    for the [1,1,1,C] squeeze-excite gates these graphs use)."""

    def __init__(self, kind: str, activation: str) -> None:
        super().__init__()
        self.kind = kind
        self.act = _activation(activation)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.act(a + b if self.kind == "add" else a * b)


class HardSwish(nn.Module):
    """TFLite's float HARD_SWISH, ``x * relu6(x + 3) / 6``, in its order of operations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.relu6(x + 3.0) / 6.0


class SpatialMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class ResizeBilinear(nn.Module):
    def __init__(self, size: list[int], align_corners: bool) -> None:
        super().__init__()
        self.size = tuple(size)
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=self.align_corners)


class Pad(nn.Module):
    """Zero padding, also along channels (BlazePose widens residual branches this way)."""

    def __init__(self, pad: list[int]) -> None:
        super().__init__()
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad)


class Reshape(nn.Module):
    """TFLite RESHAPE, which orders elements NHWC: permute 4-D tensors around it."""

    def __init__(self, shape: list[int], from_4d: bool, to_4d: bool) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.from_4d, self.to_4d = from_4d, to_4d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_4d:
            x = x.permute(0, 2, 3, 1)
        x = x.reshape(self.shape)
        return x.permute(0, 3, 1, 2) if self.to_4d else x


class Concat(nn.Module):
    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.axis)


class DepthToSpace(nn.Module):
    """TFLite DEPTH_TO_SPACE: input channel ``(i·b + j)·C + c`` goes to pixel offset (i, j) of
    output channel c. ``torch.pixel_shuffle`` reads channel ``c·b² + i·b + j`` instead."""

    def __init__(self, block_size: int) -> None:
        super().__init__()
        self.block = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b = self.block
        x = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(n, c // (b * b), h * b, w * b)


class Split(nn.Module):
    def __init__(self, axis: int, size: int) -> None:
        super().__init__()
        self.axis, self.size = axis, size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return x.split(self.size, dim=self.axis)


class ArgMax(nn.Module):
    """TFLite ARG_MAX: the first of equal maxima, like ``torch.argmax``."""

    def __init__(self, axis: int, int32: bool) -> None:
        super().__init__()
        self.axis, self.int32 = axis, int32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x.argmax(dim=self.axis)
        return index.to(torch.int32) if self.int32 else index


def _layer(spec: dict[str, Any], quant_in: list[Any] | None = None,
           quant_out: list[Any] | None = None) -> nn.Module:
    kind = spec["type"]
    options = {k: v for k, v in spec.items() if k not in ("type", "name", "inputs", "outputs")}
    if kind in ("qconv2d", "qadd", "quantize", "requantize", "dequantize"):
        return _quantized_layer(kind, options, quant_in or [], quant_out or [])
    if kind == "qavg_pool2d":
        return QAvgPool2d(options["kernel_size"], options["stride"])
    if kind == "conv2d":
        return Conv2d(**options)
    if kind == "conv_transpose2d":
        return nn.ConvTranspose2d(options["in_channels"], options["out_channels"],
                                  tuple(options["kernel_size"]), tuple(options["stride"]))
    if kind in ("add", "mul"):
        return Binary(kind, options["activation"])
    simple = {"relu": nn.ReLU, "hardswish": HardSwish, "sigmoid": nn.Sigmoid,
              "spatial_mean": SpatialMean}
    if kind in simple:
        return simple[kind]()
    if kind == "avg_pool2d":
        return nn.AvgPool2d(tuple(options["kernel_size"]), tuple(options["stride"]))
    if kind == "max_pool2d":
        return nn.MaxPool2d(tuple(options["kernel_size"]), tuple(options["stride"]))
    layers = {"resize_bilinear": ResizeBilinear, "pad": Pad, "reshape": Reshape,
              "concat": Concat, "depth_to_space": DepthToSpace, "split": Split,
              "argmax": ArgMax, "resize_bilinear_gather": ResizeBilinearGather}
    return layers[kind](**options)


def _quantized_layer(kind: str, options: dict[str, Any], quant_in: list[Any],
                     quant_out: list[Any]) -> nn.Module:
    if kind == "qconv2d":
        return QConv2d(**options, quant_in=quant_in[0], quant_out=quant_out[0])
    if kind == "qadd":
        return QAdd(options["activation"], quant_in[0], quant_in[1], quant_out[0])
    if kind == "quantize":
        return Quantize(quant_out[0])
    if kind == "requantize":
        return Requantize(quant_in[0], quant_out[0])
    return Dequantize(quant_in[0])


class TFLiteGraph(nn.Module):
    """A TFLite graph as torch layers, built from ``read_tflite``'s description.

    ``forward(x)`` takes the graph's single input in NCHW and returns the graph's outputs as
    a tuple in TFLite's output order (4-D ones NCHW). Layers with weights are named after the
    op kind and position (``conv12``, ``dwconv13``, ``deconv240``); the others are unnamed
    entries of ``ops``.

    On a quantised graph the input is a float tensor (quantised here to the input's integer
    grid) and quantised outputs come back dequantised. ``rounding=False`` keeps the integer
    graph's scales and clamps but not its rounding: the float network it approximates.
    """

    def __init__(self, graph: dict[str, Any], rounding: bool = True) -> None:
        super().__init__()
        self.graph = graph
        quant = graph.get("quant") or [None] * len(graph["shapes"])
        self.ops = nn.ModuleDict()
        self.wiring: list[tuple[str, list[int], list[int]]] = []
        for index, spec in enumerate(graph["ops"]):
            key = spec.get("name", f"op{index}")
            self.ops[key] = _layer(spec, [quant[i] for i in spec["inputs"]],
                                   [quant[i] for i in spec["outputs"]])
            if not rounding and hasattr(self.ops[key], "rounding"):
                self.ops[key].rounding = False
            self.wiring.append((key, list(spec["inputs"]), list(spec["outputs"])))
        (self.input_id,) = graph["inputs"]
        self.quantize_input = Quantize(quant[self.input_id]) if quant[self.input_id] \
            else nn.Identity()
        self.output_ids = list(graph["outputs"])
        self.output_scales = [float(_f32(quant[i][0])) if quant[i] else None
                              for i in self.output_ids]
        self.output_names = list(graph.get("output_names", []))

    def forward(self, x: torch.Tensor, integers: bool = False) -> tuple[torch.Tensor, ...]:
        """``integers``: ``x`` already holds a quantised input's integers, centred (q − z)."""
        values: dict[int, torch.Tensor] = {self.input_id: x if integers
                                           else self.quantize_input(x)}
        for key, inputs, outputs in self.wiring:
            result = self.ops[key](*[values[i] for i in inputs])
            if len(outputs) == 1:
                values[outputs[0]] = result
            else:
                values.update(zip(outputs, result, strict=True))
        return tuple(values[i] if scale is None else values[i] * scale
                     for i, scale in zip(self.output_ids, self.output_scales, strict=True))
