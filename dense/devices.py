"""Device and precision choice. No code path assumes a GPU.

On CUDA, models run in channels_last memory format under fp16 autocast (bf16 where the GPU
prefers it); on CPU they run in fp32. ``DENSE_DEVICE`` or a ``--device`` flag overrides "auto".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn


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


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Put a model in eval mode on ``device``, channels_last on CUDA."""
    model = model.eval().to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision used for inference on ``device``, or None for fp32."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if os.environ.get("DENSE_CUDA_DTYPE") == "bf16" else torch.float16


@contextlib.contextmanager
def inference(device: torch.device) -> Iterator[None]:
    """Context for running a model: no autograd, autocast on CUDA."""
    dtype = autocast_dtype(device)
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device.type, dtype=dtype):
                yield


def model_device(model: nn.Module) -> torch.device:
    """The device a model's parameters live on (CPU for a parameterless module)."""
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")
