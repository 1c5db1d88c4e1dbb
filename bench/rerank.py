"""Does MSCMAT re-ranking of the cosine top-R help retrieval? Measured on a synthetic test split.

Trains a small-preset model briefly in-process (one process, no Ray: ``msa.engine.fit`` with
``msa.engine.LocalCheckpoints``, the training loop the Ray workers run; validation recall after every
epoch, the epoch with the best val mR kept) on a small synthetic corpus, or takes --checkpoint; loads
the model with ``msa.retrieval.resolve_model``, builds retrieval indexes of the val and test splits
with msa.retrieval.build_index, and reports i2t/t2i R@1/5/10 and mR for:

  cosine only (the reference's test-time ranking), MSCMAT alone re-ranking the top R, and
  cosine + lambda * MSCMAT re-ranking the top R (lambda chosen on VAL, reported on TEST),

for R in --tops (default 10, 20), plus MSCMAT ranking the whole split for reference. The checkpoint
epoch and lambda are both chosen on val; test is only reported. Re-ranked recall uses
msa.metrics.recall_at_k on a similarity matrix whose per-query top-R entries carry the re-rank scores
above the rest (msa.retrieval.reranked_recall); with the identity re-rank it must equal cosine-only
recall exactly, which is checked first.

    nice -n 10 .venv/bin/python bench/rerank.py                        # train ~4 min on 1 thread
    nice -n 10 .venv/bin/python bench/rerank.py --checkpoint DIR --data SHARDS
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     "DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_key, _value)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from msa.metrics import chance_recall, recall_at_k  # noqa: E402
from msa.retrieval import (  # noqa: E402
    Index,
    build_index,
    mscmat_matrix,
    rerank_similarities,
    reranked_recall,
    resolve_model,
)

KEYS = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "mR")


def _counts(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected TRAIN,VAL,TEST")
    return parts


def make_shards(work: Path, counts: tuple[int, int, int], image_size: int, difficulty: str, seed: int) -> str:
    from shards.synth import generate_corpus
    from shards.writer import write_shards

    started = time.perf_counter()
    ann = generate_corpus(work / "corpus", splits=dict(zip(("train", "val", "test"), counts)),
                          image_size=image_size, seed=seed, difficulty=difficulty)
    uri = str(work / "shards")
    write_shards(ann, work / "corpus" / "images", uri, progress=False)
    print(f"corpus: synthetic {difficulty}, {counts[0]}/{counts[1]}/{counts[2]} train/val/test images "
          f"(5 captions each), {image_size} px, made in {time.perf_counter() - started:.1f} s", flush=True)
    return uri


def held_out_data(model, work: Path, args: argparse.Namespace) -> str:
    """Shards for a given checkpoint: the demo shards when it was trained on them (their val and test
    are held out), else a corpus generated with seed --seed + 1, whose images no seed --seed corpus has."""
    from msa.paths import DEMO_SHARDS_URI
    from shards.manifest import manifest_exists, read_manifest

    if manifest_exists(DEMO_SHARDS_URI) and read_manifest(DEMO_SHARDS_URI).digest == model.trained_on:
        print(f"data: the checkpoint was trained on the demo shards {DEMO_SHARDS_URI}; using their val/test")
        return DEMO_SHARDS_URI
    print(f"data: a fresh corpus with seed {args.seed + 1}, none of whose images the checkpoint was trained on")
    return make_shards(work, args.images, args.image_size, args.difficulty, args.seed + 1)


class _OutOfTime(Exception):
    """Raised by ``_TimeLimit`` after an epoch's checkpoint is written, to end ``fit`` early."""


class _TimeLimit:
    """An ``msa.engine`` epoch sink: ``LocalCheckpoints``, plus a stop after the epoch that passes
    ``max_minutes`` of training (``fit`` has no time budget of its own, so the sink ends the run)."""

    def __init__(self, checkpoints, max_minutes: float | None, epochs: int):
        self.checkpoints, self.max_minutes, self.epochs = checkpoints, max_minutes, epochs
        self.started = time.perf_counter()

    def resume_state(self, device: torch.device):
        return self.checkpoints.resume_state(device)

    def end_epoch(self, metrics: dict[str, float], write_checkpoint) -> None:
        self.checkpoints.end_epoch(metrics, write_checkpoint)  # the epoch is saved before any stop
        done, elapsed = int(metrics["epoch"]) + 1, time.perf_counter() - self.started
        if self.max_minutes and elapsed > 60 * self.max_minutes and done < self.epochs:
            raise _OutOfTime(f"stopping after epoch {done}: over --max-minutes {self.max_minutes:g}")


