"""ablate-msa: the ablation statistics against hand-computed numbers, the grid's validation, the fine-scale
synthetic corpus (and the default corpus unchanged), the `msa ablate` command line, and one 2 x 2 grid run
through the flow against real MLflow, Prefect and Ray servers."""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from msa.config import ConfigError, resolve_config
from msa.metrics import RECALL_KEYS
from msa.runtime.ablate import DEFAULT_VARIANTS, validate_grid
from msa.runtime.ablation_table import (
    _t_quantile_bisect,
    ablation_markdown,
    ablation_table,
    paired_difference,
    student_t_cdf,
    t_quantile,
)


def _row(variant: str, seed: int, mR: float) -> dict:
    # every recall gets a value derived from mR so that the means of all keys can be checked too
    return {"variant": variant, "seed": seed, **{k: mR / (i + 1) for i, k in enumerate(RECALL_KEYS[:-1])}, "mR": mR}


# ---------------------------------------------------------------------------------- statistics


# Student t 0.975 quantiles from printed tables.
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423}


@pytest.mark.parametrize("df, expected", sorted(T975.items()))
def test_t_quantile_without_scipy_matches_the_tables(df, expected) -> None:
    assert _t_quantile_bisect(0.975, df) == pytest.approx(expected, abs=5e-5)
    assert _t_quantile_bisect(0.025, df) == pytest.approx(-expected, abs=5e-5)
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-5)  # scipy's when installed


def test_t_quantile_fallback_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7.5, 19, 100):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert _t_quantile_bisect(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-9)
    assert student_t_cdf(0.0, 3) == 0.5
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_ablation_table_by_hand() -> None:
    rows = [
        _row("B", 2, 30.0), _row("full", 3, 34.0), _row("C", 5, 99.0), _row("B", 1, 27.0),
        _row("full", 1, 30.0), _row("C", 1, 31.0), _row("B", 3, 30.0), _row("full", 2, 32.0), _row("C", 2, 35.0),
    ]
    table = ablation_table(rows, ["full", "B", "C"])
    full, b, c = table
    assert [e["variant"] for e in table] == ["full", "B", "C"]

    # full: mR 30, 32, 34 -> mean 32, sample sd 2; i2t_R1 = mR -> 32; i2t_R5 = mR / 2 -> 16, sd 1.
    assert full["n"] == 3 and full["seeds"] == [1, 2, 3] and full["diff_mR"] is None
    assert full["mean"]["mR"] == pytest.approx(32.0) and full["std"]["mR"] == pytest.approx(2.0)
    assert full["mean"]["i2t_R5"] == pytest.approx(16.0) and full["std"]["i2t_R5"] == pytest.approx(1.0)
    assert full["by_seed"]["mR"] == {1: 30.0, 2: 32.0, 3: 34.0}

    # B: 27, 30, 30 -> mean 29, sd sqrt(3); paired by seed: B - full = -3, -2, -4 -> mean -3, sd 1,
    # t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3) = 2.484138.
    assert b["mean"]["mR"] == pytest.approx(29.0) and b["std"]["mR"] == pytest.approx(math.sqrt(3))
    d = b["diff_mR"]
    assert d["n_pairs"] == 3 and d["seeds"] == [1, 2, 3]
    assert d["mean"] == pytest.approx(-3.0) and d["std"] == pytest.approx(1.0)
    assert d["t_quantile"] == pytest.approx(4.302653, abs=1e-6)
    assert d["ci_low"] == pytest.approx(-5.484138, abs=1e-6) and d["ci_high"] == pytest.approx(-0.515862, abs=1e-6)

    # C: seeds 1, 2, 5 (mean 55 over all three); only seeds 1 and 2 pair with full: 1, 3 -> mean 2,
    # sd sqrt(2), t(0.975, 1) = 12.706205, half width 12.706205 * sqrt(2) / sqrt(2).
    assert c["n"] == 3 and c["mean"]["mR"] == pytest.approx(55.0)
    d = c["diff_mR"]
    assert d["n_pairs"] == 2 and d["seeds"] == [1, 2] and d["mean"] == pytest.approx(2.0)
    assert d["ci_low"] == pytest.approx(2.0 - 12.706205, abs=1e-5)
    assert d["ci_high"] == pytest.approx(2.0 + 12.706205, abs=1e-5)

    text = ablation_markdown(table, title="Ablation t")
    assert text.startswith("# Ablation t")
    assert "| `full` | 3 | 32.00 ± 2.00 | 16.00 ± 1.00 |" in text and "| reference |" in text
    assert "| 29.00 ± 1.73 | -3.00 [-5.48, -0.52] |" in text
    assert "mR - full [95% CI, paired by seed]" in text


