"""Run a TensorFlow.js graph model (``model.json`` + weight shards) as a plain PyTorch module.

Two halves, as in ``dense.ports.tflite``:

* ``read_tfjs(path)`` reads ``model.json``: the weight shards named by its ``weightsManifest``
  (float16 and uint8/uint16-quantised weights dequantised to float32 as TF.js does it)
  and the graph's node list (a TensorFlow GraphDef in JSON form). It returns a JSON-able
  *graph description* — the nodes in topological order with their attributes decoded, small
  constants inline — and the weights: convolution filters already in torch's OIHW layout
  (the convolutions become ``nn.Conv2d`` layers), large float constants as buffers.
* ``TFJSGraph`` walks that op list with torch ops that follow TensorFlow's semantics. Tensors
  keep TensorFlow's NHWC layout between ops; a convolution views its input as NCHW with
  ``permute`` (no copy: an NHWC tensor is an NCHW tensor in channels_last memory format, which
  oneDNN convolves directly) and views its output back.

TF graphs compute shapes at run time (``Shape`` → ``StridedSlice`` → ``Reshape``/``Range``/
``Fill``...). Here those are folded into constants per input size: the first call at a new
size runs the graph once on zeros and records which values depend only on constants and
tensor shapes ("the plan"). The ops left run with their shape arguments as Python numbers, so
the forward has no Python control flow on tensor values and traces (and exports to ONNX) at a
fixed input size. Ops whose output *shape* depends on tensor values (Where, NonMaxSuppression,
Unique...) are therefore outside this design, and not supported.

Ops handled: Conv2D, _FusedConv2D, DepthwiseConv2dNative, FusedDepthwiseConv2dNative (with
BiasAdd + Relu/Relu6/Sigmoid/Elu fused), element-wise unary and binary ops, shape ops
(Shape, Size, Reshape, ExpandDims, Squeeze, Pack, Unpack, ConcatV2, Split, Tile, Fill, Range,
StridedSlice, Slice, Transpose), reductions, ArgMax, TopKV2, GatherNd, GatherV2, Select(V2),
ResizeBilinear (half-pixel or align-corners), MaxPool (:func:`supported_ops` lists them).
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Reading model.json and its weight shards

_DTYPES = {"DT_FLOAT": "float32", "DT_INT32": "int32", "DT_BOOL": "bool", "DT_INT64": "int64",
           "DT_HALF": "float16", "DT_UINT8": "uint8", "DT_INT8": "int8", "DT_DOUBLE": "float64"}
_TORCH_DTYPES = {"float32": torch.float32, "int32": torch.int32, "bool": torch.bool,
                 "int64": torch.int64, "float16": torch.float16, "uint8": torch.uint8,
                 "int8": torch.int8, "float64": torch.float64}
_MANIFEST_DTYPES = {"float32": np.float32, "int32": np.int32, "bool": np.bool_}
_QUANTISED = {"float16": np.float16, "uint8": np.uint8, "uint16": np.uint16}
_CONV_OPS = {"Conv2D", "_FusedConv2D", "DepthwiseConv2dNative", "FusedDepthwiseConv2dNative"}
_ACTIVATIONS = {"Relu": "relu", "Relu6": "relu6", "Sigmoid": "sigmoid", "Elu": "elu"}
# Attributes that only restate input dtypes or concern other devices: left out of the
# description (the ops here read none of them).
_UNUSED_ATTRS = {"T", "value", "Tshape", "Tindices", "Tparams", "Tdim", "Tmultiples",
                 "Tpaddings", "Taxis", "SrcT", "Truncate", "Index", "index_type",
                 "use_cudnn_on_gpu", "num_args", "epsilon", "incompatible_shape_error"}
# Float constants with more elements than this become buffers in the state dict (the 48×48
# grids of MoveNet's heads); smaller ones and all integer constants stay in the description.
_INLINE_FLOATS = 64


def read_weights(model_json: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The weights of a TF.js model: name → float32/int32/bool array, and name → the dtype the
    shards store it in (``float16`` for fp16-quantised weights).

    Shards are concatenated in manifest order and weights follow each other without padding.
    Quantised weights: float16 is widened (exact); uint8/uint16 become ``q·scale + min``
    (TF.js's own dequantisation, in doubles rounded to float32), or ``(q - zero_point)·scale``
    where the manifest gives a zero point.
    """
    path = Path(model_json)
    manifest = json.loads(path.read_text(encoding="utf-8"))["weightsManifest"]
    weights: dict[str, np.ndarray] = {}
    stored: dict[str, str] = {}
    for group in manifest:
        data = b"".join((path.parent / p).read_bytes() for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            shape = [int(d) for d in spec["shape"]]
            count = int(np.prod(shape, dtype=np.int64))
            quant = spec.get("quantization")
            if spec["dtype"] not in _MANIFEST_DTYPES:
                raise NotImplementedError(f"TF.js weight dtype {spec['dtype']} ({spec['name']})")
            kind = np.dtype(_QUANTISED[quant["dtype"]] if quant else
                            _MANIFEST_DTYPES[spec["dtype"]])
            raw = np.frombuffer(data, dtype=kind, count=count, offset=offset)
            offset += count * kind.itemsize
            if quant is None:
                value = raw.copy()
            elif quant["dtype"] == "float16":
                value = raw.astype(np.float32)
            elif "zeroPoint" in quant:  # JS computes in doubles, stores float32: as here
                value = ((raw.astype(np.float64) - quant["zeroPoint"])
                         * quant["scale"]).astype(np.float32)
            else:
                value = (raw.astype(np.float64) * quant["scale"] + quant["min"]).astype(
                    np.float32)
            if quant is not None and spec["dtype"] == "int32":
                value = np.round(value).astype(np.int32)
            weights[spec["name"]] = value.reshape(shape)
            stored[spec["name"]] = quant["dtype"] if quant else spec["dtype"]
        if offset != len(data):
            raise ValueError(f"{path.name}: the manifest covers {offset} of {len(data)} bytes")
    return weights, stored


def decode_attr(value: dict[str, Any]) -> Any:
    """A GraphDef AttrValue in proto3 JSON form → a plain JSON value (int, float, bool, str,
    dtype name, list, or a shape as a list of dims with -1 for unknown)."""
    if not value:
        return None
    if "list" in value:
        items = value["list"]
        if not items:
            return []
        (kind, entries), = items.items()
        return [decode_attr({kind: e}) for e in entries]
    (kind, entry), = value.items()
    if kind == "i":
        return int(entry)
    if kind == "f":
        return float(entry)
    if kind == "b":
        return bool(entry)
    if kind == "s":
        return base64.b64decode(entry).decode("utf-8", errors="replace")
    if kind == "type":
        return _DTYPES.get(entry, entry)
    if kind == "shape":
        return [int(d.get("size", -1)) for d in entry.get("dim", [])] if entry else []
    return entry  # tensors and functions: not used by the ops supported here


def _ref(name: str, prefix: str) -> str:
    """A node input → our value name: ``node`` for output 0, ``node:k`` for output k."""
    if name.startswith(prefix):
        name = name[len(prefix):]
    node, _, index = name.partition(":")
    return node if index in ("", "0") else f"{node}:{index}"


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def _topological(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes in an order where each comes after its inputs (GraphDefs are not sorted)."""
    by_name = {n["name"]: n for n in nodes}
    done: set[str] = set()
    order: list[dict[str, Any]] = []
    for root in nodes:
        stack = [(root["name"], False)]
        while stack:
            name, expanded = stack.pop()
            if name in done:
                continue
            if expanded:
                done.add(name)
                order.append(by_name[name])
                continue
            stack.append((name, True))
            for source in by_name[name].get("input", []):
                source = source.lstrip("^").partition(":")[0]
                if source not in done:
                    stack.append((source, False))
    return order


class _Reader:
    def __init__(self, path: Path) -> None:
        self.model = json.loads(path.read_text(encoding="utf-8"))
        self.weights_in, self.stored = read_weights(path)
        nodes = self.model["modelTopology"]["node"]
        # Node names repeat a long scope ("StatefulPartitionedCall/"); the description keeps
        # them without it, and records it to map names back to the TF graph.
        self.prefix = "StatefulPartitionedCall/" if any(
            n["name"].startswith("StatefulPartitionedCall/") for n in nodes) else ""
        self.nodes = _topological(nodes)
        self.weights: dict[str, np.ndarray] = {}
        self.weight_dtypes: dict[str, str] = {}

    def const(self, name: str) -> np.ndarray:
        return self.weights_in[name.lstrip("^").partition(":")[0]]

    def read(self) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
        p = self.prefix
        conv_consts = {i.partition(":")[0] for n in self.nodes if n["op"] in _CONV_OPS
                       for i in n["input"][1:]}
        used = {i.lstrip("^").partition(":")[0] for n in self.nodes
                if n["op"] not in _CONV_OPS for i in n.get("input", [])}
        used |= {i.partition(":")[0] for n in self.nodes if n["op"] in _CONV_OPS
                 for i in n["input"][:1]}
        constants: dict[str, Any] = {}
        buffers: dict[str, dict[str, Any]] = {}
        ops: list[dict[str, Any]] = []
        inputs: list[dict[str, Any]] = []
        for node in self.nodes:
            name, op = _strip(node["name"], p), node["op"]
            attrs = {k: decode_attr(v) for k, v in node.get("attr", {}).items()
                     if not k.startswith("_") and k not in _UNUSED_ATTRS}
            layout = attrs.pop("data_format", "NHWC")
            if layout not in ("NHWC", None):  # the ops here are written for TF's default
                raise NotImplementedError(f"{op} ({name}) with data_format {layout}")
            if op != "Range":  # the only op whose output dtype is this attr
                attrs.pop("Tidx", None)
            if op == "Const":
                if node["name"] in conv_consts and node["name"] not in used:
                    continue  # a convolution's filter or bias: it lives in the layer
                value = self.weights_in[node["name"]]
                if value.dtype == np.float32 and value.size > _INLINE_FLOATS:
                    key = f"c{len(buffers)}"
                    buffers[name] = {"key": key, "shape": list(value.shape)}
                    self.add_weight(f"consts.{key}", value, node["name"])
                else:
                    constants[name] = {"dtype": str(value.dtype), "shape": list(value.shape),
                                       "value": value.ravel().tolist()}
                continue
            if op == "Placeholder":
                inputs.append({"name": name, "dtype": attrs.get("dtype", "float32"),
                               "shape": attrs.get("shape", [])})
                continue
            refs = [_ref(i, p) for i in node.get("input", []) if not i.startswith("^")]
            spec = {"name": name, "op": op, "inputs": refs, "attrs": attrs}
            if op in _CONV_OPS:
                spec = self.conv_spec(node, spec, len(ops))
            ops.append(spec)
        signature = self.model.get("signature", {})
        outputs = [_ref(o["name"], p) for o in signature.get("outputs", {}).values()]
        if not outputs:  # no signature: the nodes nothing consumes
            consumed = {r.partition(":")[0] for s in ops for r in s["inputs"]}
            outputs = [s["name"] for s in ops if s["name"] not in consumed]
        description = {
            "format": "tfjs-graph-model",
            "name_prefix": p,
            "inputs": inputs,
            "outputs": outputs,
            "constants": constants,
            "buffers": buffers,
            "ops": ops,
        }
        return description, self.weights, self.weight_dtypes

    def add_weight(self, key: str, value: np.ndarray, source: str) -> None:
        self.weights[key] = np.ascontiguousarray(value, dtype=np.float32)
        self.weight_dtypes[key] = self.stored[source]

    def conv_spec(self, node: dict[str, Any], spec: dict[str, Any], index: int) -> dict[str, Any]:
        """A convolution node → an ``nn.Conv2d`` layer's spec; its weights become the layer's.

        Fused ops: ``_FusedConv2D`` (Grappler's) and ``FusedDepthwiseConv2dNative`` (TF.js's)
        carry BiasAdd and an optional activation in ``fused_ops``; their extra inputs are the
        bias. Filters are HWIO (depthwise: H, W, C, multiplier), NHWC data only.
        """
        attrs, op = spec["attrs"], node["op"]
        fused = list(attrs.get("fused_ops") or [])
        activation = "none"
        if fused and fused[0] != "BiasAdd":
            raise NotImplementedError(f"{op} fusing {fused}")
        if len(fused) > 2 or (len(fused) == 2 and fused[1] not in _ACTIVATIONS):
            raise NotImplementedError(f"{op} fusing {fused}")
        if len(fused) == 2:
            activation = _ACTIVATIONS[fused[1]]
        has_bias = bool(fused)
        if any(i.partition(":")[0] not in self.weights_in for i in node["input"][1:]):
            raise NotImplementedError(f"{op} ({node['name']}) with a computed filter or bias")
        filt = self.const(node["input"][1])
        kh, kw = filt.shape[:2]
        depthwise = "Depthwise" in op
        if depthwise:  # H W C M → (C·M) 1 H W: output channel c·M + m, as TF orders them
            channels, multiplier = filt.shape[2:]
            weight = filt.reshape(kh, kw, channels * multiplier).transpose(2, 0, 1)[:, None]
            in_channels, out_channels, groups = channels, channels * multiplier, channels
        else:  # H W I O → O I H W
            weight = filt.transpose(3, 2, 0, 1)
            in_channels, out_channels, groups = filt.shape[2], filt.shape[3], 1
        key = f"{'dwconv' if depthwise else 'conv'}{index}"
        self.add_weight(f"ops.{key}.weight", weight, node["input"][1].partition(":")[0])
        if has_bias:
            bias = self.const(node["input"][2])
            self.add_weight(f"ops.{key}.bias", bias, node["input"][2].partition(":")[0])
        strides, dilations = attrs.get("strides", [1, 1, 1, 1]), attrs.get("dilations",
                                                                            [1, 1, 1, 1])
        if strides[0] != 1 or strides[3] != 1 or dilations[0] != 1 or dilations[3] != 1:
            raise NotImplementedError(f"{op} striding the batch or channel axis")
        padding = attrs.get("padding", "VALID")
        if padding == "EXPLICIT":
            padding = [int(v) for v in attrs["explicit_paddings"][2:6]]  # top, bottom, l, r
        elif padding not in ("SAME", "VALID"):
            raise NotImplementedError(f"{op} with padding {padding}")
        return {"name": spec["name"], "op": "conv2d", "key": key, "inputs": spec["inputs"][:1],
                "attrs": {"in_channels": int(in_channels), "out_channels": int(out_channels),
                          "kernel_size": [int(kh), int(kw)], "stride": strides[1:3],
                          "dilation": dilations[1:3], "groups": int(groups),
                          "padding": padding, "bias": has_bias, "activation": activation,
                          "tf_op": op}}


def read_tfjs(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, str]]:
    """Parse a TF.js graph model (``model.json`` beside its shards) into (graph description,
    float32 weights in torch layouts keyed as ``TFJSGraph.state_dict()`` names them, and the
    dtype each weight is stored in by the shards, so that converters can keep float16
    weights in float16 without loss)."""
    return _Reader(Path(path)).read()


# ---------------------------------------------------------------------------------------------
# The ops, with TensorFlow's semantics. Each takes its inputs positionally; the positions in
# ``static`` are shape-like arguments (axes, sizes, begin/end...) that the plan resolves to
# Python numbers once per input size.


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF 'SAME' padding along one axis: the odd pixel goes after (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Op(nn.Module):
    """A graph op without weights. ``static``: input positions passed as Python values."""

    static: tuple[int, ...] = ()
    # Ops whose result depends on their input's shape only (folded even on run-time inputs).
    shape_only = False

    def __init__(self, **attrs: Any) -> None:
        super().__init__()
        self.attrs = attrs


class Conv2d(nn.Conv2d):
    """TF Conv2D / DepthwiseConv2dNative (+ BiasAdd + activation) on an NHWC tensor.

    'SAME' padding is worked out from the input's size at each call (graphs of any input
    size); when it is asymmetric (stride 2 on an even size: one more pixel after) the input is
    padded explicitly.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int],
                 stride: list[int], dilation: list[int], groups: int, padding: str | list[int],
                 bias: bool, activation: str, tf_op: str = "") -> None:
        super().__init__(in_channels, out_channels, tuple(kernel_size), tuple(stride),
                         dilation=tuple(dilation), groups=groups, bias=bias)
        self.tf_padding = padding
        self.activation = activation

    def pads(self, h: int, w: int) -> tuple[int, int, int, int]:
        if self.tf_padding == "VALID":
            return 0, 0, 0, 0
        if self.tf_padding == "SAME":
            top, bottom = _same_pads(h, self.kernel_size[0], self.stride[0], self.dilation[0])
            left, right = _same_pads(w, self.kernel_size[1], self.stride[1], self.dilation[1])
            return top, bottom, left, right
        return tuple(self.tf_padding)  # explicit: top, bottom, left, right

    def geometry(self, x: torch.Tensor) -> dict[str, Any]:
        return {"pads": self.pads(int(x.shape[1]), int(x.shape[2]))}

    def forward(self, x: torch.Tensor, pads: tuple[int, int, int, int] | None = None
                ) -> torch.Tensor:
        top, bottom, left, right = pads or self.pads(int(x.shape[1]), int(x.shape[2]))
        x = x.permute(0, 3, 1, 2)  # NHWC → NCHW view, channels_last in memory
        if top == bottom and left == right:
            y = F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation,
                         self.groups)
        else:
            y = F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias,
                         self.stride, 0, self.dilation, self.groups)
        if self.activation == "relu":
            y = F.relu(y)
        elif self.activation == "relu6":
            y = F.relu6(y)
        elif self.activation == "sigmoid":
            y = torch.sigmoid(y)
        elif self.activation == "elu":
            y = F.elu(y)
        return y.permute(0, 2, 3, 1)


