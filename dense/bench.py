"""`dense bench`: how fast each model runs here, with the machine named in every result."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time

import torch

from dense import zoo
from dense.devices import inference, pick_device


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def default_size(model: torch.nn.Module) -> tuple[int, int]:
    size = model.config.get("input", {}).get("size")
    return tuple(size) if size else (256, 256)


def time_model(model: torch.nn.Module, x: torch.Tensor, runs: int = 20, warmup: int = 3) -> dict:
    """Median, p10 and p90 latency in milliseconds over ``runs`` calls after ``warmup``."""
    device = x.device
    times = []
    with inference(device):
        for i in range(warmup + runs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    deciles = statistics.quantiles(times, n=10)
    return {"median_ms": round(statistics.median(times), 3), "p10_ms": round(deciles[0], 3),
            "p90_ms": round(deciles[-1], 3), "runs": runs}


def bench_models(ids: list[str], sizes: list[tuple[int, int]] | None = None, runs: int = 20,
                 device: str = "auto", threads: int | None = None) -> list[dict]:
    """Time each model at batch 1; print a table line and a JSON line per result."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    info = machine()
    print(f"# machine: {json.dumps(info)}")
    results = []
    for model_id in ids:
        model = zoo.cached_load(model_id, dev)
        for size in sizes or [default_size(model)]:
            x = torch.rand(1, 3, *size, device=dev)
            result = {"model": model_id, "device": str(dev), "input": list(size),
                      **time_model(model, x, runs),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                           / 1024, 1),
                      "machine": info}
            results.append(result)
            print(f"{model_id:28} {size[0]}×{size[1]:<5} median {result['median_ms']:9.2f} ms  "
                  f"p10 {result['p10_ms']:9.2f}  p90 {result['p90_ms']:9.2f}")
            print(json.dumps(result))
    return results
