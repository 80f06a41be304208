"""Where things live: training and benchmark data (``DENSE_DATA``, else ``../shared/data``), the
upstream source files, and this machine's package cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout (dense.zoo re-exports it)


def package_cache() -> Path:
    """Where this machine keeps what it can rebuild: source packages of the peers and
    converters, ONNX exports, measured backend choices (``DENSE_PACKAGE_CACHE``, else
    ``~/.cache/dense``). Here, at the bottom of the package, so that the serving layer and the
    bench both find it without importing each other."""
    return Path(os.environ.get("DENSE_PACKAGE_CACHE", Path.home() / ".cache" / "dense"))


def data_root() -> Path | None:
    """The data folder, or None when there is none (tests that need it skip)."""
    env = os.environ.get("DENSE_DATA")
    if env:
        return Path(env)
    default = REPO_ROOT.parent / "shared" / "data"
    return default if default.is_dir() else None


def require_data(sub: str) -> Path:
    """``data_root() / sub``, or a clear error naming the setting."""
    root = data_root()
    if root is None or not (root / sub).exists():
        raise FileNotFoundError(
            f"data folder '{sub}' not found: set DENSE_DATA to the folder holding it "
            f"(default ../shared/data beside the repository)")
    return root / sub


def data_root_or_error(given: Path | str | None) -> Path | None:
    """``given`` (a --data argument) or :func:`data_root`; None after an error line on stderr."""
    root = given or data_root()
    if root is None:
        print("error: no data folder: pass --data or set DENSE_DATA", file=sys.stderr)
        return None
    return Path(root)


# Source files of the ports taken from public repositories (../shared/upstream, see its README):
# path under the upstream folder → sha256. `dense convert` reads them only after the check.
UPSTREAM_SHA256 = {
    "mosaic/mobile_segmenter_r4_quant_argmax_uint8.tflite":
        "da8b3822a22fde45ecaf0ff32022287eff58b500096971b04f3c1b292da66a3c",
    "espnetv2/espnetv2_s_2.0_pascal_384x384.pth":
        "bc479586b0ba9254e02589020346931a14d99028ad6bac4817198be6d9e719a6",
    "espnetv2/espnetv2_s_2.0_city_1024x512.pth":
        "a72d59699801c7ce8e8b89a53af9097eaaa60dc12180ecde86fd700ba1222fe8",
    "yolox/yolox_nano.onnx": "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14",
    "tinypose/tinypose_256x192.param":
        "7e418f7ee6e8d4ab11b774cd879ddae22b5f91ea41e5142c2c652e04f3056e85",
    "tinypose/tinypose_256x192.bin":
        "70fad87fa3004edcae4d628bcb0c6be1ba8b0f93991097b42cf8da6fe8c1968b",
    "tinypose/tinypose_128x96.param":
        "0896706df94718082bc7d573cb1ebf3d28a13907e0ba194d264c23a96f4b84b6",
    "tinypose/tinypose_128x96.bin":
        "613843a30016d2e1fac23c2a00f2e719a03af5d0662277006ecb051bdcbf19be",
    "movenet/movenet-multipose.json":
        "3c76e18669efc50148b28d0be97db491dc055cb2be292d248ec129031c5aa5de",
    "movenet/movenet-multipose.bin":
        "19828492d4a69c2e08915916c70f4d22c421c3b59152dfa5601834fc54f54118",
    "movenet/movenet-lightning.json":
        "df8cbde44d00f533ccc4916a7c6ebc17316532fb3fadad114ec667fef22872e9",
    "movenet/movenet-lightning.bin":
        "bf97bc10d9c8a11200b0190ed64ce039b6252f1aff7cb552aca99b3d191c2f34",
}


def upstream_root() -> Path:
    """``DENSE_UPSTREAM``, else ``../shared/upstream`` beside the repository."""
    env = os.environ.get("DENSE_UPSTREAM")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "upstream"


def upstream_file(relative: str) -> Path:
    """The verified path of an upstream source file, or an error naming the missing file."""
    import hashlib

    path = upstream_root() / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: `dense convert` rebuilds this model from '{relative}' in the "
            f"upstream folder (set DENSE_UPSTREAM, default ../shared/upstream)")
    expected = UPSTREAM_SHA256[relative]
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise ValueError(f"{path}: sha256 {actual[:12]}… is not the pinned {expected[:12]}…; "
                         "refusing to convert a file that is not the published one")
    return path
