"""The upsampling lab: a controlled experiment (only the upsampler differs), the checkerboard
measure, and the tab's functions on a real photo."""

from __future__ import annotations

import dataclasses

import gradio as gr
import numpy as np
import pytest
import torch
from torch import nn

from dense import lab, zoo
from dense.images import read_image
from dense.nn.upsample import UPSAMPLERS, PixelShuffleICNR, Transposed
from dense.ui import lab as ui

PHOTO = zoo.REPO_ROOT / "examples" / "astronaut.png"


def upsampling_modules(model: nn.Module) -> list[nn.Module]:
    return [block.up for block in (*model.decoder, *model.upscale)]


def shapes_outside_upsamplers(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters() if ".up." not in name}


def test_there_are_five_lab_models_one_per_upsampler() -> None:
    assert lab.UPSAMPLERS == tuple(UPSAMPLERS)
    assert [lab.model_id(u) for u in lab.UPSAMPLERS] == [
        "lab-x4-nearest", "lab-x4-bilinear", "lab-x4-transposed", "lab-x4-pixelshuffle",
        "lab-x4-pixelshuffle-icnr"]


@pytest.mark.parametrize("upsampler", lab.UPSAMPLERS)
def test_lab_configs_differ_only_in_the_upsampler(upsampler: str) -> None:
    base = lab.base_config()
    config = lab.lab_config(upsampler, base)
    assert config.model["upsampler"] == upsampler
    assert config.scale == 4 and config.model["encoder"] == "plain"
    assert config.model["norm"] == "none" and config.model["residual"] is True
    stripped = dataclasses.replace(config, id=None, model={
        k: v for k, v in config.model.items() if k != "upsampler"})
    assert stripped == base  # same data, seeds, steps, optimiser, widths


@pytest.mark.parametrize("upsampler", lab.UPSAMPLERS)
def test_lab_models_differ_only_in_their_upsampling_modules(upsampler: str) -> None:
    torch.manual_seed(0)
    reference = lab.build_model("nearest")
    torch.manual_seed(0)
    model = lab.build_model(upsampler)
    modules = upsampling_modules(model)
    assert len(modules) == 4  # two decoder stages at the LR size, two ×2 upscale stages
    assert all(type(m) is UPSAMPLERS[upsampler] for m in modules)
    # Every parameter outside the upsampling modules has the same name and shape ...
    assert shapes_outside_upsamplers(model) == shapes_outside_upsamplers(reference)
    # ... and the encoder, built first from the same seed, even starts from the same weights.
    for a, b in zip(model.encoder.parameters(), reference.encoder.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 9, 13)).shape == (1, 3, 36, 52)


@pytest.mark.parametrize("upsampler", lab.UPSAMPLERS)
def test_a_bundled_lab_model_is_the_recipe(upsampler: str) -> None:
    model_id = lab.model_id(upsampler)
    if model_id not in {m.id for m in zoo.list_models()}:
        pytest.skip(f"{model_id} is not trained and exported yet (python -m dense.lab bench)")
    model = zoo.load(model_id, device="cpu")
    assert model.config["arch_args"] == lab.arch_args(lab.lab_config(upsampler))
    assert all(type(m) is UPSAMPLERS[upsampler] for m in upsampling_modules(model))


