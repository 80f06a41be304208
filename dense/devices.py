"""Device, precision and backend choice. No code path assumes a GPU.

On CUDA, models run in channels_last memory format in fp32 (TF32 convolutions): on an H200 that
beat fp16 autocast at batch 1 for every model timed (docs/benchmarks.md, "GPU"), autocast's
per-op casts costing more than half precision saves; ``DENSE_CUDA_DTYPE=fp16`` (or ``bf16``)
turns autocast on. Models with a fixed input size (the MediaPipe graphs, unet-camvid at its
trained size) replay a CUDA graph at batch 1 (:class:`CudaGraphForward`), 1.8-4× faster than
eager in the bench there (the serving path's test passed on an H100). On CPU models run in
fp32, with glibc told to keep freed memory for reuse (:func:`keep_freed_memory`).
``DENSE_DEVICE`` or a ``--device`` flag overrides "auto".

On CPU the backend is the fastest measured for the kind of model (docs/benchmarks.md): our
own ONNX export, run by OpenVINO, for the fixed-size MediaPipe graphs (hundreds of small ops,
where eager PyTorch pays a dispatch per op), unet-camvid at its trained size and the
Real-ESRGAN and waifu2x ports; without OpenVINO, onnxruntime for the first two (it was slower
than PyTorch on the ports); channels_last PyTorch for everything else (where oneDNN in NHWC
was as fast). In fp32, except the super-resolution ports on a CPU with native bf16 units
(AVX512-BF16, AMX): OpenVINO in bf16 ran them 1.8-2× faster than in fp32, with outputs within
49-57 dB PSNR of fp32's on three real photos (0.14-0.62 grey levels on average; ncnn's own bf16
mode: 49-55 dB on Real-ESRGAN; tests/test_bench.py checks it). Not the others: bf16 moved
BlazePose's landmarks by up to 14% of their range. ``DENSE_BACKEND`` (one of BACKENDS) forces
a backend.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "channels_last", "onnxruntime", "openvino", "openvino_bf16",
            "cuda_graph")
# The runtimes on our ONNX export, each with the package it runs in.
EXPORT_BACKENDS = {"onnxruntime": "onnxruntime", "openvino": "openvino",
                   "openvino_bf16": "openvino"}
# The runtimes on our ONNX export that beat channels_last PyTorch on CPU, per architecture,
# fastest first (docs/benchmarks.md): the MediaPipe graphs (fixed input size, 3-7×), our
# segmentation U-Net at the size it was trained for (2.2×; other sizes stay in PyTorch), and
# the super-resolution ports at any size: OpenVINO in bf16 where the CPU has it (see the module
# doc), else in fp32 for Real-ESRGAN and waifu2x (8-13% and 3-25% faster than PyTorch in two
# runs; onnxruntime was slower than PyTorch on Real-ESRGAN, and OpenVINO in fp32 only tied
# PyTorch on SRVGG, animevideov3).
EXPORT_RUNTIMES = {
    "selfie_segmentation": ("openvino", "onnxruntime"),
    "blazepose_landmark": ("openvino", "onnxruntime"),
    "blazepose_detector": ("openvino", "onnxruntime"),
    "unet": ("openvino", "onnxruntime"),
    "rrdbnet": ("openvino_bf16", "openvino"),
    "waifu2x_upconv7": ("openvino_bf16", "openvino"),
    "srvgg": ("openvino_bf16",),
    # The ports of issues 19 and 20 (docs/benchmarks.md, 2026-11-30): MOSAIC's integer graph
    # as QLinearConv in onnxruntime (2.4× PyTorch; OpenVINO folds the requantisation into its
    # weights and is not exact, so the export check refuses it); the others in OpenVINO
    # (ESPNetv2 1.1-1.5×, YOLOX 2.3×, TinyPose 2.2-4.3×, MoveNet 2.1-2.5× PyTorch's fastest).
    "mosaic": ("onnxruntime",),
    "espnetv2_seg": ("openvino", "onnxruntime"),
    "yolox": ("openvino", "onnxruntime"),
    "tinypose": ("openvino", "onnxruntime"),
    "movenet_multipose": ("openvino", "onnxruntime"),
    "movenet_singlepose": ("openvino", "onnxruntime"),
}


def runtime_available(runtime: str) -> bool:
    """Whether ``runtime`` (one of EXPORT_BACKENDS) can run here: its package is installed and,
    for ``openvino_bf16``, the CPU has native bf16 (else OpenVINO would emulate it)."""
    if not importlib.util.find_spec(EXPORT_BACKENDS[runtime]):
        return False
    return runtime != "openvino_bf16" or openvino_native_bf16()


@functools.cache
def openvino_native_bf16() -> bool:
    """Whether OpenVINO reports native bf16 on this CPU."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def export_runtime(config: dict) -> str | None:
    """The fastest available runtime on our ONNX export of the model with this config, or None
    where PyTorch is faster or no export covers the model's inputs."""
    from dense.export import dynamic_export

    if not (served_size(config) or dynamic_export(config)):
        return None
    available = [r for r in EXPORT_RUNTIMES.get(config.get("architecture"), ())
                 if runtime_available(r)]
    return available[0] if available else None


