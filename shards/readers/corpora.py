"""Known corpora (RSICD, RSITMD, UCM, Sydney): recognising them and checking their published sizes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .records import Listing, corpus_slug


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    files: tuple[str, ...]
    aliases: tuple[str, ...]
    splits: dict  # split -> images
    captions_per_image: int
    image_size: int
    ext: str

    @property
    def images(self) -> int:
        return sum(self.splits.values())


KNOWN_CORPORA: dict[str, CorpusSpec] = {
    "rsicd": CorpusSpec("rsicd", ("dataset_rsicd.json",), ("rsicd",),
                        {"train": 8734, "val": 1094, "test": 1093}, 5, 224, "jpg"),
    "rsitmd": CorpusSpec("rsitmd", ("dataset_rsitmd.json",), ("rsitmd",),
                         {"train": 4291, "val": 0, "test": 452}, 5, 256, "tif"),
    "ucm": CorpusSpec("ucm", ("dataset.json",), ("ucm", "ucmcaptions", "ucmerced", "ucmercedcaptions", "uc"),
                      {"train": 1680, "val": 210, "test": 210}, 5, 256, "tif"),
    "sydney": CorpusSpec("sydney", ("dataset.json",), ("sydney", "sydneycaptions"),
                         {"train": 497, "val": 58, "test": 58}, 5, 500, "tif"),
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _alias(name: str | None) -> str | None:
    if not name:
        return None
    n = _norm(name)
    for spec in KNOWN_CORPORA.values():
        if n == spec.name or n in spec.aliases:
            return spec.name
    return None


def detect_corpus(path: str | Path, data: dict | None = None, corpus: str | None = None) -> tuple[str, CorpusSpec | None]:
    """Corpus name (and spec when known) from, in order: the ``corpus`` argument, the JSON's
    ``dataset`` field, the file name (``dataset_rsicd.json``, ``dataset_RSITMD.json``), and for a
    plain ``dataset.json`` the image count (2,100 -> ucm, 613 -> sydney)."""
    if corpus:
        name = _alias(corpus)
        return (name, KNOWN_CORPORA[name]) if name else (corpus_slug(corpus), None)
    declared = data.get("dataset") if isinstance(data, dict) else None
    name = _alias(declared) if isinstance(declared, str) else None
    if name:
        return name, KNOWN_CORPORA[name]
    fname = Path(path).name.lower()
    for spec in KNOWN_CORPORA.values():
        if fname in spec.files and fname != "dataset.json":
            return spec.name, spec
    images = data.get("images") if isinstance(data, dict) else None
    if fname == "dataset.json" and isinstance(images, list):
        for spec in KNOWN_CORPORA.values():
            if "dataset.json" in spec.files and spec.images == len(images):
                return spec.name, spec
    if isinstance(declared, str) and declared.strip():
        return corpus_slug(declared), None
    stem = Path(path).stem
    stem = stem[len("dataset_"):] if stem.lower().startswith("dataset_") else stem
    return corpus_slug(stem), None


def _count_split(split_counts: dict[str, int], split) -> None:
    """Count a record's split for :func:`_check_counts` (a split that is not text is a problem elsewhere)."""
    if isinstance(split, str):
        split_counts[split] = split_counts.get(split, 0) + 1


def _check_counts(listing: Listing, n_records: int, split_counts: dict[str, int]) -> None:
    spec = listing.spec
    if spec is None:
        return
    src = listing.annotations
    if n_records != spec.images:
        msg = f"{src}: {n_records} images, {spec.name} has {spec.images}"
        other = [s.name for s in KNOWN_CORPORA.values() if s.images == n_records and s.name != spec.name]
        if other:
            msg += (f"; that is the size of {other[0]}: is this a swapped copy "
                    f"(UCM and Sydney copies circulate with their annotations exchanged)?")
        listing.warnings.append(msg)
    for split, want in spec.splits.items():
        got = split_counts.get(split, 0)
        if got != want:
            listing.warnings.append(f"{src}: split {split} has {got} images, {spec.name} has {want}")
    for split in sorted(set(split_counts) - set(spec.splits)):
        listing.warnings.append(f"{src}: unexpected split {split!r} ({split_counts[split]} images) for {spec.name}")
