"""Reading a TF.js graph model (``model.json`` + weight shards) into a graph description.

The first half of :mod:`dense.ports.tfjs` (whose docstring describes both): ``read_tfjs``
decodes the weights and the GraphDef's nodes into a JSON-able description and torch-layout
weights; ``TFJSGraph`` runs the result with the ops of :mod:`dense.ports.tfjs_ops`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------------
# Reading model.json and its weight shards

_DTYPES = {"DT_FLOAT": "float32", "DT_INT32": "int32", "DT_BOOL": "bool", "DT_INT64": "int64",
           "DT_HALF": "float16", "DT_UINT8": "uint8", "DT_INT8": "int8", "DT_DOUBLE": "float64"}
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
