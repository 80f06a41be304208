"""Our ONNX exports and the runtimes that serve them (onnxruntime, OpenVINO), and
`dense export onnx ID`: a zoo model as an ONNX graph (dynamic batch and, where the model allows,
dynamic height and width), checked against PyTorch with onnxruntime when installed."""

from __future__ import annotations

import argparse
import functools
import glob
import hashlib
import importlib
import json
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dense import zoo
from dense.data import package_cache


class _Flat(nn.Module):
    """ONNX graphs return tensors, not dicts: the dict models (BlazePose) return their values
    in a fixed key order, named after the keys."""

    def __init__(self, model: nn.Module, keys: list[str] | None) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, x: torch.Tensor):
        out = self.model(x)
        return tuple(out[k] for k in self.keys) if self.keys else out


def served_size(config: dict) -> tuple[int, int] | None:
    """The input size a served export is fixed to: the model's fixed input size (MediaPipe
    graphs), the size it is served at (``input.served_size``: MoveNet MultiPose, whose graph
    is traced per size; the restoration U-Nets' full tile) or the size it was trained at
    (``input.trained_size``); None for none."""
    inputs = config.get("input", {})
    size = inputs.get("size") or inputs.get("served_size") or inputs.get("trained_size")
    return tuple(size) if size else None


def dynamic_export(config: dict) -> bool:
    """Whether the model's export takes any height and width.

    Models with a fixed input (their config names one) keep it. Our U-Nets pad the input to a
    multiple of their stride and crop the output back, with Python arithmetic on the traced
    size, which the ONNX tracer freezes: they are exported for one size. The ports' graphs
    (RRDBNet, SRVGG, waifu2x) have no such step and stay fully dynamic.
    """
    return config.get("architecture") != "unet" and not config.get("input", {}).get("size")


def single_image(config: dict) -> bool:
    """Whether the export takes one image at a time (``input.export_batch: 1``): graphs ported
    from TF.js (MoveNet) were written for one image, and their traced shapes fix the batch."""
    return config.get("input", {}).get("export_batch") == 1


def output_names(out: torch.Tensor | dict) -> list[str]:
    """The export's output names, in its order: a dict model's keys sorted, else ``output``."""
    return sorted(out) if isinstance(out, dict) else ["output"]


