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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Reading the flatbuffer

_ACTIVATIONS = {0: "none", 1: "relu", 2: "relu_n1_to_1", 3: "relu6", 4: "tanh"}
_NUMPY_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}
_SAME, _VALID = 0, 1  # tflite.Padding


def _nchw(shape: list[int]) -> list[int]:
    return [shape[0], shape[3], shape[1], shape[2]] if len(shape) == 4 else list(shape)


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TFLite 'SAME' padding along one axis: the odd pixel goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _densify(tensor: Any, values: np.ndarray) -> np.ndarray:
    """Expand a sparse (TACO-format) constant to a dense array.

    Walks the dimension metadata in traversal order: a DENSE level multiplies the position by
    its size, a SPARSE_CSR level reads [segment start, end) from ``array_segments`` and the
    coordinates from ``array_indices``. Block-sparse tensors are not used by the models here.
    """
    import tflite

    sparsity = tensor.Sparsity()
    order = sparsity.TraversalOrderAsNumpy().tolist()
    if sparsity.BlockMapLength() or order != sorted(order):
        raise NotImplementedError("block-sparse or reordered sparse tensors are not supported")
    shape = tensor.ShapeAsNumpy().tolist()
    levels = []
    for i in range(sparsity.DimMetadataLength()):
        meta = sparsity.DimMetadata(i)
        if meta.Format() == tflite.DimensionType.DENSE:
            levels.append(("dense", meta.DenseSize()))
        else:
            levels.append(("csr", _int_vector(meta.ArraySegments(), meta.ArraySegmentsType()),
                           _int_vector(meta.ArrayIndices(), meta.ArrayIndicesType())))
    dense = np.zeros(shape, dtype=values.dtype)

    def walk(level: int, position: int, coords: tuple[int, ...]) -> None:
        if level == len(levels):
            dense[coords] = values[position]
            return
        kind, *data = levels[level]
        if kind == "dense":
            for i in range(data[0]):
                walk(level + 1, position * data[0] + i, (*coords, i))
        else:
            segments, indices = data
            for k in range(segments[position], segments[position + 1]):
                walk(level + 1, k, (*coords, int(indices[k])))

    walk(0, 0, ())
    return dense


def _int_vector(table: Any, kind: int) -> np.ndarray:
    """Read a ``SparseIndexVector`` union member (int32, uint16 or uint8 values)."""
    import tflite

    cls = {1: tflite.Int32Vector, 2: tflite.Uint16Vector, 3: tflite.Uint8Vector}[kind]
    vector = cls()
    vector.Init(table.Bytes, table.Pos)
    return vector.ValuesAsNumpy()


