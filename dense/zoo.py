"""The model zoo: model ids → weights folders (bundled, local or on the Hugging Face Hub) → modules.

Every model is a folder in Hub layout: ``config.json`` (what to build and how to feed it),
``model.safetensors`` (the weights) and ``README.md`` (the model card). The config records the
sha256 of the weights file, which is verified before anything is read, and only safetensors
are ever loaded, so a folder or a Hub repo a user points to can never run code.

This module is the only place that knows where weights come from. It returns plain eager
modules and knows nothing of serving: ``dense.serve`` wraps them for the app and the tasks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dense.data import REPO_ROOT
from dense.hardware import pick_device

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
REQUIRED_KEYS = ("id", "task", "architecture", "arch_args", "sha256")

# Architecture name (``config["architecture"]``) → "module:callable" building it from
# ``config["arch_args"]``. Imported lazily so that listing the zoo stays cheap.
ARCHITECTURES: dict[str, str] = {
    "unet": "dense.nn.unet:UNet",
    "efficientnet_lite0_classifier": "dense.nn.encoders:EfficientNetLite0Classifier",
    # ports (issue 3)
    "selfie_segmentation": "dense.ports.mediapipe:SelfieSegmentation",
    "blazepose_landmark": "dense.ports.mediapipe:BlazePoseLandmark",
    "blazepose_detector": "dense.ports.mediapipe:BlazePoseDetector",
    "rrdbnet": "dense.ports.rrdbnet:RRDBNet",
    "srvgg": "dense.ports.srvgg:SRVGGNetCompact",
    "waifu2x_upconv7": "dense.ports.waifu2x:UpConv7",
    # segmentation of everyday photos (issue 19)
    "mosaic": "dense.ports.mosaic:MosaicSegmenter",
    "espnetv2_seg": "dense.ports.espnetv2:ESPNetv2Segmenter",
    "everyday": "dense.ports.everyday:Everyday",
    # pose for groups of people (issue 20)
    "yolox": "dense.ports.yolox:YOLOX",
    "tinypose": "dense.ports.tinypose:TinyPose",
    "movenet_multipose": "dense.ports.movenet:MoveNetMultiPose",
    "movenet_singlepose": "dense.ports.movenet:MoveNetSinglePose",
}

HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


class ModelError(RuntimeError):
    """A model could not be found, fetched, verified or built. The message names the model."""


def weights_dir() -> Path:
    """Where bundled model folders live (``DENSE_WEIGHTS`` overrides ``<repo>/weights``)."""
    return Path(os.environ.get("DENSE_WEIGHTS", REPO_ROOT / "weights"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Resolving a name to a verified folder


def resolve(name: str) -> Path:
    """Return the local folder holding model ``name``, downloading it from the Hub if needed.

    ``name`` is a bundled id (``efficientnet-lite0``), a local folder path, or a Hub repo id
    ``org/name`` with an optional ``@revision`` (branch, tag or commit).
    """
    bundled = weights_dir() / name
    if "/" not in name and bundled.is_dir():
        return bundled
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    match = HUB_ID.match(name)
    if match is None:
        known = ", ".join(sorted(m.id for m in list_models() if m.location == "bundled")) or "none"
        raise ModelError(
            f"Unknown model '{name}': not a bundled id (bundled: {known}), not a folder, "
            "and not a Hub repo id of the form org/name[@revision]."
        )
    return _download_from_hub(name, match["repo"], match["revision"] or "main")


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the Hub? Asked first because huggingface_hub retries an
    unreachable server with back-off for about 20 s per file before falling back to its cache."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _download_from_hub(name: str, repo_id: str, revision: str) -> Path:
    # Imported here, and the endpoint and cache passed explicitly: huggingface_hub reads its
    # environment at import, and tests and the app may set HF_ENDPOINT / HF_HUB_CACHE later.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or (
        not _hub_reachable(endpoint))
    folder = None
    filename = CONFIG_FILE
    try:
        for filename in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE):
            try:
                local = hf_hub_download(repo_id, filename, revision=revision, endpoint=endpoint,
                                        cache_dir=cache_dir, local_files_only=offline)
            except EntryNotFoundError as err:
                if filename == CARD_FILE:  # a missing card does not stop a model from loading
                    continue
                if isinstance(err, LocalEntryNotFoundError):
                    raise
                raise ModelError(
                    f"Model '{name}': Hub repo '{repo_id}' (revision {revision}) has no "
                    f"'{filename}'; a dense model repo needs {CONFIG_FILE} and {WEIGHTS_FILE}."
                ) from err
            folder = Path(local).parent
    except LocalEntryNotFoundError as err:
        raise ModelError(
            f"Model '{name}' is not bundled and not in the local Hub cache, and the Hub "
            f"({endpoint}) could not be reached. Connect to the network once, or download it "
            f"elsewhere with `hf download {repo_id} --revision {revision} --local-dir DIR`, copy "
            "DIR here and load the folder: dense.load('DIR')."
        ) from err
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - any Hub failure becomes one clear message
        raise ModelError(f"Could not fetch model '{name}' from the Hub ({endpoint}): {err}") \
            from err
    assert folder is not None
    return folder


def read_config(folder: Path, name: str | None = None) -> dict[str, Any]:
    """Read and check ``config.json`` of a model folder."""
    name = name or folder.name
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"Model '{name}': no {CONFIG_FILE} in {folder}.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"Model '{name}': {CONFIG_FILE} is not valid JSON ({err}).") from err
    if not isinstance(config, dict):
        raise ModelError(f"Model '{name}': {CONFIG_FILE} must hold a JSON object.")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ModelError(f"Model '{name}': {CONFIG_FILE} lacks required key(s) {missing}.")
    if config["architecture"] not in ARCHITECTURES:
        raise ModelError(
            f"Model '{name}': unknown architecture '{config['architecture']}' "
            f"(known: {', '.join(sorted(ARCHITECTURES))})."
        )
    return config


def verify(folder: Path, config: dict[str, Any], name: str | None = None) -> None:
    """Check the weights file against the sha256 recorded in the config."""
    name = name or config.get("id", folder.name)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(f"Model '{name}': no {WEIGHTS_FILE} in {folder}.")
    expected = config["sha256"].get(WEIGHTS_FILE) if isinstance(config["sha256"], dict) else None
    if not expected:
        raise ModelError(f"Model '{name}': {CONFIG_FILE} records no sha256 for {WEIGHTS_FILE}.")
    actual = sha256_of(weights)
    if actual != expected:
        raise ModelError(
            f"Model '{name}': checksum mismatch for {WEIGHTS_FILE} (expected {expected[:12]}…, "
            f"got {actual[:12]}…). The file is corrupt or was tampered with; refusing to load it."
        )


# ---------------------------------------------------------------------------------------------
# Building and loading


def build(config: dict[str, Any]) -> nn.Module:
    """Build the (untrained) module that ``config`` describes."""
    module_name, attr = ARCHITECTURES[config["architecture"]].split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**config["arch_args"])


def load(
    name: str | Path,
    device: str | torch.device | None = "auto",
    *,
    verify_checksum: bool = True,
    backend: str | None = None,
) -> nn.Module:
    """Load model ``name`` as a plain eager module in eval mode on ``device`` (``auto``:
    ``DENSE_DEVICE``, else CUDA when available, else CPU); its config is at ``model.config``.

    Nothing else happens: no export, no compiled runtime, no other memory format. To run a model
    the fastest way this machine allows, use ``dense.serve.load_served``. ``backend`` is accepted
    for callers written when this function also served: only ``None``, ``"auto"`` and
    ``"eager"``, which all mean the eager module.

    >>> model = load("efficientnet-lite0", device="cpu")
    >>> model.config["task"]
    'classification'
    """
    if backend not in (None, "auto", "eager"):
        raise ValueError(f"dense.zoo.load gives the eager module; backend '{backend}' is "
                         "chosen by dense.serve.load_served(name, device, backend)")
    name = str(name)
    folder = resolve(name)
    config = read_config(folder, name)
    if verify_checksum:
        verify(folder, config, name)
    try:
        state = load_file(folder / WEIGHTS_FILE)
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ModelError(f"Model '{name}': {WEIGHTS_FILE} cannot be read ({err}).") from err
    model = build(config)
    reference = model.state_dict()
    # Weights may be stored in fp16 to keep the bundle small; the module decides its dtype.
    state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelError(f"Model '{name}': weights do not fit its architecture ({err}).") from err
    model.config = config
    model.source_folder = folder
    return model.eval().to(pick_device(device))


_cache: dict[tuple[str, str], nn.Module] = {}
_cache_lock = threading.Lock()


def cached_load(name: str, device: str | torch.device | None = "auto") -> nn.Module:
    """:func:`load` once per (model, device): the eager module, shared.

    Kept for ``dense.lab`` until it switches to ``dense.serve.cached_load``, which the app and
    the tasks use to share *served* models across requests.
    """
    key = (str(name), str(pick_device(device)))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = load(name, key[1])
        return _cache[key]


def load_pretrained_encoder(model: nn.Module, model_id: str = "efficientnet-lite0") -> nn.Module:
    """Copy a bundled classifier's encoder weights (ImageNet EfficientNet-Lite0) into a U-Net.

    Here rather than in ``dense.nn.unet``: the building blocks do not know where weights live.
    """
    source = load(model_id, device="cpu").encoder.state_dict()
    model.encoder.load_state_dict(source)
    return model


# ---------------------------------------------------------------------------------------------
# Writing folders and listing the zoo


def save_folder(
    folder: str | Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any], card: str
) -> Path:
    """Write a model folder in Hub layout; the weights' sha256 goes into the config.

    Deterministic: the same tensors and config give byte-identical files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(state_dict.items())}
    save_file(tensors, folder / WEIGHTS_FILE)
    config = {**config, "sha256": {WEIGHTS_FILE: sha256_of(folder / WEIGHTS_FILE)}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / CARD_FILE).write_text(card.rstrip() + "\n", encoding="utf-8")
    return folder


