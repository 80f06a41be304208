"""PP-TinyPose ported from ncnn: fidelity to ncnn, the crop/decode pipeline, export, accuracy.

The default tests compare the bundled ports with ncnn's maps stored in
``tests/fixtures/tinypose`` (one real person crop per model; the tolerance is the issue's
2e-3 max abs difference on the heatmaps). Tests that need the data folder (``DENSE_DATA``,
default ``../shared/data``) or the upstream ncnn files skip when those are absent. The
``runtime`` tests run ncnn itself (requirements-runtimes.txt) on real person crops;
``DENSE_REGENERATE_FIXTURES=1`` makes them rewrite the fixtures as well.
"""

from __future__ import annotations

import copy
import functools
import os
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from dense import zoo
from dense.convert.fidelity_tinypose import (
    NCNN_MODES,
    coco_ap,
    coco_results,
    fidelity,
    make_fixture,
    read_fixture,
    real_crops,
    run_port,
    write_fixtures,
)
from dense.convert.source_tinypose import FIXTURE_BOX, SOURCES, build_port
from dense.data import data_root
from dense.ports import ncnn as ncnn_reader
from dense.ports.tinypose import (
    COCO_KEYPOINTS,
    crop_person,
    decode_heatmaps,
    invert_affine,
    person_box,
)

IDS = list(SOURCES)
MAX_ABS_DIFF = 2e-3  # the bound on the heatmaps against ncnn


@functools.cache
def bundled(model_id: str) -> nn.Module:
    return zoo.load(model_id, device="cpu")


def upstream_or_skip(model_id: str) -> None:
    try:
        from dense.convert.source_tinypose import upstream_paths

        upstream_paths(SOURCES[model_id])
    except FileNotFoundError as err:
        pytest.skip(f"upstream ncnn files absent: {err}")


# ---------------------------------------------------------------------------------------------
# The bundled folders