class _Reader:
    """Turns one subgraph into ops over integer tensor ids, folding constants on the way."""

    def __init__(self, path: Path) -> None:
        import tflite
        from tflite.BuiltinOperator import BuiltinOperator

        self.tflite = tflite
        self.model = tflite.Model.GetRootAsModel(Path(path).read_bytes(), 0)
        self.graph = self.model.Subgraphs(0)
        self.op_names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
        self.constants: dict[int, np.ndarray] = {}  # tflite tensor index → value (NHWC)
        self.source_dtypes: dict[int, str] = {}  # constant index → dtype in the file
        self.ids: dict[int, int] = {}  # tflite tensor index → our activation id
        self.shapes: list[list[int]] = []
        self.ops: list[dict[str, Any]] = []
        self.weights: dict[str, np.ndarray] = {}
        self.weight_dtypes: dict[str, str] = {}

    # tensors ---------------------------------------------------------------------------------

    def tensor(self, index: int) -> Any:
        return self.graph.Tensors(index)

    def shape(self, index: int) -> list[int]:
        tensor = self.tensor(index)
        return tensor.ShapeAsNumpy().tolist() if tensor.ShapeLength() else []

    def buffer_value(self, index: int) -> np.ndarray | None:
        tensor = self.tensor(index)
        buffer = self.model.Buffers(tensor.Buffer())
        if buffer is None or buffer.DataLength() == 0:
            return None
        raw = buffer.DataAsNumpy().tobytes()
        values = np.frombuffer(raw, dtype=_NUMPY_TYPES[tensor.Type()]).copy()
        self.source_dtypes[index] = str(values.dtype)
        if tensor.Sparsity() is not None:
            return values  # still compressed; DENSIFY expands it
        return values.reshape(self.shape(index))

    def constant(self, index: int) -> np.ndarray | None:
        if index not in self.constants:
            value = self.buffer_value(index)
            if value is None:
                return None
            self.constants[index] = value
        return self.constants[index]

    def activation(self, index: int) -> int:
        if index not in self.ids:
            self.ids[index] = len(self.shapes)
            self.shapes.append(_nchw(self.shape(index)))
        return self.ids[index]

    def add_weight(self, name: str, value: np.ndarray, source: int) -> None:
        name = "ops." + name  # the key TFLiteGraph.state_dict() uses
        self.weights[name] = np.ascontiguousarray(value.astype(np.float32))
        self.weight_dtypes[name] = self.source_dtypes.get(source, "float32")

    # ops -------------------------------------------------------------------------------------

    def options(self, op: Any, cls_name: str) -> Any:
        cls = getattr(self.tflite, cls_name)
        options = cls()
        table = op.BuiltinOptions()
        options.Init(table.Bytes, table.Pos)
        return options

    def read(self) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
        graph = self.graph
        inputs = [self.activation(i) for i in graph.InputsAsNumpy()]
        for k in range(graph.OperatorsLength()):
            op = graph.Operators(k)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            name = self.op_names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
            if name == "CUSTOM":
                name = code.CustomCode().decode()
            ins = op.InputsAsNumpy().tolist()
            outs = op.OutputsAsNumpy().tolist()
            if self.fold(name, ins, outs):
                continue
            handler = getattr(self, "op_" + name.lower(), None)
            if handler is None:
                raise NotImplementedError(f"TFLite op {name} is not supported")
            spec = handler(op, ins)
            spec["inputs"] = [self.activation(i) for i in ins[: spec.pop("n_inputs", 1)]]
            spec["outputs"] = [self.activation(i) for i in outs]
            self.ops.append(spec)
        outputs = [self.activation(i) for i in graph.OutputsAsNumpy()]
        description = {
            "inputs": inputs,
            "outputs": outputs,
            "output_names": [self.tensor(i).Name().decode() for i in graph.OutputsAsNumpy()],
            "shapes": self.shapes,
            "ops": self.ops,
        }
        return description, self.weights, self.weight_dtypes

    def fold(self, name: str, ins: list[int], outs: list[int]) -> bool:
        """Evaluate weight-only ops (sparse and fp16 storage) at conversion time."""
        if name not in ("DENSIFY", "DEQUANTIZE") or self.constant(ins[0]) is None:
            return False
        value = self.constants[ins[0]]
        if name == "DENSIFY":
            value = _densify(self.tensor(ins[0]), value)
        else:
            value = value.astype(np.float32)
        self.constants[outs[0]] = value
        self.source_dtypes[outs[0]] = self.source_dtypes[ins[0]]
        return True

    def new_name(self, kind: str) -> str:
        return f"{kind}{len(self.ops)}"

    def conv_spec(self, op: Any, ins: list[int], kind: str, options: Any) -> dict[str, Any]:
        weight, bias = self.constant(ins[1]), self.constant(ins[2])
        in_shape = self.shape(ins[0])
        _, kh, kw, _ = weight.shape
        stride = [options.StrideH(), options.StrideW()]
        dilation = [options.DilationHFactor(), options.DilationWFactor()]
        if options.Padding() == _SAME:
            top, bottom = _same_pads(in_shape[1], kh, stride[0], dilation[0])
            left, right = _same_pads(in_shape[2], kw, stride[1], dilation[1])
        else:
            top = bottom = left = right = 0
        name = self.new_name(kind)
        if kind == "conv":  # OHWI → OIHW
            torch_weight = weight.transpose(0, 3, 1, 2)
            groups = 1
        else:  # depthwise: 1HW(C·m) → (C·m)1HW
            torch_weight = weight.transpose(3, 0, 1, 2)
            groups = in_shape[3]
        self.add_weight(f"{name}.weight", torch_weight, ins[1])
        self.add_weight(f"{name}.bias", bias, ins[2])
        return {
            "type": "conv2d", "name": name,
            "in_channels": in_shape[3], "out_channels": int(torch_weight.shape[0]),
            "kernel_size": [kh, kw], "stride": stride, "dilation": dilation, "groups": groups,
            "padding": [left, right, top, bottom],
            "activation": _ACTIVATIONS[options.FusedActivationFunction()],
        }

    def op_conv_2d(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return self.conv_spec(op, ins, "conv", self.options(op, "Conv2DOptions"))

    def op_depthwise_conv_2d(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return self.conv_spec(op, ins, "dwconv", self.options(op, "DepthwiseConv2DOptions"))

    def op_convolution2dtransposebias(self, op: Any, ins: list[int]) -> dict[str, Any]:
        # MediaPipe's custom op: options are TfLiteTransposeConvParams {padding, stride_w,
        # stride_h} as three int32; weights OHWI like CONV_2D.
        padding, stride_w, stride_h = np.frombuffer(
            op.CustomOptionsAsNumpy().tobytes(), dtype=np.int32)[:3].tolist()
        weight, bias = self.constant(ins[1]), self.constant(ins[2])
        out_c, kh, kw, in_c = weight.shape
        in_shape = self.shape(ins[0])
        out_shape = self.shape(op.OutputsAsNumpy()[0])
        crop_h = (in_shape[1] - 1) * stride_h + kh - out_shape[1]
        crop_w = (in_shape[2] - 1) * stride_w + kw - out_shape[2]
        if crop_h or crop_w:
            raise NotImplementedError("transposed conv with cropping is not supported")
        name = self.new_name("deconv")
        self.add_weight(f"{name}.weight", weight.transpose(3, 0, 1, 2), ins[1])  # → I O H W
        self.add_weight(f"{name}.bias", bias, ins[2])
        return {"type": "conv_transpose2d", "name": name, "in_channels": in_c,
                "out_channels": out_c, "kernel_size": [kh, kw], "stride": [stride_h, stride_w]}

    def binary(self, op: Any, ins: list[int], kind: str, options: str) -> dict[str, Any]:
        if any(self.constant(i) is not None for i in ins):
            raise NotImplementedError(f"{kind} with a constant operand is not supported")
        activation = _ACTIVATIONS[self.options(op, options).FusedActivationFunction()]
        return {"type": kind, "activation": activation, "n_inputs": 2}

    def op_add(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return self.binary(op, ins, "add", "AddOptions")

    def op_mul(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return self.binary(op, ins, "mul", "MulOptions")

    def op_relu(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return {"type": "relu"}

    def op_hard_swish(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return {"type": "hardswish"}

    def op_logistic(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return {"type": "sigmoid"}

    def pool(self, op: Any, ins: list[int], kind: str) -> dict[str, Any]:
        options = self.options(op, "Pool2DOptions")
        kernel = [options.FilterHeight(), options.FilterWidth()]
        stride = [options.StrideH(), options.StrideW()]
        in_shape = self.shape(ins[0])
        pads = [0, 0]
        if options.Padding() == _SAME:
            pads = [_same_pads(in_shape[1 + a], kernel[a], stride[a], 1) for a in (0, 1)]
            if any(p for pair in pads for p in pair):
                raise NotImplementedError("'SAME' pooling that actually pads is not supported")
        if options.FusedActivationFunction():
            raise NotImplementedError("pooling with a fused activation is not supported")
        return {"type": kind, "kernel_size": kernel, "stride": stride}

    def op_average_pool_2d(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return self.pool(op, ins, "avg_pool2d")

    def op_max_pool_2d(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return self.pool(op, ins, "max_pool2d")

    def op_mean(self, op: Any, ins: list[int]) -> dict[str, Any]:
        axes = sorted(int(a) % 4 for a in self.constant(ins[1]).ravel())
        if axes != [1, 2] or not self.options(op, "ReducerOptions").KeepDims():
            raise NotImplementedError("MEAN is supported over H, W with keep_dims only")
        return {"type": "spatial_mean"}

    def op_resize_bilinear(self, op: Any, ins: list[int]) -> dict[str, Any]:
        options = self.options(op, "ResizeBilinearOptions")
        size = self.constant(ins[1]).ravel().tolist()
        # half_pixel_centers is torch's align_corners=False; align_corners is the same flag.
        # TFLite's legacy mode (neither flag) samples at dst·scale and has no torch equivalent.
        if options.AlignCorners():
            align_corners = True
        elif options.HalfPixelCenters():
            align_corners = False
        else:
            raise NotImplementedError("legacy RESIZE_BILINEAR sampling is not supported")
        return {"type": "resize_bilinear", "size": size, "align_corners": align_corners}

    def op_pad(self, op: Any, ins: list[int]) -> dict[str, Any]:
        pads = self.constant(ins[1]).reshape(-1, 2).tolist()  # per NHWC axis: (before, after)
        if len(pads) != 4 or pads[0] != [0, 0]:
            raise NotImplementedError("PAD is supported on 4-D tensors without batch padding")
        (top, bottom), (left, right), (c0, c1) = pads[1], pads[2], pads[3]
        return {"type": "pad", "pad": [left, right, top, bottom, c0, c1]}  # F.pad order, NCHW

    def op_reshape(self, op: Any, ins: list[int]) -> dict[str, Any]:
        out_shape = self.shape(op.OutputsAsNumpy()[0])
        return {"type": "reshape", "shape": [-1, *out_shape[1:]],
                "from_4d": len(self.shape(ins[0])) == 4, "to_4d": len(out_shape) == 4}

    def op_concatenation(self, op: Any, ins: list[int]) -> dict[str, Any]:
        options = self.options(op, "ConcatenationOptions")
        rank = len(self.shape(ins[0]))
        axis = options.Axis() % rank
        if rank == 4:
            axis = [0, 2, 3, 1][axis]  # NHWC axis → NCHW axis
        if options.FusedActivationFunction():
            raise NotImplementedError("concatenation with a fused activation is not supported")
        return {"type": "concat", "axis": axis, "n_inputs": len(ins)}

    def op_depth_to_space(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return {"type": "depth_to_space",
                "block_size": self.options(op, "DepthToSpaceOptions").BlockSize()}


def read_tflite(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """Parse a .tflite file into (graph description, fp32 torch-layout weights, source dtypes).

    The description is JSON-able and is what ``TFLiteGraph(graph=...)`` takes; weight names
    match ``TFLiteGraph.state_dict()``. ``source dtypes`` says which weights the file stores
    as float16, so that a converter can store them at that precision without loss.
    """
    return _Reader(Path(path)).read()


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


def _layer(spec: dict[str, Any]) -> nn.Module:
    kind = spec["type"]
    options = {k: v for k, v in spec.items() if k not in ("type", "name", "inputs", "outputs")}
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
              "concat": Concat, "depth_to_space": DepthToSpace}
    return layers[kind](**options)


class TFLiteGraph(nn.Module):
    """A TFLite graph as torch layers, built from ``read_tflite``'s description.

    ``forward(x)`` takes the graph's single input in NCHW and returns the graph's outputs as
    a tuple in TFLite's output order (4-D ones NCHW). Layers with weights are named after the
    op kind and position (``conv12``, ``dwconv13``, ``deconv240``); the others are unnamed
    entries of ``ops``.
    """

    def __init__(self, graph: dict[str, Any]) -> None:
        super().__init__()
        self.graph = graph
        self.ops = nn.ModuleDict()
        self.wiring: list[tuple[str, list[int], int]] = []
        for index, spec in enumerate(graph["ops"]):
            key = spec.get("name", f"op{index}")
            self.ops[key] = _layer(spec)
            self.wiring.append((key, list(spec["inputs"]), spec["outputs"][0]))
        (self.input_id,) = graph["inputs"]
        self.output_ids = list(graph["outputs"])
        self.output_names = list(graph.get("output_names", []))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values: dict[int, torch.Tensor] = {self.input_id: x}
        for key, inputs, output in self.wiring:
            values[output] = self.ops[key](*[values[i] for i in inputs])
        return tuple(values[i] for i in self.output_ids)
