"""ImageEncoder / TextEncoder / tokenizer contracts (MSA spec section 1), on tiny CPU inputs."""

from __future__ import annotations

import logging

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file

from msa.encoders import ImageEncoder, TextEncoder, build_tokenizer, tokenize
from msa.pretrained import WeightsUnavailableError

D = 32
TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256}
PACKAGED = "packaged:all-minilm-l6-v2"
slow = pytest.mark.slow  # the big backbones: a few seconds each to build and run on 2 cores

# (backbone, image size, batch); swin needs 224 px, so batch 1 there.
BACKBONES = [
    pytest.param("resnet50", 64, 2, marks=slow),
    pytest.param("convnext_tiny", 64, 2, marks=slow),
    pytest.param("swin_tiny_patch4_window7_224", 224, 1, marks=slow),
    ("efficientnet_lite0", 64, 2),
    ("resnet18", 64, 2),
    ("resnet10t", 64, 2),  # recommended random-init CPU demo backbone (the `small` preset's)
    ("mobilenetv3_small_050", 64, 2),  # fastest; a third kind of timm feature wrapper
]


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Hub unreachable and an empty cache, whatever the environment says."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def hand_pool(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m.amax(dim=(2, 3)) for m in maps[:3]] + [maps[3].mean(dim=(2, 3))]


@pytest.mark.parametrize(("name", "size", "batch"), BACKBONES)
def test_image_encoder_builds_runs_and_backprops(name: str, size: int, batch: int) -> None:
    torch.manual_seed(0)
    enc = ImageEncoder(name, D, weights=None).train()
    expected = timm.create_model(name, features_only=True).feature_info.channels()[-4:]
    assert enc.stage_dims == tuple(expected)
    if name == "resnet50":  # the reference's 256/512/1024/2048 (spec section 1)
        assert enc.stage_dims == (256, 512, 1024, 2048)

    v, scales = enc(torch.randn(batch, 3, size, size))
    assert v.shape == (batch, D) and torch.isfinite(v).all()
    assert [s.shape for s in scales] == [(batch, c) for c in enc.stage_dims]
    assert all(torch.isfinite(s).all() for s in scales)

    loss = v.pow(2).mean() + sum(s.mean() for s in scales)
    loss.backward()
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())


def test_pooling_is_max_for_stages_1_to_3_and_avg_for_4_and_fusion_is_gated() -> None:
    torch.manual_seed(0)
    enc = ImageEncoder("resnet18", D).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        v, scales = enc(x)
        raw = enc.backbone(x)
        expected = hand_pool(raw)
        for s, e in zip(scales, expected):
            torch.testing.assert_close(s, e)
        # the two poolings really differ on these maps, so the check above can fail
        for k in range(4):
            assert not torch.allclose(raw[k].amax(dim=(2, 3)), raw[k].mean(dim=(2, 3)))

        f = sum(proj(s) for proj, s in zip(enc.scale_proj, expected))
        u = enc.fuse(f)
        torch.testing.assert_close(v, enc.out(u * torch.sigmoid(enc.gate(u))))


@slow
def test_nhwc_backbone_maps_are_pooled_as_nchw() -> None:
    torch.manual_seed(0)
    enc = ImageEncoder("swin_tiny_patch4_window7_224", D).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        raw = enc.backbone(x)
        assert raw[0].shape == (1, 56, 56, 96)  # timm swin features are NHWC
        _, scales = enc(x)
    for s, e in zip(scales, hand_pool([m.permute(0, 3, 1, 2) for m in raw])):
        torch.testing.assert_close(s, e)