def pick_device(name: str | torch.device | None = "auto") -> torch.device:
    """Resolve ``"auto"`` (``DENSE_DEVICE`` or CUDA when available, else CPU) to a device."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        name = os.environ.get("DENSE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"Device '{name}' was asked for, but this machine has no usable CUDA.")
    return device


def served_size(config: dict) -> tuple[int, int] | None:
    """The input size a served export is fixed to: the model's fixed input size (MediaPipe
    graphs), the size it is served at (``input.served_size``: MoveNet MultiPose, whose graph
    is traced per size) or the size it was trained at (``input.trained_size``); None for none."""
    inputs = config.get("input", {})
    size = inputs.get("size") or inputs.get("served_size") or inputs.get("trained_size")
    return tuple(size) if size else None


def pick_backend(model: nn.Module, device: torch.device, backend: str | None = "auto") -> str:
    """``auto`` → the fastest measured backend for this model on ``device`` (see module doc)."""
    backend = backend if backend not in (None, "", "auto") else os.environ.get("DENSE_BACKEND",
                                                                               "auto")
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend '{backend}'; choose from {', '.join(BACKENDS)}")
    config = getattr(model, "config", {})
    if device.type == "cuda":  # CUDA graphs where the input size is fixed (see module doc)
        if backend in ("auto", "cuda_graph"):
            return "cuda_graph" if served_size(config) else "channels_last"
        return "eager" if backend == "eager" else "channels_last"
    if device.type != "cpu" or backend == "cuda_graph":
        return "eager" if backend == "eager" else "channels_last"
    if backend != "auto":
        return backend
    return export_runtime(config) or "channels_last"


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel at once.

    A U-Net's activations are megabytes each. glibc serves blocks above its mmap threshold from
    fresh mappings, unmaps them when they are freed and trims the heap's free top above its
    trim threshold, so every forward pass faulted its activation pages in again: for unet-sr-x2
    at 128×128 on the 2-core CPU, 62,000 page faults and 215 ms a call, against 600-900 faults
    and 118-123 ms with M_MMAP_THRESHOLD at glibc's 32 MiB maximum and M_TRIM_THRESHOLD at 256 MiB
    (onnxruntime, with its own arena, took 117 ms; all measured 2026-11-26). glibc's own
    ``mallopt`` through ctypes rather than jemalloc or tcmalloc: those need LD_PRELOAD before
    the process starts; this works from inside it. Returns whether glibc took both settings
    (False elsewhere: macOS, Windows, musl)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and
                libc.mallopt(m_trim_threshold, 256 << 20))


def prepare_model(model: nn.Module, device: torch.device, backend: str | None = "auto"
                  ) -> nn.Module:
    """Put a model in eval mode on ``device`` with the backend of :func:`pick_backend`.

    The choice is recorded as ``model.backend``. If serving from the ONNX export fails (an op
    the exporter cannot write, a mismatch with PyTorch), the model stays on channels_last and
    the reason is logged.
    """
    model = model.eval().to(device)
    if device.type == "cpu":
        keep_freed_memory()
    chosen = pick_backend(model, device, backend)
    if hasattr(model, "served_parts") and device.type == "cpu":
        chosen = _serve_parts(model, device, backend, chosen)
    if chosen in EXPORT_BACKENDS:
        from dense.export import serve_export

        try:
            serve_export(model, chosen)
        except Exception as err:  # noqa: BLE001 - any export/runtime failure falls back
            log.warning("%s unavailable for %s (%s); using PyTorch", chosen,
                        getattr(model, "config", {}).get("id", "model"), err)
            chosen = "channels_last"
    if chosen in ("channels_last", "cuda_graph"):
        model = model.to(memory_format=torch.channels_last)
    if chosen == "cuda_graph":
        model.forward = CudaGraphForward(model, served_size(model.config))
    model.backend = chosen
    return model


def _serve_parts(model: nn.Module, device: torch.device, backend: str | None,
                 chosen: str) -> str:
    """A model made of networks that are best served apart (``everyday``: MOSAIC, served by
    onnxruntime, and ESPNetv2, by OpenVINO; one export of both ran 1.7× slower than PyTorch):
    each part gets its own backend; the model's own code around them runs in PyTorch.
    Returns the backend description recorded on the model."""
    from dense.export import serve_export

    digest = getattr(model, "config", {}).get("sha256", {}).get("model.safetensors", "")
    names = []
    for name, (part, config) in model.served_parts().items():
        # The export cache is keyed by the part's id and the whole model's checksum.
        part.config = {**config, "id": f"{model.config.get('id', 'model')}-{name}",
                       "sha256": {"model.safetensors": f"{digest[:12]}{name}"}}
        runtime = pick_backend(part, device, backend)
        if runtime in EXPORT_BACKENDS:
            try:
                serve_export(part, runtime)
            except Exception as err:  # noqa: BLE001 - any export/runtime failure falls back
                log.warning("%s unavailable for %s (%s); using PyTorch", runtime,
                            part.config["id"], err)
                runtime = chosen
        names.append(f"{name}={runtime}")
    return f"{chosen} ({', '.join(names)})"


# One capture at a time in the process. Captures run in "thread_local" mode, so the app's
# other threads may keep running models on their own streams meanwhile, but two captures must
# not interleave.
_CAPTURE_LOCK = threading.Lock()


def capture_cuda_graph(forward: Callable, x: torch.Tensor, dtype: torch.dtype | None = None
                       ) -> Callable[[torch.Tensor], object]:
    """``forward`` on CUDA inputs shaped like ``x``, captured once as a CUDA graph (under
    autocast to ``dtype`` when given). The returned function copies its input into the graph's
    own, replays the graph and returns the graph's outputs, which the next replay overwrites.

    Replaying skips the per-op kernel launches that bound every model timed at batch 1 on an
    H200 (1.8-4× faster than eager fp32, docs/benchmarks.md). Autocast's weight cache is off:
    casts cached during capture would be freed under the graph.
    """
    autocast = torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None,
                              cache_enabled=False)
    with _CAPTURE_LOCK, torch.inference_mode():  # the graph's tensors are inference tensors
        static = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            for _ in range(3):  # warm-up on a side stream, as capture requires
                forward(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with autocast, torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = forward(static)

    def replay(new: torch.Tensor) -> object:
        with torch.inference_mode():
            static.copy_(new)
            graph.replay()
        return out
    return replay


def _copy(out: object) -> object:
    """Copies of a model's output tensors (a tensor, or a dict, tuple or list of them)."""
    if isinstance(out, dict):
        return {k: _copy(v) for k, v in out.items()}
    if isinstance(out, tuple | list):
        return type(out)([_copy(v) for v in out])
    return out.clone() if isinstance(out, torch.Tensor) else out


