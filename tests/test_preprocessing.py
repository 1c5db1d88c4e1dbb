"""Image preprocessing from each backbone's own data config, resolved once into the config, applied on the device."""

from __future__ import annotations

import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from msa.config import PRESETS, ConfigError, MSAConfig, resolve_config
from msa.model import ImageNormalize

HALF = (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "preset, mean, std, interpolation",
    [
        ("paper", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bilinear"),  # resnet50.tv_in1k: the spec's
        ("pretrained-lite", HALF, HALF, "bicubic"),  # the packaged TF-Lite0 weights: tf_efficientnet_lite0's
        ("small", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic"),  # resnet10t's timm cfg
        *[(name, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, "bicubic")
          for name in ("clip-vit-b32", "clip-vit-l14", "clip-rn50", "clip-georsclip-ft")],
    ],
)
def test_presets_resolve_their_backbones_own_preprocessing(preset, mean, std, interpolation):
    assert PRESETS[preset].image.mean is None  # left to the backbone
    image = resolve_config(preset).image
    assert image.mean == pytest.approx(mean) and image.std == pytest.approx(std)
    assert image.interpolation == interpolation


def test_the_backbone_decides_and_an_explicit_value_wins():
    assert resolve_config("paper", ["image.backbone=tf_efficientnet_lite0"]).image.mean == HALF
    image = resolve_config("pretrained-lite", ["image.mean=[0.1, 0.2, 0.3]", "image.interpolation=bilinear"]).image
    assert image.mean == (0.1, 0.2, 0.3) and image.interpolation == "bilinear"
    assert image.std == HALF  # the one left unset still comes from the backbone


def test_resolved_values_are_in_the_dumped_and_logged_config():
    cfg = resolve_config("pretrained-lite")
    image = cfg.to_dict()["image"]
    assert (image["mean"], image["std"], image["interpolation"]) == ([0.5] * 3, [0.5] * 3, "bicubic")
    params = cfg.flat_params()
    assert (params["image.mean"], params["image.std"], params["image.interpolation"]) == (
        "[0.5, 0.5, 0.5]", "[0.5, 0.5, 0.5]", "bicubic")
    assert MSAConfig.from_dict(cfg.to_dict()) == cfg  # a checkpoint's config restores without a lookup


def test_an_unknown_backbone_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as info:
        resolve_config("small", ["image.backbone=no_such_net"])
    assert str(info.value).startswith("image.backbone='no_such_net'") and "\n" not in str(info.value)


def test_normalisation_uses_the_resolved_statistics():
    normalize = ImageNormalize.from_config(resolve_config("pretrained-lite"))
    pixels = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    torch.testing.assert_close(normalize(pixels), torch.tensor([-1.0, 1.0, -0.6]).view(1, 3, 1, 1).expand(2, 3, 4, 4))
    assert not normalize.state_dict()  # statistics come from the config, never from a checkpoint