class Identity(Op):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Cast(Op):
    """TF Cast: float → integer truncates toward zero, as ``Tensor.to`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(_TORCH_DTYPES[self.attrs["DstT"]])


_UNARY = {
    "Abs": torch.abs, "Sqrt": torch.sqrt, "Exp": torch.exp, "Sigmoid": torch.sigmoid,
    "Relu": torch.relu, "Relu6": F.relu6, "Neg": torch.neg, "Floor": torch.floor,
    "Reciprocal": torch.reciprocal, "Square": torch.square, "Rsqrt": torch.rsqrt,
    "Log": torch.log, "Tanh": torch.tanh, "LogicalNot": torch.logical_not,
}


class Unary(Op):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UNARY[self.attrs["op"]](x)


def _floor_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.is_floating_point():
        return torch.floor(a / b)
    return torch.div(a, b, rounding_mode="floor")


_BINARY = {
    "Add": torch.add, "AddV2": torch.add, "Sub": torch.sub, "Mul": torch.mul,
    "RealDiv": torch.div, "Div": torch.div, "FloorDiv": _floor_div,
    "Maximum": torch.maximum, "Minimum": torch.minimum,
    "SquaredDifference": lambda a, b: torch.square(a - b),
    "Less": torch.lt, "LessEqual": torch.le, "Greater": torch.gt, "GreaterEqual": torch.ge,
    "Equal": torch.eq, "NotEqual": torch.ne, "LogicalAnd": torch.logical_and,
    "LogicalOr": torch.logical_or, "Pow": torch.pow,
}


class Binary(Op):
    """Element-wise ops with NumPy broadcasting, as TF's. Integer Div is TF's truncation."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        op = self.attrs["op"]
        if op == "Div" and not a.is_floating_point():
            return torch.div(a, b, rounding_mode="trunc")
        return _BINARY[op](a, b)


