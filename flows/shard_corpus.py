"""Prefect flow ``shard-corpus``: write a corpus as WebDataset shards, then verify them.

Thin wrapper over :func:`shards.writer.write_shards` and :func:`shards.manifest.verify_shards`;
tasks exchange plain strings. The write task is retried (twice) only for transient storage errors
(:class:`shards.storage.TransientStorageError`); input errors and other storage errors fail at once.
A retry is cheap: ``write_shards`` is idempotent and an interrupted write leaves no manifest. A
changed corpus rewrites only the shards whose samples changed; the others are kept. With
``ray_address`` the images are checked and the shards written as Ray tasks (same output).

``msa shard`` runs the same writer and verification from the command line.

Set ``PREFECT_LOGGING_EXTRA_LOGGERS=shards`` to see the shard writer's warnings in the run logs.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows import artifacts
from shards.manifest import read_manifest, verify_shards
from shards.storage import TransientStorageError, endpoint_options
from shards.writer import write_shards


def retry_transient_only(task, task_run, state) -> bool:
    """``retry_condition_fn``: retry when the task failed with a TransientStorageError."""
    try:
        state.result()
    except TransientStorageError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


@task(name="write-shards", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient_only)
def write_shards_task(annotations: str, images: str, out: str, corpus: str | None, on_error: str,
                      shard_size: int, resize: int | None, workers: int, endpoint_url: str | None,
                      ray_address: str | None = None) -> dict:
    """Write (or find up to date) the shard set; returns its URI and the shards rewritten and reused."""
    m = write_shards(annotations, images, out, corpus=corpus, on_error=on_error, shard_size=shard_size,
                     resize=resize, workers=workers, storage_options=endpoint_options(endpoint_url),
                     progress=False, ray_address=ray_address)
    rewritten, reused = m.write_counts
    logger = get_run_logger()
    logger.info("%s %s: digest %s, %d shards rewritten, %d reused, %d quarantined", m.uri,
                "up to date" if m.reused else "written", m.short_digest, rewritten, reused, len(m.quarantine))
    for q in m.quarantine:
        logger.warning("quarantined %s: %s", q.source, q.reason)
    return {"uri": m.uri, "shards_rewritten": rewritten, "shards_reused": reused}


@task(name="verify-shards", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient_only)
def verify_shards_task(uri: str, endpoint_url: str | None) -> dict:
    """Re-hash every shard; raise if any is missing, corrupt or extra. Returns the set's summary."""
    opts = endpoint_options(endpoint_url)
    rep = verify_shards(uri, opts)
    if not rep.ok:
        raise RuntimeError(f"{uri}: shard verification failed: " + "; ".join(rep.problems[:20]))
    m = read_manifest(uri, opts)
    return {
        "uri": m.uri,
        "manifest_uri": m.manifest_uri,
        "digest": m.digest,
        "short_digest": m.short_digest,
        "corpus": m.corpus,
        "counts": {split: {"images": s.images, "captions": s.captions, "shards": len(s.shards)}
                   for split, s in m.splits.items()},
        "quarantined": len(m.quarantine),
        "quarantine": [{"source": q.source, "reason": q.reason} for q in m.quarantine],
    }


@flow(name="shard-corpus")
def shard_corpus(annotations: str, images: str, out: str, corpus: str | None = None, on_error: str = "fail",
                 shard_size: int = 1000, resize: int | None = None, workers: int = 1,
                 endpoint_url: str | None = None, ray_address: str | None = None) -> dict:
    """Shard ``annotations``/``images`` into ``out`` (local path or s3://bucket/prefix) and verify.

    ``ray_address``: None checks and writes in this process (``workers`` processes); otherwise as
    Ray tasks on that cluster ("local": one started for the run, "auto": the running one, or its
    address), instead of ``workers``.

    Returns {"uri", "manifest_uri", "digest", "short_digest", "corpus", "counts", "quarantined", "quarantine",
    "shards_rewritten", "shards_reused"} and publishes the split counts and the quarantine report as
    artifacts (flows.artifacts)."""
    written = write_shards_task(annotations, images, out, corpus, on_error, shard_size, resize, workers, endpoint_url,
                                ray_address)
    summary = verify_shards_task(written["uri"], endpoint_url)
    artifacts.publish_shard_report(summary)
    return {**summary, "shards_rewritten": written["shards_rewritten"], "shards_reused": written["shards_reused"]}