def export_size(model: nn.Module, size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The fixed input size of the export: the model's own fixed size, else ``size``, else
    256×256 for a U-Net; None for dynamic height and width (see :func:`dynamic_export`)."""
    fixed = model.config.get("input", {}).get("size")
    if fixed:
        return tuple(fixed)
    if size:
        return tuple(size)
    return None if dynamic_export(model.config) else (256, 256)


def example_input(model: nn.Module, batch: int = 1,
                  size: tuple[int, int] | None = None) -> torch.Tensor:
    size = export_size(model, size) or (64, 64)
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0))


def export_onnx(model: nn.Module, path: Path, size: tuple[int, int] | None = None,
                opset: int = 17) -> Path:
    """Write ``model`` (from ``dense.load``, on CPU) to ``path``; return the path.

    The batch is dynamic (unless :func:`single_image`); height and width too unless
    :func:`export_size` fixes them.
    """
    # A trace follows the module's code, and code may branch on the memory format (TinyPose's
    # interleave did: its channels_last trace had 147 Transposes more and took 1.4-1.7× as long
    # in OpenVINO): the NCHW module is exported whatever format it is served in, so that one
    # model always gives one graph. Each tensor gets its own storage back after
    # (parameters and buffers: MOSAIC's weights are buffers), so the model is briefly NCHW and
    # must not be running elsewhere meanwhile (serving exports a model before it publishes it).
    if any(t.device.type != "cpu" for t in (*model.parameters(), *model.buffers())):
        raise ValueError("export_onnx takes a model on the CPU")
    # .to() swaps a parameter's data but replaces a buffer: each is put back its own way.
    parameters = [(p, p.data) for p in model.parameters()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items()
               if b is not None]
    model.eval().to(memory_format=torch.contiguous_format)
    try:
        return _export_nchw(model, path, size, opset)
    finally:
        for parameter, data in parameters:
            parameter.data = data
        for module, name, buffer in buffers:
            module._buffers[name] = buffer


# The forms an export traces instead of the module, per architecture ("module:class", built
# from the module): the same function, faster in the runtimes. TinyPose without its channel
# shuffles: 15.4-16.0 ms → 11.0-11.4 at 256×192 in OpenVINO (docs/benchmarks.md).
EXPORT_FORMS = {"tinypose": "dense.ports.tinypose_export:UnshuffledTinyPose"}


def export_module(model: nn.Module) -> nn.Module:
    """The module an export of ``model`` traces: its architecture's :data:`EXPORT_FORMS`
    built from it, else the model itself."""
    form = EXPORT_FORMS.get(getattr(model, "config", {}).get("architecture"))
    if form is None:
        return model
    module, name = form.split(":")
    return getattr(importlib.import_module(module), name)(model).eval()


def _export_nchw(model: nn.Module, path: Path, size: tuple[int, int] | None, opset: int
                 ) -> Path:
    x = example_input(model, size=size)
    with torch.inference_mode():
        out = model(x)
    names = output_names(out)
    keys = names if isinstance(out, dict) else None
    fixed = export_size(model, size) is not None
    batch = {} if single_image(model.config) else {0: "batch"}
    axes = batch if fixed else {**batch, 2: "height", 3: "width"}
    dynamic = {"image": axes, **{n: dict(batch) for n in names}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The wrapper must be in eval mode too: the exporter puts the module it is given back in
    # that module's own mode afterwards, recursively, and a wrapper left in train mode would
    # leave the model training (batch norm then updates its statistics at the next call).
    torch.onnx.export(_Flat(export_module(model), keys).eval(), (x,), str(path), dynamo=False,
                      opset_version=opset, input_names=["image"], output_names=names,
                      dynamic_axes=dynamic)
    model.eval()
    return path


def relative_difference(got: list, out: torch.Tensor | dict) -> float:
    """Largest difference between a runtime's outputs ``got`` (in the export's order) and
    PyTorch's ``out``, relative to each output's largest magnitude (logits of random noise
    reach the hundreds; fp32 reassociation then moves them by more than any absolute tolerance
    fit for probabilities)."""
    expected = [out[k] for k in output_names(out)] if isinstance(out, dict) else [out]
    return max(float(np.abs(np.asarray(g) - e.numpy()).max() / max(1.0, float(e.abs().max())))
               for g, e in zip(got, expected, strict=True))


def check_onnx(model: nn.Module, path: Path, size: tuple[int, int] | None = None,
               tolerance: float = 5e-3) -> float:
    """:func:`relative_difference` of onnxruntime on the export at ``path`` from PyTorch, on a
    random batch of 2; raises beyond ``tolerance``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = example_input(model, batch=1 if single_image(model.config) else 2, size=size)
    with torch.inference_mode():
        diff = relative_difference(session.run(None, {"image": x.numpy()}), model.cpu()(x))
    if diff > tolerance:
        raise RuntimeError(f"{path.name}: onnxruntime differs from PyTorch by {diff:.2e}")
    return diff


# Bump when export_onnx changes what it writes: cached exports (and remembered failures) made
# by an older exporter are then not reused.
EXPORT_VERSION = 4  # 3: YOLOX's stem as one strided conv; 4: traced in NCHW


@functools.cache
def _file_digest(path: str) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()


def code_digest(model: nn.Module) -> str:
    """A digest of dense's source files that define ``model``'s modules (its class and every
    submodule's, those of the form its export traces (:func:`export_module`), and their bases)
    and of its config's ``arch_args``. An export is a trace of
    that code, so a change to it must not be served from an export of the old code; keying by
    the weights and the exporter's version alone left that to raising :data:`EXPORT_VERSION` by
    hand. Helper functions a forward calls from other files are not covered: such a change
    still needs :data:`EXPORT_VERSION` raised."""
    # dense's own classes only (torch's are keyed by its version), their bases included; and
    # the graph description the TFLite and TF.js ports are built from, which is no weight.
    classes = {c for m in model.modules() for c in type(m).__mro__
               if c.__module__.startswith("dense.")}
    names = {c.__module__ for c in classes}
    form = EXPORT_FORMS.get(getattr(model, "config", {}).get("architecture"))
    if form:  # the module the export traces instead: its file (building it took 0.2 s)
        module = form.split(":")[0]
        importlib.import_module(module)  # so that sys.modules has it below
        names.add(module)
    digest = hashlib.sha256(json.dumps(getattr(model, "config", {}).get("arch_args"),
                                       sort_keys=True, default=str).encode())
    for name in sorted(names):
        path = getattr(sys.modules.get(name), "__file__", None)
        try:
            digest.update(_file_digest(path) if path else name.encode())
        except OSError:  # no source beside the module (a sourceless install): its name
            digest.update(name.encode())
    return digest.hexdigest()[:8]


