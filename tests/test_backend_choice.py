"""The measured backend choice (dense.serve.measure): candidates timed once per machine with a
fake clock, the winner cached by CPU name and flags, DENSE_BACKEND forcing, checks refusing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from dense import hardware, zoo
from dense.serve import backends, measure, served
from dense.serve import serve as serve_model

CPU = ("Fake CPU 9000", "avx avx2 fma sse4_2")


class Tiny(nn.Module):
    """A model the rule offers OpenVINO, onnxruntime and channels_last for (a MediaPipe-like
    fixed-size graph), without any real export."""

    def __init__(self, digest: str = "ab" * 32) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        self.config = {"id": "tiny", "architecture": "selfie_segmentation",
                       "input": {"size": [8, 8]}, "sha256": {zoo.WEIGHTS_FILE: digest}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Bench:
    """A fake clock advanced by each backend's call by its cost in ms; counts builds and calls."""

    def __init__(self, cost_ms: dict[str, float], refuse: tuple[str, ...] = ()) -> None:
        self.cost_ms, self.refuse = dict(cost_ms), refuse
        self.now = 0.0
        self.built: list[str] = []
        self.calls: dict[str, int] = {}

    def clock(self) -> float:
        return self.now

    def runner(self, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            self.now += self.cost_ms[backend] / 1000
            self.calls[backend] = self.calls.get(backend, 0) + 1
            return x[:, :1]
        return run

    def build(self, model: nn.Module, backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
        self.built.append(backend)
        if backend in self.refuse:  # what export_forward does when its check fails
            raise RuntimeError(f"{backend} on tiny.onnx differs from PyTorch by 1.0e+00")
        return self.runner(backend)


@pytest.fixture
def bench(monkeypatch, tmp_path: Path) -> Callable[..., Bench]:
    """Measuring on (the conftest turns it off), a cache of its own, this fake CPU, and both
    export runtimes 'installed'; returns a factory for the fake timings."""
    monkeypatch.setenv("DENSE_PACKAGE_CACHE", str(tmp_path))
    monkeypatch.setenv("DENSE_BACKEND_MEASURE", "1")
    monkeypatch.delenv("DENSE_BACKEND", raising=False)
    for cap in hardware.ISA_CAPS:
        monkeypatch.delenv(cap, raising=False)
    monkeypatch.setattr(hardware, "cpu_model", lambda: CPU)
    monkeypatch.setattr(backends, "runtime_available", lambda r: r != "openvino_bf16")
    monkeypatch.setattr(measure, "sleep", lambda s: None)
    monkeypatch.setattr(measure, "cpu_sample", lambda: None)  # an idle host (see the busy test)

    def make(cost_ms: dict[str, float], refuse: tuple[str, ...] = ()) -> Bench:
        fake = Bench(cost_ms, refuse)
        monkeypatch.setattr(measure, "clock", fake.clock)
        monkeypatch.setattr(measure, "_build", fake.build)
        # What serving builds itself: a cached or forced export backend.
        monkeypatch.setattr(served, "export_forward",
                            lambda model, backend: fake.build(model, backend))
        return fake
    return make


def cached_choices() -> dict:
    return json.loads(measure.cache_path().read_text())["machines"]


def test_the_fastest_candidate_wins_and_is_cached_with_the_cpu(bench) -> None:
    fake = bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    model = serve_model(Tiny(), "cpu")
    assert model.backend == "onnxruntime"
    assert (model.choice.how, model.choice.cached) == ("measured", False)
    assert model.choice.median_ms == pytest.approx(
        {"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    assert fake.built == ["openvino", "onnxruntime", "channels_last"]  # the rule's order
    assert min(fake.calls.values()) >= measure.MIN_RUNS
    with torch.inference_mode():  # the winner's runner, already built, serves
        model(torch.rand(1, 3, 8, 8))
    machines = cached_choices()
    (key, machine), = machines.items()
    assert key.startswith("Fake CPU 9000 | flags sha256:")
    assert (machine["cpu"], machine["flags"]) == CPU
    (model_key, entry), = machine["choices"].items()
    assert model_key.startswith(f"tiny@{'ab' * 8} 8x8 cpu threads={torch.get_num_threads()} ")
    assert (entry["backend"], entry["how"], entry["input"]) == ("onnxruntime", "measured", [8, 8])


def test_a_second_load_reads_the_cache_without_timing(bench) -> None:
    bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    serve_model(Tiny(), "cpu")
    again = bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.how, model.choice.cached) == (
        "onnxruntime", "measured", True)
    assert again.calls == {} and again.built == ["onnxruntime"]  # only the winner is built


def test_other_weights_or_another_cpu_flag_measure_again(bench, monkeypatch) -> None:
    bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    serve_model(Tiny(), "cpu")
    fake = bench({"openvino": 1.0, "onnxruntime": 3.0, "channels_last": 5.0})
    assert serve_model(Tiny(digest="cd" * 32), "cpu").choice.cached is False
    # Same CPU name, one more flag (a VM that shows AVX-512): a new key and a new measurement.
    monkeypatch.setattr(hardware, "cpu_model", lambda: (CPU[0], CPU[1] + " avx512f"))
    fake.calls.clear()
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.how, model.choice.cached) == ("openvino", "measured",
                                                                      False)
    assert fake.calls
    assert len(cached_choices()) == 2  # both machines kept


def test_an_instruction_set_cap_is_another_machine(bench, monkeypatch) -> None:
    bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    serve_model(Tiny(), "cpu")
    # The same CPU with oneDNN capped to AVX2 (OpenVINO and PyTorch then run AVX2 kernels):
    # the uncapped winner is not reused; the cap is in the key and beside the flags.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    fake = bench({"openvino": 1.0, "onnxruntime": 3.0, "channels_last": 5.0})
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.cached) == ("openvino", False)
    assert fake.calls
    capped = [m for k, m in cached_choices().items() if k.endswith("| ONEDNN_MAX_CPU_ISA=AVX2")]
    assert [m["caps"] for m in capped] == [{"ONEDNN_MAX_CPU_ISA": "AVX2"}]


def test_a_change_to_a_models_code_is_a_new_export_and_a_new_measurement(
        bench, monkeypatch) -> None:
    from dense.nn import upsample
    from dense.serve import export

    layer = nn.Sequential(upsample.PixelShuffle(4, 4, 2))  # dense's code in a submodule only
    layer.config = Tiny().config
    digest, path = export.code_digest(layer), export.onnx_cache_path(layer)
    # Tiny is this file's class and torch's: none of dense's code, another digest.
    assert digest in path.name and export.code_digest(Tiny()) != digest
    edited = export._file_digest  # the same files, one of them edited
    monkeypatch.setattr(export, "_file_digest", lambda f: edited(f) + (
        b"edit" if f == upsample.__file__ else b""))
    assert export.code_digest(layer) != digest and export.onnx_cache_path(layer) != path
    monkeypatch.setattr(export, "_file_digest", edited)
    layer.config = {**layer.config, "arch_args": {"graph": [1]}}  # a port's graph description
    assert export.code_digest(layer) != digest

    bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    monkeypatch.setattr(measure, "code_digest", lambda model: "before")
    serve_model(Tiny(), "cpu")
    fake = bench({"openvino": 1.0, "onnxruntime": 3.0, "channels_last": 5.0})
    monkeypatch.setattr(measure, "code_digest", lambda model: "after")
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.cached) == ("openvino", False) and fake.calls


