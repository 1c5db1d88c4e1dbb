"""Karpathy-layout JSON reader (RSICD, RSITMD, UCM, Sydney and ``shards.synth`` annotations)."""

from __future__ import annotations

import json
from pathlib import Path

from .corpora import _check_counts, _count_split, detect_corpus
from .jsonstream import JSONStream, OnRead, open_text
from .records import _JSON, InputError, Listing, _Builder, json_error, read_error


def _fields(rec) -> tuple | str:
    """What a record contributes: (filename, split, captions, imgid), or the type name of a record
    that is not an object. Its dicts are dropped as soon as it is parsed."""
    if not isinstance(rec, dict):
        return type(rec).__name__
    sentences = rec.get("sentences")
    captions = [s.get("raw") if isinstance(s, dict) else s for s in sentences] if isinstance(sentences, list) else None
    return rec.get("filename"), rec.get("split"), captions, rec.get("imgid")


def read_karpathy(path: str | Path, images_dir: str | Path, corpus: str | None = None, *,
                  on_read: OnRead | None = None) -> Listing:
    """Read a Karpathy-layout JSON (RSICD, RSITMD, UCM, Sydney, synth).

    The ``images`` list is parsed a record at a time and only each record's fields are kept: the
    document is never held whole. Samples are built once the whole file is read, since the corpus
    name (in every sample key) may come from a ``dataset`` field after the list, as in RSICD's."""
    path = Path(path)
    records: list[tuple | str | None] = []
    top: dict = {}  # the top-level object, with ``records`` as its images
    try:
        text, hashing = open_text(path, on_read)
        with text:
            doc = JSONStream(text, _JSON)
            if doc.peek() == "{":  # anything else is not Karpathy-layout (below)
                for key in doc.keys():
                    if key == "images" and doc.peek() == "[":
                        records.clear()  # a repeated key: the last one counts, as for json.loads
                        top[key] = records
                        records.extend(_fields(rec) for rec in doc.elements())
                    else:
                        top[key] = doc.value()
                doc.end()
    except json.JSONDecodeError as exc:
        raise json_error(path.name, exc) from exc
    except OSError as exc:
        raise read_error(path, exc) from exc
    if top.get("images") is not records:
        raise InputError(f"{path.name}: not a Karpathy-layout file (expected an object with an 'images' list)")
    name, spec = detect_corpus(path, top, corpus)
    listing = Listing(name, path.name, hashing.sha256.hexdigest(), spec=spec)
    b = _Builder(listing, Path(images_dir).resolve(), spec.captions_per_image if spec else None)
    split_counts: dict[str, int] = {}
    for i, fields in enumerate(records):
        records[i] = None  # freed as its sample is built
        where = f"{path.name} record {i}"
        if isinstance(fields, str):
            b.problem(where, f"record is not an object ({fields})")
            continue
        filename, split, captions, image_id = fields
        _count_split(split_counts, split)
        b.add(where, filename, split, captions, image_id)
    _check_counts(listing, len(records), split_counts)
    return listing