def onnx_cache_path(model: nn.Module, size: tuple[int, int] | None = None) -> Path:
    """Where the export of this exact model is cached: keyed by its weights' checksum, its
    code (:func:`code_digest`), the exporter's version and torch's; ``size`` for an export
    fixed to another input size than the one it is served at."""
    digest = model.config.get("sha256", {}).get(zoo.WEIGHTS_FILE, "unversioned")[:16]
    name = Path(model.config.get("id", "model")).name
    at = f"-{size[0]}x{size[1]}" if size else ""
    return (package_cache() / "onnx" / f"{name}-{digest}{at}-{code_digest(model)}"
            f"-v{EXPORT_VERSION}-torch{torch.__version__.split('+')[0]}.onnx")


# Exports kept per model and input size, the most recently used: each change of the weights,
# the model's code (code_digest), the exporter or torch writes a new file, and none was ever
# removed (this machine's cache had grown to 132 files, 1.2 GB). More than one, so that two
# versions of dense sharing a cache (two checkouts) do not export in turn.
KEEP_EXPORTS = 3


def prune_exports(model: nn.Module, size: tuple[int, int] | None = None,
                  keep: int = KEEP_EXPORTS) -> list[Path]:
    """Mark the model's current export (:func:`onnx_cache_path`) as just used, and remove the
    cached exports and remembered failures of the same model and size beyond the ``keep`` most
    recently used (the current one always kept). Returns the removed paths. Best effort: a
    cache this process may read but not write (a shared, read-only one) is left as it is."""
    current = onnx_cache_path(model, size)
    try:
        if current.is_file():
            os.utime(current)
    except OSError:
        return []
    name = Path(model.config.get("id", "model")).name
    at = f"-{size[0]}x{size[1]}" if size else ""
    ours = re.compile(rf"{re.escape(name)}-(?:[0-9a-z]{{16}}|unversioned){re.escape(at)}"
                      rf"(?:-[0-9a-f]{{8}})?-v\d+-torch[^-]+\.(?:onnx|failed)")
    cached = [p for p in current.parent.glob(f"{glob.escape(name)}-*")
              if ours.fullmatch(p.name) and p.with_suffix("") != current.with_suffix("")]
    removed = []
    for path in sorted(cached, key=lambda p: p.stat().st_mtime, reverse=True)[keep - 1:]:
        try:
            path.unlink(missing_ok=True)  # another process may have removed it first
        except OSError:
            continue
        removed.append(path)
    return removed


# Architectures served to photos only, never to a live stream, whose onnxruntime threads
# busy-wait within a call (and stop at its end): MOSAIC's ~200 ops took 10-40% longer with its
# threads falling asleep between them; YOLOX (the group photo's person boxes) 11.6-11.9 ms
# against 8.9-9.0 (OpenVINO: 9.7-10.0); TinyPose 16.0-17.1 against 12.3-12.5 (OpenVINO, which
# serves it: 11.6-11.9; two processes each, 2026-11-30, AMD EPYC Zen 4, 2 threads). Not for
# the live models: with the browser on the same two cores, the webcam stream fell from 23.6 /
# 24.0 / 20.5 to 16.1 / 14.8 / 12.8 frames/s (blazepose-lite / full / movenet-multipose
# forced onto onnxruntime, 2026-11-30).
SPIN_WITHIN_CALLS = frozenset({"mosaic", "yolox", "tinypose"})


def ort_spinning(config: dict) -> str:
    """How the served onnxruntime sessions of the model with this ``config`` busy-wait:
    ``calls`` (between calls too: DENSE_ORT_SPINNING=1, for batch jobs), ``within`` (within a
    call only: SPIN_WITHIN_CALLS) or ``off``."""
    if os.environ.get("DENSE_ORT_SPINNING", "0") == "1":
        return "calls"
    return "within" if config.get("architecture") in SPIN_WITHIN_CALLS else "off"


