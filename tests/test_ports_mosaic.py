"""MOSAIC R4 port (uint8 TFLite graph, ADE20K top 31) against LiteRT.

Default tests compare the bundled port with LiteRT outputs stored in ``tests/fixtures/mosaic``
(the argmax as a PNG and a sha256 of the uint8 scores, per photo) and check the legacy bilinear
resize against a numpy implementation of TF's sampling. ``-m runtime`` tests compare with
LiteRT live (every tensor of the graph on one photo; the argmax and scores on all the photo
sets); with ``DENSE_REGENERATE_FIXTURES=1`` they also rewrite the fixtures.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dense import zoo
from dense.convert.mosaic import (
    PHOTO_SETS,
    UPSTREAM,
    LiteRT,
    as_tensor,
    photo_paths,
    photo_uint8,
)
from dense.ports.mosaic import LABELS, MosaicSegmenter
from dense.ports.tflite_quant import ResizeBilinearGather

FIXTURES = Path(__file__).parent / "fixtures" / "mosaic"
MODEL_ID = "mosaic-ade31"
MIN_AGREEMENT = 0.99  # the contract; the port measured 100% everywhere (see the model card)
# The photos with recorded LiteRT outputs: all the examples and one photo of each data set
# (all of them are compared live under -m runtime).
RECORDED = json.loads((FIXTURES / "fixtures.json").read_text())["photos"]
EXAMPLES = [r["name"] for r in RECORDED.values() if r["set"] == "examples"]
DATA_PHOTOS = [(r["set"], r["name"]) for r in RECORDED.values() if r["set"] != "examples"]
_cache: dict[str, torch.Tensor] = {}


def photo_path(set_name: str, name: str) -> Path:
    """The photo, or a skip where it is absent (a data set not on this machine)."""
    photo_set = next(s for s in PHOTO_SETS if s.name == set_name)
    found = [p for p in photo_paths(photo_set) if p.name == name]
    if not found:
        pytest.skip(f"{photo_set.folder}/{name} is not here")
    return found[0]


def fixture_key(set_name: str, name: str) -> str:
    return f"{set_name}-{Path(name).stem}"


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def model() -> MosaicSegmenter:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return zoo.load(MODEL_ID, device="cpu")


def run(model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    key = sha256(image)  # each photo once per session: sensible-class tests reuse the scores
    if key not in _cache:
        with torch.inference_mode():
            _cache[key] = model(as_tensor(image))[0]
    return _cache[key]


def uint8_scores(model: MosaicSegmenter, scores: torch.Tensor) -> np.ndarray:
    """The port's scores back on the graph's uint8 grid, H×W×C as LiteRT holds them."""
    q = torch.round(scores / model.net.output_scales[0])
    assert torch.equal(q * model.net.output_scales[0], scores)  # exactly on the grid
    return q.permute(1, 2, 0).numpy().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The bundled folder


def test_config_and_labels(model):
    config = model.config
    assert config["task"] == "segmentation" and config["architecture"] == "mosaic"
    assert config["labels"] == LABELS and len(LABELS) == 32
    assert LABELS[0] == "other" and LABELS[1] == "wall" and LABELS[13] == "person"
    assert LABELS[31] == "armchair"
    assert np.asarray(config["colors"]).shape == (32, 3)
    assert config["colors"][1] == [120, 120, 120]  # ADE20K's wall
    assert config["input"] == {"layout": "NCHW", "channels": "RGB", "size": [512, 512],
                               "range": [0, 1]}
    assert config["licence"] == "Apache-2.0"
    assert config["source"]["sha256"].startswith("da8b3822")
    assert config["metrics"]["published_miou_ade20k_top31"] == 60.1
    card = zoo.model_card(MODEL_ID)
    assert "MLCommons" in card and "60.1" in card


def test_weights_are_the_files_integers(model):
    state = model.state_dict()
    assert state["net.ops.conv0.weight"].dtype == torch.uint8
    assert state["net.ops.conv0.bias"].dtype == torch.int32
    assert sum(v.numel() for v in state.values()) > 1_800_000


def test_output_contract(model):
    x = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        scores = model(x)
    assert scores.shape == (2, 32, 512, 512) and scores.dtype == torch.float32
    assert float(scores.min()) >= 0.0 and float(scores.max()) <= 24.6
    with torch.inference_mode():
        single = model(x[1:])
    assert torch.equal(single[0], scores[1])  # batched = one at a time, bit for bit


def test_graph_ops(model):
    """The ops of the file (less its final ARG_MAX, which dense's argmax replaces)."""
    kinds = Counter(op["type"] for op in model.net.graph["ops"])
    assert kinds == {"qconv2d": 67, "qadd": 11, "resize_bilinear_gather": 6, "concat": 5,
                     "requantize": 4, "qavg_pool2d": 3, "split": 3}
    legacy = [op for op in model.net.graph["ops"] if op["type"] == "resize_bilinear_gather"]
    assert {op["sampling"] for op in legacy} == {"legacy"}


def test_float_input_is_quantised_as_the_file_does(model):
    """The graph's own input quantisation (round(x/s) + 128) gives the integers
    MosaicSegmenter hands over."""
    q = torch.randint(0, 256, (1, 3, 512, 512), generator=torch.Generator().manual_seed(3))
    q = q.float()
    with torch.inference_mode():
        (direct,) = model.net(q - 128.0, integers=True)
        (quantised,) = model.net((q - 128.0) / 127.5)
    assert torch.equal(direct, quantised)


# ---------------------------------------------------------------------------------------------
# Port vs recorded LiteRT outputs


def _check_against_fixture(model, set_name: str, name: str) -> None:
    key = fixture_key(set_name, name)
    image = photo_uint8(photo_path(set_name, name))
    expected = cv2.imread(str(FIXTURES / f"{key}.png"), cv2.IMREAD_UNCHANGED)
    scores = run(model, image)
    agreement = float((scores.argmax(0).numpy() == expected).mean())
    assert agreement >= MIN_AGREEMENT, (key, agreement)
    if sha256(image) == RECORDED[key]["input_sha256"]:  # same decoder and resize as recorded
        assert sha256(uint8_scores(model, scores)) == RECORDED[key]["scores_sha256"]
        assert agreement == 1.0


@pytest.mark.parametrize("name", EXAMPLES)
def test_matches_litert_on_examples(model, name):
    _check_against_fixture(model, "examples", name)


@pytest.mark.parametrize("set_name, name", DATA_PHOTOS)
def test_matches_litert_on_data_photos(model, set_name, name):
    _check_against_fixture(model, set_name, name)


@pytest.mark.parametrize("name, labels, share", [
    ("astronaut.png", ["person"], 0.3), ("grace_hopper.jpg", ["person"], 0.3),
    ("charades.jpg", ["person"], 0.1), ("rocket.jpg", ["sky"], 0.9),
    ("coffee.png", ["table"], 0.3),
    ("room.jpg", ["wall", "floor", "ceiling", "curtain", "armchair", "sofa", "chair"], 0.9)])
def test_sensible_classes(model, name, labels, share):
    """Portraits and the charades players come out as people, the launch as sky, the coffee
    cup on its table, the living room as a room's parts. (The cat of chelsea.png is not tested:
    MOSAIC has no animal class.)"""
    found = run(model, photo_uint8(photo_path("examples", name))).argmax(0).numpy()
    assert np.isin(found, [LABELS.index(label) for label in labels]).mean() >= share


# ---------------------------------------------------------------------------------------------
# TF's legacy bilinear resize


def tf_resize_reference(x: np.ndarray, size: tuple[int, int], sampling: str,
                        quantized: bool = False) -> np.ndarray:
    """TFLite's bilinear resize of an N×C×H×W array, pixel by pixel (float64 sums).

    legacy: src = dst·in/out; half_pixel: max(0, (dst + ½)·in/out − ½); align_corners:
    dst·(in − 1)/(out − 1); the scales in float32. Neighbours ⌊src⌋ and min(⌊src⌋ + 1, in − 1).
    ``quantized``: XNNPACK's uint8 kernel, weights rounded to 1/2048 and the result half up.
    """
    n, c, h, w = x.shape
    out_h, out_w = size

    def source(dst: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        if sampling == "align_corners" and n_out > 1:
            scale = np.float32(n_in - 1) / np.float32(n_out - 1)
        else:
            scale = np.float32(n_in) / np.float32(n_out)
        if sampling == "half_pixel":
            src = max(np.float32(0), (np.float32(dst) + np.float32(0.5)) * scale
                      - np.float32(0.5))
        else:
            src = np.float32(dst) * scale
        lo = min(int(np.floor(src)), n_in - 1)
        frac = float(np.float32(src) - np.float32(lo))
        if quantized:
            frac = round(frac * 2048) / 2048
        return lo, min(lo + 1, n_in - 1), frac

    out = np.zeros((n, c, out_h, out_w))
    for oy in range(out_h):
        y0, y1, fy = source(oy, h, out_h)
        for ox in range(out_w):
            x0, x1, fx = source(ox, w, out_w)
            out[:, :, oy, ox] = (x[:, :, y0, x0] * (1 - fy) * (1 - fx)
                                 + x[:, :, y0, x1] * (1 - fy) * fx
                                 + x[:, :, y1, x0] * fy * (1 - fx)
                                 + x[:, :, y1, x1] * fy * fx)
    return np.floor(out + 0.5) if quantized else out


RESIZES = [((4, 4), (32, 32)), ((32, 32), (64, 64)), ((5, 7), (12, 9)), ((9, 6), (4, 5)),
           ((1, 3), (3, 8))]


@pytest.mark.parametrize("sampling", ["legacy", "half_pixel", "align_corners"])
@pytest.mark.parametrize("in_size, size", RESIZES)
def test_resize_matches_tf_reference(sampling, in_size, size):
    x = np.random.default_rng(0).normal(size=(2, 3, *in_size)).astype(np.float32)
    ours = ResizeBilinearGather(list(in_size), list(size), sampling, quantized=False)(
        torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, tf_resize_reference(x, size, sampling), atol=1e-5)


@pytest.mark.parametrize("in_size, size", RESIZES)
def test_quantized_legacy_resize_is_exact(in_size, size):
    """On centred uint8 values with MOSAIC's ratios (multiples of 1/8) the float sums are the
    integer kernel's; other ratios may differ in the last bit of a rounding tie."""
    x = np.random.default_rng(1).integers(-128, 128, size=(1, 4, *in_size)).astype(np.float32)
    ours = ResizeBilinearGather(list(in_size), list(size), "legacy", quantized=True)(
        torch.from_numpy(x)).numpy()
    reference = tf_resize_reference(x, size, "legacy", quantized=True)
    if all(o % i == 0 and (o // i) in (1, 2, 4, 8) for i, o in zip(in_size, size, strict=True)):
        np.testing.assert_array_equal(ours, reference)
    else:
        assert np.abs(ours - reference).max() <= 1


def test_legacy_sampling_differs_from_interpolate():
    """Why the gather: TF's legacy sampling is none of F.interpolate's."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    legacy = ResizeBilinearGather([4, 4], [8, 8], "legacy", quantized=False)(x)
    for align in (False, True):
        other = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=align)
        assert not torch.allclose(legacy, other)
    assert legacy[0, 0, 0, :3].tolist() == [0.0, 0.5, 1.0]  # src = dst / 2
    assert legacy[0, 0, 0, -1] == 3.0  # clamped at the edge


@pytest.mark.parametrize("sampling, align", [("half_pixel", False), ("align_corners", True)])
def test_gather_resize_matches_interpolate(sampling, align):
    x = torch.randn(1, 2, 6, 5, generator=torch.Generator().manual_seed(2))
    ours = ResizeBilinearGather([6, 5], [11, 13], sampling, quantized=False)(x)
    theirs = F.interpolate(x, size=(11, 13), mode="bilinear", align_corners=align)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Export


def test_onnx_export_gives_the_same_scores(model, tmp_path):
    """The port traces to ONNX (no Python control flow on values) and onnxruntime computes
    the same integers from it."""
    ort = pytest.importorskip("onnxruntime")
    from dense.serve.export import export_onnx

    path = export_onnx(model, tmp_path / "mosaic.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    image = photo_uint8(photo_path("examples", "astronaut.png"))
    (theirs,) = session.run(None, {"image": as_tensor(image).numpy()})
    np.testing.assert_array_equal(theirs[0], run(model, image).numpy())


# ---------------------------------------------------------------------------------------------
# Live against LiteRT (needs requirements-runtimes.txt and ../shared/upstream)


@pytest.fixture(scope="module")
def tflite_file() -> Path:
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")
    from dense.data import upstream_file

    try:
        return upstream_file(UPSTREAM)
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.mark.runtime
def test_every_tensor_equals_litert(model, tflite_file):
    """Every tensor the port computes on one photo (103, the three SPLITs giving two each),
    each read from LiteRT by pointing the file's output at it: the port reproduces the integer
    graph, not an approximation of it."""
    from dense.ports.tflite_reader import _Reader

    reader = _Reader(tflite_file)
    reader.read()
    tflite_index = {ours: theirs for theirs, ours in reader.ids.items()}
    net = model.net
    quant = net.graph["quant"]
    image = photo_uint8(photo_path("examples", "astronaut.png"))
    checked = 0
    with torch.inference_mode():
        q = torch.clamp(torch.round(as_tensor(image) * 255.0), 0.0, 255.0)
        values = {net.input_id: q - 128.0}  # as MosaicSegmenter hands it over
        for key, inputs, outputs in net.wiring:
            result = net.ops[key](*[values[i] for i in inputs])
            values.update(zip(outputs, result if len(outputs) > 1 else [result], strict=True))
            for o in outputs:
                theirs = LiteRT(tflite_file, output=tflite_index[o])(image)
                ours = (values[o] + quant[o][1]).permute(0, 2, 3, 1).numpy()
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{key}, tensor {o}")
                checked += 1
    assert checked == 102


@pytest.mark.runtime
@pytest.mark.parametrize("photo_set", PHOTO_SETS, ids=[s.name for s in PHOTO_SETS])
def test_port_matches_litert_live(model, tflite_file, photo_set):
    from dense.convert.mosaic import compare

    paths = photo_paths(photo_set)
    if not paths:
        pytest.skip(f"no photos in {photo_set.folder}")
    for name, result in compare(model, tflite_file, paths)["photos"].items():
        assert result["argmax_agreement"] >= MIN_AGREEMENT, (name, result)
        assert result["scores_equal"], name


@pytest.mark.runtime
def test_the_like_for_like_litert_peer_returns_our_scores(model, tflite_file):
    """`dense bench --peers`' second LiteRT row computes what our contract returns."""
    from dense.bench import litert_scores_peer

    x = as_tensor(photo_uint8(photo_path("examples", "family_tv.jpg")))
    scores = litert_scores_peer(MODEL_ID, x, threads=2)()
    assert scores.shape == (1, 32, 512, 512) and scores.dtype == np.float32
    assert np.array_equal(scores, run(model, photo_uint8(photo_path("examples",
                                                                   "family_tv.jpg")))[None])


@pytest.mark.runtime
def test_regenerate_fixtures(tflite_file):
    """Rewrite the LiteRT fixtures (only with DENSE_REGENERATE_FIXTURES=1)."""
    if os.environ.get("DENSE_REGENERATE_FIXTURES") != "1":
        pytest.skip("set DENSE_REGENERATE_FIXTURES=1 to rewrite tests/fixtures/mosaic")
    from dense.convert.mosaic import SCORES

    FIXTURES.mkdir(parents=True, exist_ok=True)
    labels, scores = LiteRT(tflite_file), LiteRT(tflite_file, output=SCORES)
    photos = {}
    for photo_set in PHOTO_SETS:
        paths = photo_paths(photo_set)
        for path in paths if photo_set.name == "examples" else paths[:1]:
            key = fixture_key(photo_set.name, path.name)
            image = photo_uint8(path)
            cv2.imwrite(str(FIXTURES / f"{key}.png"), labels(image)[0].astype(np.uint8),
                        [cv2.IMWRITE_PNG_COMPRESSION, 9])
            photos[key] = {"set": photo_set.name, "name": path.name,
                           "photo": f"{photo_set.folder}/{path.name}",
                           "input_sha256": sha256(image), "scores_sha256": sha256(scores(image)[0])}
    how = {
        "runtime": "ai-edge-litert==2.3.0, XNNPACK, 2 threads, on the pinned .tflite file",
        "input": "photo read with cv2, BGR→RGB, cv2.resize INTER_AREA to 512×512, uint8; see "
                 "dense.convert.mosaic.photo_uint8",
        "png": "<set>-<photo stem>.png: LiteRT's SemanticPredictions (labels 0-31) as uint8",
        "scores_sha256": "sha256 of LiteRT's uint8 resize_logits (512×512×32, HWC bytes)",
        "photos": photos,
    }
    (FIXTURES / "fixtures.json").write_text(json.dumps(how, indent=2) + "\n")
