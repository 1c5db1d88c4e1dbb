"""msa.config: presets, strict validation of overrides, one-line ConfigErrors, round trips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from msa.config import (
    PRESETS,
    ConfigError,
    ImageConfig,
    LossConfig,
    MSAConfig,
    MSCMATConfig,
    OptimConfig,
    TextConfig,
    TrainConfig,
    parse_overrides,
    resolve_config,
    resolve_preprocessing,
)

PAPER = {
    "preset": "paper",
    "image": {"backbone": "resnet50.tv_in1k", "weights": "hub", "fallback_random": False, "size": 224,
              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"},
    "text": {"model": "bert-base-uncased", "weights": "pretrained", "tokenizer": None, "config_overrides": {},
             "fallback_random": False, "max_tokens": 31},
    "clip": {"arch": None, "checkpoint": None, "random_init": False, "model_cfg": {}, "scales": 4},
    "mscmat": {"num_heads": 12, "key_padding_mask": False},
    "loss": {"w_align": 15.0, "w_cons": 10.0, "margin": 0.5, "cons_temperature": 2.0, "align_temperature": None,
             "align_both_directions": False, "mask_same_image": False, "triplet_reduction": "sum",
             "triplet_negatives": "hardest", "w_infonce": 0.0, "infonce_temperature": 0.07,
             "learn_temperature": False},
    "optim": {"lr": 1e-5, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "schedule": "constant",
              "warmup_steps": 0, "grad_clip": None, "no_decay_norm_bias": False, "head_lr": None},
    "train": {"batch_size": 32, "epochs": 60, "seed": 1, "val_fraction": 0.1, "eval_batch_size": 128,
              "loader_workers": 1, "bf16": False, "keep_checkpoints": 2, "compile": False, "channels_last": False,
              "fused_adamw": False, "tf32": False, "prefetch": False},
}

CLIP_IMAGE = {"weights": None, "size": 224, "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic"}
TINY_BERT = {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 256}


def _with(base: dict, **sections: dict) -> dict:
    out = json.loads(json.dumps(base))
    for name, values in sections.items():
        out[name].update(values)
    return out


EXPECTED = {
    "paper": PAPER,
    "small": _with(
        {**PAPER, "preset": "small"},
        image={"backbone": "resnet10t", "weights": None, "size": 64, "interpolation": "bicubic"},  # resnet10t's cfg
        text={"model": "packaged:all-minilm-l6-v2", "weights": None, "config_overrides": TINY_BERT},
        mscmat={"num_heads": 4},
        loss={"triplet_negatives": "all"},
        optim={"lr": 5e-4, "weight_decay": 0.01},
        train={"batch_size": 32, "epochs": 6, "eval_batch_size": 256, "bf16": True},
    ),
    "pretrained-lite": _with(
        {**PAPER, "preset": "pretrained-lite"},
        image={"backbone": "efficientnet_lite0", "weights": "efficientnet-lite0-package", "size": 128,
               "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"},  # the TF-Lite0 weights' own
        text={"model": "packaged:all-minilm-l6-v2", "weights": "pretrained"},
        mscmat={"num_heads": 12},
        optim={"lr": 1e-4, "weight_decay": 0.05},
        train={"batch_size": 32, "epochs": 10, "eval_batch_size": 128, "bf16": True},
    ),
    **{
        name: _with(
            {**PAPER, "preset": name},
            image={**CLIP_IMAGE, "backbone": f"open_clip:{arch}"},
            text={"model": f"open_clip:{arch}", "weights": None, "max_tokens": 77},
            clip={"arch": arch},
            mscmat={"num_heads": 8},
            optim={"lr": 5e-6},
            train={"batch_size": 128, "epochs": 10, "bf16": True},
        )
        for name, arch in (("clip-vit-b32", "ViT-B-32"), ("clip-vit-l14", "ViT-L-14"), ("clip-rn50", "RN50"))
    },
    "clip-georsclip-ft": _with(
        {**PAPER, "preset": "clip-georsclip-ft"},
        image={**CLIP_IMAGE, "backbone": "open_clip:ViT-B-32"},
        text={"model": "open_clip:ViT-B-32", "weights": None, "max_tokens": 77},
        clip={"arch": "ViT-B-32"},
        mscmat={"num_heads": 8},
        loss={"w_infonce": 1.0, "learn_temperature": True},
        optim={"lr": 5e-6, "schedule": "cosine", "warmup_steps": 100, "grad_clip": 50.0, "no_decay_norm_bias": True},
        train={"batch_size": 256, "epochs": 5, "bf16": True},
    ),
}


def test_presets_are_the_known_ones() -> None:
    assert sorted(PRESETS) == ["clip-georsclip-ft", "clip-rn50", "clip-vit-b32", "clip-vit-l14", "paper",
                               "pretrained-lite", "small"]


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_values(preset: str) -> None:
    cfg = resolve_config(preset)
    assert cfg.to_dict() == EXPECTED[preset]
    assert resolve_preprocessing(PRESETS[preset]) == cfg  # presets leave preprocessing to the backbone


def test_paper_preset_is_the_reference() -> None:
    cfg = resolve_config("paper")
    assert (cfg.image.backbone, cfg.image.weights, cfg.image.size) == ("resnet50.tv_in1k", "hub", 224)
    assert (cfg.text.model, cfg.text.weights, cfg.text.max_tokens) == ("bert-base-uncased", "pretrained", 31)
    assert cfg.mscmat.num_heads == 12
    assert (cfg.loss.w_align, cfg.loss.w_cons, cfg.loss.margin, cfg.loss.cons_temperature) == (15, 10, 0.5, 2.0)
    assert (cfg.loss.triplet_negatives, cfg.loss.triplet_reduction) == ("hardest", "sum")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.eps) == (1e-5, 0.1, 1e-8)
    assert tuple(cfg.optim.betas) == (0.9, 0.999)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.seed) == (32, 60, 1)
    # The authors trained AdamW in fp32 with a fixed lr: no schedule, clipping, groups or training-path options.
    assert cfg.train.bf16 is False
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.optim.grad_clip) == ("constant", 0, None)
    assert (cfg.optim.no_decay_norm_bias, cfg.optim.head_lr, cfg.loss.learn_temperature) == (False, None, False)
    t = cfg.train
    assert not (t.compile or t.channels_last or t.fused_adamw or t.tf32 or t.prefetch)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_round_trips(preset: str) -> None:
    cfg = resolve_config(preset)
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON-able python
    back = MSAConfig.from_dict(data)
    assert back == cfg
    assert back.to_dict() == data
    assert MSAConfig.from_dict(json.loads(cfg.to_json())) == cfg
    # a checkpoint may hold betas as a tuple (the dataclass era): still accepted
    assert MSAConfig.from_dict({**data, "optim": {**data["optim"], "betas": (0.9, 0.999)}}).optim == cfg.optim


def test_sections_are_exported_and_default_to_the_paper() -> None:
    cfg = MSAConfig(preset="x", image=ImageConfig(), text=TextConfig(), mscmat=MSCMATConfig(), loss=LossConfig(),
                    optim=OptimConfig(), train=TrainConfig())
    assert resolve_preprocessing(cfg).to_dict() == {**PAPER, "preset": "x"}


def test_frozen() -> None:
    cfg = resolve_config("small")
    with pytest.raises(ValidationError):
        cfg.train.batch_size = 8  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.train = TrainConfig()  # type: ignore[misc]
    assert cfg.train.batch_size == 32


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.batch_size=-4", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=16.5", "train.batch_size"),
        ("train.epochs=true", "train.epochs"),
        ("train.bf16=maybe", "train.bf16"),
        ("train.bf16=1", "train.bf16"),
        ("loss.triplet_negatives=bogus", "loss.triplet_negatives"),
        ("loss.triplet_reduction=max", "loss.triplet_reduction"),
        ("text.weights=hub", "text.weights"),
        ("bogus.epochs=3", "bogus.epochs"),
        ("train.bogus=3", "train.bogus"),
        ("optim.lr=0", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=.inf", "optim.lr"),
        ("train.val_fraction=1.0", "train.val_fraction"),
        ("train.val_fraction=-0.1", "train.val_fraction"),
        ("optim.betas=[0.9, 0.99, 0.5]", "optim.betas"),
        ("optim.betas=[0.9, 1.0]", "optim.betas"),
        ("image.size=8", "image.size"),
        ("text.max_tokens=1", "text.max_tokens"),
        ("mscmat.num_heads=0", "mscmat.num_heads"),
        ("loss.margin=-0.1", "loss.margin"),
        ("loss.align_temperature=0", "loss.align_temperature"),
        ("train.loader_workers=-1", "train.loader_workers"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("text.config_overrides=[1, 2]", "text.config_overrides"),
        ("train.epochs", "train.epochs"),  # no '='
        ("optim.lr=[1,", "optim.lr"),  # not YAML
    ],
)
def test_bad_overrides_raise_one_line(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("small", [override])
    message = str(info.value)
    assert "\n" not in message
    assert key in message
    assert isinstance(info.value, ValueError)  # callers catching ValueError keep working


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=-4", "train.batch_size=-4: must be an integer >= 1"),
        ("train.batch_size=16.5", "train.batch_size=16.5: must be an integer >= 1"),
        ("train.bf16=maybe", "train.bf16='maybe': must be true or false"),
        ("loss.triplet_negatives=bogus", "loss.triplet_negatives='bogus': must be one of 'hardest', 'all'"),
        ("text.weights=hub", "text.weights='hub': must be one of 'pretrained', null"),
        ("optim.lr=0", "optim.lr=0: must be a finite number > 0"),
        ("train.val_fraction=1.0", "train.val_fraction=1.0: must be a finite number >= 0 and < 1"),
        ("optim.betas=[0.9, 0.99, 0.5]",
         "optim.betas=[0.9, 0.99, 0.5]: must be a list of 2 items, each a finite number >= 0 and < 1"),
        ("image.interpolation=nearest", "image.interpolation='nearest': must be one of 'bilinear', 'bicubic' or null"),
        ("image.std=[0.2, 0.2, 0]",
         "image.std=[0.2, 0.2, 0]: must be a list of 3 items, each a finite number > 0 or null"),
        ("clip.scales=0", "clip.scales=0: must be an integer >= 1"),
        ("clip.model_cfg=3", "clip.model_cfg=3: must be a mapping with string keys"),
        ("train.bogus=1", "train.bogus: unknown config key; valid keys in train: batch_size, epochs, seed, "
                          "val_fraction, eval_batch_size, loader_workers, bf16, keep_checkpoints, compile, "
                          "channels_last, fused_adamw, tf32, prefetch"),
        ("optim.schedule=linear", "optim.schedule='linear': must be one of 'constant', 'cosine'"),
        ("optim.warmup_steps=-1", "optim.warmup_steps=-1: must be an integer >= 0"),
        ("optim.grad_clip=0", "optim.grad_clip=0: must be a finite number > 0 or null"),
        ("optim.head_lr=-0.5", "optim.head_lr=-0.5: must be a finite number > 0 or null"),
        ("train.compile=yes please", "train.compile='yes please': must be true or false"),
        ("loss.learn_temperature=3", "loss.learn_temperature=3: must be true or false"),
        ("bogus.x=1", "bogus.x: unknown config key; keys look like section.key (e.g. train.epochs), "
                      "sections: image, text, clip, mscmat, loss, optim, train"),
    ],
)
def test_error_messages(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("small", [override])
    assert str(info.value) == message


def test_missing_equals_message() -> None:
    with pytest.raises(ConfigError, match=r"override 'train\.epochs 5' has no '='.*section\.key=value"):
        parse_overrides(["train.epochs 5"])


def test_unknown_preset() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("x")
    assert str(info.value) == (
        "unknown preset 'x'; choose one of clip-georsclip-ft, clip-rn50, clip-vit-b32, clip-vit-l14, paper, "
        "pretrained-lite, small"
    )


def test_mapping_overrides_are_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"^train\.batch_size=16\.5: must be an integer >= 1$"):
        resolve_config("small", {"train.batch_size": 16.5})
    with pytest.raises(ConfigError, match="unknown config key"):
        resolve_config("small", {"optim.learning_rate": 0.1})
    cfg = resolve_config("small", {"optim.lr": 2e-3, "loss.w_align": 3, "train.batch_size": 16.0})
    assert cfg.optim.lr == 2e-3
    assert cfg.loss.w_align == 3.0 and isinstance(cfg.loss.w_align, float)
    assert cfg.train.batch_size == 16 and isinstance(cfg.train.batch_size, int)


def test_good_overrides() -> None:
    cfg = resolve_config("small", [
        "optim.lr=1e-3",  # YAML 1.1 reads this as the string '1e-3'
        "train.epochs=3",
        "image.weights=null",
        "text.config_overrides={num_hidden_layers: 1}",
        "loss.align_temperature=0.1",
        "optim.betas=[0.8, 0.99]",
        "train.bf16=false",
        "image.weights=/tmp/backbone.pt",
    ])
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.image.weights == "/tmp/backbone.pt"  # the later override wins
    assert cfg.text.config_overrides == {"num_hidden_layers": 1}
    assert cfg.loss.align_temperature == 0.1
    assert tuple(cfg.optim.betas) == (0.8, 0.99)
    assert cfg.train.bf16 is False
    assert resolve_config("small", ["image.weights=null"]).image.weights is None
    assert resolve_config("paper", ["text.weights=null"]).text.weights is None


def test_numpy_scalars_from_a_search_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    cfg = resolve_config("small", {"train.batch_size": np.int64(16), "optim.lr": np.float64(3e-4)})
    assert cfg.train.batch_size == 16 and type(cfg.train.batch_size) is int
    assert cfg.optim.lr == 3e-4 and type(cfg.optim.lr) is float


def test_parse_overrides() -> None:
    assert parse_overrides(None) == {}
    assert parse_overrides([]) == {}
    assert parse_overrides(["train.epochs=5", "image.weights=null", "optim.lr=1e-3"]) == {
        "train.epochs": 5, "image.weights": None, "optim.lr": "1e-3"}
    assert parse_overrides({"train.epochs": 5}) == {"train.epochs": 5}


@pytest.mark.parametrize(
    "data, key",
    [
        ({**PAPER, "train": {**PAPER["train"], "batch_size": -1}}, "train.batch_size"),
        ({**PAPER, "bogus": {}}, "bogus"),
        ({**PAPER, "optim": {**PAPER["optim"], "momentum": 0.9}}, "optim.momentum"),
        ({**PAPER, "train": 5}, "train"),
        ({k: v for k, v in PAPER.items() if k != "preset"}, "preset"),
    ],
)
def test_from_dict_refuses_bad_data(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        MSAConfig.from_dict(data)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_flat_params_format() -> None:
    params = resolve_config("small", ["optim.lr=0.001"]).flat_params()
    assert params["preset"] == "small"
    assert params["optim.lr"] == str(0.001) == "0.001"
    assert params["optim.eps"] == "1e-08"
    assert params["optim.betas"] == "[0.9, 0.999]"
    assert params["loss.w_align"] == "15.0"
    assert params["train.batch_size"] == "32"
    assert params["train.bf16"] == "True"
    assert params["image.weights"] == "None"
    assert params["text.config_overrides"] == json.dumps(TINY_BERT)
    assert params["loss.triplet_negatives"] == "all"
    assert len(params) == 1 + sum(len(v) for k, v in PAPER.items() if k != "preset")
    assert all(isinstance(v, str) for v in params.values())


def test_import_is_light() -> None:
    code = ("import sys, msa.config; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'transformers', 'timm'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
