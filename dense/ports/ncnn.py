"""A small reader for ncnn models: the text ``.param`` graph and the ``.bin`` weights.

ncnn stores a network as two files. The ``.param`` file is text: a magic number (7767517),
the layer and blob counts, then one line per layer::

    Convolution  conv1  1 1  in_blob out_blob  0=16 1=3 5=1 6=432 9=2 -23310=1,0.1

(type, name, number of inputs and outputs, their blob names, then ``key=value`` parameters;
a key ``-23300-k`` carries an array for parameter ``k`` as ``count,v1,v2,...``).

The ``.bin`` file has no header and no names: it is the weights of the layers that have any,
in the order of the ``.param`` lines, each array read the way that layer's ``load_model``
reads it. Convolution weights are read "tagged" (a 4-byte tag says fp16, int8, fp32 or a
256-entry quantisation table follows); biases and PReLU slopes are read as raw fp32. So the
reader must know, per layer type, which arrays it loads and how big they are. This module knows
the layer types the ports need (super-resolution: Convolution, Deconvolution, PReLU; PP-TinyPose:
grouped and depthwise Convolution) and refuses any other layer that has weights.

Besides the arrays, :func:`conv_geometry` reads a convolution's kernel, stride, dilation,
padding, groups and fused activation from its parameters, so a converter can check that the
PyTorch layer it fills is the same operation, not just the same weight shape.

We read with numpy only (no ncnn needed) and keep the stored precision: fp16 weights come back
as ``float16`` arrays, raw ones as ``float32``, so a conversion is lossless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PARAM_MAGIC = 7767517

# Tags that precede a "tagged" array in the .bin (ncnn src/modelbin.cpp).
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FP32_SCALED = 0x0002C056  # fp32 data "with extra scaling"; the data itself is plain fp32

# Layer types that load nothing from the .bin.
WEIGHTLESS = frozenset(
    {"Input", "Split", "Slice", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle",
     "ShuffleChannel", "ReLU", "Sigmoid", "HardSigmoid", "HardSwish", "Swish", "TanH", "Crop",
     "Padding", "Pooling", "Reshape", "Flatten", "Permute", "Clip", "Softmax", "Noop"}
)

# The activations ncnn fuses into a convolution (parameter 9; parameter 10 holds their
# arguments): 1 ReLU, 2 LeakyReLU(slope), 3 Clip(min, max), 4 Sigmoid, 5 Mish, 6 HardSwish.
ACTIVATIONS = {0: None, 1: "relu", 2: "leaky_relu", 3: "clip", 4: "sigmoid", 5: "mish",
               6: "hardswish"}

ParamValue = int | float | list[int] | list[float]
Weights = dict[str, dict[str, np.ndarray]]  # layer name -> {"weight": ..., "bias": ...}


@dataclass
class Layer:
    """One line of a ``.param`` file."""

    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, ParamValue] = field(default_factory=dict)

    def get(self, key: int, default: ParamValue = 0) -> ParamValue:
        return self.params.get(key, default)


def _number(text: str) -> int | float:
    # ncnn decides int vs float by the presence of '.' or an exponent ('e'/'E').
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_param(text: str) -> list[Layer]:
    """Parse the text of an ncnn ``.param`` file into its layers, in file order."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or int(lines[0][0]) != PARAM_MAGIC:
        raise ValueError(f"not an ncnn text .param file (magic number {PARAM_MAGIC} missing)")
    layer_count = int(lines[1][0])
    layers = []
    for fields in lines[2 : 2 + layer_count]:
        kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
        blobs = fields[4 : 4 + n_in + n_out]
        params: dict[int, ParamValue] = {}
        for item in fields[4 + n_in + n_out :]:
            key_text, value_text = item.split("=", 1)
            key = int(key_text)
            if key <= -23300:  # array parameter: "-233xx=count,v1,v2,..."
                count, *values = value_text.split(",")
                params[-key - 23300] = [_number(v) for v in values][: int(count)]
            else:
                params[key] = _number(value_text)
        layers.append(Layer(kind, name, blobs[:n_in], blobs[n_in:], params))
    if len(layers) != layer_count:
        raise ValueError(f".param declares {layer_count} layers but has {len(layers)}")
    return layers


def read_param(path: str | Path) -> list[Layer]:
    """Read an ncnn ``.param`` text file."""
    return parse_param(Path(path).read_text(encoding="ascii"))


