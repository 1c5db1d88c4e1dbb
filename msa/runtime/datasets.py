"""Shard sets as the runtime sees them: verified before use, and the synthetic demo set made on demand.

The demo set is one fixed recipe (images per split, shard size, seed), so every flow that makes it
produces the same bytes and the same dataset digest, whichever runs first.
"""

from __future__ import annotations

from msa.paths import DEMO_CORPUS_DIR, DEMO_SHARDS_URI
from shards.manifest import manifest_exists, read_manifest, verify_shards

DEMO_IMAGES = {"train": 300, "val": 100, "test": 100}
DEMO_SHARD_SIZE = 50
DEMO_SEED = 0


def absolute_uri(data_uri: str) -> str:
    """A local shard path made absolute (Ray Tune runs each trial in its own working directory, so a
    relative path would name nothing there); remote URIs unchanged."""
    from pathlib import Path

    from shards.storage import is_remote

    if is_remote(data_uri):
        return data_uri
    return str(Path(data_uri.removeprefix("file://")).expanduser().resolve())


def verify_dataset(data_uri: str, storage_options: dict | None = None) -> str:
    """Re-hash every shard against the manifest; the dataset digest when all is well."""
    report = verify_shards(data_uri, storage_options)
    if not report.ok:
        raise ValueError(f"shard set {data_uri} failed verification: " + "; ".join(report.problems))
    return read_manifest(data_uri, storage_options).digest


def demo_annotations(image_size: int, images: dict[str, int] | None = None) -> str:
    """The synthetic demo corpus's annotation file, generated when absent."""
    from shards.synth import generate_corpus

    path = DEMO_CORPUS_DIR / "dataset_synth.json"
    if not path.exists():
        path = generate_corpus(DEMO_CORPUS_DIR, splits=images or DEMO_IMAGES, image_size=image_size, seed=DEMO_SEED)
    return str(path)


def ensure_shards(data_uri: str, image_size: int, storage_options: dict | None = None,
                  demo_images: dict[str, int] | None = None) -> bool:
    """True when the shard set exists; the demo location is filled on first use, any other must exist."""
    if manifest_exists(data_uri, storage_options):
        return True
    if data_uri != DEMO_SHARDS_URI:
        raise FileNotFoundError(f"{data_uri}: no manifest.json; shard the corpus first (msa shard / shard-corpus)")
    from shards.writer import write_shards

    write_shards(demo_annotations(image_size, demo_images), DEMO_CORPUS_DIR / "images", data_uri, corpus="synth",
                 shard_size=DEMO_SHARD_SIZE, progress=False)
    return False