class AddN(Op):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        total = xs[0]
        for x in xs[1:]:  # left to right, as TF's CPU kernel sums
            total = total + x
        return total


class Shape(Op):
    shape_only = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _TORCH_DTYPES[self.attrs.get("out_type", "int32")]
        return torch.tensor(list(x.shape), dtype=dtype, device=x.device)


class Size(Op):
    shape_only = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _TORCH_DTYPES[self.attrs.get("out_type", "int32")]
        return torch.tensor(x.numel(), dtype=dtype, device=x.device)


class Reshape(Op):
    static = (1,)

    def forward(self, x: torch.Tensor, shape: list[int]) -> torch.Tensor:
        return x.reshape([int(s) for s in np.ravel(shape)])


class ExpandDims(Op):
    static = (1,)

    def forward(self, x: torch.Tensor, dim: int | list[int]) -> torch.Tensor:
        return x.unsqueeze(int(np.ravel(dim)[0]))


class Squeeze(Op):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = self.attrs.get("squeeze_dims") or []
        if not dims:
            return x.squeeze()
        return x.squeeze(tuple(d % x.dim() for d in dims))


class Pack(Op):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.stack(xs, dim=self.attrs.get("axis", 0))


class Unpack(Op):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.unbind(x, dim=self.attrs.get("axis", 0))