def test_ablation_table_edge_cases() -> None:
    one = ablation_table([_row("full", 1, 30.0), _row("B", 1, 25.0)])
    assert one[0]["std"]["mR"] is None and one[1]["diff_mR"]["mean"] == pytest.approx(-5.0)
    assert one[1]["diff_mR"]["ci_low"] is None  # one pair: no interval
    assert "-5.00 (n=1, no interval)" in ablation_markdown(one, title="t")
    empty = ablation_table([_row("full", 1, 30.0)], ["full", "B"])
    assert empty[1]["n"] == 0 and empty[1]["mean"]["mR"] is None and empty[1]["diff_mR"]["n_pairs"] == 0
    assert paired_difference({1: 2.0}, {2: 1.0})["mean"] is None
    with pytest.raises(ValueError, match="two rows"):
        ablation_table([_row("full", 1, 30.0), _row("full", 1, 31.0)])
    with pytest.raises(ValueError, match="unknown variant"):
        ablation_table([_row("other", 1, 30.0)], ["full"])


# ---------------------------------------------------------------------------------- the grid


def test_default_variants_are_distinct_configurations() -> None:
    assert list(DEFAULT_VARIANTS)[:4] == ["full", "no-consistency", "no-alignment", "triplet-only"]
    validate_grid(DEFAULT_VARIANTS, [1, 2, 3], "small")
    losses = [json.dumps(resolve_config("small", v).loss.model_dump(), sort_keys=True)
              for v in DEFAULT_VARIANTS.values()]
    assert len(set(losses)) == len(losses)
    assert resolve_config("small", DEFAULT_VARIANTS["full"]).loss.w_cons > 0


@pytest.mark.parametrize(
    "variants, seeds, error, message",
    [
        ({"full": {}, "bad": {"loss.w_bogus": 1}}, [1], ConfigError, "variant bad: loss.w_bogus"),
        ({"full": {"loss.w_cons": -1}}, [1], ConfigError, "variant full"),
        ({"full": {"train.seed": 4}}, [1], ValueError, "set by the grid"),
        ({"full": {"train.epochs": 4}}, [1], ValueError, "set by the grid"),
        ({"a b": {}}, [1], ValueError, "variant name"),
        ({}, [1], ValueError, "at least one variant"),
        ({"full": {}}, [], ValueError, "at least one seed"),
        ({"full": {}}, [1, 1], ValueError, "each seed once"),
        ({"full": {}}, [-1], ValueError, "seed -1"),
    ],
)
def test_bad_grids_are_refused(variants, seeds, error, message) -> None:
    with pytest.raises(error, match=message):
        validate_grid(variants, seeds, "small")


