"""Build ``.dev/`` for scripts/gpu_session.sh: what a GPU lease needs, under its 64 MiB limit.

    python scripts/gpu_payload.py --data seg/camvid/train sr/train sr/benchmark/Set5/x2 \\
        sr/benchmark/Set5/x4 --weights unet-camvid --timing-only blazepose-full realesrgan-x4plus

(the first lease's payload, 62.5 MiB; the second carried ``--data sr/train sr/benchmark/Set5/x2
sr/benchmark/Set5/x4 --weights unet-sr-x4 unet-sr-x2``. For the GPU-only tests add
``--weights selfie-seg blazepose-full --wheels pytest exceptiongroup tomli`` and keep ``tests/``
tracked.)

``--data`` folders are copied from the data root (PNGs re-encoded losslessly at the highest
compression where that is smaller; pixels checked equal). ``--weights`` are bundled models
copied in fp16 (a model folder of their own, with its new checksum). ``--timing-only`` models
travel as their config alone; the session times their graphs with random weights. ``--wheels``
are pure-Python packages from the package index with their dependencies (pytest, which the
lent machine may lack; it reaches no index). Add ``.dev/``
to ``.git/info/exclude`` and name it in the lease's ``carry``. The tracked ``weights/`` alone
(about 125 MB) exceeds the limit: for the lease, untrack it and the other folders the session
does not need (``git rm -r -q --cached weights tests examples docs``, the same paths in
``.git/info/exclude``), and ``git reset -q`` afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
from safetensors.torch import load_file

from dense import zoo
from dense.data import data_root

DEV = zoo.REPO_ROOT / ".dev"


def copy_data(source: Path, target: Path) -> None:
    """``source`` (a file or a folder) to ``target``, the same path under ``.dev/data``."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        out = target if source.is_file() else target / path.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".png":
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
            if ok and len(encoded) < path.stat().st_size:
                assert (cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED) == image).all()
                out.write_bytes(encoded.tobytes())
                continue
        shutil.copy(path, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="*", default=[], help="folders under the data root")
    parser.add_argument("--weights", nargs="*", default=[], help="bundled ids, sent in fp16")
    parser.add_argument("--timing-only", nargs="*", default=[], help="bundled ids, config only")
    parser.add_argument("--wheels", nargs="*", default=[], help="packages to carry as wheels")
    args = parser.parse_args()
    shutil.rmtree(DEV, ignore_errors=True)
    root = data_root()
    for rel in args.data:
        copy_data(root / rel, DEV / "data" / rel)
        if (root / rel).is_dir() and rel.startswith("seg/"):  # the classes file beside it
            classes = root / Path(rel).parent / "classes.json"
            if classes.is_file():
                shutil.copy(classes, DEV / "data" / Path(rel).parent / "classes.json")
    for name in args.weights:
        folder = zoo.weights_dir() / name
        config = zoo.read_config(folder, name)
        config.pop("sha256")
        state = {k: v.half() if v.is_floating_point() else v
                 for k, v in load_file(folder / zoo.WEIGHTS_FILE).items()}
        zoo.save_folder(DEV / "weights" / name, state, config, "fp16 copy for a GPU lease\n")
    for name in args.timing_only:
        (DEV / "weights-config" / name).mkdir(parents=True)
        shutil.copy(zoo.weights_dir() / name / zoo.CONFIG_FILE, DEV / "weights-config" / name)
    if args.wheels:
        # Wheels that install on Python 3.10 and later. pip evaluates dependency markers for
        # the Python running here, so the backports an older one needs (pytest on 3.10:
        # exceptiongroup, tomli) must be named: see the module doc.
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                        "--python-version", "3.10", "-d", str(DEV / "wheels"), *args.wheels],
                       check=True)
    size = sum(p.stat().st_size for p in DEV.rglob("*") if p.is_file())
    print(f"{DEV}: {size / 2**20:.1f} MiB (the lease takes 64 MiB with the working tree)")


if __name__ == "__main__":
    main()