class ConcatV2(Op):
    """TF ConcatV2: the axis is the last input."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.static = (attrs["N"],)

    def forward(self, *args: Any) -> torch.Tensor:
        *xs, axis = args
        return torch.cat(xs, dim=int(axis))


class Split(Op):
    """TF Split: (axis, value) into ``num_split`` equal parts."""

    static = (0,)

    def geometry(self, axis: int, x: torch.Tensor) -> dict[str, Any]:
        axis = int(np.ravel(axis)[0]) % x.dim()
        return {"size": int(x.shape[axis]) // self.attrs["num_split"]}

    def forward(self, axis: int, x: torch.Tensor, size: int | None = None
                ) -> tuple[torch.Tensor, ...]:
        size = size or self.geometry(axis, x)["size"]
        return torch.split(x, size, dim=int(np.ravel(axis)[0]) % x.dim())


class Tile(Op):
    static = (1,)

    def forward(self, x: torch.Tensor, multiples: list[int]) -> torch.Tensor:
        return x.repeat([int(m) for m in multiples])


class Fill(Op):
    static = (0,)

    def forward(self, dims: list[int], value: torch.Tensor) -> torch.Tensor:
        return value.expand([int(d) for d in np.ravel(dims)]).clone()


class Range(Op):
    static = (0, 1, 2)

    def forward(self, start: float, limit: float, delta: float) -> torch.Tensor:
        dtype = _TORCH_DTYPES[self.attrs.get("Tidx", "int32")]
        return torch.arange(start, limit, delta, dtype=dtype)


class Reduce(Op):
    """Sum / Max / Min / Mean / Prod / Any / All over constant axes."""

    static = (1,)

    def forward(self, x: torch.Tensor, axes: int | list[int]) -> torch.Tensor:
        dims = tuple(int(a) % x.dim() for a in np.ravel(axes))
        keep = bool(self.attrs.get("keep_dims", False))
        op = self.attrs["op"]
        if not dims:
            return x
        if op == "Sum":
            return x.sum(dim=dims, keepdim=keep)
        if op == "Mean":
            return x.mean(dim=dims, keepdim=keep)
        if op == "Max":
            return x.amax(dim=dims, keepdim=keep)
        if op == "Min":
            return x.amin(dim=dims, keepdim=keep)
        reduce = {"Any": torch.any, "All": torch.all, "Prod": torch.prod}[op]
        out = x
        for d in sorted(dims, reverse=True):  # one axis at a time (these take one)
            out = reduce(out, dim=d, keepdim=keep)
        return out


class ArgMax(Op):
    """TF ArgMax: the first of equal maxima, like ``torch.argmax``."""

    static = (1,)

    def forward(self, x: torch.Tensor, axis: int | list[int]) -> torch.Tensor:
        index = x.argmax(dim=int(np.ravel(axis)[0]))
        return index.to(_TORCH_DTYPES[self.attrs.get("output_type", "int64")])


class TopKV2(Op):
    """TF TopKV2 along the last axis: values and int32 indices, largest first.

    On equal values TF gives the lower index first. ``torch.topk`` does not promise an order
    among ties, so eager runs take a stable descending sort; a trace (ONNX export, where the
    stable sort has no symbolic) takes ``topk``, which becomes ONNX TopK, whose specification
    breaks ties by the lower index, as TF.
    """

    static = (1,)

    def forward(self, x: torch.Tensor, k: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        k = int(np.ravel(k)[0])
        if torch.jit.is_tracing():
            values, indices = torch.topk(x, k, dim=-1, largest=True, sorted=True)
            return values, indices.to(torch.int32)
        values, indices = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k].to(torch.int32)


class GatherNd(Op):
    """TF GatherNd: ``params[indices[..., 0], ..., indices[..., M-1]]``.

    Done as one flat ``index_select`` (row-major offsets from the params' shape), which traces
    to a plain ONNX Gather.
    """

    def geometry(self, params: torch.Tensor, indices: torch.Tensor) -> dict[str, Any]:
        # The row-major strides as a tensor made here, at plan time: the forward then copies
        # nothing from the host (CUDA graphs cannot capture such copies).
        depth = int(indices.shape[-1])
        lead = [int(d) for d in params.shape[:depth]]
        strides = [int(np.prod(lead[i + 1:], dtype=np.int64)) for i in range(depth)]
        return {"strides": torch.tensor(strides, dtype=torch.int64, device=indices.device),
                "rows": int(np.prod(lead, dtype=np.int64)),
                "shape": [int(d) for d in (*indices.shape[:-1], *params.shape[depth:])]}

    def forward(self, params: torch.Tensor, indices: torch.Tensor,
                strides: torch.Tensor | None = None, rows: int | None = None,
                shape: list[int] | None = None) -> torch.Tensor:
        if strides is None:
            return self.forward(params, indices, **self.geometry(params, indices))
        flat = (indices.to(torch.int64) * strides).sum(-1)
        table = params.reshape([rows, *params.shape[strides.shape[0]:]])
        return table.index_select(0, flat.reshape(-1)).reshape(shape)


class GatherV2(Op):
    static = (2,)

    def forward(self, params: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
        axis = int(np.ravel(axis)[0]) % params.dim()
        if self.attrs.get("batch_dims", 0):
            raise NotImplementedError("GatherV2 with batch_dims")
        flat = params.index_select(axis, indices.reshape(-1).to(torch.int64))
        shape = [*params.shape[:axis], *indices.shape, *params.shape[axis + 1:]]
        return flat.reshape(shape)


class Select(Op):
    """TF Select (v1: a vector condition picks rows) and SelectV2 (broadcasting)."""

    def forward(self, cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.attrs["op"] == "Select" and cond.dim() == 1 and a.dim() > 1:
            cond = cond.reshape([-1] + [1] * (a.dim() - 1))
        return torch.where(cond, a, b)


class StridedSlice(Op):
    """TF StridedSlice with its five masks, as basic indexing (views, no gather)."""

    static = (1, 2, 3)

    def forward(self, x: torch.Tensor, begin: list[int], end: list[int],
                strides: list[int]) -> torch.Tensor:
        a = self.attrs
        begin_mask, end_mask = a.get("begin_mask", 0), a.get("end_mask", 0)
        ellipsis, new_axis = a.get("ellipsis_mask", 0), a.get("new_axis_mask", 0)
        shrink = a.get("shrink_axis_mask", 0)
        begin, end, strides = (list(np.ravel(v)) for v in (begin, end, strides))
        index: list[Any] = []
        for i, (b, e, s) in enumerate(zip(begin, end, strides, strict=True)):
            bit = 1 << i
            if ellipsis & bit:
                index.append(Ellipsis)
            elif new_axis & bit:
                index.append(None)
            elif shrink & bit:
                index.append(int(b))
            else:
                start = None if begin_mask & bit else int(b)
                stop = None if end_mask & bit else int(e)
                if int(s) < 0:
                    raise NotImplementedError("StridedSlice with a negative stride")
                index.append(slice(start, stop, int(s)))
        # negative integer indices (shrink) are counted from the end, as Python does
        return x[tuple(index)]


class Slice(Op):
    static = (1, 2)

    def forward(self, x: torch.Tensor, begin: list[int], size: list[int]) -> torch.Tensor:
        index = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s))
                      for b, s in zip(np.ravel(begin), np.ravel(size), strict=True))
        return x[index]


class Transpose(Op):
    static = (1,)

    def forward(self, x: torch.Tensor, perm: list[int]) -> torch.Tensor:
        return x.permute([int(p) for p in np.ravel(perm)])


class ResizeBilinear(Op):
    """TF ResizeBilinear on NHWC. half_pixel_centers is torch's align_corners=False (TF clamps
    the lower source index at 0 as torch clamps the source coordinate: the same samples);
    align_corners is the same flag. TF's legacy mode (neither) is not implemented."""

    static = (1,)

    def forward(self, x: torch.Tensor, size: list[int]) -> torch.Tensor:
        align = bool(self.attrs.get("align_corners", False))
        if not align and not self.attrs.get("half_pixel_centers", False):
            raise NotImplementedError("ResizeBilinear in TF's legacy sampling mode")
        y = F.interpolate(x.permute(0, 3, 1, 2), size=[int(s) for s in np.ravel(size)],
                          mode="bilinear", align_corners=align)
        return y.permute(0, 2, 3, 1)