@pytest.mark.parametrize("model_id", IDS)
def test_loads_and_maps_a_batch(model_id: str) -> None:
    model = bundled(model_id)
    config = model.config
    h, w = config["input"]["size"]
    assert config["task"] == "keypoints" and config["keypoints"] == list(COCO_KEYPOINTS)
    assert config["licence"] == "Apache-2.0"
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        maps = model(x)
        single = model(x[1:])
    assert maps.shape == (2, 17, h // 4, w // 4)
    torch.testing.assert_close(maps[1:], single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_id", IDS)
def test_matches_stored_ncnn_maps(model_id: str) -> None:
    fixture = read_fixture(SOURCES[model_id])
    ours = run_port(bundled(model_id), fixture["crop"][None])[0]
    diff = float(np.abs(ours - fixture["maps"]).max())
    assert diff <= MAX_ABS_DIFF, f"max abs diff {diff:.3g} against ncnn {fixture['ncnn_version']}"


@pytest.mark.parametrize("model_id", IDS)
def test_channels_last_matches_eager(model_id: str) -> None:
    """The interleaving shuffle has a channels_last path of its own: same values."""
    model = bundled(model_id)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    crop = read_fixture(SOURCES[model_id])["crop"]
    x = torch.from_numpy(crop.transpose(2, 0, 1).copy())[None].float() / 255
    with torch.inference_mode():
        eager = model(x)
        last = channels_last(x.contiguous(memory_format=torch.channels_last))
    assert last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_id", IDS)
def test_keypoints_land_inside_the_person_box(model_id: str) -> None:
    """The fixture crop is a full-length person: the confident keypoints are inside the box
    (the crop itself is 1.25× larger), and most of the body is found."""
    fixture = read_fixture(SOURCES[model_id])
    maps = run_port(bundled(model_id), fixture["crop"][None])
    points = decode_heatmaps(maps, invert_affine(fixture["matrix"]))[0]
    x1, y1, x2, y2 = fixture["box"]
    confident = points[points[:, 2] > 0.3]
    assert len(confident) >= 12, points[:, 2]
    assert np.all((confident[:, 0] >= x1) & (confident[:, 0] <= x2)), confident
    assert np.all((confident[:, 1] >= y1) & (confident[:, 1] <= y2)), confident
    # Head above hips above ankles (COCO order: 0 nose, 11/12 hips, 15/16 ankles).
    assert points[0, 1] < points[11:13, 1].min() < points[15:17, 1].min()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_exports_to_onnx(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (requirements-runtimes)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    model = bundled("tinypose-128x96")
    x = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(2))
    other = torch.from_numpy(read_fixture(SOURCES["tinypose-128x96"])["crop"].transpose(2, 0, 1)
                             .copy())[None].float().repeat(2, 1, 1, 1) / 255
    path = tmp_path / "tinypose.onnx"
    axes = {0: "batch"}
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["image"],
                      output_names=["heatmaps"], dynamic_axes={"image": axes, "heatmaps": axes})
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": other.numpy()})
    with torch.inference_mode():
        expected = model(other).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Crop and decode


def test_crop_geometry_follows_paddledetection() -> None:
    """Box → region: aspect fixed to w/h = 3/4 around the box centre, then ×1.25; the unbiased
    affine puts the region's centre on the crop's centre pixel and its edges on the outer
    pixel centres."""
    center, extent = person_box([100, 50, 160, 250], (256, 192))
    np.testing.assert_allclose(center, [130, 150])
    np.testing.assert_allclose(extent, [150 * 1.25, 200 * 1.25])  # width grown to 3/4 of 200
    center, extent = person_box([0, 0, 300, 100], (256, 192))
    np.testing.assert_allclose(extent, [300 * 1.25, 400 * 1.25])  # height grown to 4/3 of 300
    rgb = np.zeros((300, 400, 3), np.uint8)
    crop, matrix = crop_person(rgb, [100, 50, 160, 250])
    assert crop.shape == (256, 192, 3) and crop.dtype == np.uint8
    corners = np.array([[130 - 93.75, 150 - 125, 1], [130, 150, 1], [130 + 93.75, 150 + 125, 1]])
    np.testing.assert_allclose(corners @ matrix.T, [[0, 0], [95.5, 127.5], [191, 255]],
                               atol=1e-9)
    back = invert_affine(matrix)
    np.testing.assert_allclose(np.c_[corners[:, :2] @ matrix[:, :2].T + matrix[:, 2], [1] * 3]
                               @ back.T, corners[:, :2], atol=1e-9)


def test_crop_samples_the_photo_bilinearly() -> None:
    """A horizontal ramp stays a ramp with the slope the matrix says."""
    ramp = np.tile(np.arange(256, dtype=np.uint8)[None, :, None], (256, 1, 3))
    crop, matrix = crop_person(ramp, [64, 64, 160, 192], size=(128, 96))
    row = crop[64, :, 0].astype(float)
    expected = (np.arange(96) - matrix[0, 2]) / matrix[0, 0]
    inside = (expected >= 0) & (expected <= 255)
    np.testing.assert_allclose(row[inside], expected[inside], atol=1.0)


def _gaussian_maps(h: int, w: int, centres: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """Training-style targets: unnormalised Gaussians (ToHeatmapsTopDown_DARK, sigma 2)."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
                     for cx, cy in centres]).astype(np.float32)


def test_dark_recovers_subpixel_peaks() -> None:
    centres = np.array([[10.3, 20.7], [30.62, 5.25], [24.0, 40.0], [3.4, 60.1]])
    maps = _gaussian_maps(64, 48, centres)[None]
    points = decode_heatmaps(maps, np.array([[1.0, 0, 0], [0, 1.0, 0]]), stride=1)[0]
    np.testing.assert_allclose(points[:, :2], centres, atol=0.05)
    np.testing.assert_allclose(points[:, 2], maps[0].max(axis=(1, 2)))


def _paddle_style_decode(maps: np.ndarray) -> np.ndarray:
    """PaddleDetection's HRNetPostProcess (use_dark, kernel 3) written out per keypoint with
    cv2.GaussianBlur and a matrix inverse, in heatmap coordinates; the reference for the
    vectorised decoder."""
    n, k, h, w = maps.shape
    out = np.zeros((n, k, 2))
    for i in range(n):
        for j in range(k):
            hm = maps[i, j].astype(np.float64)
            index = int(hm.argmax())
            px, py = index % w, index // w
            if hm.max() <= 0:
                continue
            padded = np.zeros((h + 2, w + 2))
            padded[1:-1, 1:-1] = hm
            blurred = cv2.GaussianBlur(padded, (3, 3), 0)[1:-1, 1:-1]
            blurred *= hm.max() / blurred.max()
            log = np.log(np.maximum(blurred, 1e-10))
            coord = np.array([px, py], dtype=np.float64)
            if 1 < px < w - 2 and 1 < py < h - 2:
                dx = 0.5 * (log[py, px + 1] - log[py, px - 1])
                dy = 0.5 * (log[py + 1, px] - log[py - 1, px])
                dxx = 0.25 * (log[py, px + 2] - 2 * log[py, px] + log[py, px - 2])
                dxy = 0.25 * (log[py + 1, px + 1] - log[py - 1, px + 1] - log[py + 1, px - 1]
                              + log[py - 1, px - 1])
                dyy = 0.25 * (log[py + 2, px] - 2 * log[py, px] + log[py - 2, px])
                hessian = np.array([[dxx, dxy], [dxy, dyy]])
                if dxx * dyy - dxy**2 != 0:
                    coord += -np.linalg.inv(hessian) @ np.array([dx, dy])
            out[i, j] = coord
    return out


@pytest.mark.parametrize("model_id", IDS)
def test_decoder_matches_paddledetection_postprocess(model_id: str) -> None:
    """On the network's own maps of a real crop, plus maps that are flat, negative or peak at
    the border."""
    fixture = read_fixture(SOURCES[model_id])
    maps = run_port(bundled(model_id), fixture["crop"][None])
    odd = maps[:, :4].copy()
    odd[0, 0] = 0.0
    odd[0, 1] -= 5.0
    odd[0, 2, 0, 5] = 9.0
    odd[0, 3, 1, -1] = 9.0
    both = np.concatenate([maps, odd], axis=1)
    ours = decode_heatmaps(both, np.array([[1.0, 0, 0], [0, 1.0, 0]]), stride=1)
    np.testing.assert_allclose(ours[..., :2], _paddle_style_decode(both), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# The ncnn reader's grouped convolutions


def test_reader_reads_depthwise_and_grouped_convolutions() -> None:
    param = """7767517
3 3
Input                image  0 1 in
ConvolutionDepthWise dw     1 1 in mid 0=4 1=3 3=2 4=1 5=1 6=36 7=4 9=1
ConvolutionDepthWise gc     1 1 mid out 0=4 1=1 11=3 5=0 6=24 7=2 9=2 -23310=1,1.000000e-01
"""
    layers = ncnn_reader.parse_param(param)
    dw_weight = np.arange(36, dtype=np.float16)
    gc_weight = np.arange(24, dtype=np.float32)
    data = (struct.pack("<I", ncnn_reader.TAG_FP16) + dw_weight.tobytes()
            + np.arange(4, dtype="<f4").tobytes()
            + struct.pack("<I", 0) + gc_weight.astype("<f4").tobytes())
    weights = ncnn_reader.read_weights(layers, data)
    assert weights["dw"]["weight"].shape == (4, 1, 3, 3)
    assert weights["dw"]["weight"].dtype == np.float16
    assert weights["gc"]["weight"].shape == (4, 2, 3, 1) and "bias" not in weights["gc"]
    dw = ncnn_reader.conv_geometry(layers[1])
    assert (dw.groups, dw.stride, dw.padding, dw.activation) == (4, (2, 2), (1, 1, 1, 1), "relu")
    gc = ncnn_reader.conv_geometry(layers[2])
    assert (gc.kernel, gc.groups, gc.activation, gc.activation_params) == (
        (3, 1), 2, "leaky_relu", (0.1,))


def test_reader_refuses_int8_convolutions() -> None:
    layers = ncnn_reader.parse_param("7767517\n2 2\nInput i 0 1 a\n"
                                     "Convolution c 1 1 a b 0=1 1=1 6=1 8=1\n")
    with pytest.raises(ValueError, match="int8"):
        ncnn_reader.read_weights(layers, b"")


# ---------------------------------------------------------------------------------------------
# Accuracy on the data folder's COCO sample


def coco_sample() -> Path:
    root = data_root()
    if root is None or not (root / "pose" / "coco_sample" / "test_coco.json").is_file():
        pytest.skip("pose/coco_sample not found (set DENSE_DATA)")
    return root / "pose" / "coco_sample"


@pytest.mark.parametrize(("model_id", "floor"), [("tinypose-256x192", 75.0),
                                                 ("tinypose-128x96", 55.0)])
def test_coco_sample_ap_from_annotated_boxes(model_id: str, floor: float) -> None:
    """4 photos, 14 people: a smoke test of crop + network + decode, not a benchmark
    (measured 80.9 and 63.7 AP when the ports were made)."""
    folder = coco_sample()
    pytest.importorskip("pycocotools", reason="pycocotools is not installed")
    size = tuple(bundled(model_id).config["input"]["size"])
    ap = coco_ap(coco_results(bundled(model_id), size, folder), folder / "test_coco.json")
    assert ap["AP"] >= floor, ap


# ---------------------------------------------------------------------------------------------
# Against the ncnn runtime itself


@pytest.mark.runtime
@pytest.mark.parametrize("model_id", IDS)
def test_live_against_ncnn_on_real_crops(model_id: str) -> None:
    """Every person crop available (the example photos; with the data folder also coco_sample
    and mpii_sample) through ncnn, in its default CPU options and in plain fp32, and through
    the port built from the upstream files and the bundled one."""
    pytest.importorskip("ncnn", reason="ncnn is not installed (requirements-runtimes.txt)")
    upstream_or_skip(model_id)
    source = SOURCES[model_id]
    crops = real_crops(source.size, data_root())
    converted, _ = build_port(model_id)
    for model in (converted, bundled(model_id)):
        per_crop = fidelity(model, source, crops)
        for name, diffs in per_crop.items():
            print(f"{model_id} {name}: " + ", ".join(f"{m} {diffs[m]:.3g}" for m in NCNN_MODES))
            assert max(diffs.values()) <= MAX_ABS_DIFF, (name, diffs)


@pytest.mark.runtime
@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
@pytest.mark.parametrize("model_id", IDS)
def test_served_export_against_ncnn_on_real_crops(model_id: str, runtime: str,
                                                   monkeypatch, tmp_path: Path) -> None:
    """What the app runs (the unshuffled export in OpenVINO or onnxruntime, in batches of the
    compiled sizes) is within the issue's bound of ncnn on every real crop."""
    pytest.importorskip("ncnn", reason="ncnn is not installed (requirements-runtimes.txt)")
    pytest.importorskip(runtime)
    upstream_or_skip(model_id)
    from dense.serve.export import export_forward

    monkeypatch.setenv("DENSE_PACKAGE_CACHE", str(tmp_path))
    source = SOURCES[model_id]
    crops = real_crops(source.size, data_root())
    forward = export_forward(bundled(model_id), runtime)
    per_crop = fidelity(forward, source, crops)
    worst = max(max(diffs.values()) for diffs in per_crop.values())
    print(f"{model_id} {runtime}: {len(crops)} crops, worst {worst:.3g}")
    assert worst <= MAX_ABS_DIFF


@pytest.mark.runtime
@pytest.mark.parametrize("model_id", IDS)
def test_fixture_is_what_ncnn_gives(model_id: str) -> None:
    """Remake the fixture as ``python -m dense.convert.tinypose --fixtures`` does (and
    write it when DENSE_REGENERATE_FIXTURES=1). Another CPU may round ncnn's float32 sums
    differently: allow one float16 step at 1 (2**-10)."""
    pytest.importorskip("ncnn", reason="ncnn is not installed (requirements-runtimes.txt)")
    upstream_or_skip(model_id)
    source = SOURCES[model_id]
    if os.environ.get("DENSE_REGENERATE_FIXTURES") == "1":
        write_fixtures([model_id])
    fresh = make_fixture(source)
    with np.load(source.fixture, allow_pickle=False) as stored:
        assert np.array_equal(fresh["crop"], stored["crop"])
        np.testing.assert_allclose(stored["box"], FIXTURE_BOX)
        np.testing.assert_allclose(fresh["maps"].astype(np.float32),
                                   stored["maps"].astype(np.float32), rtol=0, atol=2**-10)


def test_the_export_is_the_nchw_graph_whatever_format_the_model_is_served_in(tmp_path) -> None:
    """The interleave branches on the memory format; a channels_last trace was 147 Transposes
    longer and took 1.4-1.7× as long in OpenVINO, so the exporter always traces the NCHW module."""
    import onnx

    from dense.serve.export import export_onnx

    model = zoo.load("tinypose-128x96", device="cpu")
    ops = [n.op_type for n in onnx.load(export_onnx(model, tmp_path / "a.onnx")).graph.node]
    model.to(memory_format=torch.channels_last)
    served = [n.op_type for n in onnx.load(export_onnx(model, tmp_path / "b.onnx")).graph.node]
    assert served == ops and "Transpose" not in ops
    conv = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # served format restored


def test_the_export_gives_each_tensor_its_storage_back(tmp_path) -> None:
    """Buffers too (MOSAIC's weights are buffers): .to() replaces them, and they come back."""
    from dense.serve.export import export_onnx

    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight", torch.rand(2, 3, 3, 3).contiguous(
                memory_format=torch.channels_last))
            self.config = {"id": "with-buffer", "input": {"size": [8, 8]}}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(x, self.weight)

    model = WithBuffer()
    buffer = model.weight
    export_onnx(model, tmp_path / "m.onnx")
    assert model.weight is buffer and buffer.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("model_id", IDS)