def ort_session(path: Path, threads: int, spinning: bool, within_calls: bool = False):
    """An onnxruntime CPU session on ``path`` with ``threads`` intra-op threads.

    ``spinning``: let idle threads busy-wait between calls (onnxruntime's default). Faster for
    back-to-back calls on otherwise idle cores; the app turns it off (see _runner).
    ``within_calls``: busy-wait within a call only, and stop at its end (no CPU time taken
    after it: 0.1 ms in the 100 ms after a MOSAIC call, against 40.5 ms with ``spinning``).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    spin = spinning or within_calls
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if within_calls and not spinning:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# OpenVINO's inference precision per served backend name (dense.serve.backends.EXPORT_BACKENDS).
OPENVINO_PRECISION = {"openvino": "f32", "openvino_bf16": "bf16"}


def openvino_model(path: Path, threads: int, batch: int, size: tuple[int, int] | None,
                   precision: str = "f32") -> tuple[object, list[bool]]:
    """An OpenVINO CPU model compiled for latency from the ONNX file at ``path``, with
    ``threads`` inference threads, in ``precision`` (``f32`` or ``bf16``), for inputs of
    ``batch``×3×``size`` (any height and width for ``size`` None).

    The export's batch is dynamic; OpenVINO compiled for a static shape ran the MediaPipe
    graphs 13-37% faster than for the dynamic one (docs/benchmarks.md); the SR ports' big
    convolutions ran as fast with dynamic height and width as with static. Outputs with more than
    one channel come out channels-last (N×H×W×C), the layout OpenVINO computes them in: turning
    BlazePose's 39×64×64 heatmaps back to channels-first took 0.62 of its 3.95 ms. Returns
    the compiled model and, per output, whether it is channels-last.
    """
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    core = ov.Core()
    graph = core.read_model(str(path))
    graph.reshape([batch, 3, *(size or (-1, -1))])
    layouts = PrePostProcessor(graph)
    channels_last = [o.get_partial_shape().rank.get_length() == 4
                     and o.get_partial_shape()[1].get_length() > 1 for o in graph.outputs]
    for i in (i for i, last in enumerate(channels_last) if last):
        layouts.output(i).model().set_layout(ov.Layout("NCHW"))
        layouts.output(i).tensor().set_layout(ov.Layout("NHWC"))
    compiled = core.compile_model(layouts.build(), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": precision})
    return compiled, channels_last


# The batch sizes OpenVINO compiles a model for, largest first (its static shapes ran 13-37%
# faster than a dynamic batch); other batches run as chunks of these. Compiling a size took
# 1-2.6 s for PP-TinyPose, so a group photo with 3 people, then one with 5, then 11, each paid
# it again; now a model is compiled at most twice. TinyPose 256×192 per crop, three processes:
# 11.4-11.5 ms one by one, 9.5-9.7 at batch 2, 8.7-8.9 at batch 4, 8.9-9.3 at batch 8
# (2026-11-30, AMD EPYC Zen 4, 2 threads): 4 is as fast as 8, and more photos fill it.
OPENVINO_BATCHES = (4, 1)


def _runner(runtime: str, path: Path, threads: int, size: tuple[int, int] | None,
            spinning: str = "off") -> Callable:
    """A function ``numpy batch -> list of numpy outputs`` (in the export's output order) on
    the export at ``path``. Safe to call from several threads (the app serves requests in
    parallel). ``spinning``: onnxruntime's, see :func:`ort_spinning`."""
    if runtime == "onnxruntime":
        # No busy-waiting between calls by default: in the app the same cores also decode, draw
        # and encode (and may run the browser), and spinning threads take their time: live pose
        # went from 13-15 to 24 frames/s without it, at 20-40% more latency per isolated call
        # (docs/benchmarks.md). DENSE_ORT_SPINNING=1 turns it back on for batch jobs. Photo-only
        # graphs spin within their calls (SPIN_WITHIN_CALLS).
        session = ort_session(path, threads, spinning=spinning == "calls",
                              within_calls=spinning == "within")
        return lambda x: session.run(None, {"image": x})
    if runtime not in OPENVINO_PRECISION:
        raise ValueError(f"no runtime '{runtime}' for ONNX exports")
    precision = OPENVINO_PRECISION[runtime]
    compiled: dict[int, tuple] = {}  # one static-shape model per batch size in OPENVINO_BATCHES
    local = threading.local()  # an infer request holds its buffers: one per calling thread
    lock = threading.Lock()

    def infer(x: np.ndarray) -> list[np.ndarray]:
        batch = x.shape[0]
        with lock:
            if batch not in compiled:
                compiled[batch] = openvino_model(path, threads, batch, size, precision)
        requests = local.__dict__.setdefault("requests", {})
        if batch not in requests:
            requests[batch] = compiled[batch][0].create_infer_request()
        model, channels_last = compiled[batch]
        out = requests[batch].infer({0: x}, share_inputs=True)  # outputs copied (the default)
        # Channels-last outputs (see openvino_model) back to N×C×H×W as strided views: no copy.
        return [out[o].transpose(0, 3, 1, 2) if last else out[o]
                for o, last in zip(model.outputs, channels_last, strict=True)]

    def run(x: np.ndarray) -> list[np.ndarray]:
        n = x.shape[0]
        if n in OPENVINO_BATCHES:
            return infer(x)
        chunks, start = [], 0
        while start < n:  # the largest compiled batch that fits, then single images
            batch = next(b for b in OPENVINO_BATCHES if b <= n - start)
            chunks.append(infer(x[start:start + batch]))
            start += batch
        return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]

    return run


