"""The measured backend choice: on first use on a machine, the candidate backends for a model
are timed once and the fastest is kept, per machine, in a JSON file; later loads read it.

Why measure rather than keep a table: the fastest backend depends on the CPU (OpenVINO beat
LiteRT on an AVX-512 EPYC and lost to it on an AVX2-only one, issue 23), the thread count and
the runtimes' versions, and a table written on one machine is a guess on the next. The rule of
:mod:`dense.serve.backends` stays as the list of candidates (what is considered for a model at
all, in its order of preference) and as the fallback: ``DENSE_BACKEND_MEASURE=0``, devices
other than the CPU, and models too slow to time cheaply (one call over :data:`CAP_MS`) keep it.
``DENSE_BACKEND`` forces a backend and nothing is timed.

A candidate is only timed once it has passed its own check: an export runtime is built through
:func:`dense.serve.export.export_forward`, which compares its result with PyTorch's and raises
when it differs (OpenVINO is not exact on MOSAIC's integer graph, so the rule never offers it
there, and a check that fails anywhere removes the candidate). The winner is then the runtime
already built, so a measured first load builds no more than the candidates themselves.

The cache (``package_cache()/backends.json``)::

    {"version": 1,
     "machines": {"<CPU model name> | flags sha256:<12 hex>[ | ONEDNN_MAX_CPU_ISA=<cap>...]": {
         "cpu": "<model name>", "flags": "<sorted flags>"[, "caps": {"<variable>": "<cap>"}],
         "choices": {"<id>@<weights sha256, 16 hex> <H>x<W> cpu threads=<n>
                      candidates=<backend>,<backend>... spinning=<off|within|calls>
                      code=<digest> export=v<n> torch=<v> onnxruntime=<v> openvino=<v>": {
             "model": "<id>", "backend": "openvino", "how": "measured",
             "median_ms": {"openvino": 0.9, "onnxruntime": 2.4, "channels_last": 6.4},
             "failed": {}, "runs": 6, "input": [256, 256], "threads": 1,
             "note": "", "measured": "<UTC time>"}}}}}
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dense import hardware, zoo
from dense.data import package_cache
from dense.serve.backends import EXPORT_BACKENDS, cpu_candidates
from dense.serve.export import (
    EXPORT_VERSION,
    code_digest,
    export_forward,
    ort_spinning,
    served_size,
)

__all__ = ["CAP_MS", "Choice", "cache_path", "choice_key", "machine_key", "measure_backend",
           "measuring", "time_round_robin"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# A model whose one call takes longer than this keeps the rule's choice: timing its candidates
# would cost seconds at every first start on a machine (Real-ESRGAN: ~1 s a call at 128×128).
CAP_MS = 500.0
# Wall-clock budget of the timed calls of one model, all candidates together (warm-up calls and
# the pauses between blocks aside); each candidate still gets at least MIN_RUNS timed calls.
BUDGET_MS = 200.0
MIN_RUNS, MAX_RUNS = 3, 8
# Models whose export takes any size (the SR ports) are timed at this side: a size they are
# really served at (restoration tiles are 256, the bench times them at 128) and small enough
# for the cap to let most through.
DYNAMIC_SIDE = 128
# Models whose probed call takes longer skip the warm-up call of each timing block.
WARMUP_BELOW_MS = 20.0
# A candidate later in the rule's order must beat the earlier one by more than this to win:
# within it, two runtimes are a tie on a shared host, and the rule's order was measured too.
TIE = 0.03
# A measurement during which other processes kept more than this share of the CPU busy (a
# browser drawing the page on the same cores, a training run) serves this process but is not
# cached, so the next start measures again: under contention the winner is the runtime that
# suffers least from it, not the fastest (seen: onnxruntime picked for blazepose-full and
# movenet-multipose at the first live frame with headless Chromium on both cores, where
# OpenVINO wins on idle cores by 1.2-2×).
BUSY_SHARE = 0.25
# How long a process waits for another one's measurement (the cache's file lock) before it
# measures unlocked: a process stuck while holding the lock must not stall every load.
LOCK_WAIT_S = 120.0

# What the measurement reads the time with and pauses with (tests put a fake clock here).
clock: Callable[[], float] = time.perf_counter
sleep: Callable[[float], None] = time.sleep

_lock = threading.Lock()  # one measurement at a time in a process: two would time each other
_lock_stuck = False  # the cache's file lock timed out once in this process (see _file_lock)


@dataclass(frozen=True)
class Choice:
    """How a model's backend was chosen.

    ``how``: ``measured`` (timed here, now or by an earlier load: ``cached``), ``forced``
    (``DENSE_BACKEND`` or an explicit backend), or ``rule`` (``dense.serve.backends``; ``note``
    says why it was not measured). ``median_ms`` holds the timings, ``failed`` the candidates
    refused by their check, with the reason.
    """

    backend: str
    how: str
    median_ms: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    cached: bool = False
    note: str = ""
    runs: int = 0  # timed calls per candidate

    def describe(self) -> str:
        """One line: ``openvino, measured (cached): openvino 0.90 ms, onnxruntime 2.40 ms``."""
        how = f"{self.how} (cached)" if self.cached else self.how
        times = ", ".join(f"{name} {ms:.2f} ms" for name, ms in
                          sorted(self.median_ms.items(), key=lambda item: item[1]))
        refused = ", ".join(f"{name} refused" for name in self.failed)
        details = "; ".join(s for s in (times, refused, self.note) if s)
        return f"{self.backend}, {how}" + (f": {details}" if details else "")


def measuring() -> bool:
    """Whether ``auto`` measures (``DENSE_BACKEND_MEASURE``, default on; ``0`` keeps the rule)."""
    return os.environ.get("DENSE_BACKEND_MEASURE", "1").strip().lower() not in ("0", "false",
                                                                                  "no", "off")


# ---------------------------------------------------------------------------------------------
# Timing


def time_round_robin(calls: dict[str, Callable[[], object]], runs: int = 20, warmup: int = 3,
                     cuda: bool = False, rounds: int = 4, settle_s: float = 0.2,
                     clock: Callable[[], float] = time.perf_counter,
                     sleep: Callable[[float], None] = time.sleep) -> dict[str, dict]:
    """Median, p10 and p90 latency in milliseconds of each call over ``runs`` timed calls.

    The calls take turns in ``rounds`` blocks, so that a shared host slowing down or speeding
    up during the run weighs on all of them alike. Each block starts after a pause of
    ``settle_s``, with ``warmup`` untimed calls: a runtime's worker threads busy-wait for a while
    after its last call (onnxruntime's by default), and without the pause the next runtime's
    timings measured that spinning (OpenVINO's blazepose-lite median 4.1 ms after onnxruntime's
    block, 2.5 ms alone). ``clock`` and ``sleep`` are there for tests.
    """
    rounds = max(1, min(rounds, runs))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name, call in calls.items():
            if settle_s:
                sleep(settle_s)
            timed_here = runs // rounds + (r < runs % rounds)
            for i in range(warmup + timed_here):
                if cuda:
                    torch.cuda.synchronize()
                start = clock()
                call()
                if cuda:
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append((clock() - start) * 1000)
    results = {}
    for name, timed in times.items():
        deciles = (statistics.quantiles(timed, n=10, method="inclusive") if len(timed) > 1
                   else timed * 2)
        results[name] = {"median_ms": round(statistics.median(timed), 3),
                         "p10_ms": round(deciles[0], 3), "p90_ms": round(deciles[-1], 3),
                         "runs": runs}
    return results


# ---------------------------------------------------------------------------------------------
# The cache


def cache_path() -> Path:
    return package_cache() / "backends.json"


def machine_key() -> tuple[str, dict[str, str]]:
    """This CPU's key in the cache and what it stands for: the model name and a digest of the
    sorted flags (the full flags are kept beside it; two VMs with one CPU name may differ in
    AVX-512 or AMX, and those decide the winner), and the instruction-set caps in force
    (dense.hardware.isa_caps: a run capped to AVX2 is another machine)."""
    name, flags = hardware.cpu_model()
    digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    caps = hardware.isa_caps()
    capped = "".join(f" | {k}={v}" for k, v in caps.items())
    return (f"{name} | flags sha256:{digest}{capped}",
            {"cpu": name, "flags": flags, **({"caps": caps} if caps else {})})


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def choice_key(config: dict, size: tuple[int, int], device: torch.device | str,
               threads: int, candidates: list[str] | None = None, *, code: str) -> str:
    """A model's key within its machine's entry: id, weights checksum, the input size timed,
    device, threads, the candidates, onnxruntime's spinning setting, the model's code
    (``code``: :func:`dense.serve.export.code_digest`), the exporter's version and the versions
    of the runtimes (a new candidate, runtime, graph or export, or spinning threads, may change
    the winner)."""
    digest = config.get("sha256", {}).get(zoo.WEIGHTS_FILE, "unversioned")[:16]
    versions = " ".join(f"{p}={_version(p)}" for p in ("torch", "onnxruntime", "openvino"))
    return (f"{config.get('id', 'model')}@{digest} {size[0]}x{size[1]} {device} "
            f"threads={threads} candidates={','.join(candidates or [])} "
            f"spinning={ort_spinning(config)} "
            f"code={code} export=v{EXPORT_VERSION} {versions}")


@contextlib.contextmanager
def _file_lock() -> Iterator[None]:
    """Held across read, measurement and write: replicas starting together measure a model
    once (the second finds the first's entry) and never time each other."""
    global _lock_stuck
    path = cache_path().with_suffix(".lock")
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")  # noqa: SIM115 - closed below, after the body has run
    except (ImportError, OSError) as err:  # not POSIX, or no writable cache: unlocked
        log.debug("no lock on %s (%s)", path, err)
        yield
        return
    try:
        # After one timeout this process stops waiting: the holder is stuck, and every model
        # measured after it would otherwise wait the whole LOCK_WAIT_S in turn.
        deadline = time.monotonic() + (0.0 if _lock_stuck else LOCK_WAIT_S)
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    if not _lock_stuck:
                        log.warning("%s still locked after %.0f s: measuring without the lock "
                                    "from now on", path, LOCK_WAIT_S)
                    _lock_stuck = True
                    break
                time.sleep(0.05)
        yield
    finally:
        f.close()  # closing releases the lock


def read_cache() -> dict[str, Any]:
    """The whole cache; an empty one if missing, unreadable or of another version."""
    try:
        data = json.loads(cache_path().read_text())
    except (FileNotFoundError, NotADirectoryError):
        data = {}
    except (OSError, ValueError) as err:
        log.warning("ignoring the backend cache %s (%s); it will be rewritten", cache_path(), err)
        data = {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        data = {}
    return {"version": CACHE_VERSION, "machines": data.get("machines", {})}


def machine_choices() -> dict[str, dict]:
    """The cached choices of this machine, by key."""
    key, _ = machine_key()
    return read_cache()["machines"].get(key, {}).get("choices", {})


def _write_entry(key: str, entry: dict) -> None:
    """Add ``entry`` to the cache; a cache that cannot be written (a read-only home) is
    logged, and the choice then holds for this process only."""
    data = read_cache()
    name, about = machine_key()
    machine = data["machines"].setdefault(name, {**about, "choices": {}})
    machine["choices"][key] = entry
    path = cache_path()
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(data, indent=1))
        partial.replace(path)  # atomic: a reader never sees half a file
    except OSError as err:
        log.warning("could not cache the backend choice in %s (%s)", path, err)


# ---------------------------------------------------------------------------------------------
# The measurement


def _choice(entry: dict, cached: bool) -> Choice:
    return Choice(entry["backend"], entry["how"], dict(entry.get("median_ms", {})),
                  dict(entry.get("failed", {})), cached, entry.get("note", ""),
                  entry.get("runs", 0))


def _runs(probe_ms: float, candidates: int) -> int:
    """Timed calls per candidate so that all of them fit in BUDGET_MS."""
    return max(MIN_RUNS, min(MAX_RUNS, int(BUDGET_MS / (max(probe_ms, 0.05) * candidates))))


def _build(model: nn.Module, backend: str) -> Callable[[torch.Tensor], Any]:
    """The served forward of ``backend`` for ``model`` (already channels_last): the model
    itself for PyTorch, else the export runtime, built and checked against PyTorch."""
    return export_forward(model, backend) if backend in EXPORT_BACKENDS else model


def measure_backend(model: nn.Module, device: torch.device, rule: str
                    ) -> tuple[Choice, Callable[[torch.Tensor], Any] | None]:
    """The backend for ``model`` (a zoo module in eval mode on the CPU) measured here, or read
    from the cache; and the winner's export forward when measuring built it (None otherwise:
    the caller builds it, as for a cached choice).

    ``rule`` is :func:`dense.serve.backends.pick_backend`'s choice; it is kept when there is
    nothing to choose from, when the cache names a backend no longer offered, and for slow
    models (see :data:`CAP_MS`).
    """
    config = getattr(model, "config", {})
    candidates = cpu_candidates(config)
    if rule not in candidates or len(candidates) < 2:
        return Choice(rule, "rule", note="the only candidate"), None
    size = served_size(config) or (DYNAMIC_SIDE, DYNAMIC_SIDE)
    threads = torch.get_num_threads()
    key = choice_key(config, size, device, threads, candidates, code=code_digest(model))
    entry = machine_choices().get(key)
    if entry and entry.get("backend") in candidates:
        return _choice(entry, cached=True), None
    with _lock, _file_lock():
        entry = machine_choices().get(key)  # another process may have measured meanwhile
        if entry and entry.get("backend") in candidates:
            return _choice(entry, cached=True), None
        before = cpu_sample()
        choice, run = _measure(model, candidates, size, threads)
        others = others_share(before, cpu_sample())
        if others > BUSY_SHARE:
            choice = dataclasses.replace(choice, note=(
                f"{choice.note}; " if choice.note else "") + f"other processes used "
                f"{others:.0%} of the CPU meanwhile: not cached, measured again next start")
            log.info("backend for %s: %s", config.get("id", "model"), choice.describe())
            return choice, run
        _write_entry(key, {
            "model": config.get("id", "model"), "backend": choice.backend, "how": choice.how,
            "median_ms": choice.median_ms, "failed": choice.failed, "note": choice.note,
            "input": list(size), "threads": threads, "runs": choice.runs,
            "measured": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
    log.info("backend for %s: %s", config.get("id", "model"), choice.describe())
    return choice, run


def _measure(model: nn.Module, candidates: list[str], size: tuple[int, int], threads: int
             ) -> tuple[Choice, Callable[[torch.Tensor], Any] | None]:
    # PyTorch's candidate is the module as served: weights in channels_last (dense.serve.serve
    # puts them so for every backend but eager, before or after; doing it first is the same).
    model.to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    runners: dict[str, Callable[[torch.Tensor], Any]] = {}
    failed: dict[str, str] = {}
    probe_ms: float | None = None
    # The candidates that have already run at this size: an export ran in its check, at the
    # size it serves when that is fixed (the SR ports' check runs a smaller size).
    warm = ({b for b in candidates if b in EXPORT_BACKENDS}
            if served_size(model.config) else set())
    for backend in candidates:  # the rule's order: its first choice is probed
        try:
            runners[backend] = _build(model, backend)
        except Exception as err:  # noqa: BLE001 - a candidate that fails its check is out
            failed[backend] = str(err)[:300]
            log.info("%s refused for %s: %s", backend, model.config.get("id", "model"), err)
            continue
        if probe_ms is None:
            # One timed call, after a first one where it has not run at this size yet
            # (PyTorch's first call creates its kernels): a model slower than CAP_MS keeps the
            # rule's choice. A first call over twice the cap is enough to tell (Real-ESRGAN:
            # 3.6 s a call at 128×128 on one busy core).
            probe_ms = 0.0
            if backend not in warm:
                probe_ms = _time_once(runners[backend], x)
            if probe_ms <= 2 * CAP_MS:
                probe_ms = _time_once(runners[backend], x)
            warm.add(backend)
            if probe_ms > CAP_MS:
                note = f"one call {probe_ms:.0f} ms > {CAP_MS:.0f} ms: not measured"
                return (Choice(backend, "rule", {backend: probe_ms}, failed, note=note, runs=1),
                        _export_run(runners, backend))
    if len(runners) < 2:
        only = next(iter(runners), "channels_last")
        note = "the other candidates failed their check"
        return Choice(only, "rule", failed=failed, note=note), _export_run(runners, only)
    runs = _runs(probe_ms or 0.0, len(runners))
    calls = {b: _call(r, x) for b, r in runners.items()}
    # Models of tens of ms and more skip the warm-up call of each block, half the cost of their
    # measurement (unet-camvid: ~0.4 s a call on one core): only the candidates that have not
    # run at this size yet (PyTorch's first call creates its kernels) get one call first. For
    # fast models a warm-up per block is cheap and steadies the first timed call.
    warmup = 1 if (probe_ms or 0.0) < WARMUP_BELOW_MS else 0
    if not warmup:
        for backend in calls.keys() - warm:
            calls[backend]()
    # Served onnxruntime sessions do not spin between calls (dense.serve.export.ort_spinning),
    # so a short pause settles the threads; with DENSE_ORT_SPINNING=1 they do, and the bench's
    # 0.2 s pause is needed.
    settle = 0.2 if ort_spinning(getattr(model, "config", {})) == "calls" else 0.02
    timed = time_round_robin(calls, runs=runs, warmup=warmup, rounds=2 if runs >= 4 else 1,
                             settle_s=settle, clock=clock, sleep=sleep)
    medians = {b: t["median_ms"] for b, t in timed.items()}
    best = min(medians.values())
    winner = next(b for b in runners if medians[b] <= best * (1 + TIE))
    return Choice(winner, "measured", medians, failed, runs=runs), _export_run(runners, winner)


def _cpus() -> list[int]:
    """The CPUs this process may run on (its affinity; all of them where that is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cpu_sample() -> tuple[float, float, float, int] | None:
    """(monotonic seconds, CPU seconds all processes have kept this process's CPUs busy since
    boot, CPU seconds of this process, number of those CPUs), from /proc/stat's per-CPU lines
    and os.times; None where there is no /proc.

    A host's other tenants on CPUs this process may not use do not count; this process's own
    threads do not count as others (a webcam frame served while a model is measured is
    contention the reading does not see)."""
    cpus = {f"cpu{i}" for i in _cpus()}
    busy = 0.0
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in cpus:
                    # user nice system idle iowait irq softirq steal: all but idle and iowait
                    # are busy (steal: a VM's host took the core); guest time is inside user.
                    ticks = [int(v) for v in fields[1:9]]
                    busy += sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
    except (OSError, ValueError):
        return None
    own = os.times()
    return (time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system,
            len(cpus))


def others_share(before: tuple[float, float, float, int] | None,
                 after: tuple[float, float, float, int] | None) -> float:
    """The share of this process's CPUs that other processes kept busy between two
    :func:`cpu_sample` readings (0 where either is missing)."""
    if before is None or after is None or after[0] <= before[0]:
        return 0.0
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / ((after[0] - before[0]) * max(after[3], 1)))


def _time_once(run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    """Milliseconds of one call of ``run(x)``."""
    start = clock()
    _call(run, x)()
    return round((clock() - start) * 1000, 3)


def _call(run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return run(x)
    return call


def _export_run(runners: dict[str, Callable], backend: str) -> Callable | None:
    return runners.get(backend) if backend in EXPORT_BACKENDS else None
