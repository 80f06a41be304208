"""`dense export onnx` and `dense bench`: the export equals PyTorch; the bench runs end to end
with its peers and names its machine (timings are reported, never asserted)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch

from dense import zoo
from dense.bench import time_calls
from dense.cli import main
from dense.serve import load_served


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


# ---------------------------------------------------------------------------------------------
# The served backend: what the app and `dense predict` run (dense.serve.pick_backend)


@pytest.mark.parametrize("backend", ["auto", "onnxruntime"])
def test_export_backends_serve_mediapipe_graphs_equal_to_pytorch(backend: str,
                                                                  monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    if backend == "auto":
        pytest.importorskip("openvino")
    from dense.images import read_image

    monkeypatch.setenv("DENSE_BACKEND", backend)
    photo = read_image(Path(__file__).parents[1] / "examples" / "astronaut.png").rgb
    for model_id in ("selfie-seg", "blazepose-lite"):
        served = load_served(model_id, device="cpu")
        eager = load_served(model_id, device="cpu", backend="eager")
        want_backend = "openvino" if backend == "auto" else backend
        assert (served.backend, eager.backend) == (want_backend, "eager")
        size = tuple(served.config["input"]["size"])
        x = torch.nn.functional.interpolate(
            torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255, size=size)
        x = torch.cat([x, x.flip(-1)])  # a batch of 2: the runtime's other input shape
        with torch.inference_mode():
            got, want = served(x), eager(x)
        got, want = (got, want) if isinstance(got, dict) else ({"out": got}, {"out": want})
        assert set(got) == set(want)
        for key in want:
            scale = max(1.0, float(want[key].abs().max()))
            assert float((got[key] - want[key]).abs().max()) / scale < 1e-3, (model_id, key)
    # What the export does not cover (here: a gradient through the input) goes to PyTorch.
    x = torch.rand(1, 3, 256, 256, requires_grad=True)
    assert load_served("selfie-seg", device="cpu")(x).grad_fn is not None


def test_without_openvino_onnxruntime_serves_only_what_it_was_measured_faster_on(
        monkeypatch) -> None:
    import importlib.util

    from dense.serve import backends as devices

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    config = zoo.load("selfie-seg", "cpu").config
    assert devices.export_runtime(config) == "onnxruntime"
    port = zoo.load("realesrgan-x4plus", "cpu").config
    assert devices.export_runtime(port) is None  # onnxruntime was slower than PyTorch there
    # Our restoration U-Nets at their full tile: onnxruntime beat PyTorch there too
    # (unet-sr-x2 at 288²: 1.24 s against 1.69 s channels_last).
    unet = zoo.load("unet-sr-x4", "cpu").config
    assert devices.export_runtime(unet) == "onnxruntime"
    lab = zoo.load("lab-x4-nearest", "cpu").config
    assert devices.export_runtime(lab) is None  # no served size, and a U-Net's export is not


def test_openvino_serves_an_sr_port_at_any_size_equal_to_pytorch() -> None:
    pytest.importorskip("openvino")
    served = load_served("waifu2x-photo-x2", device="cpu", backend="openvino")
    eager = load_served("waifu2x-photo-x2", device="cpu", backend="eager")
    assert served.backend == "openvino"
    for shape in ((1, 3, 37, 50), (2, 3, 64, 24)):
        x = torch.rand(*shape)
        with torch.inference_mode():
            got, want = served(x), eager(x)
        assert got.shape == want.shape == (shape[0], 3, shape[2] * 2, shape[3] * 2)
        assert float((got - want).abs().max()) < 1e-4


@pytest.mark.parametrize("model_id", ["realesrgan-x4plus", "realesr-animevideov3",
                                      "waifu2x-photo-x2"])
def test_sr_ports_are_served_in_bf16_within_45_db_of_fp32_on_a_real_photo(model_id: str) -> None:
    from dense.images import read_image
    from dense.serve.backends import runtime_available

    if not runtime_available("openvino_bf16"):
        pytest.skip("needs OpenVINO and a CPU with native bf16")
    served = load_served(model_id, device="cpu")
    eager = load_served(model_id, device="cpu", backend="eager")
    assert served.backend == "openvino_bf16"
    photo = read_image(Path(__file__).parents[1] / "examples" / "astronaut.png").rgb
    x = torch.from_numpy(photo[100:164, 150:230]).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        got, want = (torch.round(m(x).clamp(0, 1) * 255) for m in (served, eager))
    psnr = 10 * torch.log10(255**2 / ((got - want) ** 2).mean().clamp_min(1e-10))
    assert psnr > 45, f"{model_id}: bf16 output {psnr:.1f} dB from fp32"  # measured 49-57 dB


@pytest.mark.parametrize("model_id", ["unet-sr-x2", "unet-deblur"])
def test_restoration_unets_are_served_at_the_full_tile_within_45_db_of_fp32(model_id: str
                                                                            ) -> None:
    """A photo's tiles go through the export (bf16 where native: measured 54-63 dB from fp32
    on 7 photos); another size runs channels_last PyTorch (fp32: equal to float rounding)."""
    from dense.images import read_image
    from dense.tasks import restoration as R

    pytest.importorskip("openvino")
    served = load_served(model_id, device="cpu")
    eager = load_served(model_id, device="cpu", backend="eager")
    assert served.config["input"]["served_size"] == [R.TILE_INPUT, R.TILE_INPUT]
    assert served.backend in ("openvino_bf16", "openvino")
    photo = read_image(Path(__file__).parents[1] / "examples" / "astronaut.png").rgb
    x = torch.from_numpy(photo[50:50 + R.TILE_INPUT, 100:100 + R.TILE_INPUT]).permute(
        2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        got, want = (torch.round(m(x).clamp(0, 1) * 255) for m in (served, eager))
        small = x[..., :64, :80]
        assert float((served(small) - eager(small)).abs().max()) < 1e-4
    psnr = 10 * torch.log10(255**2 / ((got - want) ** 2).mean().clamp_min(1e-10))
    assert psnr > 45, f"{model_id}: served output {psnr:.1f} dB from PyTorch's"


def test_openvino_compiles_a_model_for_two_batch_sizes_whatever_the_batches(monkeypatch
                                                                             ) -> None:
    """A group photo's person crops come in batches of any size: they run as chunks of the
    compiled sizes (4, then single images), each equal to PyTorch, and nothing else is
    compiled (each compile took 1-2.6 s for TinyPose)."""
    pytest.importorskip("openvino")
    from dense.serve import export

    compiled = []
    real = export.openvino_model

    def counting(path, threads, batch, size, precision="f32"):
        compiled.append(batch)
        return real(path, threads, batch, size, precision)

    monkeypatch.setattr(export, "openvino_model", counting)
    served = load_served("tinypose-128x96", device="cpu", backend="openvino")
    eager = load_served("tinypose-128x96", device="cpu", backend="eager")
    for n in (3, 11, 8, 4, 1):
        x = torch.rand(n, 3, 128, 96, generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            got, want = served(x), eager(x)
        assert got.shape == want.shape
        assert float((got - want).abs().max()) < 1e-4
    assert sorted(set(compiled)) == sorted(export.OPENVINO_BATCHES) == [1, 4]


def test_openvino_serves_requests_from_several_threads_at_once() -> None:
    pytest.importorskip("openvino")
    from concurrent.futures import ThreadPoolExecutor

    model = load_served("selfie-seg", device="cpu", backend="openvino")
    eager = load_served("selfie-seg", device="cpu", backend="eager")
    inputs = [torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(i))
              for i in range(8)]
    with torch.inference_mode(), ThreadPoolExecutor(4) as pool:
        got = list(pool.map(model, inputs))
        for x, y in zip(inputs, got, strict=True):
            assert float((y - eager(x)).abs().max()) < 1e-4


def test_backend_choice_can_be_forced_and_other_models_run_channels_last(monkeypatch) -> None:
    from dense.serve.backends import runtime_available

    bf16 = runtime_available("openvino_bf16")  # SRVGG: only OpenVINO in bf16 beat PyTorch
    assert load_served("realesr-animevideov3", device="cpu").backend == (
        "openvino_bf16" if bf16 else "channels_last")
    # Our restoration U-Nets are served at restore()'s full tile, in bf16 where the CPU has it.
    assert load_served("unet-deblur", device="cpu").backend == (
        "openvino_bf16" if bf16 else "openvino")
    # unet-camvid is served at its trained size in fp32 (bf16 is not offered for segmentation).
    assert load_served("unet-camvid", device="cpu").backend == "openvino"
    monkeypatch.setenv("DENSE_BACKEND", "eager")
    assert load_served("selfie-seg", device="cpu").backend == "eager"
    monkeypatch.setenv("DENSE_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="Unknown backend 'tensorrt'"):
        load_served("selfie-seg", device="cpu")


def test_a_failed_onnx_export_falls_back_to_pytorch_once(monkeypatch, tmp_path, caplog) -> None:
    pytest.importorskip("onnxruntime")
    import dense.serve.export

    monkeypatch.setenv("DENSE_PACKAGE_CACHE", str(tmp_path))
    calls = []

    def broken_check(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("onnxruntime differs from PyTorch by 1e+00")

    monkeypatch.setattr(dense.serve.export, "check_onnx", broken_check)
    for _ in range(2):
        model = load_served("selfie-seg", device="cpu")
        assert model.backend == "channels_last"
        assert model(torch.rand(1, 3, 256, 256)).shape == (1, 1, 256, 256)
    assert len(calls) == 1  # the failure is remembered: no second export
    assert "unavailable for selfie-seg" in caplog.text


def test_count_flops_of_a_parameterless_module() -> None:
    from dense.bench import count_flops
    from dense.tasks.restoration import BicubicUpscaler

    assert count_flops(BicubicUpscaler(4), (16, 16)) >= 0
    assert count_flops(torch.nn.Conv2d(3, 8, 3), (16, 16)) == 2 * 3 * 8 * 9 * 14 * 14


def test_onnx_export_leaves_the_model_in_eval_mode_and_unchanged(tmp_path: Path) -> None:
    from dense.serve.export import export_onnx

    model = zoo.load("unet-camvid", device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "unet.onnx", (64, 96))
    assert not any(m.training for m in model.modules())
    x = torch.rand(2, 3, 64, 96)
    with torch.inference_mode():
        model(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cuda_dtype_setting_is_checked(monkeypatch) -> None:
    from dense.serve.devices import autocast_dtype

    cuda = torch.device("cuda")
    assert autocast_dtype(cuda) is None  # fp32 by default (faster at batch 1, measured)
    monkeypatch.setenv("DENSE_CUDA_DTYPE", "bf16")
    assert autocast_dtype(cuda) is torch.bfloat16
    assert autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setenv("DENSE_CUDA_DTYPE", "half")
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        autocast_dtype(cuda)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_variants_compute_what_the_served_model_computes() -> None:
    from dense.bench import autocast_call, cuda_graph_call

    model = load_served("blazepose-full", "cuda")
    x = torch.rand(1, 3, 256, 256, device="cuda")
    with torch.inference_mode():
        served = model(x)
    # Landmarks: x, y, z in pixels of the 256-px input, then visibility and presence in [0, 1].
    # z is left out: its rounding grows through the whole network (fp16 moved it 2.1 px on an
    # H100, 2.7 px in fp16 on a CPU, while x and y moved under 0.5 px). On this random input
    # the visibilities sit where the sigmoid is steepest: fp16 moved one by 0.067 on an H100.
    for make in (autocast_call, cuda_graph_call):
        got = make(model, x)()["landmarks"].float()
        torch.testing.assert_close(got[..., :2], served["landmarks"][..., :2], atol=1.0, rtol=0)
        torch.testing.assert_close(got[..., 3:], served["landmarks"][..., 3:], atol=0.1, rtol=0)


def test_cuda_serves_fixed_size_models_through_cuda_graphs() -> None:
    from dense.serve.backends import pick_backend

    cuda = torch.device("cuda")  # the choice reads the device type only: no GPU needed
    assert pick_backend(zoo.load("blazepose-full", "cpu"), cuda) == "cuda_graph"
    assert pick_backend(zoo.load("unet-sr-x4", "cpu"), cuda) == "cuda_graph"  # its full tile
    assert pick_backend(zoo.load("realesrgan-x4plus", "cpu"), cuda) == "channels_last"
    assert pick_backend(zoo.load("selfie-seg", "cpu"), cuda,
                        "eager") == "eager"
    # Forced on a CPU, the CUDA-only backend means the CPU's PyTorch path.
    assert load_served("selfie-seg", "cpu", backend="cuda_graph").backend == "channels_last"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_serving_equals_eager_and_returns_outputs_of_its_own() -> None:
    served = load_served("selfie-seg", "cuda")
    eager = load_served("selfie-seg", "cuda", backend="eager")
    assert served.backend == "cuda_graph"
    x1, x2 = (torch.rand(1, 3, 256, 256, device="cuda") for _ in range(2))
    with torch.inference_mode():
        first = served(x1)  # captures
        second = served(x2)  # replays
        kept = first.clone()
        served(x1)
        torch.testing.assert_close(first, kept)  # the next replay did not overwrite it
        torch.testing.assert_close(first, eager(x1), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(second, eager(x2), atol=1e-3, rtol=1e-3)
        assert served(torch.rand(2, 3, 256, 256, device="cuda")).shape[0] == 2  # eager


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_cpu_serving_keeps_freed_activations_instead_of_faulting_them_in_again() -> None:
    """unet-deblur served on the CPU at 128×128: with glibc's defaults 2,000-4,300 page faults
    per call were measured here (its activations faulted in again on every call), with
    keep_freed_memory (which serving calls for a CPU model) 0-106."""
    import resource

    model = load_served("unet-deblur", "cpu")
    x = torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            model(x)
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5 < 1000
