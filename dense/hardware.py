"""What this machine offers: the device to run on, and the CPU's name and instruction-set flags.

At the bottom of the package (it imports only torch), so that the zoo can put a module on a
device and the serving layer can key its measured backend choices by CPU without either
importing the other.
"""

from __future__ import annotations

import functools
import os
import platform

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


def model_device(model: nn.Module) -> torch.device:
    """The device a model's tensors live on: its parameters', else its buffers' (a module with
    buffers only, moved to a GPU, is on the GPU); CPU for a module with neither."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _cpuinfo_field(field: str, text: str) -> str | None:
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.split(":", 1)[0].strip() == field), None)


@functools.cache
def cpu_model() -> tuple[str, str]:
    """The CPU's model name and its sorted instruction-set flags (``/proc/cpuinfo`` on Linux;
    the platform's processor string and no flags elsewhere). Two machines with the same name
    can differ in flags (a VM may hide AVX-512 or AMX), and the flags decide which backend is
    fastest, so both go into the key of a measured choice."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return name, flags
    name = _cpuinfo_field("model name", text) or name
    flags = " ".join(sorted(set((_cpuinfo_field("flags", text) or "").split())))
    return name, flags


# Environment variables that cap the instruction sets the libraries use below what the CPU
# has: oneDNN's (PyTorch's convolutions and all of OpenVINO's CPU kernels read it) and ATen's
# own vector kernels. ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` runs our side as on
# a CPU without AVX-512 (onnxruntime, LiteRT and ncnn have no such switch: they keep theirs).
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def isa_caps() -> dict[str, str]:
    """The instruction-set caps set in the environment (see ISA_CAPS), by variable."""
    return {k: v for k in ISA_CAPS if (v := os.environ.get(k, "").strip())}


def onednn_bf16_allowed() -> bool:
    """Whether oneDNN may use the CPU's native bf16 instructions: no cap, or a cap that keeps
    AVX-512 with bf16 (or AMX). OpenVINO reports bf16 from the CPU's flags, cap or not."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "")
    cap = cap.strip().upper()
    # oneDNN's ISA names from AVX512_CORE_BF16 up all include bf16 (…_FP16, …_AMX, AVX10_*)
    return not cap or cap in ("ALL", "DEFAULT") or cap.startswith("AVX10") or any(
        part in cap for part in ("BF16", "FP16", "AMX"))
