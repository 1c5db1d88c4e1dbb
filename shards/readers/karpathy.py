"""Karpathy-layout JSON reader (RSICD, RSITMD, UCM, Sydney and ``shards.synth`` annotations)."""

from __future__ import annotations

import json
from pathlib import Path

from .corpora import _check_counts, detect_corpus
from .records import _JSON, InputError, Listing, _Builder, _decode


def read_karpathy(path: str | Path, images_dir: str | Path, corpus: str | None = None) -> Listing:
    """Read a Karpathy-layout JSON (RSICD, RSITMD, UCM, Sydney, synth)."""
    path = Path(path)
    text, sha256 = _decode(path)
    try:
        data = _JSON.decode(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path.name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    del text  # parsed: not held while the samples are built
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path.name}: not a Karpathy-layout file (expected an object with an 'images' list)")
    name, spec = detect_corpus(path, data, corpus)
    listing = Listing(name, path.name, sha256, spec=spec)
    b = _Builder(listing, Path(images_dir).resolve(), spec.captions_per_image if spec else None)
    split_counts: dict[str, int] = {}
    for i, rec in enumerate(data["images"]):
        where = f"{path.name} record {i}"
        if not isinstance(rec, dict):
            b.problem(where, f"record is not an object ({type(rec).__name__})")
            continue
        split = rec.get("split")
        if isinstance(split, str):
            split_counts[split] = split_counts.get(split, 0) + 1
        sentences = rec.get("sentences")
        captions = None
        if isinstance(sentences, list):
            captions = []
            for s in sentences:
                captions.append(s.get("raw") if isinstance(s, dict) else s)
        b.add(where, rec.get("filename"), split, captions, rec.get("imgid"))
    _check_counts(listing, len(data["images"]), split_counts)
    return listing
