"""The backend a served model runs on, per device and kind of model: the rule.

On CPU the rule gives the candidates for a model, in order of preference, and
:mod:`dense.serve.measure` times them once per machine and keeps the fastest; the rule's own
choice (its first candidate) is what runs where nothing is measured (``DENSE_BACKEND_MEASURE=0``,
models slower than the measurement's cap, other devices). The order is what was measured
fastest for the kind of model on the AVX-512 EPYC of docs/benchmarks.md: our
own ONNX export, run by OpenVINO, for the fixed-size MediaPipe graphs (hundreds of small ops,
where eager PyTorch pays a dispatch per op), unet-camvid at its trained size and the
Real-ESRGAN and waifu2x ports; without OpenVINO, onnxruntime for the first two (it was slower
than PyTorch on the ports); channels_last PyTorch for everything else (where oneDNN in NHWC
was as fast). In fp32, except the super-resolution ports on a CPU with native bf16 units
(AVX512-BF16, AMX): OpenVINO in bf16 ran them 1.8-2× faster than in fp32, with outputs within
49-57 dB PSNR of fp32's on three real photos (0.14-0.62 grey levels on average; ncnn's own bf16
mode: 49-55 dB on Real-ESRGAN; tests/test_bench.py checks it), and our super-resolution and
deblurring U-Nets, served at restore()'s full tile (54-63 dB from fp32 on 7 photos). Not the
others: bf16 moved BlazePose's landmarks by up to 14% of their range, PP-TinyPose's by up to
35 px at its 256-pixel input. ``DENSE_BACKEND`` (one of BACKENDS) forces
a backend.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import nn

from dense import hardware
from dense.serve.export import dynamic_export, served_size

__all__ = ["BACKENDS", "EXPORT_BACKENDS", "EXPORT_RUNTIMES", "cpu_candidates", "export_runtime",
           "forced_backend", "pick_backend", "runtime_available", "served_size"]

BACKENDS = ("auto", "eager", "channels_last", "onnxruntime", "openvino", "openvino_bf16",
            "cuda_graph")
# The runtimes on our ONNX export, each with the package it runs in.
EXPORT_BACKENDS = {"onnxruntime": "onnxruntime", "openvino": "openvino",
                   "openvino_bf16": "openvino"}
# The runtimes on our ONNX export that beat channels_last PyTorch on CPU, per architecture,
# fastest first (docs/benchmarks.md): the MediaPipe graphs (fixed input size, 3-7×), our
# segmentation U-Net at the size it was trained for (2.2×; other sizes run in channels_last
# PyTorch, see dense.serve.served.serve), and
# the super-resolution ports at any size: OpenVINO in bf16 where the CPU has it (see the module
# doc), else in fp32 for Real-ESRGAN and waifu2x (8-13% and 3-25% faster than PyTorch in two
# runs; onnxruntime was slower than PyTorch on Real-ESRGAN, and OpenVINO in fp32 only tied
# PyTorch on SRVGG, animevideov3).
EXPORT_RUNTIMES = {
    "selfie_segmentation": ("openvino", "onnxruntime"),
    "blazepose_landmark": ("openvino", "onnxruntime"),
    "blazepose_detector": ("openvino", "onnxruntime"),
    "unet": ("openvino", "onnxruntime"),
    # Our U-Nets for super-resolution and deblurring, served at restore()'s full tile (their
    # config's input.served_size): OpenVINO 0.74-0.91× channels_last PyTorch's time in fp32
    # and 0.37-0.45× in bf16, whose results stayed within 54-63 dB PSNR of fp32's on 7 photos
    # (at most 5 grey levels); onnxruntime 0.80-0.99× (2026-11-30, docs/benchmarks.md). Not
    # for segmentation, whose argmax bf16 may flip.
    "unet_restoration": ("openvino_bf16", "openvino", "onnxruntime"),
    "rrdbnet": ("openvino_bf16", "openvino"),
    "waifu2x_upconv7": ("openvino_bf16", "openvino"),
    "srvgg": ("openvino_bf16",),
    # The ports of issues 19 and 20 (docs/benchmarks.md, 2026-11-30): MOSAIC's integer graph
    # as QLinearConv in onnxruntime (2.4× PyTorch; OpenVINO folds the requantisation into its
    # weights and is not exact, so the export check refuses it); YOLOX in onnxruntime, its
    # threads busy-waiting within a call (dense.serve.export.SPIN_WITHIN_CALLS: 8.9-9.0 ms,
    # OpenVINO 9.7-10.0, 2× PyTorch's fastest); the others in OpenVINO (ESPNetv2 1.1-1.5×,
    # TinyPose 2.5-5×, MoveNet 2.1-2.5× PyTorch's fastest).
    "mosaic": ("onnxruntime",),
    "espnetv2_seg": ("openvino", "onnxruntime"),
    "yolox": ("onnxruntime", "openvino"),
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
    """Whether OpenVINO reports native bf16 on this CPU and no instruction-set cap forbids
    it (dense.hardware.ISA_CAPS)."""
    import openvino as ov

    return hardware.onednn_bf16_allowed() and "BF16" in ov.Core().get_property(
        "CPU", "OPTIMIZATION_CAPABILITIES")


# The tasks whose U-Nets are served as "unet_restoration" (dense.tasks.restoration's names).
RESTORATION_TASKS = ("super-resolution", "deblurring")


def runtime_family(config: dict) -> str | None:
    """The EXPORT_RUNTIMES entry of the model with this config: its architecture, with our
    U-Nets split by task (restoration ones take bf16, segmentation's do not)."""
    architecture = config.get("architecture")
    if architecture == "unet" and config.get("task") in RESTORATION_TASKS:
        return "unet_restoration"
    return architecture


def export_runtimes(config: dict) -> list[str]:
    """The available runtimes on our ONNX export considered for the model with this config,
    fastest first as measured for its kind of model; none where PyTorch was faster or no export
    covers the model's inputs."""
    if not (served_size(config) or dynamic_export(config)):
        return []
    return [r for r in EXPORT_RUNTIMES.get(runtime_family(config), ()) if runtime_available(r)]


def export_runtime(config: dict) -> str | None:
    """The fastest available runtime on our ONNX export of the model with this config, by the
    rule, or None where PyTorch is faster or no export covers the model's inputs."""
    available = export_runtimes(config)
    return available[0] if available else None


def cpu_candidates(config: dict) -> list[str]:
    """The CPU backends :mod:`dense.serve.measure` times for the model with this config, the
    rule's choice first: its export runtimes, then channels_last PyTorch, which serves every
    model (and every input an export does not cover)."""
    return [*export_runtimes(config), "channels_last"]


def forced_backend(backend: str | None = "auto") -> str | None:
    """The backend forced by the caller or by ``DENSE_BACKEND``, or None for ``auto``."""
    if backend in (None, "", "auto"):
        backend = os.environ.get("DENSE_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend '{backend}'; choose from {', '.join(BACKENDS)}")
    return None if backend == "auto" else backend


def pick_backend(model: nn.Module, device: torch.device, backend: str | None = "auto") -> str:
    """The rule's backend for this model on ``device`` (see module doc); ``backend`` or
    ``DENSE_BACKEND``, mapped to what the device can run, when forced."""
    backend = forced_backend(backend) or "auto"
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