def test_the_unshuffled_form_is_the_same_function(model_id: str) -> None:
    """The export's form (channel shuffles folded into the weights) gives the network's maps
    on a real crop and on noise, to the reordering of each conv's sum."""
    from dense.ports.tinypose_export import UnshuffledBlock
    from dense.serve.export import export_module

    model = bundled(model_id)
    form = export_module(model)
    crop = read_fixture(SOURCES[model_id])["crop"]
    real = torch.from_numpy(crop.transpose(2, 0, 1).copy())[None].float() / 255
    x = torch.cat([real, torch.rand_like(real)])
    with torch.inference_mode():
        torch.testing.assert_close(form(x), model(x), rtol=0, atol=1e-5)
    blocks = [m for m in form.modules() if isinstance(m, UnshuffledBlock)]
    assert len(blocks) == 48 and max(len(b.slices) for b in blocks) == 14


def test_the_unshuffled_form_holds_for_other_widths_and_depths() -> None:
    """Odd halves, three blocks a branch, other module counts: random weights, any size."""
    from dense.ports.tinypose import TinyPose
    from dense.ports.tinypose_export import UnshuffledTinyPose

    torch.manual_seed(0)
    model = TinyPose(stem_channels=8, channels=(6, 10, 14, 18), modules=(2, 1, 1), blocks=3,
                     num_keypoints=5).eval()
    for p in model.parameters():  # BatchNorm-folded biases are not zero
        p.data.normal_(0, 0.3)
    x = torch.rand(3, 3, 96, 64)
    with torch.inference_mode():
        want = model(x)
        torch.testing.assert_close(UnshuffledTinyPose(model)(x), want, rtol=1e-5,
                                   atol=1e-5 * float(want.abs().max()))