def export_forward(model: nn.Module, runtime: str = "onnxruntime"
                   ) -> Callable[[torch.Tensor], torch.Tensor | dict[str, torch.Tensor]]:
    """A forward function running ``model`` on CPU through ``runtime`` (``openvino``,
    ``openvino_bf16`` or ``onnxruntime``) on its own ONNX export: for the model's fixed input
    size (MediaPipe graphs), the size it was trained at (``input.trained_size``), or any size
    where the export is dynamic (the SR ports).

    The export is written once per model version (cached by weights checksum) and checked
    against PyTorch (with onnxruntime) before it is used; the serving runtime's own result is
    checked again here. ``model`` itself is left as it is (briefly NCHW while it is traced, see
    :func:`export_onnx`, so it must not be running elsewhere then): inputs the export does not cover
    (another size, a gradient, a GPU tensor) are passed to ``model``'s own forward, whatever
    memory format its weights are in when that call comes (channels_last, as served).
    """
    size = served_size(model.config)
    if size is None and not dynamic_export(model.config):
        raise ValueError("only models with a fixed or trained input size, or an export of any "
                         "size, are served from their ONNX export")
    path = onnx_cache_path(model)
    failed = path.with_suffix(".failed")
    if failed.is_file():  # tried before: do not pay the export again at every load
        raise RuntimeError(failed.read_text())
    if not path.is_file():
        partial = path.with_suffix(".partial")
        try:
            with warnings.catch_warnings():  # the tracer's notes on constant shapes (fixed here)
                warnings.simplefilter("ignore")
                export_onnx(model, partial, size)
            check_onnx(model, partial, size)
        except Exception as err:
            failed.write_text(f"export or check failed: {err}")
            partial.unlink(missing_ok=True)
            raise
        partial.replace(path)  # atomic: a half-written export is never used
    prune_exports(model)
    run = _runner(runtime, path, torch.get_num_threads(), size, ort_spinning(model.config))
    x = example_input(model, size=size)
    with torch.inference_mode():
        out = model(x)
    diff = relative_difference(run(x.numpy()), out)
    # bf16 keeps 8 bits of mantissa: up to 2% of the range on the example's noise (measured on
    # the SR ports, 0.6-2%); this check is for a broken graph, tests/test_bench.py for fidelity.
    if diff > (5e-2 if OPENVINO_PRECISION.get(runtime) == "bf16" else 5e-3):
        raise RuntimeError(f"{runtime} on {path.name} differs from PyTorch by {diff:.2e}")
    names = output_names(out)
    single = single_image(model.config)

    def forward(x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if (size and tuple(x.shape[-2:]) != size) or x.device.type != "cpu" or (
                torch.is_grad_enabled() and x.requires_grad):
            return model(x)
        images = x.detach().float().contiguous().numpy()
        if single and images.shape[0] > 1:  # a one-image export, run image by image
            parts = [run(images[i:i + 1]) for i in range(images.shape[0])]
            outs = [np.concatenate(o) for o in zip(*parts, strict=True)]
        else:
            outs = run(images)
        tensors = [torch.from_numpy(o) for o in outs]
        return tensors[0] if names == ["output"] else dict(zip(names, tensors, strict=True))

    return forward


def _export(args: argparse.Namespace) -> int:
    model = zoo.load(args.model, device="cpu")
    size = tuple(args.size) if args.size else None
    path = export_onnx(model, args.out or Path(f"{Path(args.model).name}.onnx"), size)
    try:
        diff = check_onnx(model, path, size)
    except ImportError:
        print(f"wrote {path} (onnxruntime not installed: not checked)")
        return 0
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}; onnxruntime equals PyTorch within {diff:.1e} (relative)")
    return 0


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("onnx", help="a zoo model as ONNX, checked with onnxruntime")
    p.add_argument("model", help="model id, folder or Hub repo")
    p.add_argument("--out", type=Path, help="output file (default <id>.onnx)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="fixed input size (our U-Nets are exported for one size; default 256 256)")
    p.set_defaults(func=_export)
