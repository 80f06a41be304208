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

The reader is :mod:`dense.ports.tfjs_reader` and the ops :mod:`dense.ports.tfjs_ops`; this
module holds ``TFJSGraph``, and ``read_tfjs`` is importable from here as well.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

# The reader lives in dense.ports.tfjs_reader, the ops in tfjs_ops; the names callers imported
# from here stay importable from here.
from dense.ports.tfjs_ops import Conv2d as Conv2d
from dense.ports.tfjs_ops import make_layer
from dense.ports.tfjs_ops import supported_ops as supported_ops
from dense.ports.tfjs_reader import read_tfjs as read_tfjs
from dense.ports.tfjs_reader import read_weights as read_weights

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
