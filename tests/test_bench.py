"""`dense export onnx` and `dense bench`: the export equals PyTorch; the bench runs end to end
with its peers and names its machine (timings are reported, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dense import zoo
from dense.bench import time_calls
from dense.cli import main


def test_time_calls_reports_ordered_percentiles() -> None:
    ticks = iter(range(100))
    result = time_calls(lambda: next(ticks), runs=10, warmup=2)
    assert result["runs"] == 10
    assert 0 <= result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_export_onnx_of_a_dict_model_equals_pytorch(tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime", reason="needs requirements-runtimes.txt")
    out = tmp_path / "detector.onnx"
    assert main(["export", "onnx", "blazepose-detector", "--out", str(out)]) == 0
    assert out.is_file() and "equals PyTorch" in capsys.readouterr().out
    import onnx

    names = [o.name for o in onnx.load(str(out)).graph.output]
    detector = zoo.load("blazepose-detector", device="cpu")
    assert names == sorted(detector(torch.rand(1, 3, 224, 224)).keys())


@pytest.mark.bench
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_bench_runs_with_peers_and_names_its_machine(capsys, tmp_path, monkeypatch) -> None:
    pytest.importorskip("ai_edge_litert", reason="pip install -r requirements-runtimes.txt")
    pytest.importorskip("ncnn", reason="pip install -r requirements-runtimes.txt")
    monkeypatch.setenv("DENSE_PACKAGE_CACHE", str(Path.home() / ".cache" / "dense"))
    assert main(["bench", "selfie-seg", "--runs", "3", "--peers", "--threads", "2"]) == 0
    assert main(["bench", "waifu2x-photo-x2", "--size", "32", "32", "--runs", "3", "--peers",
                 "--batch", "2", "--threads", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    runtimes = {r["model"]: [row["runtime"] for row in r["rows"]] for r in lines}
    assert "ai-edge-litert" in runtimes["selfie-seg"]
    assert "ncnn" in runtimes["waifu2x-photo-x2"]
    assert all("onnxruntime (our export)" in v for v in runtimes.values())
    assert all(r["machine"]["cores"] and r["machine"]["torch"] for r in lines)
    print(json.dumps(lines, indent=1)[:3000])
