"""open_clip towers (msa/clip.py): CLIP's own embeddings exactly, its preprocessing, local weights only."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from msa.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from msa.clip import evenly_spaced_blocks
from msa.config import resolve_config
from msa.data import ImageTransform
from msa.encoders import build_tokenizer, tokenize
from msa.losses import compute_loss
from msa.model import ImageNormalize, MSAModel
from msa.pretrained import WeightsUnavailableError

CAPTIONS = [
    "a river crosses green farmland",
    "wow! many buildings near a playground",  # '!' is BPE id 0, the padding value
    " ".join(["dense residential area"] * 40),  # longer than 77 tokens: truncated, <eot> kept
]
TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_OVERRIDES = [f"clip.model_cfg={json.dumps(TINY)}", "image.size=32", "clip.scales=2", "train.batch_size=4"]
PRESET = {"ViT-B-32": "clip-vit-b32", "RN50": "clip-rn50"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """arch -> a random open_clip model (eval) and its state dict saved plain and as {'state_dict': {'module.' + k}}."""
    built = {}

    def get(arch: str):
        if arch not in built:
            torch.manual_seed(0)
            model = open_clip.create_model(arch, pretrained=None).eval()
            root = tmp_path_factory.mktemp(arch)
            files = {"plain": root / "plain.pt", "wrapped": root / "wrapped.pt"}
            torch.save(model.state_dict(), files["plain"])
            torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
                       files["wrapped"])
            built[arch] = model, files
        return built[arch]

    return get


@pytest.mark.parametrize("arch, layout", [("ViT-B-32", "plain"), ("ViT-B-32", "wrapped"), ("RN50", "plain")])
@torch.no_grad()
def test_global_embeddings_are_open_clips_own(reference, arch, layout):
    oc, files = reference(arch)
    cfg = resolve_config(PRESET[arch], [f"clip.checkpoint={files[layout]}"])
    model = MSAModel(cfg).eval()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    image_emb, scales = model.encode_image(images)
    torch.testing.assert_close(image_emb, F.normalize(oc.encode_image(images), dim=-1), atol=1e-5, rtol=0)

    tokenizer = build_tokenizer(cfg)
    ids, mask = tokenize(tokenizer, CAPTIONS, cfg.text.max_tokens)
    theirs = open_clip.get_tokenizer(arch)(CAPTIONS)
    assert torch.equal(ids, theirs) and ids.dtype == mask.dtype == torch.long
    eot = theirs.argmax(dim=1)  # <eot> is the highest id
    assert mask.sum(1).tolist() == (eot + 1).tolist() and mask[1, : eot[1] + 1].all()
    text_emb, tokens = model.encode_text(ids, mask)
    torch.testing.assert_close(text_emb, F.normalize(oc.encode_text(theirs), dim=-1), atol=1e-5, rtol=0)
    assert tokens.shape == (3, 76, model.text.hidden_size)  # RN50: 512-wide states projected to 1024

    # The scales are the pooled intermediates open_clip itself reports (blocks 3, 6, 9, 12 / stages 1-4).
    if arch == "RN50":
        maps = oc.visual.forward_intermediates(images, indices=[1, 2, 3, 4], intermediates_only=True)
        expected = [m.amax(dim=(2, 3)) for m in maps["image_intermediates"][:3]]
        expected.append(maps["image_intermediates"][3].mean(dim=(2, 3)))
        assert model.image.stage_dims == (256, 512, 1024, 2048)
    else:
        maps = oc.visual.forward_intermediates(images, indices=[2, 5, 8, 11], intermediates_only=True)
        expected = [m.mean(dim=(2, 3)) for m in maps["image_intermediates"]]  # patch tokens as NCHW maps
        assert model.image.stage_dims == (768,) * 4
    for ours, theirs_scale in zip(scales, expected, strict=True):
        torch.testing.assert_close(ours, theirs_scale, atol=1e-4, rtol=1e-5)


def test_the_presets_transform_is_clips_preprocessing(reference):
    pre = open_clip.get_model_preprocess_cfg(reference("ViT-B-32")[0])
    theirs = open_clip.image_transform(pre["size"], is_train=False, mean=pre["mean"], std=pre["std"],
                                       interpolation=pre["interpolation"], resize_mode=pre["resize_mode"])
    rng = np.random.default_rng(0)
    for preset in ("clip-vit-b32", "clip-vit-l14", "clip-rn50"):
        cfg = resolve_config(preset)
        ours, normalize = ImageTransform.from_config(cfg), ImageNormalize.from_config(cfg)
        for height, width in ((256, 256), (256, 301), (180, 200), (224, 224)):
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            # uint8 out of the transform, normalised by the model's module: together open_clip's preprocessing.
            torch.testing.assert_close(normalize(ours(image)[None])[0], theirs(image), atol=1e-5, rtol=0)
    # The paper's transform is unchanged: ImageNet statistics, bilinear.
    paper = resolve_config("paper").image
    assert paper.mean == pytest.approx([0.485, 0.456, 0.406]) and paper.std == pytest.approx([0.229, 0.224, 0.225])
    assert ImageTransform.from_config(resolve_config("paper")).resample == Image.BILINEAR


def _tiny(*overrides: str):
    return resolve_config("clip-vit-b32", [*TINY_OVERRIDES, *overrides])


@pytest.mark.parametrize(
    "write, problem",
    [
        (None, "no such file"),
        (lambda p: torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(4, 2)}, p), "unexpected keys 1"),
        (lambda p: p.write_bytes(b"not a checkpoint"), "unreadable"),
        (lambda p: torch.save([torch.zeros(1)], p), "not a state dict"),
    ],
    ids=["missing", "foreign", "garbage", "not-a-dict"],
)
def test_bad_weight_files_are_one_line_errors_naming_the_file(tmp_path, write, problem):
    path = tmp_path / "weights.pt"
    if write is not None:
        write(path)
    with pytest.raises(WeightsUnavailableError) as info:
        MSAModel(_tiny(f"clip.checkpoint={path}"))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and problem in message
    assert "open_clip state dict" in message  # the expected format


def test_no_weights_and_no_random_init_is_refused():
    with pytest.raises(WeightsUnavailableError, match=r"clip\.checkpoint=PATH.*clip\.random_init=true") as info:
        MSAModel(_tiny())
    assert "\n" not in str(info.value)


def test_scales_need_enough_blocks():
    assert evenly_spaced_blocks(12, 4) == [2, 5, 8, 11] and evenly_spaced_blocks(24, 4) == [5, 11, 17, 23]
    with pytest.raises(ValueError, match=r"clip\.scales=4: the vision transformer has 2 blocks"):
        MSAModel(_tiny("clip.random_init=true", "clip.scales=4"))


def test_tiny_clip_model_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(open_clip.CLIP(**TINY).state_dict(), weights)
    cfg = _tiny(f"clip.checkpoint={weights}")
    model = MSAModel(cfg).train()
    assert model.image.stage_dims == (64, 64) and model.text.hidden_size == 64

    tokenizer = build_tokenizer(cfg)
    ids, mask = tokenize(tokenizer, CAPTIONS + ["a bare field"], cfg.text.max_tokens)
    images = torch.randn(4, 3, 32, 32)
    out = model(images, ids, mask)
    assert out.scores.shape == (2, 4, 4)
    parts = compute_loss(out, cfg.loss)
    parts["total"].backward()
    assert torch.isfinite(parts["total"])
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in params if p.grad is None or not p.grad.isfinite().all()]
    assert not no_grad, no_grad

    # Shorter captions: the causal transformer gives the same <eot> state for a caption that fits.
    model.eval()
    with torch.no_grad():
        short_ids, short_mask = tokenize(tokenizer, CAPTIONS[:2], 16)
        torch.testing.assert_close(model.encode_text(short_ids, short_mask)[0], model.encode_text(ids, mask)[0][:2])

    # The tokenizer rebuilds from what save_pretrained wrote (the MLflow publish step), and from its label.
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    for rebuilt in (build_tokenizer(str(tmp_path / "tokenizer")), build_tokenizer(cfg.text.model)):
        pairs = zip(tokenize(rebuilt, CAPTIONS, 77), tokenize(tokenizer, CAPTIONS, 77))
        assert all(torch.equal(a, b) for a, b in pairs)

    # A checkpoint rebuilds the model with no weight file at hand.
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=None, epoch=0, cfg=cfg, dataset_digest="d",
                    metrics={}, history=[])
    weights.unlink()
    restored, restored_cfg = model_from_checkpoint(load_checkpoint(tmp_path / "ckpt"))
    assert restored_cfg == cfg
    with torch.no_grad():
        again, before = restored.eval()(images, ids, mask), model(images, ids, mask)
        for field in ("image_emb", "text_emb", "scores"):
            torch.testing.assert_close(getattr(again, field), getattr(before, field))
