"""A zoo module made ready to serve: :class:`ServedModel`, :func:`serve`, :func:`load_served`.

The zoo gives a plain eager module; serving wraps it, without changing what it computes, in one
explicit object that records the backend chosen for it (``dense.serve.backends``) and runs it
there. The wrapper is an ``nn.Module`` so tasks call it like the model; ``.eager`` is the module
itself (for exports, gradients, training), ``.backend`` the choice, ``.choice`` how it was made
(measured here, forced, or the rule: ``dense.serve.measure.Choice``) and ``.config`` the
model's config.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dense import zoo
from dense.serve.backends import EXPORT_BACKENDS, forced_backend, pick_backend, served_size
from dense.serve.devices import CudaGraphForward, keep_freed_memory, pick_device
from dense.serve.export import export_forward
from dense.serve.measure import Choice, measure_backend, measuring

log = logging.getLogger(__name__)


class ServedModel(nn.Module):
    """``eager`` served on ``backend``: calls go to ``run`` (an export's runtime, a CUDA graph,
    or ``eager`` with some parts served apart), or to ``eager`` itself when ``run`` is None.

    Attributes the wrapper lacks are read from ``eager`` (``config``, ``labels``, ``scale``...),
    so code written for the zoo's module keeps working on the served one.
    """

    def __init__(self, eager: nn.Module, backend: str,
                 run: Callable[[torch.Tensor], Any] | None = None,
                 choice: Choice | None = None) -> None:
        super().__init__()
        self.eager = eager
        self.backend = backend
        self.choice = choice or Choice(backend, "rule")
        # A plain attribute, not a submodule: a shallow copy of ``eager`` (see _serve_parts)
        # shares its parameters and must not be counted or moved twice.
        object.__setattr__(self, "run", run)

    @property
    def config(self) -> dict[str, Any]:
        return self.eager.config

    def forward(self, x: torch.Tensor) -> Any:
        return self.run(x) if self.run is not None else self.eager(x)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("eager"), name)


def serve(model: nn.Module, device: str | torch.device | None = "auto",
          backend: str | None = "auto") -> ServedModel:
    """``model`` (a zoo module) in eval mode on ``device``, on the backend measured fastest for
    it on this machine (:func:`dense.serve.measure.measure_backend`; cached per machine), or
    forced (``backend``, ``DENSE_BACKEND``), or the rule's
    (:func:`dense.serve.backends.pick_backend`: off the CPU, ``DENSE_BACKEND_MEASURE=0``).

    If serving from the ONNX export fails (an op the exporter cannot write, a mismatch with
    PyTorch), the model runs channels_last PyTorch and the reason is logged. Inputs an export
    does not cover (a U-Net at another size than it was trained at, a gradient) also run in
    channels_last PyTorch, the choice measured for PyTorch on CPU: the module's weights are put
    in that format once the export has been checked against it.
    """
    device = pick_device(device)
    model = model.eval().to(device)
    if device.type == "cpu":
        keep_freed_memory()
    chosen = pick_backend(model, device, backend)
    choice = Choice(chosen, "forced" if forced_backend(backend) else "rule")
    run = None
    if hasattr(model, "served_parts") and device.type == "cpu":
        chosen, run = _serve_parts(model, device, backend, chosen)
        choice = Choice(chosen, choice.how if choice.how == "forced" else "parts")
    else:
        if choice.how == "rule" and device.type == "cpu" and measuring():
            choice, run = measure_backend(model, device, chosen)
            chosen = choice.backend
        if chosen in EXPORT_BACKENDS and run is None:
            try:
                run = export_forward(model, chosen)
            except Exception as err:  # noqa: BLE001 - any export/runtime failure falls back
                log.warning("%s unavailable for %s (%s); using PyTorch", chosen,
                            getattr(model, "config", {}).get("id", "model"), err)
                chosen = "channels_last"
                choice = Choice(chosen, "rule", note=f"{choice.backend} failed: {err}")
    if chosen != "eager":  # channels_last, cuda_graph, and the exports' PyTorch fallback
        model = model.to(memory_format=torch.channels_last)
    if chosen == "cuda_graph":
        run = CudaGraphForward(model, served_size(model.config))
    return ServedModel(model, chosen, run, choice)


def _serve_parts(model: nn.Module, device: torch.device, backend: str | None,
                 chosen: str) -> tuple[str, nn.Module]:
    """A model made of networks that are best served apart (``everyday``: MOSAIC, served by
    onnxruntime, and ESPNetv2, by OpenVINO; one export of both ran 1.7× slower than PyTorch):
    each part gets its own backend, measured like a model's (cached under the part's id,
    ``everyday-scene``); the model's own code around them runs in PyTorch.

    The parts are swapped in a shallow copy of ``model`` (same parameters, its own table of
    submodules), so ``model`` stays the plain module. Returns the backend description and the
    copy, whose forward serves the model.
    """
    digest = getattr(model, "config", {}).get("sha256", {}).get(zoo.WEIGHTS_FILE, "")
    runner = copy.copy(model)
    runner._modules = dict(model._modules)
    names = []
    for name, (part, config) in model.served_parts().items():
        # The export cache is keyed by the part's id and the whole model's checksum.
        part.config = {**config, "id": f"{model.config.get('id', 'model')}-{name}",
                       "sha256": {zoo.WEIGHTS_FILE: f"{digest[:12]}{name}"}}
        runtime = pick_backend(part, device, backend)
        choice, run = Choice(runtime, "forced" if forced_backend(backend) else "rule"), None
        if choice.how == "rule" and measuring():
            choice, run = measure_backend(part, device, runtime)
            runtime = choice.backend
        if runtime in EXPORT_BACKENDS:
            try:
                attribute = next(k for k, m in model._modules.items() if m is part)
                runner._modules[attribute] = ServedModel(
                    part, runtime, run or export_forward(part, runtime), choice)
            except Exception as err:  # noqa: BLE001 - any export/runtime failure falls back
                log.warning("%s unavailable for %s (%s); using PyTorch", runtime,
                            part.config["id"], err)
                runtime = chosen
        names.append(f"{name}={runtime}")
    return f"{chosen} ({', '.join(names)})", runner


def load_served(name: str, device: str | torch.device | None = "auto",
                backend: str | None = "auto", *, verify_checksum: bool = True) -> ServedModel:
    """Model ``name`` from the zoo (:func:`dense.zoo.load`), served on ``device`` with
    ``backend`` (``dense.serve.backends.BACKENDS``; ``auto``: the fastest measured for the model
    there, ``DENSE_BACKEND`` forces one; ``eager``: the plain module in the wrapper)."""
    device = pick_device(device)
    model = zoo.load(name, device, verify_checksum=verify_checksum)
    return serve(model, device, backend)


_cache: dict[tuple[str, str], ServedModel] = {}
_cache_lock = threading.Lock()  # guards the two dicts only, never held during a load
_load_locks: dict[tuple[str, str], threading.Lock] = {}


def cached_load(name: str, device: str | torch.device | None = "auto") -> ServedModel:
    """:func:`load_served` once per (model, device), shared across requests and threads.

    Each model has its own lock, so a slow first load (on CPU it may write an ONNX export)
    delays only the requests that need that model, not those for models already loaded.
    """
    key = (str(name), str(pick_device(device)))
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        lock = _load_locks.setdefault(key, threading.Lock())
    with lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        model = load_served(key[0], key[1])
        with _cache_lock:
            _cache[key] = model
        return model