def train(data_uri: str, out: Path, args: argparse.Namespace) -> tuple[Path, float]:
    """The small preset, single process (no data-loader workers): ``msa.engine.fit`` on
    ``plan_splits(manifest, cfg.train.val_fraction)`` with epoch checkpoints in ``out``.

    Returns the checkpoint with the best validation mR and the training seconds. Training starts
    fresh: epoch checkpoints an earlier run left in ``out`` are removed first (else fit would resume).
    """
    import shutil

    from msa.config import resolve_config
    from msa.data import plan_splits
    from msa.engine import LocalCheckpoints, fit
    from shards.manifest import read_manifest

    cfg = resolve_config("small", [f"train.epochs={args.epochs}", "train.loader_workers=0", *args.set])
    manifest = read_manifest(data_uri)
    plan = plan_splits(manifest, cfg.train.val_fraction)
    for stale in out.glob("epoch-*"):
        shutil.rmtree(stale)
    checkpoints = LocalCheckpoints(out, keep=1)
    started = time.perf_counter()
    try:
        fit(cfg, plan, sink=_TimeLimit(checkpoints, args.max_minutes, cfg.train.epochs),
            dataset_digest=manifest.digest, device="cpu")
    except _OutOfTime as stop:
        print(f"  {stop}", flush=True)
    seconds = time.perf_counter() - started
    best, metrics = checkpoints.best()
    print(f"  best epoch {int(metrics['epoch']) + 1} by val mR ({metrics['val_mR']:.2f}): {best}", flush=True)
    return best, seconds