def test_backbone_state_dict_file_roundtrip(tmp_path) -> None:
    torch.manual_seed(0)
    source = ImageEncoder("resnet18", D).eval()
    torch.save(source.backbone.state_dict(), tmp_path / "backbone.pth")
    save_file(source.backbone.state_dict(), str(tmp_path / "backbone.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    for file in ("backbone.pth", "backbone.safetensors"):
        torch.manual_seed(1)  # a different random init, so equality means the file was loaded
        loaded = ImageEncoder("resnet18", D, weights=tmp_path / file).eval()
        with torch.no_grad():
            for a, b in zip(source.backbone(x), loaded.backbone(x)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_full_model_checkpoint_is_renamed_to_the_feature_layout(tmp_path) -> None:
    # timm's convnext features rename 'stages.0' -> 'stages_0'; a classifier checkpoint must still load.
    torch.manual_seed(0)
    full = timm.create_model("convnext_atto").eval()
    save_file(full.state_dict(), str(tmp_path / "convnext_atto.safetensors"))
    enc = ImageEncoder("convnext_atto", D, weights=str(tmp_path / "convnext_atto.safetensors")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = full.forward_intermediates(x, indices=4, intermediates_only=True)
        for a, b in zip(enc.backbone(x), expected):
            torch.testing.assert_close(a, b)


def test_checkpoint_key_mismatch_is_an_error_even_with_fallback(tmp_path) -> None:
    state = ImageEncoder("resnet18", D).backbone.state_dict()
    missing = dict(state)
    del missing["layer4.1.bn2.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="layer4.1.bn2.running_var"):
        ImageEncoder("resnet18", D, weights=tmp_path / "missing.pth", fallback_random=True)
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="extra.weight"):
        ImageEncoder("resnet18", D, weights=tmp_path / "extra.pth")


def test_missing_weight_file_raises_clear_error_or_falls_back(tmp_path, caplog) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(WeightsUnavailableError, match=r"(?s)absent\.safetensors.*resnet18.*fallback_random"):
        ImageEncoder("resnet18", D, weights=path)
    with caplog.at_level(logging.WARNING, logger="msa.encoders"):
        enc = ImageEncoder("resnet18", D, weights=path, fallback_random=True)
    assert "random init" in caplog.text
    assert enc(torch.randn(2, 3, 64, 64))[0].shape == (2, D)


def test_hub_weights_offline_raise_clear_error_or_fall_back(offline_hub, caplog) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"(?s)hub.*resnet18.*local .*fallback_random"):
        ImageEncoder("resnet18", D, weights="hub")
    with caplog.at_level(logging.WARNING, logger="msa.encoders"):
        enc = ImageEncoder("resnet18", D, weights="hub", fallback_random=True)
    assert "resnet18" in caplog.text and "random init" in caplog.text
    assert enc(torch.randn(2, 3, 64, 64))[0].shape == (2, D)


def test_package_weights_need_an_efficientnet_lite0_backbone() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        ImageEncoder("resnet18", D, weights="efficientnet-lite0-package")


# ------------------------------------------------------------------------------------------ text


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(PACKAGED)


def test_tokenize_gives_31_tokens_cls_sep_pad(tokenizer) -> None:
    short = "a red plane parked near the terminal"
    long = " ".join(["many green trees surround a large baseball field"] * 10)
    ids, mask = tokenize(tokenizer, [short, long])
    assert ids.shape == mask.shape == (2, 31) and ids.dtype == mask.dtype == torch.long
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id

    pieces = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(short))
    n = len(pieces)
    assert ids[0].tolist() == [cls, *pieces, sep] + [pad] * (29 - n)
    assert mask[0].tolist() == [1] * (n + 2) + [0] * (29 - n)

    long_pieces = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(long))
    assert len(long_pieces) > 29
    assert ids[1].tolist() == [cls, *long_pieces[:29], sep]
    assert mask[1].tolist() == [1] * 31


def test_tiny_text_encoder_outputs_and_gradients(tokenizer) -> None:
    torch.manual_seed(0)
    enc = TextEncoder("bert-base-uncased", weights=None, config_overrides=TINY_BERT)
    assert enc.hidden_size == 128
    ids, mask = tokenize(tokenizer, ["two tennis courts", "a river crosses the green farmland near houses"])

    enc.eval()
    with torch.no_grad():
        cls, tokens = enc(ids, mask)
        hidden = enc.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        unmasked = enc.transformer(input_ids=ids).last_hidden_state
    assert cls.shape == (2, 128) and tokens.shape == (2, 30, 128)
    torch.testing.assert_close(cls, hidden[:, 0])
    torch.testing.assert_close(tokens, hidden[:, 1:])  # [SEP] and [PAD] positions included
    assert not torch.allclose(hidden[0, :4], unmasked[0, :4], atol=1e-4)  # the mask reached BERT

    enc.train()
    cls, tokens = enc(ids, mask)
    (cls.pow(2).mean() + tokens.pow(2).mean()).backward()
    no_grad = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())


def test_text_random_init_from_packaged_config_and_override_checks() -> None:
    enc = TextEncoder(PACKAGED, weights=None, config_overrides={"num_hidden_layers": 1})
    assert enc.hidden_size == 384 and enc.transformer.config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="num_hidden_layer"):
        TextEncoder(PACKAGED, weights=None, config_overrides={"num_hidden_layer": 1})


def test_text_hub_offline_raises_clear_error_or_falls_back(offline_hub, caplog) -> None:
    with pytest.raises(WeightsUnavailableError, match=r"(?s)bert-base-uncased.*fallback_random"):
        TextEncoder("bert-base-uncased")
    with caplog.at_level(logging.WARNING, logger="msa.encoders"):
        enc = TextEncoder("bert-base-uncased", config_overrides=TINY_BERT, fallback_random=True)
    assert "bert-base-uncased" in caplog.text and "random init" in caplog.text
    assert enc.hidden_size == 128 and enc.transformer.config.vocab_size == 30522
    with pytest.raises(WeightsUnavailableError, match="bert-base-uncased"):
        build_tokenizer("bert-base-uncased")
    # an unreachable name whose architecture we cannot know is an error, not a silent BertConfig()
    with pytest.raises(WeightsUnavailableError, match="roberta-base"):
        TextEncoder("roberta-base", weights=None)
