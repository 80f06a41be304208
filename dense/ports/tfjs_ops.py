"""The TF ops of :class:`dense.ports.tfjs.TFJSGraph`, as torch layers with TensorFlow's
semantics (``make_layer`` builds one from an op of ``read_tfjs``'s description).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dense.ports.tfjs_reader import _CONV_OPS

_TORCH_DTYPES = {"float32": torch.float32, "int32": torch.int32, "bool": torch.bool,
                 "int64": torch.int64, "float16": torch.float16, "uint8": torch.uint8,
                 "int8": torch.int8, "float64": torch.float64}


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
