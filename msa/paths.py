"""Project-local defaults, so the embedded stack never writes into the caller's cwd."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# MSA_HOME moves all local state (shards, MLflow store, Ray results) elsewhere, e.g. per test.
LOCAL_STATE = Path(os.environ.get("MSA_HOME", PROJECT_ROOT / ".msa")).resolve()
DEMO_CORPUS_DIR = LOCAL_STATE / "corpus" / "synth-demo"
DEMO_SHARDS_URI = str(LOCAL_STATE / "shards" / "synth-demo")


# Every process of the product runs offline (no hub look-ups that retry for a minute) and quiet.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def default_ray_storage() -> str:
    return str(LOCAL_STATE / "ray_results")