@pytest.mark.parametrize(("cap", "allowed"), [
    (None, True), ("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False),
    ("AVX512_CORE_BF16", True), ("AVX512_CORE_FP16", True), ("AVX512_CORE_AMX", True),
    ("AVX10_1_512", True)])
def test_bf16_is_not_native_under_a_cap_without_it(monkeypatch, cap, allowed) -> None:
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert hardware.onednn_bf16_allowed() is allowed


def test_dense_backend_forces_and_nothing_is_timed(bench, monkeypatch) -> None:
    fake = bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    monkeypatch.setenv("DENSE_BACKEND", "openvino")
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.how) == ("openvino", "forced")
    monkeypatch.delenv("DENSE_BACKEND")
    forced = serve_model(Tiny(), "cpu", backend="channels_last")  # an explicit backend too
    assert (forced.backend, forced.choice.how) == ("channels_last", "forced")
    assert fake.calls == {} and not measure.cache_path().exists()


def test_measuring_off_keeps_the_rule(bench, monkeypatch) -> None:
    fake = bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    monkeypatch.setenv("DENSE_BACKEND_MEASURE", "0")
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.how) == ("openvino", "rule")
    assert fake.calls == {}


def test_a_candidate_failing_its_check_is_never_chosen(bench) -> None:
    fake = bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0},
                 refuse=("onnxruntime",))
    model = serve_model(Tiny(), "cpu")
    assert model.backend == "openvino"
    assert "onnxruntime" in model.choice.failed and "onnxruntime" not in model.choice.median_ms
    assert "onnxruntime" not in fake.calls
    (machine,) = cached_choices().values()
    (entry,) = machine["choices"].values()
    assert entry["backend"] == "openvino" and "differs" in entry["failed"]["onnxruntime"]