def split_scores(index: Index, model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = index.tensors(model.device)
    sims = t["image_emb"] @ t["text_emb"].T
    return sims, mscmat_matrix(index, model), t["caption_image"]


def query_hits(sims: torch.Tensor, ci: torch.Tensor, dim: int, ks=(1, 5, 10)) -> torch.Tensor:
    """Per-query hit indicators [len(ks), n_queries] with recall_at_k's rank rule (strictly better count):
    dim=1 image queries over caption rows, dim=0 caption queries over image columns."""
    own = sims[ci, torch.arange(sims.shape[1])]
    if dim == 1:
        best = sims.new_full((sims.shape[0],), float("-inf")).scatter_reduce(0, ci, own, reduce="amax")
        rank = (sims > best[:, None]).sum(1)
    else:
        rank = (sims > own[None, :]).sum(0)
    return torch.stack([(rank < k).double() for k in ks])


def bootstrap_delta(base: tuple, new: tuple, ci: torch.Tensor, n_images: int, draws: int = 2000) -> tuple:
    """Paired bootstrap over images (captions follow their image) of the mR difference new - base:
    returns (2.5th, 97.5th percentile, fraction of draws where new > base)."""
    g = torch.Generator().manual_seed(0)
    counts = torch.stack([torch.bincount(torch.randint(n_images, (n_images,), generator=g), minlength=n_images)
                          for _ in range(draws)]).double()  # [draws, N]
    weights = counts[:, ci]  # [draws, M] caption weights

    def mr(hits: tuple) -> torch.Tensor:
        i2t, t2i = hits
        r_i2t = counts @ i2t.T / n_images  # [draws, 3]
        r_t2i = weights @ t2i.T / weights.sum(1, keepdim=True)
        return 100.0 * torch.cat([r_i2t, r_t2i], 1).mean(1)

    delta = mr(new) - mr(base)
    low, high = torch.quantile(delta, torch.tensor([0.025, 0.975], dtype=delta.dtype)).tolist()
    return low, high, float((delta > 0).double().mean())


def evaluate(sims, ms, ci, tops, lam) -> dict[str, dict[str, float]]:
    rows = {"cosine": recall_at_k(sims, ci)}
    for top in tops:
        rows[f"mscmat top{top}"] = reranked_recall(sims, ms, ci, top)
        rows[f"cos+{lam:g}*mscmat top{top}"] = reranked_recall(sims, sims + lam * ms, ci, top)
    rows["mscmat all (ref.)"] = recall_at_k(ms, ci)
    return rows


def print_table(rows: dict[str, dict[str, float]], title: str) -> None:
    base = rows["cosine"]["mR"]
    print(f"\n{title}")
    print(f"  {'ranking':<24}" + "".join(f"{k:>9}" for k in KEYS) + f"{'mR ratio':>10}")
    for name, r in rows.items():
        ratio = r["mR"] / base if base else float("nan")
        print(f"  {name:<24}" + "".join(f"{r[k]:9.2f}" for k in KEYS) + f"{ratio:10.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="evaluate this checkpoint dir instead of training one (e.g. from "
                        ".msa/ray_results/...); without --data: the demo shards if it was trained on them, else a "
                        "corpus generated with seed --seed + 1")
    parser.add_argument("--data", help="shard set with val (else train) and test splits; default: generate one")
    parser.add_argument("--images", type=_counts, default=(300, 100, 100), metavar="TRAIN,VAL,TEST",
                        help="synthetic corpus size (default 300,100,100)")
    parser.add_argument("--image-size", type=int, default=64, help="synthetic image size in px (default 64)")
    parser.add_argument("--difficulty", default="easy", help="synthetic corpus difficulty (default easy)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    parser.add_argument("--max-minutes", type=float, default=5.0,
                        help="stop training after the epoch that passes this many minutes (0: no limit); the best "
                        "epoch so far by val mR is used")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--tops", default="10,20", help="re-rank depths R (default 10,20)")
    parser.add_argument("--lambdas", default="0.25,0.5,1,2,4,8", help="blend weights tried on val")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--work", help="working directory (default: a temp dir, removed)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tops = [int(t) for t in args.tops.split(",")]
    lambdas = [float(x) for x in args.lambdas.split(",")]

    with tempfile.TemporaryDirectory(prefix="msa-rerank-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_seconds = None
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
            model = resolve_model(checkpoint, device="cpu")
            data_uri = args.data or held_out_data(model, work, args)
        else:
            data_uri = args.data or make_shards(work, args.images, args.image_size, args.difficulty, args.seed)
            print("training the small preset in-process (1 process, no Ray):", flush=True)
            checkpoint, train_seconds = train(data_uri, work / "checkpoints", args)
            print(f"trained in {train_seconds:.0f} s on {torch.get_num_threads()} thread(s)", flush=True)
            model = resolve_model(checkpoint, device="cpu")
        from shards.manifest import read_manifest

        splits = read_manifest(data_uri).splits
        val_split = "val" if "val" in splits and splits["val"].images else "train"
        started = time.perf_counter()
        indexes = {s: Index.load(build_index(model, data_uri, work / f"index-{s}", split=s))
                   for s in (val_split, "test")}
        scores = {s: split_scores(ix, model) for s, ix in indexes.items()}
        print(f"indexed {val_split} and test and scored every MSCMAT pair in {time.perf_counter() - started:.1f} s")

        # The protocol check: re-ranking with the cosine itself must reproduce cosine-only recall exactly.
        for name, (sims, _, ci) in scores.items():
            base = recall_at_k(sims, ci)
            for top in tops + [sims.shape[0], sims.shape[1]]:
                same = reranked_recall(sims, sims, ci, top)
                if same != base:
                    raise AssertionError(f"identity re-rank top{top} on {name} changed recall: {same} vs {base}")
        print("identity re-rank check: recall equals cosine-only recall exactly (all R) - OK")

        sims, ms, ci = scores[val_split]
        val_mr = {lam: sum(reranked_recall(sims, sims + lam * ms, ci, t)["mR"] for t in tops) / len(tops)
                  for lam in lambdas}
        best = max(val_mr, key=val_mr.get)
        print(f"blend weight on {val_split}: " + ", ".join(f"{lam:g}: mR {v:.2f}" for lam, v in val_mr.items())
              + f"  -> lambda = {best:g}")

        results = {}
        for split in (val_split, "test"):
            sims, ms, ci = scores[split]
            n_img, n_cap = sims.shape
            rows = evaluate(sims, ms, ci, tops, best)
            rows["chance"] = chance_recall(ci, n_images=n_img)
            results[split] = rows
            print_table(rows, f"{split} split: {n_img} images, {n_cap} captions (recall %, mR ratio vs cosine)")

        test = results["test"]
        sims, ms, ci = scores["test"]
        n_img = sims.shape[0]
        base_hits = (query_hits(sims, ci, 1), query_hits(sims, ci, 0))
        per_query = [100 * v for hits in base_hits for v in hits.mean(1).tolist()]
        if max(abs(a - test["cosine"][k]) for a, k in zip(per_query, KEYS[:6])) > 1e-9:
            raise AssertionError("per-query hits disagree with recall_at_k")
        print(f"\nre-ranking vs cosine on test (mR difference, 95% paired bootstrap CI over the {n_img} images):")
        for top in tops:
            for name, rescored in ((f"mscmat top{top}", ms), (f"cos+{best:g}*mscmat top{top}", sims + best * ms)):
                hits = (query_hits(rerank_similarities(sims, rescored, top, 1), ci, 1),
                        query_hits(rerank_similarities(sims, rescored, top, 0), ci, 0))
                delta = test[name]["mR"] - test["cosine"]["mR"]
                low, high, p_better = bootstrap_delta(base_hits, hits, ci, n_img)
                verdict = ("helps" if low > 0 else "hurts" if high < 0 else "no significant change")
                test[name]["delta_mR_ci95"] = [low, high]
                print(f"  {name:<24} mR {delta:+6.2f}  CI [{low:+.2f}, {high:+.2f}]  better in {100 * p_better:3.0f}% "
                      f"of draws -> {verdict}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "train_seconds": train_seconds, "checkpoint": str(checkpoint), "data": data_uri,
                "blend_lambda": best, "val_blend_mR": val_mr, "results": results,
            }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