class MaxPool(Op):
    """TF MaxPool on NHWC; 'SAME' pads with -inf (padding never wins the max)."""

    def geometry(self, x: torch.Tensor) -> dict[str, Any]:
        _, kh, kw, _ = self.attrs["ksize"]
        _, sh, sw, _ = self.attrs["strides"]
        if self.attrs.get("padding", "VALID") != "SAME":
            return {"pads": (0, 0, 0, 0)}
        return {"pads": (*_same_pads(int(x.shape[1]), kh, sh, 1),
                         *_same_pads(int(x.shape[2]), kw, sw, 1))}

    def forward(self, x: torch.Tensor, pads: tuple[int, int, int, int] | None = None
                ) -> torch.Tensor:
        _, kh, kw, _ = self.attrs["ksize"]
        _, sh, sw, _ = self.attrs["strides"]
        nchw = x.permute(0, 3, 1, 2)
        top, bottom, left, right = pads or self.geometry(x)["pads"]
        if top or bottom or left or right:
            if top == bottom and left == right and top <= kh // 2 and left <= kw // 2:
                return F.max_pool2d(nchw, (kh, kw), (sh, sw), (top, left)).permute(0, 2, 3, 1)
            nchw = F.pad(nchw, (left, right, top, bottom), value=float("-inf"))
        return F.max_pool2d(nchw, (kh, kw), (sh, sw)).permute(0, 2, 3, 1)