def test_msa_ablate_command_line() -> None:
    import subprocess
    import sys

    from flows.cli import build_parser

    args = build_parser().parse_args(
        ["ablate", "--data", "shards/", "--seeds", "4,5", "--variants", '{"full": {}, "x": {"loss.w_cons": 0}}',
         "--epochs", "2", "--cpus-per-worker", "0.5", "--max-concurrent-trials", "2"]
    )
    assert args.handler.__name__ == "_ablate" and args.seeds == [4, 5] and args.variants["x"] == {"loss.w_cons": 0}
    assert args.workers == 2 and not hasattr(args, "max_failures") and args.max_concurrent_trials == 2
    assert build_parser().parse_args(["ablate"]).seeds == [1, 2, 3]
    # A bad variant exits 2 with one line, before Prefect or Ray is imported.
    bad = json.dumps({"v": {"loss.nope": 1}})
    code = (f"import sys; from flows.cli import main; rc = main(['ablate', '--variants', {bad!r}]); "
            "print(rc, 'prefect' in sys.modules, 'ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "False", "False"], (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "variant v: loss.nope" in proc.stderr


# ---------------------------------------------------------------------------------- fine-scale corpus


# sha256 of dataset_synth.json written by the generator BEFORE the fine-scale option existed: the default
# corpus may not change by a byte (captions and attributes follow every draw of the random streams).
DEFAULT_CORPUS_PINS = [
    (dict(splits={"train": 30, "val": 6, "test": 6}, image_size=32, seed=0),
     "af20dab6ad6279e05617621397093d53740f9dcbc56a0396f570ddf22cad12f0"),
    (dict(splits={"train": 20, "val": 5, "test": 5}, image_size=48, seed=3, difficulty="hard", image_format="mixed"),
     "fd46953af8f3346203ab33eb3083d267b7843c5a8403fe749d65a54dee3d699b"),
]


@pytest.mark.parametrize("kwargs, digest", DEFAULT_CORPUS_PINS)
def test_default_corpus_is_unchanged(tmp_path, kwargs, digest) -> None:
    from shards.synth import generate_corpus

    annotations = generate_corpus(tmp_path / "a", **kwargs)
    assert hashlib.sha256(annotations.read_bytes()).hexdigest() == digest
    explicit = generate_corpus(tmp_path / "b", fine_scale=False, group_size=3, **kwargs)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    doc = json.loads(explicit.read_text())
    assert "fine_scale" not in doc["synth_config"] and "synth_group" not in doc["images"][0]
    assert all("colour" not in o for im in doc["images"] for o in im["synth_attrs"]["objects"])


def _signature(image: dict) -> tuple:
    return tuple((o["kind"], o["count"], o.get("location"), o.get("colour")) for o in image["synth_attrs"]["objects"])


def test_fine_scale_groups_share_the_layout_and_differ_in_small_objects(tmp_path) -> None:
    from shards.synth import generate_corpus
    from shards.synth.scenes import COLOURED_KINDS

    annotations = generate_corpus(tmp_path / "fine", splits={"train": 24, "val": 4, "test": 6}, image_size=32,
                                  seed=5, fine_scale=True)
    doc = json.loads(annotations.read_text())
    assert doc["synth_config"]["fine_scale"] == {"group_size": 4}
    groups: dict[int, list[dict]] = defaultdict(list)
    for image in doc["images"]:
        groups[image["synth_group"]].append(image)
    # groups of 4 within a split; the test split's 6 images make a group of 4 and one of 2
    assert sorted(len(g) for g in groups.values()) == [2] + [4] * 8
    pixels = {im["imgid"]: np.asarray(Image.open(tmp_path / "fine" / "images" / im["filename"]), np.float32)
              for im in doc["images"]}
    within, between = [], []
    for first, members in groups.items():
        assert first == members[0]["imgid"] and len({m["split"] for m in members}) == 1
        # the coarse layout is the group's: same land cover, sides, linear features and orientation
        layouts = {json.dumps([m["synth_attrs"]["regions"], m["synth_attrs"]["linear"]]) for m in members}
        assert len(layouts) == 1
        kinds = {tuple(o["kind"] for o in m["synth_attrs"]["objects"]) for m in members}
        assert len(kinds) == 1 and next(iter(kinds))  # every image has objects, of the same kinds
        # ... and the small objects differ image to image, as do the captions that name them
        assert len({_signature(m) for m in members}) == len(members)
        captions = [frozenset(s["raw"] for s in m["sentences"]) for m in members]
        assert len(set(captions)) == len(members)
        for m in members:
            for group in m["synth_attrs"]["objects"]:
                assert (group.get("colour") is not None) == (group["kind"] in COLOURED_KINDS)
                assert 1 <= group["count"] <= 5
        a, b = members[0]["imgid"], members[1]["imgid"]
        within.append(np.abs(pixels[a] - pixels[b]).mean())
        other = next(g for f, g in groups.items() if f != first)[0]["imgid"]
        between.append(np.abs(pixels[a] - pixels[other]).mean())
    # same background: images of a group differ only where objects are (and in sensor noise)
    assert max(within) < min(between), (within, between)


def test_fine_scale_captions_name_count_colour_and_location(tmp_path) -> None:
    from shards.synth import make_group

    count_words = {1: ("a ", "an ", "one ", "single "), 2: ("two ",), 3: ("three ",), 4: ("four ",),
                   5: ("five ",)}
    place_words = {"left": ("left",), "right": ("right",), "top": ("top", "upper"), "bottom": ("bottom", "lower"),
                   "center": ("center", "middle")}
    for first in (0, 40, 80):
        for _, captions, drawn in make_group(3, first, 4, image_size=48):
            assert len(captions) == 5
            for caption in captions:
                for group in drawn.objects:
                    if group.colour:
                        assert f" {group.colour} " in f" {caption}", caption
                    assert any(w in f" {caption}" for w in count_words[group.count]), caption
                    if group.location:
                        assert any(w in caption for w in place_words[group.location]), caption


def test_msa_corpus_synth_fine_scale(tmp_path) -> None:
    from flows.cli import main

    assert main(["corpus", "synth", str(tmp_path / "c"), "--train", "8", "--val", "0", "--test", "0",
                 "--size", "32", "--fine-scale", "--group-size", "2"]) == 0
    doc = json.loads((tmp_path / "c" / "dataset_synth.json").read_text())
    assert doc["synth_config"]["fine_scale"] == {"group_size": 2}
    assert [im["synth_group"] for im in doc["images"]] == [0, 0, 2, 2, 4, 4, 6, 6]


# ---------------------------------------------------------------------------------- the flow


@pytest.mark.slow
def test_ablate_flow_two_variants_two_seeds(
    mlflow_server, tiny_shards, prefect_stack, ray_cluster, tiny_overrides, tmp_path
) -> None:
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.ablate_msa import ablate_msa

    variants = {"full": {}, "triplet-only": {"loss.w_align": 0.0, "loss.w_cons": 0.0}}
    state = ablate_msa(
        data_uri=tiny_shards, overrides=tiny_overrides, epochs=1, variants=variants, seeds=[1, 2],
        max_concurrent_trials=2, workers=1, cpus_per_worker=0.5, mlflow_uri=mlflow_server,
        storage_path=str(tmp_path / "ray"), name="ablate-test", return_state=True,
    )
    assert state.is_completed(), state
    result = state.result()
    client = MlflowClient(mlflow_server)

    # Four child runs of one parent, each with its variant, seed and test metrics.
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["msa.kind"] == "ablation"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4
    cells = {(c.data.tags["ablation.variant"], int(c.data.tags["ablation.seed"])) for c in children}
    assert cells == {(v, s) for v in variants for s in (1, 2)}
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["msa.kind"] == "ablation-trial"
        assert all(f"test_{k}" in child.data.metrics for k in RECALL_KEYS)
        assert child.data.params["train.seed"] == child.data.tags["ablation.seed"]
        assert child.data.params["loss.w_cons"] == ("0.0" if child.data.tags["ablation.variant"] != "full" else "10.0")

    # The parent's table: both variants, n=2 each, means equal to the children's test mR.
    local = client.download_artifacts(parent.info.run_id, "ablation.json", str(tmp_path))
    with open(local) as f:
        document = json.load(f)
    assert [e["variant"] for e in document["table"]] == ["full", "triplet-only"]
    for entry in document["table"]:
        mine = [c.data.metrics["test_mR"] for c in children if c.data.tags["ablation.variant"] == entry["variant"]]
        assert entry["n"] == 2 and entry["mean"]["mR"] == pytest.approx(sum(mine) / 2)
        assert set(entry["mean"]) == set(RECALL_KEYS)
    diff = document["table"][1]["diff_mR"]
    assert diff["n_pairs"] == 2 and diff["ci_low"] <= diff["mean"] <= diff["ci_high"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"ablation.json", "ablation.md", "figures"} <= artifacts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "figures")] == ["figures/ablation.png"]

    # The same table as the flow run's Prefect artifact.
    with get_client(sync_client=True) as prefect:
        found = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    table = next(a for a in found if a.key == "ablate-msa-table")
    assert table.type == "markdown" and table.data == result["markdown"]
    assert "`triplet-only`" in table.data and "paired by seed" in table.data