def test_stride_energy_is_the_dft_energy_at_the_stride_frequencies() -> None:
    rng = np.random.default_rng(0)
    image, period = rng.random((32, 48, 3)), 4
    spectrum = np.fft.fft2(image, axes=(0, 1))
    h, w = image.shape[:2]
    bins = [(k * h // period, m * w // period)
            for k in range(period) for m in range(period) if (k, m) != (0, 0)]
    expected = np.mean([sum(abs(spectrum[a, b, c]) ** 2 for a, b in bins) for c in range(3)])
    assert lab.stride_energy(image, period, tile=None) == pytest.approx(expected / (h * w) ** 2)
    # Tiled: the mean of the per-tile values (tiles of 4 cells = 16 px here).
    tiles = [image[i:i + 16, j:j + 16] for i in range(0, h, 16) for j in range(0, w, 16)]
    assert lab.stride_energy(image, period, tile=4) == pytest.approx(
        np.mean([lab.stride_energy(t, period, tile=None) for t in tiles]))


def test_checkerboard_measure_ranks_a_checkerboarded_image_above_a_smooth_one() -> None:
    photo = read_image(PHOTO).rgb[100:292, 150:342].astype(np.float64)
    checker = np.indices(photo.shape[:2]).sum(axis=0) % 2 * 2.0 - 1.0  # ±1, period 2
    checkerboarded = np.clip(photo * (1 + 0.04 * checker[..., None]), 0, 255).astype(np.uint8)
    smooth = photo.astype(np.uint8)
    assert lab.stride_energy(checkerboarded, 2) > 5 * lab.stride_energy(smooth, 2)
    assert lab.stride_energy_ratio(checkerboarded, smooth, 2) > 5
    # Nearest-neighbour blocks are no checkerboard: each phase sees the same pixels.
    blocks = np.repeat(np.repeat(smooth[::4, ::4], 4, 0), 4, 1)
    assert lab.stride_energy(blocks, 4) == pytest.approx(0, abs=1e-12)


def test_grey_ripple_is_zero_for_icnr_and_not_for_a_transposed_conv() -> None:
    torch.manual_seed(0)
    assert lab.grey_ripple(Transposed(3, 3, 2), scale=2) > 1.0  # levels of 255
    assert lab.grey_ripple(PixelShuffleICNR(3, 3, 2), scale=2) == pytest.approx(0, abs=1e-4)


def test_flops_are_counted_by_pytorch() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert lab.count_flops(conv, (16, 16)) == 2 * 3 * 8 * 9 * 16 * 16
    assert lab.count_params(conv) == 3 * 8 * 9 + 8
    # Same widths: a transposed conv (3×3 taps per input pixel) costs less than conv at 2× size.
    size = (32, 32)
    assert lab.count_flops(lab.build_model("transposed"), size) < lab.count_flops(
        lab.build_model("nearest"), size)


def test_the_tab_returns_every_panel_for_a_real_photo() -> None:
    state, items, table, picker, zoomed = ui.compare(str(PHOTO), 4, True, max_lr_side=24)
    names = [p.name for p in state.panels]
    bundled = {m.id for m in zoo.list_models()}
    expected = ["nearest", "bilinear", "bicubic", *ui.lab_models(),
                *(m for m, _ in ui.PRETRAINED if m in bundled)]
    assert names == expected
    assert state.reference.shape == (96, 96, 3)
    assert len(items) == len(names) + 1  # the original first
    for (image, caption), panel in zip(items[1:], state.panels, strict=True):
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert caption.startswith(panel.name) and caption.endswith("dB")
    assert all(f"| {name} |" in table for name in names)
    assert picker.shape == (96, 96, 3)
    assert zoomed.ndim == 3 and zoomed.shape[2] == 3


def test_the_tab_without_degrading_and_at_x2() -> None:
    state, items, table, _, _ = ui.compare(str(PHOTO), 2, False, max_lr_side=16)
    assert state.reference is None and len(items) == len(state.panels)
    assert all(p.image.shape == (32, 32, 3) for p in state.panels)
    assert "÷ bicubic" in table


def test_zoom_shows_the_same_window_of_every_result() -> None:
    rng = np.random.default_rng(0)
    panels = [ui.Panel(str(i), "test", rng.integers(0, 255, (40, 60, 3), np.uint8))
              for i in range(3)]
    panels[1].name = "bicubic"
    result = ui.LabResult(panels[0].image[::2, ::2], None, panels, 2)
    top, left, side = ui.window(result, 1.0, 0.0, 10)  # clamped inside the image
    assert (top, left, side) == (0, 50, 10)
    _, zoomed = ui.zoom(result, 1.0, 0.0, 10)
    factor = ui.TILE // 10
    tile = zoomed[22:22 + 10 * factor, :10 * factor]  # below the caption bar
    np.testing.assert_array_equal(tile[::factor, ::factor], panels[0].image[0:10, 50:60])
    # A click on the picker at pixel (x=15, y=20) centres the window there.
    click = gr.SelectData(None, {"index": [15, 20], "value": None})
    x, y, picker, _ = ui.select_window(result, 10, click)
    assert ui.window(result, x, y, 10) == (15, 10, 10)
    assert picker[15, 10].tolist() == [255, 0, 0]  # the window's outline


def test_the_explanations_come_from_the_real_ops() -> None:
    assert ">1<" in ui.nearest_demo() and ">4<" in ui.nearest_demo()
    _, out, source = ui.pixel_shuffle_layout(channels=2, r=2, size=3)
    for c, y, x in ((0, 0, 0), (1, 3, 4), (1, 5, 5)):
        i, j = y % 2, x % 2  # phase inside the 2×2 block
        assert source[c, y, x] == c * 4 + i * 2 + j
        assert out[c, y, x] == source[c, y, x] * 9 + (y // 2) * 3 + x // 2
    counts = ui.overlap_counts(kernel=3, stride=2, size=5)
    assert set(np.unique(counts[3:-3, 3:-3])) == {1, 2, 4}  # uneven: a checkerboard
    assert np.all(ui.overlap_counts(kernel=4, stride=2, size=5)[4:-4, 4:-4] == 4)
    ripples = [float(caption.rsplit(" ", 1)[1]) for _, caption in ui.icnr_demo()]
    assert ripples[0] > 0.01 and ripples[1] > 0.01 and ripples[2] == 0  # ICNR is flat


def test_the_tab_builds_its_controls_and_the_compare_endpoint() -> None:
    with gr.Blocks() as demo:
        ui.build()
    labels = {getattr(block, "label", None) for block in demo.blocks.values()}
    assert {"Photo", "Scale", "Results", "Zoom", "Click to move the window"} <= labels
    assert "lab_compare" in {fn.api_name for fn in demo.fns.values()}  # the scripted endpoint


def test_the_tab_shows_the_measured_table_from_the_doc(tmp_path) -> None:
    assert "| model |" in lab.results_markdown()  # docs/lab.md, as `dense bench lab` wrote it
    doc = tmp_path / "lab.md"
    doc.write_text(f"intro\n{lab.TABLE_START}\n| a | b |\n{lab.TABLE_END}\nmore\n")
    assert lab.results_markdown(doc) == "| a | b |"
    assert "dense bench lab" in lab.results_markdown(tmp_path / "missing.md")


def test_the_bundled_run_is_the_median_seed() -> None:
    rows = [{"seed": s, "psnr_Set5": p} for s, p in ((0, 28.9), (1, 30.3), (2, 30.1))]
    assert lab.representative(rows)["seed"] == 2
    assert lab.representative(rows[:2])["seed"] == 0
    assert lab.representative([]) is None


def test_the_lab_card_comes_from_the_shared_template() -> None:
    row = {key: 1.0 for key, _, _ in lab.COLUMNS} | {"seed": 0, "params": 12345}
    spread = {**row, "model": "lab-x4-nearest", "seeds": [0, 1, 2],
              **{f"{key}_spread": 0.5 for key, _, _ in lab.COLUMNS}}
    card = lab.model_card("nearest", lab.lab_config("nearest"), row, spread, steps=1500)
    assert card.startswith("---\nlicense: other\nlibrary_name: dense\n")
    assert "\n# lab-x4-nearest\n" in card
    labels = [line.split(":**")[0] for line in card.splitlines() if line.startswith("**")]
    assert labels == ["**Task", "**Architecture", "**Input", "**Training", "**Measured",
                      "**Licence"]  # dense.cards.SECTIONS, in its order
    measured = card.index("**Measured")
    assert measured < card.index("| lab-x4-nearest |") < card.index("**Licence")
    assert "Over seeds [0, 1, 2]" in card and "12,345 parameters" in card
