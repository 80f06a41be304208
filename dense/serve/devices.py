"""Device, precision and backend choice. No code path assumes a GPU.

On CUDA, models run in channels_last memory format in fp32 (TF32 convolutions): on an H200 that
beat fp16 autocast at batch 1 for every model timed (docs/benchmarks.md, "GPU"), autocast's
per-op casts costing more than half precision saves; ``DENSE_CUDA_DTYPE=fp16`` (or ``bf16``)
turns autocast on. Models with a fixed input size (the MediaPipe graphs, unet-camvid at its
trained size) replay a CUDA graph at batch 1 (:class:`CudaGraphForward`), 1.8-4× faster than
eager in the bench there (the serving path's test passed on an H100). On CPU models run in
fp32, with glibc told to keep freed memory for reuse (:func:`keep_freed_memory`).
``DENSE_DEVICE`` or a ``--device`` flag overrides "auto".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator

import torch
from torch import nn

from dense.hardware import model_device, pick_device

__all__ = ["CUDA_DTYPES", "CudaGraphForward", "autocast_dtype", "capture_cuda_graph",
           "inference", "keep_freed_memory", "model_device", "pick_device"]

log = logging.getLogger(__name__)


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
