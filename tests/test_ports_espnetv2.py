"""The ESPNetv2 segmentation ports: config, any input size, and equality with EdgeNets' code.

The default tests compare the bundled models with reference logits stored in
``tests/fixtures/espnetv2`` (EdgeNets' own forward pass, same weights; tolerance 1e-4) and check
their predictions on real photos. The ``runtime`` tests run our ONNX export in onnxruntime
against the same logits and, with ``ESPNETV2_REFERENCE`` pointing at a checkout of
sacmehta/EdgeNets, rerun EdgeNets' code live. Rebuild the fixtures with
``python -m dense.convert.espnetv2 --fixtures --reference <checkout>``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dense import zoo
from dense.convert.fidelity_espnetv2 import (
    compare_with_fixture,
    export_session,
    fixture_inputs,
    load_photo,
    read_fixture,
    run_port,
    run_session,
)
from dense.convert.source_espnetv2 import EXAMPLES, PORTS, TOLERANCE, convert_state_dict
from dense.serve import load_served

IDS = list(PORTS)


@functools.cache
def port_model(model_id: str) -> nn.Module:
    return zoo.load(model_id, device="cpu")


def class_shares(model: nn.Module, photo: Path) -> dict[str, float]:
    logits = run_port(model, load_photo(photo, tuple(model.config["input"]["size"])))
    counts = np.bincount(logits.argmax(0).ravel(), minlength=logits.shape[0])
    return dict(zip(model.config["labels"], (counts / counts.sum()).tolist(), strict=True))


def test_voc_config() -> None:
    config = port_model("espnetv2-voc").config
    assert config["task"] == "segmentation"
    assert config["architecture"] == "espnetv2_seg"
    assert config["arch_args"]["num_classes"] == 21
    assert len(config["labels"]) == len(config["colors"]) == 21
    assert config["labels"][0] == "background" and config["labels"][15] == "person"
    assert config["colors"][:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]  # VOC palette
    assert config["input"]["size"] == [384, 384] and config["input"]["range"] == [0, 1]
    assert config["licence"] == "MIT"
    assert config["source"]["commit"].startswith("2b232d3")
    assert config["metrics"]["max_abs_diff"]["working_eager"] <= TOLERANCE


def test_cityscapes_config() -> None:
    config = port_model("espnetv2-cityscapes").config
    assert config["arch_args"]["num_classes"] == 20
    assert len(config["labels"]) == len(config["colors"]) == 20
    assert config["labels"][0] == "road" and config["labels"][-1] == "background"
    assert config["input"]["size"] == [512, 1024]
    assert "MIT License" in zoo.model_card("espnetv2-cityscapes")


@pytest.mark.parametrize("model_id", IDS)
def test_matches_stored_reference_logits(model_id: str) -> None:
    """EdgeNets' logits on a photo (128×192) and on an odd-sized crop of it (121×183)."""
    result = compare_with_fixture(port_model(model_id), PORTS[model_id])
    for name, values in result.items():
        assert values["max_abs_diff"] <= TOLERANCE, (name, values)
        assert values["argmax_agreement"] >= 0.999, (name, values)


@pytest.mark.parametrize("model_id", IDS)
def test_served_model_matches_reference(model_id: str) -> None:
    """What the app serves on CPU (``backend="auto"``) is held to the same tolerance."""
    model = load_served(model_id, device="cpu")
    port = PORTS[model_id]
    run = None
    if model.backend == "channels_last":
        def run(rgb: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None]
            with torch.inference_mode():
                return model(x.to(memory_format=torch.channels_last))[0].contiguous().numpy()
    result = compare_with_fixture(model, port, run)
    assert max(v["max_abs_diff"] for v in result.values()) <= TOLERANCE, (model.backend, result)


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (16, 16), (17, 23), (64, 100), (97, 33)])
def test_any_input_size(size: tuple[int, int]) -> None:
    model = port_model("espnetv2-voc")
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (2, 21, *size)
    assert torch.isfinite(y).all()


def test_batch_equals_single_runs() -> None:
    model = port_model("espnetv2-cityscapes")
    x = torch.rand(2, 3, 40, 72, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        together = model(x)
        apart = torch.cat([model(x[:1]), model(x[1:])])
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-5)


def test_fixtures_are_small() -> None:
    folder = PORTS["espnetv2-voc"].fixture.parent
    assert sum(p.stat().st_size for p in folder.iterdir()) < 300_000