_LAYERS: dict[str, type[Op]] = {
    "Identity": Identity, "Cast": Cast, "AddN": AddN, "Shape": Shape, "Size": Size,
    "Reshape": Reshape, "ExpandDims": ExpandDims, "Squeeze": Squeeze, "Pack": Pack,
    "Unpack": Unpack, "ConcatV2": ConcatV2, "Split": Split, "Tile": Tile, "Fill": Fill,
    "Range": Range, "ArgMax": ArgMax, "TopKV2": TopKV2, "GatherNd": GatherNd,
    "GatherV2": GatherV2, "StridedSlice": StridedSlice, "Slice": Slice,
    "Transpose": Transpose, "ResizeBilinear": ResizeBilinear, "MaxPool": MaxPool,
}


def make_layer(spec: dict[str, Any]) -> nn.Module:
    """The torch layer of one op of the description."""
    op, attrs = spec["op"], spec["attrs"]
    if op == "conv2d":
        return Conv2d(**attrs)
    if op in _UNARY:
        return Unary(op=op)
    if op in _BINARY:
        return Binary(op=op)
    if op in ("Select", "SelectV2"):
        return Select(op=op)
    if op in ("Sum", "Max", "Min", "Mean", "Prod", "Any", "All"):
        return Reduce(op=op, keep_dims=attrs.get("keep_dims", False))
    if op in _LAYERS:
        return _LAYERS[op](**attrs)
    raise NotImplementedError(f"TF op {op} ({spec['name']}) is not supported")