def test_a_slow_model_keeps_the_rule_after_one_call(bench) -> None:
    fake = bench({"openvino": 900.0, "onnxruntime": 1.0, "channels_last": 5.0})
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.how) == ("openvino", "rule")
    # One timed call: the export already ran at this size in its check.
    assert fake.built == ["openvino"] and fake.calls == {"openvino": 1}
    assert "not measured" in model.choice.note
    # A model of any size (an SR port) runs once untimed first, unless that call is over twice
    # the cap already.
    port = Tiny(digest="ef" * 32)
    port.config = {**port.config, "architecture": "waifu2x_upconv7", "input": {}}
    fake = bench({"openvino": 900.0, "onnxruntime": 1.0, "channels_last": 5.0})
    assert serve_model(port, "cpu").choice.how == "rule" and fake.calls == {"openvino": 2}
    fake = bench({"openvino": 1500.0, "onnxruntime": 1.0, "channels_last": 5.0})
    port.config = {**port.config, "sha256": {zoo.WEIGHTS_FILE: "01" * 32}}
    assert serve_model(port, "cpu").choice.how == "rule" and fake.calls == {"openvino": 1}
    again = bench({"openvino": 900.0, "onnxruntime": 1.0, "channels_last": 5.0})
    assert serve_model(Tiny(), "cpu").choice.cached and again.calls == {}  # not probed again


def test_ties_go_to_the_rules_order(bench) -> None:
    bench({"openvino": 1.02, "onnxruntime": 1.0, "channels_last": 5.0})
    assert serve_model(Tiny(), "cpu").backend == "openvino"  # within 3%: the rule's first


def test_timing_stays_within_its_budget_for_small_graphs(bench) -> None:
    fake = bench({"openvino": 0.5, "onnxruntime": 1.0, "channels_last": 2.0})
    serve_model(Tiny(), "cpu")
    timed_ms = 1000 * fake.now
    assert timed_ms < 2 * measure.BUDGET_MS  # the budget, plus warm-up calls


def test_mosaic_is_never_offered_openvino() -> None:
    """OpenVINO folds MOSAIC's requantisation into its weights and is not exact there: the
    rule offers only what passes MOSAIC's serving check."""
    config = json.loads((zoo.weights_dir() / "mosaic-ade31" / "config.json").read_text())
    assert "openvino" not in backends.cpu_candidates(config)
    assert backends.cpu_candidates(config)[-1] == "channels_last"


def test_yolox_is_offered_onnxruntime_first() -> None:
    """YOLOX's onnxruntime session, busy-waiting within its calls, beat OpenVINO (8.9-9.0 ms
    against 9.7-10.0): the rule's own choice, where nothing is measured, is onnxruntime."""
    pytest.importorskip("onnxruntime")
    config = json.loads((zoo.weights_dir() / "yolox-nano" / "config.json").read_text())
    assert backends.cpu_candidates(config)[0] == "onnxruntime"


