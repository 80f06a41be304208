"""Reading a ``.tflite`` flatbuffer into a graph description and torch-layout weights.

The first half of :mod:`dense.ports.tflite` (whose docstring describes both): ``read_tflite``
parses the file with the PyPI ``tflite`` parser (no TensorFlow), folds constant sub-graphs and
resolves TFLite's conventions into explicit torch-side options. ``TFLiteGraph`` runs the
result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
