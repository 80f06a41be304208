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
_INTEGER_RANGES = {3: (0, 255), 9: (-128, 127)}  # quantised activation types: uint8, int8
# Ops that only move values: on a quantised graph they need one quantisation for all their
# inputs and outputs (TFLite's own requirement for most of them), and then run unchanged on the
# centred integers (padding with 0 is padding with the zero point).
_LAYOUT_OPS = {"concat", "split", "pad", "reshape", "depth_to_space", "max_pool2d"}
# Ops with their own quantised arithmetic (or none: argmax of q - z is argmax of the value).
_QUANTIZED_OPS = {"qconv2d", "qadd", "qavg_pool2d", "resize_bilinear_gather", "quantize",
                  "requantize", "dequantize", "argmax"}


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
        self.quant: list[list[float] | None] = []  # per activation id: see activation_quant
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

    def quantization(self, index: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(scales, zero points, quantised axis) of an integer tensor, None for float ones."""
        tensor = self.tensor(index)
        params = tensor.Quantization()
        if tensor.Type() not in (2, 3, 9) or params is None or not params.ScaleLength():
            return None
        return (params.ScaleAsNumpy().astype(np.float32),
                params.ZeroPointAsNumpy().astype(np.int64), params.QuantizedDimension())

    def activation_quant(self, index: int) -> list[float] | None:
        """``[scale, zero_point, qmin, qmax]`` of a quantised activation, None for float ones."""
        params = self.quantization(index)
        if params is None or self.tensor(index).Type() not in _INTEGER_RANGES:
            return None
        scales, zero_points, _ = params
        if len(scales) != 1:
            raise NotImplementedError("per-channel quantised activations are not supported")
        return [float(scales[0]), int(zero_points[0]), *_INTEGER_RANGES[self.tensor(index).Type()]]

    def activation(self, index: int) -> int:
        if index not in self.ids:
            self.ids[index] = len(self.shapes)
            self.shapes.append(_nchw(self.shape(index)))
            self.quant.append(self.activation_quant(index))
        return self.ids[index]

    def add_weight(self, name: str, value: np.ndarray, source: int) -> None:
        """Float weights become float32; integer (quantised) weights keep the file's integers."""
        name = "ops." + name  # the key TFLiteGraph.state_dict() uses
        if not np.issubdtype(value.dtype, np.integer):
            value = value.astype(np.float32)
        self.weights[name] = np.ascontiguousarray(value)
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
            tensors = spec.pop("tensors", ins[: spec.pop("n_inputs", 1)])
            spec["inputs"] = [self.activation(i) for i in tensors]
            spec["outputs"] = [self.activation(i) for i in outs]
            self.check_quantized(name, spec)
            self.ops.append(spec)
        outputs = [self.activation(i) for i in graph.OutputsAsNumpy()]
        description = {
            "inputs": inputs,
            "outputs": outputs,
            "output_names": [self.tensor(i).Name().decode() for i in graph.OutputsAsNumpy()],
            "shapes": self.shapes,
            "ops": self.ops,
        }
        if any(q is not None for q in self.quant):  # float graphs keep their old description
            description["quant"] = self.quant
        return description, self.weights, self.weight_dtypes

    def check_quantized(self, name: str, spec: dict[str, Any]) -> None:
        """Refuse quantised tensors on ops whose integer arithmetic is not reproduced."""
        quants = [self.quant[i] for i in spec["inputs"] + spec["outputs"]]
        if all(q is None for q in quants) or spec["type"] in _QUANTIZED_OPS:
            return
        if spec["type"] in _LAYOUT_OPS and all(q == quants[0] for q in quants):
            return
        raise NotImplementedError(f"quantised TFLite op {name} is not supported here")

    def fold(self, name: str, ins: list[int], outs: list[int]) -> bool:
        """Evaluate weight-only ops (sparse, fp16 and int8 storage) at conversion time."""
        if name not in ("DENSIFY", "DEQUANTIZE") or self.constant(ins[0]) is None:
            return False
        value = self.constants[ins[0]]
        params = self.quantization(ins[0])
        if name == "DENSIFY":
            value = _densify(self.tensor(ins[0]), value)
        elif params is not None:  # integer weights of a float op: (q - zero_point) * scale
            scales, zero_points, axis = params
            shape = [-1 if a == axis else 1 for a in range(value.ndim)]
            value = ((value.astype(np.float64) - zero_points.reshape(shape))
                     * scales.reshape(shape)).astype(np.float32)
        else:
            value = value.astype(np.float32)
        self.constants[outs[0]] = value
        self.source_dtypes[outs[0]] = self.source_dtypes[ins[0]]
        return True

    def new_name(self, kind: str) -> str:
        return f"{kind}{len(self.ops)}"

    def conv_spec(self, op: Any, ins: list[int], kind: str, options: Any) -> dict[str, Any]:
        weight = self.constant(ins[1])
        bias = self.constant(ins[2]) if ins[2] >= 0 else None  # -1: no bias
        if bias is None:
            integer = np.issubdtype(weight.dtype, np.integer)
            bias = np.zeros(weight.shape[0 if kind == "conv" else 3],
                            np.int32 if integer else np.float32)
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
        spec = {
            "type": "conv2d", "name": name,
            "in_channels": in_shape[3], "out_channels": int(torch_weight.shape[0]),
            "kernel_size": [kh, kw], "stride": stride, "dilation": dilation, "groups": groups,
            "padding": [left, right, top, bottom],
            "activation": _ACTIVATIONS[options.FusedActivationFunction()],
        }
        weight_quant = self.quantization(ins[1])
        if weight_quant is not None:
            spec.update(self.quantized_weights(ins, weight_quant, spec["out_channels"]))
        return spec

    def quantized_weights(self, ins: list[int], weight_quant: tuple[np.ndarray, np.ndarray, int],
                          out_channels: int) -> dict[str, Any]:
        """Spec entries of a quantised convolution: its weights stay integers (per-tensor or
        per output channel; both TFLite layouts put that axis first in torch's), and the int32
        bias must have scale input_scale·weight_scale, as TFLite requires, to be added as is."""
        scales, zero_points, _ = weight_quant
        if len(scales) not in (1, out_channels):
            raise NotImplementedError("weights quantised along another axis than the output one")
        input_quant = self.activation_quant(ins[0])
        bias_quant = self.quantization(ins[2]) if ins[2] >= 0 else None
        if input_quant is None:
            raise NotImplementedError("integer weights on a float activation (hybrid op)")
        if bias_quant is not None:
            expected = np.float32(input_quant[0]) * scales
            if not np.allclose(bias_quant[0], expected, rtol=1e-5, atol=0):
                raise NotImplementedError("bias scale is not input scale × weight scale")
        return {"type": "qconv2d", "weight_dtype": str(self.constant(ins[1]).dtype),
                "weight_scale": [float(s) for s in scales],
                "weight_zero_point": [int(z) for z in zero_points]}

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
        if kind == "add" and self.activation_quant(ins[0]) is not None:
            kind = "qadd"
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
        quant = self.activation_quant(ins[0])
        if quant is None:
            return self.pool(op, ins, "avg_pool2d")
        if quant != self.activation_quant(op.OutputsAsNumpy()[0]):
            raise NotImplementedError("quantised AVERAGE_POOL_2D changing the quantisation")
        return self.pool(op, ins, "qavg_pool2d")

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
        quant = self.activation_quant(ins[0])
        if options.AlignCorners():
            sampling = "align_corners"
        elif options.HalfPixelCenters():
            sampling = "half_pixel"
        else:
            sampling = "legacy"
        # half_pixel_centers is torch's align_corners=False; align_corners is the same flag:
        # those run as F.interpolate on float graphs. TFLite's legacy mode (neither flag)
        # samples at dst·in/out, which torch has no mode for, and quantised resizes round
        # their weights: those gather the rows and columns themselves.
        if sampling != "legacy" and quant is None:
            return {"type": "resize_bilinear", "size": size,
                    "align_corners": sampling == "align_corners"}
        if quant != self.activation_quant(op.OutputsAsNumpy()[0]):
            raise NotImplementedError("quantised RESIZE_BILINEAR changing the quantisation")
        return {"type": "resize_bilinear_gather", "input_size": self.shape(ins[0])[1:3],
                "size": size, "sampling": sampling, "quantized": quant is not None}

    def op_quantize(self, op: Any, ins: list[int]) -> dict[str, Any]:
        # float → integers, or integers → integers at another scale (a requantisation)
        return {"type": "quantize" if self.activation_quant(ins[0]) is None else "requantize"}

    def op_dequantize(self, op: Any, ins: list[int]) -> dict[str, Any]:
        return {"type": "dequantize"}  # of an activation; constants are folded (see fold)

    def op_split(self, op: Any, ins: list[int]) -> dict[str, Any]:
        shape = self.shape(ins[1])
        axis = int(self.constant(ins[0]).ravel()[0]) % len(shape)
        parts = self.options(op, "SplitOptions").NumSplits()
        if shape[axis] % parts:
            raise NotImplementedError("SPLIT into unequal parts")
        return {"type": "split", "axis": [0, 2, 3, 1][axis] if len(shape) == 4 else axis,
                "size": shape[axis] // parts, "tensors": [ins[1]]}

    def op_arg_max(self, op: Any, ins: list[int]) -> dict[str, Any]:
        rank = len(self.shape(ins[0]))
        axis = int(self.constant(ins[1]).ravel()[0]) % rank
        output_type = self.tensor(op.OutputsAsNumpy()[0]).Type()
        return {"type": "argmax", "axis": [0, 2, 3, 1][axis] if rank == 4 else axis,
                "int32": output_type == 2}

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


def _sampling(n_in: int, n_out: int, sampling: str, quantized: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (or columns) ``i0``, ``i1`` and the weight of ``i1`` for TFLite's bilinear
    resize along one axis, computed in float32 as TFLite does.

    legacy: src = dst·in/out; half_pixel: src = (dst + ½)·in/out − ½, at least 0;
    align_corners: src = dst·(in − 1)/(out − 1). Then i0 = ⌊src⌋, i1 = min(i0 + 1, in − 1).
    Quantised resizes (XNNPACK) round the weight to 11 fractional bits.
    """
    f32 = np.float32
    if sampling == "align_corners" and n_out > 1:
        scale = f32(n_in - 1) / f32(n_out - 1)
    else:
        scale = f32(n_in) / f32(n_out)
    dst = np.arange(n_out, dtype=f32)
    if sampling == "half_pixel":
        src = np.maximum((dst + f32(0.5)) * scale - f32(0.5), f32(0))
    else:
        src = dst * scale
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    weight = src - i0.astype(f32)
    if quantized:
        weight = np.rint(weight * f32(2048)) / f32(2048)
    return i0, i1, weight.astype(f32)


class ResizeBilinearGather(nn.Module):
    """TFLite RESIZE_BILINEAR by gathering rows, then columns, and mixing them with fixed
    weights: any of TFLite's three samplings, including the legacy one F.interpolate lacks.

    Quantised (XNNPACK's uint8 kernel): weights in steps of 1/2048 and the result rounded half
    up, as its fixed-point sum does. The float sums equal that integer arithmetic where the
    weights are multiples of 1/256 (every 2× or 4× or 8× enlargement: MOSAIC's), else may differ
    from it in the last bit. ``index_select`` with constant indices traces to ONNX Gather.
    """

    def __init__(self, input_size: list[int], size: list[int], sampling: str,
                 quantized: bool) -> None:
        super().__init__()
        self.rounding = quantized
        # Legacy sampling is ONNX Resize's "asymmetric" one: the export uses that op where it
        # is exact, enlargements by powers of two (weights k/2^n); elsewhere it gathers.
        factors = [o // i if o % i == 0 else 0 for i, o in zip(input_size, size, strict=True)]
        self.onnx_scales = [1.0, 1.0, *map(float, factors)] if sampling == "legacy" and all(
            f > 0 and f & (f - 1) == 0 for f in factors) else None
        for axis, n_in, n_out in (("y", input_size[0], size[0]), ("x", input_size[1], size[1])):
            i0, i1, weight = _sampling(n_in, n_out, sampling, quantized)
            shape = (1, 1, n_out, 1) if axis == "y" else (1, 1, 1, n_out)
            self.register_buffer(f"{axis}0", torch.from_numpy(i0), persistent=False)
            self.register_buffer(f"{axis}1", torch.from_numpy(i1), persistent=False)
            self.register_buffer(f"w{axis}", torch.from_numpy(weight).reshape(shape),
                                 persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx_scales is None:
            return self.gather(x)
        if torch.onnx.is_in_onnx_export():
            return _LegacyResize.apply(x, self)
        if self.rounding:  # exact here: see _LegacyResize
            return _enlarge(_enlarge(x + 0.5, 2, int(self.onnx_scales[2])), 3,
                            int(self.onnx_scales[3])).floor_()
        return _enlarge(_enlarge(x, 2, int(self.onnx_scales[2])), 3, int(self.onnx_scales[3]))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        # a + (b − a)·w, the order of XNNPACK's kernels
        top, bottom = x.index_select(2, self.y0), x.index_select(2, self.y1)
        rows = torch.addcmul(top, bottom - top, self.wy)
        left, right = rows.index_select(3, self.x0), rows.index_select(3, self.x1)
        out = torch.addcmul(left, right - left, self.wx)
        return out.add_(0.5).floor_() if self.rounding else out


def _enlarge(x: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    """Legacy bilinear enlargement by an integer factor along one axis, without gathers:
    output row f·i + k is row i + (row i+1 − row i)·k/f (the last row repeated at the edge)."""
    if factor == 1:
        return x
    n = x.shape[axis]
    step = torch.cat([x.narrow(axis, 1, n - 1), x.narrow(axis, n - 1, 1)], dim=axis) - x
    phases = torch.arange(factor, dtype=x.dtype, device=x.device) / factor
    phases = phases.reshape([factor] + [1] * (x.dim() - axis - 1))
    out = torch.addcmul(x.unsqueeze(axis + 1), step.unsqueeze(axis + 1), phases)
    return out.flatten(axis, axis + 1)


class _LegacyResize(torch.autograd.Function):
    """A legacy power-of-two enlargement in an ONNX export: Resize (linear, asymmetric), which
    onnxruntime ran 4-5× faster than the gathers on MOSAIC. Its sums are exact here (weights
    k/2^n on integers or halves), so adding the ½ of the rounding before the resize, on the
    smaller tensor, gives the same ⌊v + ½⌋."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: ResizeBilinearGather) -> torch.Tensor:
        return layer.gather(x)

    @staticmethod
    def symbolic(g: Any, x: Any, layer: ResizeBilinearGather) -> Any:
        if layer.rounding:
            x = g.op("Add", x, _onnx_constant(g, 0.5, torch.float32))
        out = g.op("Resize", x, _onnx_constant(g, [], torch.float32),
                   _onnx_constant(g, layer.onnx_scales, torch.float32), mode_s="linear",
                   coordinate_transformation_mode_s="asymmetric")
        return g.op("Floor", out) if layer.rounding else out


# ---------------------------------------------------------------------------------------------
# Quantised layers. Each takes and returns float tensors holding integers centred on their
# tensor's zero point (q − z); ``quant`` entries are ``[scale, zero_point, qmin, qmax]``.
# ``rounding`` False skips the rounding to the integer grid (keeping the clamps): the float
# network the integer one approximates, for measuring how far the two drift apart.


def _f32(value: float) -> np.float32:
    return np.float32(value)


def _clamp_range(activation: str, quant: list[float]) -> tuple[float, float]:
    """The centred range a quantised output is clamped to: the integer type's, narrowed by
    the fused activation (TFLite's CalculateActivationRangeQuantized)."""
    scale, zero_point, qmin, qmax = quant
    lo, hi = qmin, qmax
    bounds = {"relu": (0.0, None), "relu6": (0.0, 6.0), "relu_n1_to_1": (-1.0, 1.0)}
    if activation in bounds:
        low, high = bounds[activation]
        lo = max(qmin, zero_point + round(low / scale))
        if high is not None:
            hi = min(qmax, zero_point + round(high / scale))
    elif activation != "none":
        raise NotImplementedError(f"fused {activation} on a quantised op")
    return float(lo - zero_point), float(hi - zero_point)


class Quantize(nn.Module):
    """Float → centred integers: round(x / scale), clamped to the type's range."""

    def __init__(self, quant: list[float]) -> None:
        super().__init__()
        self.scale = float(_f32(quant[0]))
        self.lo, self.hi = _clamp_range("none", quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.scale), self.lo, self.hi)


class Dequantize(nn.Module):
    def __init__(self, quant: list[float]) -> None:
        super().__init__()
        self.scale = float(_f32(quant[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Requantize(nn.Module):
    """Integers → integers at another scale, as XNNPACK's uint8 convert does it: the scale
    ratio rounded to 8 fractional bits (m/256), then ⌊x·m/256 + ½⌋ (exact in float32)."""

    def __init__(self, quant_in: list[float], quant_out: list[float]) -> None:
        super().__init__()
        ratio = _f32(quant_in[0]) / _f32(quant_out[0])
        self.multiplier = float(np.rint(_f32(256) * ratio)) / 256
        self.ratio = float(ratio)
        self.lo, self.hi = _clamp_range("none", quant_out)
        self.rounding = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rounding:
            return torch.clamp(x * self.ratio, self.lo, self.hi)
        return torch.clamp(torch.floor(x * self.multiplier + 0.5), self.lo, self.hi)


class QConv2d(nn.Module):
    """A quantised CONV_2D / DEPTHWISE_CONV_2D on centred integers.

    ``weight`` (uint8/int8, OIHW) and ``bias`` (int32) are the file's integers. The convolution
    of centred inputs with centred weights plus the bias is the exact int32 accumulator
    (float32 holds integers up to 2**24 exactly; MOSAIC's stayed under 2**17 on the photos
    measured, its biases under 2**15), which XNNPACK
    requantises as round-half-even(acc · input_scale·weight_scale/output_scale), the scale
    product taken in float32, then clamps.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int],
                 stride: list[int], dilation: list[int], groups: int, padding: list[int],
                 activation: str, weight_dtype: str, weight_scale: list[float],
                 weight_zero_point: list[int], quant_in: list[float],
                 quant_out: list[float]) -> None:
        super().__init__()
        dtype = getattr(torch, weight_dtype)
        shape = (out_channels, in_channels // groups, *kernel_size)
        self.register_buffer("weight", torch.zeros(shape, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_channels, dtype=torch.int32))
        zero_point = torch.tensor(weight_zero_point, dtype=torch.float32).reshape(-1, 1, 1, 1)
        self.register_buffer("weight_zero_point", zero_point, persistent=False)
        # the requantisation factor, per output channel where the weights are per channel
        scales = np.asarray(weight_scale, np.float32)
        multiplier = (_f32(quant_in[0]) * scales) / _f32(quant_out[0])
        self.register_buffer("multiplier", torch.from_numpy(multiplier.astype(np.float32))
                             .reshape(1, -1, 1, 1), persistent=False)
        left, right, top, bottom = padding
        symmetric = left == right and top == bottom
        self.padding = (top, left) if symmetric else (0, 0)
        self.extra_pad = None if symmetric else (left, right, top, bottom)
        self.stride, self.dilation, self.groups = tuple(stride), tuple(dilation), groups
        self.lo, self.hi = _clamp_range(activation, quant_out)
        self.rounding = True
        # for the ONNX export (_QLinearConv)
        self.pads = [top, left, bottom, right]
        self.quant_in, self.quant_out = list(quant_in), list(quant_out)
        self.weight_scale, self.weight_zero_points = list(weight_scale), list(weight_zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() and self.rounding:
            # weight and bias as inputs: the tracer must know every tensor the op reads
            return _QLinearConv.apply(x, self.weight, self.bias, self)
        return self.emulate(x)

    def emulate(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)  # zeros: the input's zero point
        weight = self.weight.float() - self.weight_zero_point
        acc = F.conv2d(x, weight, self.bias.float(), self.stride, self.padding, self.dilation,
                       self.groups)
        out = acc.mul_(self.multiplier)  # in place: these passes cost as much as the convolution
        return (out.round_() if self.rounding else out).clamp_(self.lo, self.hi)


_ONNX_TYPES = {"uint8": 2, "int8": 3, "float": 1}  # onnx.TensorProto


def _onnx_constant(g: Any, value: Any, dtype: torch.dtype) -> Any:
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


class _QLinearConv(torch.autograd.Function):
    """``QConv2d`` in an ONNX export: QLinearConv on the integers themselves.

    onnxruntime accumulates in int32 and requantises with the float32 factor
    s_in·s_w/s_out, rounding half to even, as XNNPACK does: its results are the port's, checked
    on MOSAIC bit for bit, at integer speed. Weights go in as int8 (uint8 ones shifted by 128
    with their zero point, the same integers), the layout onnxruntime's VNNI kernels take.
    OpenVINO turns QLinearConv into fake-quantised float arithmetic that rounds elsewhere.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                layer: QConv2d) -> torch.Tensor:
        return layer.emulate(x)

    @staticmethod
    def symbolic(g: Any, x: Any, weight_value: Any, bias_value: Any, layer: QConv2d) -> Any:
        f32 = torch.float32
        scale_in, zero_in, qmin, _ = layer.quant_in
        scale_out, zero_out, out_min, out_max = layer.quant_out
        activation = torch.uint8 if qmin == 0 else torch.int8
        kind = "uint8" if qmin == 0 else "int8"
        weight, zero_points = layer.weight, torch.tensor(layer.weight_zero_points)
        if weight.dtype == torch.uint8:
            weight, zero_points = weight.to(torch.int16) - 128, zero_points - 128
        per_channel = len(layer.weight_scale) > 1
        as_vector = (lambda v: v) if per_channel else (lambda v: v[0])
        q = g.op("Cast", g.op("Add", x, _onnx_constant(g, float(zero_in), f32)),
                 to_i=_ONNX_TYPES[kind])
        y = g.op("QLinearConv", q, _onnx_constant(g, scale_in, f32),
                 _onnx_constant(g, zero_in, activation),
                 g.op("Constant", value_t=weight.to(torch.int8)),
                 _onnx_constant(g, as_vector(layer.weight_scale), f32),
                 _onnx_constant(g, as_vector(zero_points.tolist()), torch.int8),
                 _onnx_constant(g, scale_out, f32),
                 _onnx_constant(g, zero_out, torch.uint8 if out_min == 0 else torch.int8),
                 g.op("Constant", value_t=layer.bias.clone()),
                 strides_i=list(layer.stride), pads_i=layer.pads,
                 dilations_i=list(layer.dilation), group_i=layer.groups,
                 kernel_shape_i=list(layer.weight.shape[2:]))
        out = g.op("Sub", g.op("Cast", y, to_i=_ONNX_TYPES["float"]),
                   _onnx_constant(g, float(zero_out), f32))
        if (layer.lo, layer.hi) != (out_min - zero_out, out_max - zero_out):  # a fused activation
            out = g.op("Clip", out, _onnx_constant(g, layer.lo, f32),
                       _onnx_constant(g, layer.hi, f32))
        return out


class QAdd(nn.Module):
    """Quantised ADD as XNNPACK computes it: each input's scale ratio to the output as a fixed-
    point multiplier (the larger in [2**20, 2**21)), ⌊(a·ma + b·mb) / 2**shift + ½⌋. The sum
    reaches 2**30: computed in float64, where it is exact."""

    def __init__(self, activation: str, quant_a: list[float], quant_b: list[float],
                 quant_out: list[float]) -> None:
        super().__init__()
        ratio_a = _f32(quant_a[0]) / _f32(quant_out[0])
        ratio_b = _f32(quant_b[0]) / _f32(quant_out[0])
        exponent = int(np.frexp(max(ratio_a, ratio_b))[1]) - 1  # ⌊log2⌋ of the larger ratio
        shift = 20 - exponent
        self.a = float(np.rint(np.float64(ratio_a) * 2.0**shift) / 2.0**shift)
        self.b = float(np.rint(np.float64(ratio_b) * 2.0**shift) / 2.0**shift)
        self.ratios = (float(ratio_a), float(ratio_b))
        self.lo, self.hi = _clamp_range(activation, quant_out)
        self.rounding = True

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.rounding:
            return torch.clamp(a * self.ratios[0] + b * self.ratios[1], self.lo, self.hi)
        total = a.double() * self.a + b.double() * self.b
        return torch.clamp(torch.floor(total + 0.5), self.lo, self.hi).float()


class QAvgPool2d(nn.AvgPool2d):
    """Quantised AVERAGE_POOL_2D (same quantisation in and out): the mean rounded half up,
    TFLite's (sum + n/2) / n, which LiteRT's results follow (half to even would not).
    The float mean is exact for sums under 2**24."""

    def __init__(self, kernel_size: list[int], stride: list[int]) -> None:
        super().__init__(tuple(kernel_size), tuple(stride))
        self.rounding = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = super().forward(x)
        return torch.floor(mean + 0.5) if self.rounding else mean


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