def test_the_export_traces_the_unshuffled_form(tmp_path, monkeypatch) -> None:
    """No interleave left in the graph (it was a Reshape through five dimensions per block,
    around which OpenVINO converted layouts: 16 ms against 11 at 256×192), and the form's
    code is part of the export's key."""
    import onnx

    import dense.ports.tinypose_export as form
    from dense.serve import export

    model = zoo.load("tinypose-128x96", device="cpu")
    ops = [n.op_type for n in onnx.load(export.export_onnx(model, tmp_path / "a.onnx")).graph.node]
    assert "Reshape" not in ops and "Transpose" not in ops and ops.count("Conv") == 269
    before = export.code_digest(model)
    (tmp_path / "changed.py").write_text("# another version of the form\n")
    monkeypatch.setattr(form, "__file__", str(tmp_path / "changed.py"))
    assert export.code_digest(model) != before


def test_reordered_convs_refuse_what_they_cannot_do() -> None:
    from dense.ports.tinypose import Conv
    from dense.ports.tinypose_export import concat_slices, reordered_conv

    depthwise = Conv(4, 4, 3, groups=4)
    with pytest.raises(ValueError, match="depthwise"):
        reordered_conv(depthwise, np.arange(4), np.arange(4)[::-1])
    conv = Conv(4, 2, 1)
    x = torch.rand(1, 4, 3, 3)
    src, dst = np.array([2, 0, 3, 1]), np.array([1, 0])
    with torch.inference_mode():
        got = reordered_conv(conv, src, dst)(x[:, src])
        torch.testing.assert_close(got, conv(x)[:, dst], rtol=0, atol=1e-6)
    assert concat_slices([(0, 3), (0, 4), (1, 0), (1, 1), (0, 0)]) == [
        (0, 3, 5), (1, 0, 2), (0, 0, 1)]
