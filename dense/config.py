"""Training configs as dataclasses, read strictly.

A config file (TOML) or a run folder's ``config.json`` becomes one of the task configs below
through :func:`load`: a key the dataclass does not declare is an error that names it and its
section (``amp = "fp16"`` once trained silently in fp32; a misspelt ``max_nosie`` would have
trained with the default), a missing required key likewise, and a value outside a ``Literal``
is refused. Every default is written here once. ``[model]`` holds ``dense.nn.unet.UNet``
arguments and ``[discriminator]`` ``PatchDiscriminator`` ones: both are checked against those
signatures, so a typo there fails when the config is read, not minutes later.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar


class ConfigError(ValueError):
    """A config that does not fit its dataclass: the message names the key and its section."""


# ---------------------------------------------------------------------------------------------
# [train]: what every task shares, then each task's own keys


@dataclass(kw_only=True)
class TrainConfig:
    """``[train]`` keys of every task (``dense.train.fit`` and the run setup read these)."""

    epochs: int = 1                # or ``minutes``, which sets the schedule by wall-clock time
    steps_per_epoch: int | None = None  # segmentation: one pass over the training set
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int | None = None     # None: torch's default
    amp: Literal["bf16"] | None = None
    minutes: float | None = None
    device: str = "cpu"            # written by the command line (--device)
    init: str | None = None        # start from a run's .pt, a zoo id or a model folder
    init_note: str | None = None   # for the model card: what ``init`` was


@dataclass(kw_only=True)
class RestorationTrain(TrainConfig):
    patch: int                     # HR patch side (SR) or patch side (deblurring)
    weight_decay: float = 0.0      # no decay, as usual for pixel regression
    max_noise: float = 2.0         # deblurring: noise σ drawn in [0, max_noise] grey levels
    kernel_size: int = 25          # deblurring: side of the training blur kernels
    kernel_mix: Literal["classic", "wide"] = "classic"  # see degradations.random_kernel
    jpeg: float = 0.0              # deblurring: share of patches JPEG-compressed after the blur


@dataclass(kw_only=True)
class SegmentationTrain(TrainConfig):
    crop: list[int]
    scale: list[float]
    class_weights: Literal["enet"] | None = None
    snapshot_every: int = 0
    previous: list[str] = field(default_factory=list)  # earlier stages, for the model card
    first_stage_epochs: int | None = None              # for the model card of a second stage
    first_stage_lr: float | None = None


@dataclass(kw_only=True)
class KeypointTrain(TrainConfig):
    input_size: list[int]          # crop height, width
    sigma: float                   # target Gaussian's standard deviation, crop pixels
    foreground_weight: float = 0.0
    augment: bool = True


@dataclass(kw_only=True)
class LabTrain:
    steps: int
    steps_per_epoch: int
    batch_size: int
    patch: int                     # LR patch side
    lr: float
    weight_decay: float = 0.0
    loss: Literal["l1", "l2"] = "l1"
    threads: int | None = None


# ---------------------------------------------------------------------------------------------
# The other sections


@dataclass(kw_only=True)
class RestorationData:
    train: list[str]                     # folders under the data root
    eval_hr: str | None = None           # SR validation pairs
    eval_lr: str | None = None
    train_kernels: str | None = None     # deblurring: an .npz kernel bank
    eval_sharp: str | None = None        # deblurring validation: sharp images ...
    eval_kernels: str | None = None      # ... blurred with a bank, or "synthetic"
    eval_images: int = 8
    eval_crop: int = 192
    eval_noise: float = 1.0              # noise σ of the validation blur, grey levels


@dataclass(kw_only=True)
class GanConfig:
    init: str | None = None        # an L2 run folder (its best.pt), a zoo id or a folder
    d_steps: int = 1               # discriminator updates per generator update
    adv_weight: float = 5e-3       # generator loss = content + adv_weight × adversarial
    content: Literal["l1", "l2"] = "l1"
    lr_d: float | None = None      # None: the generator's lr


@dataclass(kw_only=True)
class KeypointData:
    train_json: str
    train_images: str
    val_json: str
    val_images: str


# ---------------------------------------------------------------------------------------------
# One config per task


@dataclass(kw_only=True)
class RunConfig:
    """Keys every run config has: where it runs and what the model card may say about it."""

    id: str
    run_dir: str
    model: dict[str, Any]
    config_file: str | None = None  # written by the command line, for the model card
    machine: str | None = None      # for the model card: where it trained
    selection: str | None = None    # for the model card: how the weights were chosen

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (``config.json``), unset optional keys left out."""
        return _plain(self)


