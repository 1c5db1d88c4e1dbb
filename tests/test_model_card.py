"""The registered version's model card (msa.runtime.tracking.model_card), built from plain data.

That a published version carries it, with its input example, system metrics and test dataset input, is
checked on a real run in tests/test_demo_flow.py.
"""

from __future__ import annotations

import re

from msa.config import resolve_config
from msa.metrics import RECALL_KEYS
from msa.runtime.tracking import model_card

TEST = {"i2t_R1": 17.0, "i2t_R5": 40.0, "i2t_R10": 56.0, "t2i_R1": 9.4, "t2i_R5": 38.6, "t2i_R10": 59.2,
        "mR": 36.7, "chance_mR": 5.26, "selected_epoch": 4.0}
DIGEST = "cbe7e38b392235ff" + "0" * 48


def _card(**changes) -> str:
    args = dict(version="3", cfg=resolve_config("small", {"train.epochs": 6}), corpus="synth",
                data_uri="/state/shards/synth-demo", dataset_digest=DIGEST, test=TEST, run_id="c62d1a7f",
                tracking_uri="sqlite:////state/mlflow.db")
    return model_card(**{**args, **changes})


def test_card_names_the_data_preset_and_config() -> None:
    card = _card()
    assert card.startswith("# msa-retrieval v3\n")
    assert f"| dataset digest | `{DIGEST}` |" in card
    assert "| corpus | `synth` at `/state/shards/synth-demo` |" in card
    assert "| preset | `small` |" in card
    assert "image `resnet10t`" in card and "64 px images" in card
    assert "6 epochs, batch 32, lr 0.0005" in card
    assert "| selected epoch | 5 (best validation mR) |" in card
    assert "`c62d1a7f`" in card


def test_card_has_every_test_recall_and_the_chance_level() -> None:
    card = _card()
    header = next(line for line in card.splitlines() if line.startswith("| i2t_R1"))
    values = card.splitlines()[card.splitlines().index(header) + 2]
    assert header == "| " + " | ".join(RECALL_KEYS) + " |"
    assert values == "| " + " | ".join(f"{TEST[k]:.2f}" for k in RECALL_KEYS) + " |"
    assert "Chance mR on this split: 5.26 (mR is 7.0x chance)." in card


def test_card_says_how_to_load_the_version() -> None:
    card = _card(version="12")
    python = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    compile(python, "model card", "exec")  # the snippet is valid Python
    assert 'mlflow.set_tracking_uri("sqlite:////state/mlflow.db")' in python
    assert 'mlflow.pyfunc.load_model("models:/msa-retrieval/12")' in python
    assert "msa index --model models:/msa-retrieval/12 --data /state/shards/synth-demo --out .msa/index" in card
    assert 'msa search .msa/index --text "a river through farmland"' in card
