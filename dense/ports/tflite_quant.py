"""TFLite layers with integer arithmetic, for :class:`dense.ports.tflite.TFLiteGraph`.

The quantised layers (``Quantize``, ``Dequantize``, ``Requantize``, ``QConv2d`` and its ONNX
export as QLinearConv, ``QAdd``, ``QAvgPool2d``) reproduce the integer arithmetic of LiteRT's
default CPU path (XNNPACK) on float tensors holding centred integers; ``ResizeBilinearGather``
is TFLite's bilinear resize in any of its samplings (the legacy one F.interpolate lacks, and
the quantised one's rounded weights).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# Bilinear resize in TFLite's samplings (float and quantised)


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
