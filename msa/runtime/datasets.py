"""Shard sets as the runtime sees them: verified before use, and the synthetic demo set made on demand.

The demo set is one fixed recipe (images per split, shard size, seed), so every flow that makes it
produces the same bytes and the same dataset digest, whichever runs first.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from msa.paths import DEMO_CORPUS_DIR, DEMO_SHARDS_URI
from shards.manifest import manifest_exists, read_manifest, verify_shards

DEMO_IMAGES = {"train": 300, "val": 100, "test": 100}
DEMO_SHARD_SIZE = 50
DEMO_SEED = 0


def absolute_uri(data_uri: str) -> str:
    """Local shard paths made absolute (Ray Tune runs each trial in its own working directory, so a
    relative path would name nothing there); remote URIs unchanged; a mix keeps its names and weights."""
    from pathlib import Path

    from shards.storage import is_remote

    def absolute(uri: str) -> str:
        return uri if is_remote(uri) else str(Path(uri.removeprefix("file://")).expanduser().resolve())

    mix = DataMix.parse(data_uri)
    return str(DataMix(tuple(Corpus(c.name, absolute(c.uri), c.weight) for c in mix.corpora)))


_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass(frozen=True)
class Corpus:
    """One shard set of a ``DataMix``: its name (a metric prefix), URI and sampling weight."""

    name: str
    uri: str
    weight: float = 1.0


@dataclass(frozen=True)
class DataMix:
    """What a ``data_uri`` names: one shard set, or several trained as one stream (joint training).

    Written ``URI`` (one shard set, as everywhere) or ``NAME=URI[@WEIGHT],NAME=URI[@WEIGHT],...``. A weight
    scales its corpus's share of each epoch relative to its size: all 1 (the default) is plain
    concatenation, each pair seen about once per epoch; 2 samples that corpus twice as often. Validation
    and test recall are computed per corpus (metrics ``<kind>_<NAME>_<key>``) and the unprefixed metrics
    are their mean, which selects checkpoints and decides promotions. A mix's digest hashes its members'
    manifest digests with names and weights, so it names the training data as a shard set's digest does.
    """

    corpora: tuple[Corpus, ...]

    @classmethod
    def parse(cls, data_uri: str) -> DataMix:
        text = data_uri.strip()
        if "=" not in text.split(",", 1)[0].split("://", 1)[0]:
            return cls((Corpus("", text),))
        corpora = []
        for part in text.split(","):
            name, sep, rest = part.strip().partition("=")
            if not sep or not _NAME.fullmatch(name):
                raise ValueError(f"data {data_uri!r}: {part!r} is not NAME=URI[@WEIGHT] with NAME in [a-z0-9-], "
                                 "starting with a letter")
            uri, weight = rest, 1.0
            head, at, tail = rest.rpartition("@")
            if at and re.fullmatch(r"[0-9.eE+-]+", tail):
                uri, weight = head, float(tail)
                if not weight > 0:
                    raise ValueError(f"data {data_uri!r}: weight of {name!r} must be > 0, got {tail}")
            if not uri:
                raise ValueError(f"data {data_uri!r}: {name!r} has no URI")
            corpora.append(Corpus(name, uri, weight))
        names = [c.name for c in corpora]
        if len(set(names)) != len(names):
            raise ValueError(f"data {data_uri!r}: corpus names must be unique, got {names}")
        return cls(tuple(corpora))

    def __str__(self) -> str:
        if not self.joint:
            return self.corpora[0].uri
        return ",".join(f"{c.name}={c.uri}@{c.weight:g}" for c in self.corpora)

    @property
    def joint(self) -> bool:
        return bool(self.corpora[0].name)

    def digest(self, digests: list[str]) -> str:
        """The mix's dataset digest from its members' manifest digests (a single shard set keeps its own)."""
        if not self.joint:
            return digests[0]
        lines = "".join(f"{c.name}={d}@{c.weight!r}\n" for c, d in zip(self.corpora, digests))
        return hashlib.sha256(("msa-joint-v1\n" + lines).encode()).hexdigest()


def verify_dataset(data_uri: str, storage_options: dict | None = None) -> str:
    """Re-hash every shard of every shard set ``data_uri`` names; the dataset digest when all is well."""
    mix, digests = DataMix.parse(data_uri), []
    for corpus in mix.corpora:
        report = verify_shards(corpus.uri, storage_options)
        if not report.ok:
            raise ValueError(f"shard set {corpus.uri} failed verification: " + "; ".join(report.problems))
        digests.append(read_manifest(corpus.uri, storage_options).digest)
    return mix.digest(digests)


def demo_annotations(image_size: int, images: dict[str, int] | None = None) -> str:
    """The synthetic demo corpus's annotation file, generated when absent."""
    from shards.synth import generate_corpus

    path = DEMO_CORPUS_DIR / "dataset_synth.json"
    if not path.exists():
        path = generate_corpus(DEMO_CORPUS_DIR, splits=images or DEMO_IMAGES, image_size=image_size, seed=DEMO_SEED)
    return str(path)


def ensure_shards(data_uri: str, image_size: int, storage_options: dict | None = None,
                  demo_images: dict[str, int] | None = None) -> bool:
    """True when every shard set exists; the demo location is filled on first use, any other must exist."""
    existed = True
    for corpus in DataMix.parse(data_uri).corpora:
        if manifest_exists(corpus.uri, storage_options):
            continue
        if corpus.uri != DEMO_SHARDS_URI:
            raise FileNotFoundError(f"{corpus.uri}: no manifest.json; shard the corpus first "
                                    "(msa shard / shard-corpus)")
        from shards.writer import write_shards

        write_shards(demo_annotations(image_size, demo_images), DEMO_CORPUS_DIR / "images", corpus.uri,
                     corpus="synth", shard_size=DEMO_SHARD_SIZE, progress=False)
        existed = False
    return existed