@dataclass(frozen=True)
class ModelInfo:
    id: str
    task: str
    architecture: str
    params: int
    licence: str
    location: str  # "bundled" or "hub cache"
    folder: Path

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "folder": str(self.folder)}


def _count_params(weights: Path) -> int:
    """Learned parameters in a safetensors file, read from its header only (no tensor data)."""
    from math import prod

    from safetensors import safe_open

    buffers = ("running_mean", "running_var", "num_batches_tracked")
    with safe_open(weights, framework="pt") as f:
        return sum(prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(buffers))


def _info(folder: Path, model_id: str | None, location: str) -> ModelInfo | None:
    try:
        config = read_config(folder)
    except ModelError:
        return None  # a broken folder must not hide the others; load() reports it by name
    try:
        params = _count_params(folder / WEIGHTS_FILE)
    except Exception:  # noqa: BLE001 - a damaged or missing file must not hide the zoo;
        params = 0  # load() names the model and what is wrong with it
    return ModelInfo(id=model_id or config["id"], task=config["task"],
                     architecture=config["architecture"], params=params,
                     licence=config.get("licence", "unknown"), location=location, folder=folder)


def _hub_cached() -> list[ModelInfo]:
    """The dense models in the local Hub cache (``HF_HUB_CACHE``), one per cached revision,
    under the id that loads them: ``org/name`` for the revision ``main`` points to, else
    ``org/name@ref`` (or ``@commit``). Reads the cache's folders only, never the network."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(os.environ.get("HF_HUB_CACHE") or None)
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
            refs = sorted(revision.refs)
            at = "" if "main" in refs else f"@{refs[0] if refs else revision.commit_hash}"
            if (revision.snapshot_path / CONFIG_FILE).is_file():
                info = _info(revision.snapshot_path, f"{repo.repo_id}{at}", "hub cache")
                if info is not None:
                    found.append(info)
    return found


def list_models(task: str | None = None) -> list[ModelInfo]:
    """The bundled models and the dense models already downloaded from the Hub (see
    :func:`_hub_cached`), optionally of one task."""
    folders = sorted(p for p in weights_dir().glob("*") if (p / CONFIG_FILE).is_file())
    found = [info for info in (_info(f, None, "bundled") for f in folders) if info is not None]
    found += _hub_cached()
    return [m for m in found if task is None or m.task == task]


def model_card(name: str) -> str:
    """The model card (README.md) of a bundled or cached model, or an empty string."""
    card = resolve(name) / CARD_FILE
    return card.read_text(encoding="utf-8") if card.is_file() else ""