class CudaGraphForward:
    """A model's forward that serves batch-1 float32 CUDA inputs of ``size`` by replaying a CUDA
    graph, captured at the first such call, in the precision of ``DENSE_CUDA_DTYPE``.

    Anything else runs the eager forward: other shapes or dtypes, gradients, another autocast
    precision than the graph's (an explicit ``torch.autocast`` of the caller is honoured), a
    call made while some graph is being captured, and every call after a failed capture. An
    out-of-memory error during capture is not remembered (the next call tries again). Each call
    returns copies of the graph's outputs, so that a caller may keep them while the next call
    replays; calls are serialised, as the graph has one input and one output buffer.
    """

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        self.eager, self.size = model.forward, tuple(size)
        self.name = getattr(model, "config", {}).get("id", "model")
        self.lock = threading.Lock()
        self.replay: Callable[[torch.Tensor], object] | None = None
        self.dtype: torch.dtype | None = None
        self.failed = False

    def __call__(self, x: torch.Tensor) -> object:
        if not self._graph_fits(x):
            return self.eager(x)
        with self.lock:
            if self.replay is None:
                self.dtype = autocast_dtype(x.device)
                try:
                    self.replay = capture_cuda_graph(self.eager, x, self.dtype)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    return self.eager(x)
                except RuntimeError as err:
                    log.warning("CUDA graph capture failed for %s (%s); running eager",
                                self.name, err)
                    self.failed = True
                    return self.eager(x)
            return _copy(self.replay(x))

    def _graph_fits(self, x: torch.Tensor) -> bool:
        if (self.failed or x.device.type != "cuda" or x.dtype != torch.float32
                or tuple(x.shape) != (1, 3, *self.size) or torch.is_grad_enabled()
                or torch.cuda.is_current_stream_capturing()):
            return False
        caller = (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda")
                  else None)
        graph = self.dtype if self.replay is not None else autocast_dtype(x.device)
        return caller == graph


CUDA_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision used for inference on ``device`` (``DENSE_CUDA_DTYPE`` on CUDA),
    or None for fp32."""
    if device.type != "cuda":
        return None
    name = os.environ.get("DENSE_CUDA_DTYPE", "fp32")
    if name not in CUDA_DTYPES:
        raise ValueError(f"DENSE_CUDA_DTYPE={name!r}: choose from {', '.join(CUDA_DTYPES)}")
    return CUDA_DTYPES[name]


@contextlib.contextmanager
def inference(device: torch.device) -> Iterator[None]:
    """Context for running a model: no autograd; autocast on CUDA when asked for."""
    dtype = autocast_dtype(device)
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device.type, dtype=dtype):
                yield


def model_device(model: nn.Module) -> torch.device:
    """The device a model's tensors live on: its parameters', else its buffers' (a module with
    buffers only, moved to a GPU, is on the GPU); CPU for a module with neither."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