class _BinReader:
    """Sequential reads from the .bin bytes, mirroring ncnn's ``ModelBinFromDataReader``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def _take(self, nbytes: int) -> bytes:
        if self.offset + nbytes > len(self.data):
            raise ValueError(f".bin ends early: need {nbytes} bytes at offset {self.offset}")
        chunk = self.data[self.offset : self.offset + nbytes]
        self.offset += nbytes
        return chunk

    def raw(self, count: int) -> np.ndarray:
        """``load(w, type=1)``: ``count`` little-endian fp32 values, no tag."""
        return np.frombuffer(self._take(4 * count), dtype="<f4").copy()

    def tagged(self, count: int) -> np.ndarray:
        """``load(w, type=0)``: a 4-byte tag, then the data in the format the tag names."""
        tag = int.from_bytes(self._take(4), "little")
        if tag == TAG_FP16:
            data = self._take(_align4(2 * count))
            return np.frombuffer(data, dtype="<f2", count=count).copy()
        if tag == TAG_INT8:
            raise ValueError("int8-quantised ncnn weights are not supported (need their scales)")
        if tag in (TAG_FP32_SCALED, 0):
            return self.raw(count)
        # Any other non-zero tag: a 256-entry fp32 lookup table, then one uint8 index per value.
        table = np.frombuffer(self._take(256 * 4), dtype="<f4")
        index = np.frombuffer(self._take(_align4(count)), dtype=np.uint8, count=count)
        return table[index].astype(np.float32)


def _align4(nbytes: int) -> int:
    return (nbytes + 3) // 4 * 4


@dataclass(frozen=True)
class ConvGeometry:
    """What a Convolution / ConvolutionDepthWise / Deconvolution line computes, besides its
    weights. ``padding`` is (left, right, top, bottom); ncnn's "SAME" codes (-233, -234) are
    kept as they are, they depend on the input size."""

    out_channels: int
    kernel: tuple[int, int]  # (height, width)
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int, int, int]
    groups: int
    bias: bool
    activation: str | None
    activation_params: tuple[float, ...]


def conv_geometry(layer: Layer) -> ConvGeometry:
    """Read a convolution's parameters (ncnn's ``load_param`` keys and defaults)."""
    kernel_w = int(layer.get(1))
    dilation_w = int(layer.get(2, 1))
    stride_w = int(layer.get(3, 1))
    pad_left = int(layer.get(4))
    pad_top = int(layer.get(14, pad_left))
    activation = int(layer.get(9))
    if activation not in ACTIVATIONS:
        raise ValueError(f"layer {layer.name}: unknown fused activation type {activation}")
    params = layer.get(10, [])
    return ConvGeometry(
        out_channels=int(layer.get(0)),
        kernel=(int(layer.get(11, kernel_w)), kernel_w),
        stride=(int(layer.get(13, stride_w)), stride_w),
        dilation=(int(layer.get(12, dilation_w)), dilation_w),
        padding=(pad_left, int(layer.get(15, pad_left)), pad_top, int(layer.get(16, pad_top))),
        groups=int(layer.get(7, 1)) if layer.type.endswith("DepthWise") else 1,
        bias=bool(int(layer.get(5))),
        activation=ACTIVATIONS[activation],
        activation_params=tuple(float(v) for v in params) if isinstance(params, list) else (),
    )


def _conv_arrays(layer: Layer, reader: _BinReader) -> dict[str, np.ndarray]:
    """Convolution, ConvolutionDepthWise and Deconvolution: tagged weight, then an fp32 bias if
    ``bias_term``.

    The weight is shaped ``(num_output, num_input / groups, kernel_h, kernel_w)``, PyTorch's
    Conv2d layout; for a deconvolution too, since ncnn's converters already store its weight
    output-channel first. ``ConvolutionDepthWise`` is ncnn's name for any grouped convolution
    (``7=group``); a plain ``Convolution`` has no groups.
    """
    if int(layer.get(8)):
        raise ValueError(f"layer {layer.name}: int8 convolutions (8=int8_scale_term) are not "
                         "supported")
    geometry = conv_geometry(layer)
    if layer.type == "Deconvolution" and geometry.groups != 1:
        raise ValueError(f"layer {layer.name}: grouped deconvolutions are not supported")
    num_output, groups = geometry.out_channels, geometry.groups
    kernel_h, kernel_w = geometry.kernel
    size = int(layer.get(6))
    per_group_input = size // (num_output * kernel_h * kernel_w)
    if per_group_input * num_output * kernel_h * kernel_w != size or num_output % groups:
        raise ValueError(f"layer {layer.name}: weight_data_size {size} does not fit "
                         f"{num_output} outputs, {groups} groups, kernel {kernel_h}×{kernel_w}")
    weight = reader.tagged(size).reshape(num_output, per_group_input, kernel_h, kernel_w)
    arrays = {"weight": weight}
    if geometry.bias:
        arrays["bias"] = reader.raw(num_output)
    return arrays


def _prelu_arrays(layer: Layer, reader: _BinReader) -> dict[str, np.ndarray]:
    """PReLU: one fp32 slope per channel (``0=num_slope``)."""
    return {"slope": reader.raw(int(layer.get(0)))}


_LOADERS = {
    "Convolution": _conv_arrays,
    "ConvolutionDepthWise": _conv_arrays,
    "Deconvolution": _conv_arrays,
    "PReLU": _prelu_arrays,
}


def read_weights(layers: list[Layer], data: bytes) -> Weights:
    """Split ``.bin`` bytes into named arrays: ``{layer name: {"weight": ..., "bias": ...}}``.

    Only layers with weights appear, in file order (dicts keep insertion order). The whole file
    must be consumed; leftover bytes mean the graph and the weights do not belong together.
    """
    reader = _BinReader(data)
    weights: Weights = {}
    for layer in layers:
        loader = _LOADERS.get(layer.type)
        if loader is not None:
            weights[layer.name] = loader(layer, reader)
        elif layer.type not in WEIGHTLESS:
            raise ValueError(f"layer {layer.name}: ncnn layer type {layer.type} is not supported")
    if reader.offset != len(data):
        raise ValueError(f".bin has {len(data) - reader.offset} bytes left after the last layer")
    return weights


def read_model(param: str | Path, bin_path: str | Path) -> tuple[list[Layer], Weights]:
    """Read a ``.param``/``.bin`` pair: the layers and their named weight arrays."""
    layers = read_param(param)
    return layers, read_weights(layers, Path(bin_path).read_bytes())