def test_cat_photo_is_mostly_cat() -> None:
    shares = class_shares(port_model("espnetv2-voc"), EXAMPLES / "chelsea.png")
    assert max(shares, key=shares.get) == "cat"
    assert shares["cat"] > 0.6, shares


@pytest.mark.parametrize("photo", ["astronaut.png", "grace_hopper.jpg"])
def test_people_are_person(photo: str) -> None:
    shares = class_shares(port_model("espnetv2-voc"), EXAMPLES / photo)
    objects = {k: v for k, v in shares.items() if k != "background"}
    assert max(objects, key=objects.get) == "person"
    assert shares["person"] > 0.3, shares


def test_coco_people_are_person() -> None:
    from dense.data import data_root

    root = data_root()
    photos = sorted((root / "pose" / "coco_sample").glob("*.jpg")) if root else []
    if not photos:
        pytest.skip("../shared/data/pose/coco_sample not found (set DENSE_DATA)")
    model = port_model("espnetv2-voc")
    for photo in photos:
        shares = class_shares(model, photo)
        objects = {k: v for k, v in shares.items() if k != "background"}
        assert max(objects, key=objects.get) == "person", (photo.name, shares)


@pytest.mark.parametrize("model_id", IDS)
def test_conversion_reproduces_bundled_weights(model_id: str) -> None:
    """The upstream state dict, renamed, is exactly the bundled safetensors."""
    from safetensors.torch import load_file

    from dense.data import upstream_file
    from dense.ports.espnetv2 import ESPNetv2Segmenter

    port = PORTS[model_id]
    try:
        source = upstream_file(port.upstream)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    converted = convert_state_dict(torch.load(source, map_location="cpu", weights_only=True),
                                   ESPNetv2Segmenter(**port.arch_args))
    bundled = load_file(zoo.resolve(model_id) / zoo.WEIGHTS_FILE)
    assert converted.keys() == bundled.keys()
    for key, tensor in converted.items():
        assert torch.equal(tensor, bundled[key]), key


# ---------------------------------------------------------------------------------------------
# Runtime checks


@pytest.mark.runtime
@pytest.mark.parametrize("model_id", IDS)
def test_onnx_export_matches_reference(model_id: str, tmp_path: Path) -> None:
    """Our ONNX export in onnxruntime: against EdgeNets' stored logits at the fixture sizes, and
    against the eager port (equal to EdgeNets' code) on a real photo at the working size."""
    model = port_model(model_id)
    port = PORTS[model_id]
    sessions = {rgb.shape[:2]: export_session(model, rgb.shape[:2], tmp_path)
                for rgb in fixture_inputs(port).values()}
    result = compare_with_fixture(model, port, lambda x: run_session(sessions[x.shape[:2]], x))
    print(model_id, result)
    for name, values in result.items():
        assert values["max_abs_diff"] <= TOLERANCE, (name, values)
        assert values["argmax_agreement"] >= 0.999, (name, values)
    session = export_session(model, port.size, tmp_path)
    rgb = load_photo(EXAMPLES / "chelsea.png", port.size)
    diff = float(np.abs(run_session(session, rgb) - run_port(model, rgb)).max())
    print(model_id, "working size", diff)
    assert diff <= TOLERANCE


@pytest.mark.runtime
@pytest.mark.parametrize("model_id", IDS)
def test_against_edgenets_code(model_id: str) -> None:
    """EdgeNets' forward pass, live: set ESPNETV2_REFERENCE to a checkout of sacmehta/EdgeNets
    (kept outside this repository) and have ../shared/upstream."""
    from dense.convert.fidelity_espnetv2 import load_reference, run_reference

    checkout = os.environ.get("ESPNETV2_REFERENCE")
    if not checkout:
        pytest.skip("set ESPNETV2_REFERENCE to a checkout of sacmehta/EdgeNets")
    port = PORTS[model_id]
    try:
        reference = load_reference(Path(checkout), port)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model = port_model(model_id)
    for size in (port.size, (port.size[0] - 7, port.size[1] - 9)):
        rgb = load_photo(EXAMPLES / "astronaut.png", size)
        diff = float(np.abs(run_port(model, rgb) - run_reference(reference, model, rgb)).max())
        print(model_id, size, diff)
        assert diff <= TOLERANCE


def test_fixture_records_its_inputs() -> None:
    for port in PORTS.values():
        fixture = read_fixture(port)
        assert str(fixture["image"]) == port.fixture_image
        assert tuple(fixture["size"]) == port.fixture_size