def supported_ops() -> list[str]:
    """The TF ops ``TFJSGraph`` runs (besides Const and Placeholder)."""
    return sorted({*_CONV_OPS, *_UNARY, *_BINARY, *_LAYERS, "Select", "SelectV2", "Sum",
                   "Max", "Min", "Mean", "Prod", "Any", "All"})


# ---------------------------------------------------------------------------------------------
# The module


@dataclass
class _Plan:
    """The graph at one input size: folded constants and the steps left to run."""

    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    # (layer, input names or None for static ones, static values, geometry, output names)
    steps: list[tuple[nn.Module, list[str | None], list[Any], dict[str, Any], list[str]]] = (
        field(default_factory=list))


@contextlib.contextmanager
def _not_tracing() -> Iterator[None]:
    """Build plans outside any trace (the plan's constants are not part of the graph) and as
    ordinary tensors (not inference-mode ones, which a later graph could not save)."""
    state = torch._C._get_tracing_state()
    if state is not None:
        torch._C._set_tracing_state(None)
    try:
        with torch.inference_mode(False), torch.no_grad():
            yield
    finally:
        if state is not None:
            torch._C._set_tracing_state(state)


class TFJSGraph(nn.Module):
    """A TF.js graph model as torch layers, built from ``read_tfjs``'s description.

    ``forward(*inputs)`` takes the graph's inputs in TF's layout and dtypes (NHWC images) and
    returns its outputs as a tuple in the signature's order. Convolutions are ``ops.conv<i>``
    and ``ops.dwconv<i>`` (``nn.Conv2d`` with the graph's weights); large float constants are
    buffers ``consts.c<i>``; other ops are weightless entries of ``ops``.
    """

    MAX_PLANS = 16  # input sizes whose plans are kept (each holds a few small constants)

    def __init__(self, graph: dict[str, Any]) -> None:
        super().__init__()
        self.graph = graph
        self.ops = nn.ModuleDict()
        self.keys: list[str] = []
        for index, spec in enumerate(graph["ops"]):
            key = spec.get("key", f"op{index}")
            self.ops[key] = make_layer(spec)
            self.keys.append(key)
        self.consts = nn.Module()
        for spec in graph["buffers"].values():
            self.consts.register_buffer(spec["key"], torch.zeros(spec["shape"]))
        self.input_names = [i["name"] for i in graph["inputs"]]
        self.output_names = list(graph["outputs"])
        self._plans: dict[tuple[Any, ...], _Plan] = {}  # most recently used last
        self._plans_lock = threading.Lock()  # the app runs a model from several threads

    def _load_from_state_dict(self, *args: Any) -> None:
        self._plans.clear()  # plans hold copies of the constants
        super()._load_from_state_dict(*args)

    def _apply(self, fn: Any, recurse: bool = True) -> TFJSGraph:
        self._plans.clear()  # plans hold constants on the old device
        return super()._apply(fn, recurse)

    def constant_values(self, device: torch.device) -> dict[str, torch.Tensor]:
        values = {name: torch.tensor(np.asarray(c["value"], dtype=c["dtype"]).reshape(
            c["shape"]), device=device) for name, c in self.graph["constants"].items()}
        for name, spec in self.graph["buffers"].items():
            values[name] = getattr(self.consts, spec["key"]).to(device)
        return values

    def plan(self, inputs: tuple[torch.Tensor, ...]) -> _Plan:
        """The plan for inputs shaped like these (cached per shape, dtype and device; the
        ``MAX_PLANS`` most recently used are kept)."""
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        with self._plans_lock:
            plan = self._plans.pop(key, None)
            if plan is not None:
                self._plans[key] = plan  # now the most recent
                return plan
        with _not_tracing():
            plan = self._build_plan(inputs)
        with self._plans_lock:
            self._plans[key] = plan
            while len(self._plans) > self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
        return plan

    def _build_plan(self, inputs: tuple[torch.Tensor, ...]) -> _Plan:
        device = inputs[0].device
        known = self.constant_values(device)  # values that do not depend on the inputs' data
        sample = {n: torch.zeros_like(x) for n, x in zip(self.input_names, inputs, strict=True)}
        plan = _Plan()
        for key, spec in zip(self.keys, self.graph["ops"], strict=True):
            layer = self.ops[key]
            refs = spec["inputs"]
            static = getattr(layer, "static", ())
            args: list[Any] = []
            for position, ref in enumerate(refs):
                value = known.get(ref, sample.get(ref))
                if value is None:
                    raise KeyError(f"{spec['name']}: input {ref} is not computed before it")
                if position in static:
                    if ref not in known:
                        raise NotImplementedError(
                            f"{spec['name']} ({spec['op']}): input {position} depends on the "
                            "input's values, not only its shape")
                    value = value.tolist()
                args.append(value)
            constant = all(r in known for r in refs) or getattr(layer, "shape_only", False)
            # shape-derived numbers a layer needs (padding, offsets), fixed for this size
            extra = layer.geometry(*args) if hasattr(layer, "geometry") else {}
            result = layer(*args, **extra)
            outputs = result if isinstance(result, tuple | list) else (result,)
            names = [spec["name"]] + [f"{spec['name']}:{i}" for i in range(1, len(outputs))]
            if constant:  # on the inputs' device (Range and Fill make theirs on the CPU)
                known.update((n, o.to(device)) for n, o in zip(names, outputs, strict=True))
                continue
            sample.update(zip(names, outputs, strict=True))
            run_refs: list[str | None] = []
            statics: list[Any] = []
            for position, ref in enumerate(refs):
                if position in static:
                    run_refs.append(None)
                    statics.append(args[position])
                else:
                    run_refs.append(ref)
                    statics.append(None)
                    if ref in known:
                        plan.constants[ref] = known[ref]
            plan.steps.append((layer, run_refs, statics, extra, names))
        for name in self.output_names:
            if name in known:
                plan.constants[name] = known[name]
        return plan

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        plan = self.plan(inputs)
        values = dict(plan.constants)
        values.update(zip(self.input_names, inputs, strict=True))
        for layer, refs, statics, extra, names in plan.steps:
            args = [values[r] if r is not None else s for r, s in zip(refs, statics,
                                                                      strict=True)]
            result = layer(*args, **extra)
            if isinstance(result, torch.Tensor):
                values[names[0]] = result
            else:  # Unpack, Split, TopKV2: one value per output
                values.update(zip(names, result, strict=True))
        return tuple(values[name] for name in self.output_names)