def test_dense_backends_lists_the_cached_choices(bench, capsys) -> None:
    from dense.cli import main

    bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    serve_model(Tiny(), "cpu")
    capsys.readouterr()
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "Fake CPU 9000" in out and "tiny" in out and "onnxruntime" in out
    assert "measured" in out and "1.00 ms" in out
    assert main(["backends", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["machine"]["flags"] == CPU[1]
    assert [c["backend"] for c in listing["choices"]] == ["onnxruntime"]


def test_a_real_measurement_serves_equal_to_pytorch(monkeypatch, tmp_path: Path) -> None:
    """The real path once: selfie-seg's candidates built, checked and timed on this machine
    (the exports in the usual cache, the choice in a cache of its own)."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("DENSE_BACKEND_MEASURE", "1")
    monkeypatch.delenv("DENSE_BACKEND", raising=False)
    monkeypatch.setattr(measure, "cache_path", lambda: tmp_path / "backends.json")
    monkeypatch.setattr(measure, "cpu_sample", lambda: None)  # cached even on a busy CI host
    model = serve_model(zoo.load("selfie-seg", "cpu"), "cpu")
    assert model.choice.how == "measured" and model.backend in model.choice.median_ms
    assert set(model.choice.median_ms) | set(model.choice.failed) == set(
        backends.cpu_candidates(model.config))
    eager = zoo.load("selfie-seg", "cpu")
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), eager(x), atol=1e-3, rtol=1e-3)
    assert serve_model(zoo.load("selfie-seg", "cpu"), "cpu").choice.cached


def test_models_of_tens_of_ms_skip_the_block_warm_ups(bench) -> None:
    """Every export ran once at its fixed size in its check: only PyTorch is warmed up, once,
    and each candidate gets MIN_RUNS timed calls (the probe is the rule's first one)."""
    fake = bench({"openvino": 100.0, "onnxruntime": 120.0, "channels_last": 150.0})
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.how, model.choice.runs) == ("openvino", "measured", 3)
    assert fake.calls == {"openvino": 1 + 3, "onnxruntime": 3, "channels_last": 1 + 3}


def test_a_model_of_any_size_warms_every_candidate_at_the_size_timed(bench) -> None:
    """An SR port's export is checked at a smaller size than it is timed at (128×128)."""
    fake = bench({"openvino": 100.0, "onnxruntime": 120.0, "channels_last": 150.0})
    tiny = Tiny()
    tiny.config = {**tiny.config, "architecture": "waifu2x_upconv7", "input": {}}
    served_port = serve_model(tiny, "cpu")
    assert served_port.choice.how == "measured"
    assert fake.calls == {"openvino": 2 + 3, "channels_last": 1 + 3}  # waifu2x: no onnxruntime
    (machine,) = cached_choices().values()
    (entry,) = machine["choices"].values()
    assert entry["input"] == [measure.DYNAMIC_SIDE] * 2


def test_a_cache_that_cannot_be_written_still_serves_the_measured_winner(
        bench, monkeypatch, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("DENSE_PACKAGE_CACHE", str(blocked))  # every cache path under a file
    bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.how) == ("onnxruntime", "measured")


def test_a_broken_cache_file_is_measured_over(bench) -> None:
    measure.cache_path().write_text("{not json")
    bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    assert serve_model(Tiny(), "cpu").choice.how == "measured"
    assert len(cached_choices()) == 1


def test_a_measurement_on_a_busy_host_serves_but_is_not_cached(bench, monkeypatch) -> None:
    """Other processes kept half of the cores busy while the candidates were timed (a browser
    on the same cores): the winner serves this load, the next load measures again."""
    samples = iter([(0.0, 100.0, 1.0, 2), (2.0, 103.0, 1.0, 2)])  # others: 3 CPU s in 2 s × 2
    monkeypatch.setattr(measure, "cpu_sample", lambda: next(samples))
    fake = bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    model = serve_model(Tiny(), "cpu")
    assert (model.backend, model.choice.how) == ("onnxruntime", "measured")
    assert "other processes used 75% of the CPU" in model.choice.note
    assert not measure.cache_path().exists() or not cached_choices()
    monkeypatch.setattr(measure, "cpu_sample", lambda: None)  # idle now
    fake.calls.clear()
    again = serve_model(Tiny(), "cpu")
    assert (again.choice.cached, bool(fake.calls)) == (False, True)
    assert serve_model(Tiny(), "cpu").choice.cached


def test_others_share_counts_only_other_processes() -> None:
    # 1 s of wall time on 2 cores: 1.5 CPU s busy in all, 1.0 of them ours → 25% others
    assert measure.others_share((10.0, 50.0, 3.0, 2), (11.0, 51.5, 4.0, 2)) == pytest.approx(
        0.25)
    assert measure.others_share((10.0, 50.0, 3.0, 2), (11.0, 50.5, 4.0, 2)) == 0.0  # never < 0
    assert measure.others_share(None, (11.0, 51.5, 4.0, 2)) == 0.0
    sample = measure.cpu_sample()
    if sample is not None:  # Linux: a real reading, over the CPUs this process may use
        assert sample[1] > 0 and sample[2] > 0 and sample[3] == len(measure._cpus())


def test_a_stuck_lock_holder_does_not_stall_a_load(bench, monkeypatch, caplog) -> None:
    """The first load waits LOCK_WAIT_S, then measures unlocked; later loads of this process
    no longer wait (each would otherwise wait the whole time in turn)."""
    import time

    fcntl = pytest.importorskip("fcntl")
    monkeypatch.setattr(measure, "LOCK_WAIT_S", 0.3)
    monkeypatch.setattr(measure, "_lock_stuck", False)
    bench({"openvino": 3.0, "onnxruntime": 1.0, "channels_last": 5.0})
    lock = measure.cache_path().with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as held:  # another process's lock, never released meanwhile
        fcntl.flock(held, fcntl.LOCK_EX)
        # flock locks belong to the open file: a second open in this process contends too
        start = time.monotonic()
        model = serve_model(Tiny(), "cpu")
        first = time.monotonic() - start
        start = time.monotonic()
        serve_model(Tiny(digest="cd" * 32), "cpu")
        second = time.monotonic() - start
    assert (model.backend, model.choice.how) == ("onnxruntime", "measured")
    assert "still locked after" in caplog.text
    assert first >= 0.3 > second