@dataclass(kw_only=True)
class RestorationConfig(RunConfig):
    task: Literal["sr", "deblur"]
    scale: int = 1
    data: RestorationData
    train: RestorationTrain
    gan: GanConfig | None = None
    discriminator: dict[str, Any] = field(default_factory=dict)
    steps_trained: int | None = None  # written by `dense export` for the card

    def __post_init__(self) -> None:
        check_arguments(self.model, "model", _unet_parameters(), ("out_channels", "scale"))
        check_arguments(self.discriminator, "discriminator", _discriminator_parameters(),
                        owner="PatchDiscriminator")
        _require_steps(self.train)
        if self.task == "sr" and not (self.data.eval_hr and self.data.eval_lr):
            raise ConfigError("an sr config needs eval_hr and eval_lr in [data]")
        if self.task == "deblur" and not (self.data.eval_sharp and self.data.eval_kernels):
            raise ConfigError("a deblur config needs eval_sharp and eval_kernels in [data]")

    @property
    def upscale(self) -> int:
        """The model's scale: the config's for SR, 1 for deblurring."""
        return int(self.scale) if self.task == "sr" else 1


@dataclass(kw_only=True)
class SegmentationConfig(RunConfig):
    data: str                      # the data set folder under the data root
    train: SegmentationTrain

    def __post_init__(self) -> None:
        check_arguments(self.model, "model", {*_unet_parameters(), "encoder_weights"},
                        ("out_channels",))


@dataclass(kw_only=True)
class KeypointConfig(RunConfig):
    data: KeypointData
    train: KeypointTrain
    licence: str = ""

    def __post_init__(self) -> None:
        _require_steps(self.train)
        check_arguments(self.model, "model", {*_unet_parameters(), "encoder_weights"},
                        ("out_channels",))


@dataclass(kw_only=True)
class LabConfig:
    """``configs/lab/base.toml``, and a lab run's ``config.json`` (which adds id, seed, steps)."""

    scale: int
    data: str
    runs: str
    seeds: list[int]
    model: dict[str, Any]
    train: LabTrain
    id: str | None = None
    seed: int | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        check_arguments(self.model, "model", _unet_parameters(), ("scale",))

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


# ---------------------------------------------------------------------------------------------
# Reading


C = TypeVar("C")


def load(cls: type[C], source: dict[str, Any] | str | Path) -> C:
    """``cls`` from a dict, a TOML file or a JSON file (a run folder's ``config.json``), read
    strictly: an unknown or missing key, or a value outside its ``Literal``, is a
    :class:`ConfigError` that names the key and its section."""
    if isinstance(source, str | Path):
        path = Path(source)
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    else:
        data = source
    return _build(cls, data, "")


def _build(cls: type, data: Any, section: str) -> Any:
    where = f"[{section}]" if section else "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, not {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}' in {where}{hint}; "
                              f"known: {', '.join(sorted(fields))}")
    values = {}
    for name in fields:
        if name in data:
            child = f"{section}.{name}" if section else name
            values[name] = _value(hints[name], data[name], child)
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key '{missing[0]}' in {where}")
    return cls(**values)


def _value(hint: Any, value: Any, name: str) -> Any:
    """``value`` checked against ``hint``: nested dataclasses built, ``Literal`` enforced."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None and type(None) in options:
        return None
    allowed = [a for o in options if typing.get_origin(o) is Literal for a in typing.get_args(o)]
    if allowed:
        if value not in allowed:
            raise ConfigError(f"{name} must be {' or '.join(repr(a) for a in allowed)}"
                              f"{' (or absent)' if type(None) in options else ''}, "
                              f"not {value!r}")
        return value
    for option in options:
        if dataclasses.is_dataclass(option):
            return _build(option, value, name)
    return value


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def check_arguments(args: dict[str, Any], section: str, allowed: set[str],
                    reserved: tuple[str, ...] = (), owner: str = "UNet") -> None:
    """Refuse a key of ``[section]`` that is no argument of ``owner``, the class it is passed
    to, or one the task sets itself (``reserved``)."""
    for key in args:
        if key not in allowed or key in reserved:
            why = "the task sets it" if key in reserved else f"{owner} has no such argument"
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close and key not in reserved else ""
            raise ConfigError(f"unknown key '{key}' in [{section}] ({why}){hint}")


def _require_steps(train: TrainConfig) -> None:
    # Optional in TrainConfig only because segmentation counts its steps from the data.
    if train.steps_per_epoch is None:
        raise ConfigError("missing key 'steps_per_epoch' in [train]")


def _unet_parameters() -> set[str]:
    from dense.nn.unet import UNet

    return set(inspect.signature(UNet).parameters)


def _discriminator_parameters() -> set[str]:
    from dense.nn.discriminator import PatchDiscriminator

    return set(inspect.signature(PatchDiscriminator).parameters)


def _plain(config: Any) -> dict[str, Any]:
    """asdict without the optional keys left unset (None), so config.json stays readable."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if v is not None}
        return value

    return strip(dataclasses.asdict(config))


def ensure(cls: type[C], config: C | dict[str, Any]) -> C:
    """``config`` as ``cls``: a dict (a test's, or an old caller's) is read strictly."""
    return config if isinstance(config, cls) else load(cls, config)
