"""MSA image and text encoders (spec section 1): a four-stage timm CNN and a BERT-family transformer.

Pretrained weights are optional and explicit: the project's machines reach no model hub, so every
source that can fail (hub, file, pip package) fails with an error that says how to fix it, or falls
back to random init with a warning when the caller asked for that.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from msa.config import ConfigError

from .pretrained import (
    EFFICIENTNET_LITE0_PACKAGE,
    EFFICIENTNET_LITE0_TF_KWARGS,
    WeightsUnavailableError,
    efficientnet_lite0_state_dict,
    minilm_path,
)

if TYPE_CHECKING:
    from msa.config import MSAConfig

__all__ = ["ImageEncoder", "TextEncoder", "build_towers", "build_tokenizer", "tokenize", "LITE0_PACKAGE_WEIGHTS"]

logger = logging.getLogger(__name__)

LITE0_PACKAGE_WEIGHTS = "efficientnet-lite0-package"
_LITE0_NAMES = ("efficientnet_lite0", "tf_efficientnet_lite0")
_PACKAGED_TEXT: dict[str, Callable[[], str]] = {"packaged:all-minilm-l6-v2": minilm_path}
# Hub names whose architecture is transformers' BertConfig() defaults, usable offline for random init.
_BERT_BASE_UNCASED = ("bert-base-uncased", "google-bert/bert-base-uncased")


# ----------------------------------------------------------------------------------------- image


def _image_source(weights: str | os.PathLike[str]) -> str:
    if weights == "hub":
        return "timm hub weights (pretrained=True)"
    if weights == LITE0_PACKAGE_WEIGHTS:
        return f"pip package '{EFFICIENTNET_LITE0_PACKAGE}'"
    return f"file '{weights}'"


def _read_state_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise WeightsUnavailableError(
            f"no such file: {path} (weights must be None, 'hub', {LITE0_PACKAGE_WEIGHTS!r} or a local file)"
        )
    # timm's reader handles .safetensors, torch pickles, {'state_dict': ...} wrappers and 'module.' prefixes.
    return timm.models.load_state_dict(str(path), weights_only=True)


def _to_backbone_layout(
    state: Mapping[str, Tensor], backbone_keys: Iterable[str], full_model_keys: Iterable[str], where: str
) -> dict[str, Tensor]:
    """Rename a full timm model's state dict to the features_only backbone's keys.

    timm's feature wrappers rename flattened modules by joining the path with '_' ('stages.0' ->
    'stages_0'), so keys are matched with '_' and '.' identified. Keys the backbone drops (the
    classifier head) are fine; anything else left over, or any backbone key not found, is an error.
    """
    def norm(key: str) -> str:
        return key.replace("_", ".")

    by_norm = {norm(k): k for k in state}
    if len(by_norm) != len(state):
        raise ValueError(f"{where}: state dict keys are ambiguous once '_' and '.' are identified")
    found = {k: by_norm[norm(k)] for k in backbone_keys if norm(k) in by_norm}
    missing = [k for k in backbone_keys if k not in found]
    unexpected = sorted(set(state) - set(found.values()) - set(full_model_keys))
    if missing or unexpected:
        raise ValueError(
            f"{where}: missing keys {missing[:10]} ({len(missing)} in all), "
            f"unexpected keys {unexpected[:10]} ({len(unexpected)} in all)"
        )
    return {k: state[source] for k, source in found.items()}


def _load_backbone_state(
    backbone: nn.Module, name: str, model_kwargs: dict[str, object], state: Mapping[str, Tensor], where: str
) -> None:
    """Strictly load a timm-layout state dict (backbone-only or full classifier model) into `backbone`.

    timm's own file loading (pretrained_cfg_overlay) is not used: for features_only models it loads
    non-strictly and would silently leave missing tensors at random init.
    """
    target = backbone.state_dict()
    if state.keys() != target.keys():
        with torch.device("meta"):
            full_keys = timm.create_model(name, **model_kwargs).state_dict().keys()
        state = _to_backbone_layout(state, list(target), full_keys, where)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{where}: {e}") from e


def _build_backbone(name: str, weights: str | os.PathLike[str] | None, fallback_random: bool) -> nn.Module:
    model_kwargs: dict[str, object] = {}
    if weights == LITE0_PACKAGE_WEIGHTS:
        if name not in _LITE0_NAMES:
            raise ValueError(f"weights={LITE0_PACKAGE_WEIGHTS!r} fits backbones {_LITE0_NAMES}, not {name!r}")
        model_kwargs = dict(EFFICIENTNET_LITE0_TF_KWARGS)
    # The last four feature stages: resnet has 5 (stem + 4), convnext/swin 4, efficientnet 5.
    feature_kwargs = dict(features_only=True, out_indices=(-4, -3, -2, -1), **model_kwargs)
    if weights is None:
        return timm.create_model(name, **feature_kwargs)

    where = f"{_image_source(weights)} for image backbone '{name}'"
    try:
        if weights == "hub":
            return timm.create_model(name, pretrained=True, **feature_kwargs)
        state = efficientnet_lite0_state_dict() if weights == LITE0_PACKAGE_WEIGHTS else _read_state_file(weights)
    except (WeightsUnavailableError, OSError) as e:
        message = (
            f"Cannot load {where}: {e}. Fix: pass weights=<path to a local .pth/.bin/.safetensors state dict "
            f"of '{name}'>, or set fallback_random=True (or weights=None) to start from random init."
        )
        if not fallback_random:
            raise WeightsUnavailableError(message) from e
        logger.warning("%s Falling back to random init.", message)
        return timm.create_model(name, **feature_kwargs)
    backbone = timm.create_model(name, **feature_kwargs)
    _load_backbone_state(backbone, name, model_kwargs, state, where)
    return backbone


class ImageEncoder(nn.Module):
    """A timm backbone's last four stages, pooled to s1..s4, fused into the global image embedding v.

    Args:
        backbone: timm model name with at least four feature stages.
        embed_dim: D, the embedding size (the text encoder's hidden size).
        weights: None (random init), "hub" (timm pretrained, needs network or a warm HF cache), a local
            state-dict file in timm layout (full model or backbone-only), or "efficientnet-lite0-package"
            (offline ImageNet weights; builds the TF-equivalent efficientnet_lite0 they were trained as).
        fallback_random: when the weights cannot be obtained, warn and use random init instead of raising.
    """

    def __init__(
        self,
        backbone: str,
        embed_dim: int,
        weights: str | os.PathLike[str] | None = None,
        fallback_random: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = _build_backbone(backbone, weights, fallback_random)
        self.stage_dims: tuple[int, ...] = tuple(self.backbone.feature_info.channels())
        if len(self.stage_dims) != 4:
            raise ValueError(f"backbone '{backbone}' gives {len(self.stage_dims)} feature stages, MSA needs 4")
        # timm's swin-style feature maps are NHWC; CNNs' are NCHW (and may lack the attribute).
        self._nhwc = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"
        self.scale_proj = nn.ModuleList(nn.Linear(c, embed_dim) for c in self.stage_dims)
        self.fuse = nn.Linear(embed_dim, embed_dim)
        self.gate = nn.Linear(embed_dim, embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """The four stage maps, NCHW whatever the backbone's native layout."""
        maps = self.backbone(images)
        return [m.permute(0, 3, 1, 2) for m in maps] if self._nhwc else list(maps)

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """images [B,3,H,W] -> (v [B,D], not normalised; [s1..s4], s_k [B,C_k])."""
        maps = self.feature_maps(images)
        # Reference: global max pooling for stages 1-3, global average pooling for stage 4.
        scales = [F.adaptive_max_pool2d(m, 1).flatten(1) for m in maps[:3]]
        scales.append(F.adaptive_avg_pool2d(maps[3], 1).flatten(1))
        fused = torch.stack([proj(s) for proj, s in zip(self.scale_proj, scales)]).sum(0)
        u = self.fuse(fused)
        v = self.out(u * torch.sigmoid(self.gate(u)))
        return v, scales


# ------------------------------------------------------------------------------------------ text


def _text_source(model: str) -> str:
    """Resolve "packaged:<name>" to the package's local directory; other names pass through."""
    if model.startswith("packaged:"):
        if model not in _PACKAGED_TEXT:
            raise ValueError(f"unknown packaged text model {model!r}; known: {sorted(_PACKAGED_TEXT)}")
        return _PACKAGED_TEXT[model]()
    return model


def _apply_overrides(config: PretrainedConfig, overrides: Mapping[str, object] | None) -> PretrainedConfig:
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):  # a typo would otherwise silently add an unused attribute
            raise ValueError(f"config_overrides: {type(config).__name__} has no field {key!r}")
        setattr(config, key, value)
    return config


def _random_text_model(model: str, source: str, overrides: Mapping[str, object] | None) -> nn.Module:
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        if model not in _BERT_BASE_UNCASED:
            raise WeightsUnavailableError(
                f"Cannot load the config of text model '{model}' for random init: {e}. Fix: pass a local "
                f"directory with config.json, 'packaged:all-minilm-l6-v2', or 'bert-base-uncased'."
            ) from e
        logger.info("'%s' unreachable: random init from BertConfig() defaults (its architecture)", model)
        config = BertConfig()
    return AutoModel.from_config(_apply_overrides(config, overrides))


class TextEncoder(nn.Module):
    """A BERT-family transformer; global embedding = [CLS] final state, local tokens = positions 1..

    Args:
        model: hub name (e.g. "bert-base-uncased"), local HF directory, or "packaged:all-minilm-l6-v2".
        weights: "pretrained" (from_pretrained) or None (random init from the model's config; for an
            unreachable "bert-base-uncased", BertConfig() defaults).
        config_overrides: config fields to change, e.g. a tiny CPU model or dropout rates.
        fallback_random: when pretrained weights cannot be obtained, warn and use random init.
    """

    def __init__(
        self,
        model: str,
        weights: str | None = "pretrained",
        config_overrides: Mapping[str, object] | None = None,
        fallback_random: bool = False,
    ) -> None:
        super().__init__()
        if weights not in ("pretrained", None):
            raise ValueError(f"weights must be 'pretrained' or None, not {weights!r}")
        source = _text_source(model)
        if weights is None:
            self.transformer = _random_text_model(model, source, config_overrides)
        else:
            try:
                config = _apply_overrides(AutoConfig.from_pretrained(source), config_overrides)
                self.transformer, info = AutoModel.from_pretrained(source, config=config, output_loading_info=True)
            except OSError as e:
                message = (
                    f"Cannot load pretrained weights of text model '{model}': {e}. Fix: pass a local HF "
                    f"directory or 'packaged:all-minilm-l6-v2', or set fallback_random=True (or weights=None) "
                    f"to start from random init."
                )
                if not fallback_random:
                    raise WeightsUnavailableError(message) from e
                logger.warning("%s Falling back to random init.", message)
                self.transformer = _random_text_model(model, source, config_overrides)
            else:
                missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
                if missing or info["mismatched_keys"]:
                    raise ValueError(
                        f"text model '{model}': checkpoint lacks {sorted(missing)[:10]}, "
                        f"mismatched {sorted(info['mismatched_keys'])[:10]}"
                    )
        # MSA uses the [CLS] hidden state, never BERT's pooler; dropping it keeps every parameter in
        # the graph (DDP without find_unused_parameters).
        if getattr(self.transformer, "pooler", None) is not None:
            self.transformer.pooler = None

    @property
    def hidden_size(self) -> int:
        return self.transformer.config.hidden_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) [B,L] -> (cls [B,D] not normalised, tokens [B,L-1,D]).

        tokens are the final states at positions 1..L-1, [SEP] and [PAD] positions included.
        """
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden[:, 0], hidden[:, 1:]


# ---------------------------------------------------------------------------------- the factories

_OPEN_CLIP = "open_clip:"
# The package's weights are TensorFlow's EfficientNet-Lite0: timm describes their data as tf_efficientnet_lite0.
_LITE0_PACKAGE_DATA = "tf_efficientnet_lite0"


@functools.cache
def _timm_preprocessing(name: str) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    try:
        pretrained = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # a known architecture with an unknown pretrained tag
        raise ConfigError(f"image.backbone={name!r}: {e}") from None
    if pretrained is None and not timm.is_model(name):
        raise ConfigError(f"image.backbone={name!r}: not a timm model name (see timm.list_models())")
    # A model registered without a pretrained cfg gets timm's defaults.
    data = timm.data.resolve_data_config(pretrained_cfg=pretrained.to_dict() if pretrained else {"architecture": name})
    return tuple(data["mean"]), tuple(data["std"]), data["interpolation"]


def image_preprocessing(cfg: MSAConfig) -> dict[str, object]:
    """mean, std and interpolation the image tower's weights were trained with: its own data config.

    timm backbones: timm's resolved data config of the backbone name (its pretrained tag's; for the packaged
    EfficientNet-Lite0 weights tf_efficientnet_lite0's, 0.5/0.5). CLIP towers: open_clip's preprocessing (a
    local checkpoint is a bare state dict, so the arch's: OpenAI's mean/std, bicubic). Read from the installed
    packages, never the network. Only the statistics and the filter: the resize/crop stays the spec's.
    """
    if cfg.clip.enabled:
        from open_clip.transform import PreprocessCfg

        pre = PreprocessCfg()
        return {"mean": tuple(pre.mean), "std": tuple(pre.std), "interpolation": pre.interpolation}
    name = _LITE0_PACKAGE_DATA if cfg.image.weights == LITE0_PACKAGE_WEIGHTS else cfg.image.backbone
    mean, std, interpolation = _timm_preprocessing(name)
    return {"mean": mean, "std": std, "interpolation": interpolation}


def build_towers(cfg: MSAConfig) -> tuple[nn.Module, nn.Module]:
    """(text, image) towers for ``cfg``: open_clip's when ``clip.arch`` or ``clip.model_cfg`` is set, else
    the BERT-family transformer and the timm CNN (whose embedding width is the text hidden size)."""
    if cfg.clip.enabled:
        from msa.clip import build_clip_towers  # imports open_clip only for CLIP configs

        return build_clip_towers(cfg)
    text = TextEncoder(
        cfg.text.model,
        weights=cfg.text.weights,
        config_overrides=cfg.text.config_overrides,
        fallback_random=cfg.text.fallback_random,
    )
    image = ImageEncoder(
        cfg.image.backbone, text.hidden_size, weights=cfg.image.weights, fallback_random=cfg.image.fallback_random
    )
    return text, image


def _clip_tokenizer(arch: str | None):
    from msa.clip import ClipTokenizer

    return ClipTokenizer(arch)


def build_tokenizer(source: str | MSAConfig):
    """The captions' tokenizer, from a resolved config, a hub name, a local directory, "packaged:all-minilm-l6-v2"
    or "open_clip:<arch>".

    A config's is open_clip's for a CLIP config, else its ``text.tokenizer`` (default ``text.model``), a fast
    HF tokenizer. A directory holds either; CLIP's is the JSON ``ClipTokenizer.save_pretrained`` wrote.
    """
    if not isinstance(source, str):
        if source.clip.enabled:
            return _clip_tokenizer(source.clip.arch)
        source = source.text.tokenizer or source.text.model
    if source.startswith(_OPEN_CLIP):
        return _clip_tokenizer(source.removeprefix(_OPEN_CLIP))
    if Path(source, "open_clip_tokenizer.json").is_file():  # ClipTokenizer.FILE
        from msa.clip import ClipTokenizer

        return ClipTokenizer.from_directory(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(_text_source(source))
    except OSError as e:
        raise WeightsUnavailableError(
            f"Cannot load tokenizer '{source}': {e}. Fix: pass a local directory with the tokenizer files, "
            f"or 'packaged:all-minilm-l6-v2' (the bert-base-uncased vocabulary)."
        ) from e
    if not tokenizer.is_fast:
        raise ValueError(f"tokenizer '{source}' has no fast (Rust) implementation")
    return tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, captions: list[str], max_tokens: int = 31) -> tuple[Tensor, Tensor]:
    """Captions -> (input_ids, attention_mask) [N, max_tokens], long: [CLS] pieces [SEP] [PAD]...

    (open_clip's tokenizer: <sot> pieces <eot> then zeros; the mask is 1 up to and including <eot>.)"""
    if hasattr(tokenizer, "ids_and_mask"):
        return tokenizer.ids_and_mask(captions, max_tokens)
    encoded = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=max_tokens,
        return_token_type_ids=False,
        return_tensors="pt",
    )
    return encoded["input_ids"], encoded["attention_mask"]
