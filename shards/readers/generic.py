"""Generic reader: JSONL, a JSON list, CSV or TSV of records sharing one set of field names."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

from .corpora import _check_counts, detect_corpus
from .records import _JSON, InputError, Listing, _Builder, _decode

_IMAGE_FIELDS = ("filename", "image", "path", "filepath", "file", "image_path")
_CAPTION_FIELDS = ("caption", "text", "title", "sentence")


def _record_fields(rec: dict) -> tuple[object, object, object, object]:
    fname = next((rec[k] for k in _IMAGE_FIELDS if k in rec), None)
    caps = rec.get("captions")
    if caps is None:
        caps = rec.get("sentences")
        if isinstance(caps, list):
            caps = [s.get("raw") if isinstance(s, dict) else s for s in caps]
    if caps is None:
        one = next((rec[k] for k in _CAPTION_FIELDS if k in rec), None)
        caps = [one] if one is not None else None
    elif isinstance(caps, str):
        caps = [caps]
    split = rec.get("split", "train")
    image_id = next((rec[k] for k in ("image_id", "imgid", "id") if k in rec), None)
    return fname, caps, split, image_id


def _jsonl_records(lines: list[str], name: str, b: _Builder) -> Iterator[tuple[str, object]]:
    """(where, record) for each non-blank line, parsed as it is reached (invalid ones become problems)."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            yield where, _JSON.decode(line)
        except json.JSONDecodeError as exc:
            b.problem(where, f"invalid JSON: {exc.msg} (column {exc.colno})")


def read_generic(path: str | Path, images_dir: str | Path, corpus: str | None = None) -> Listing:
    """Read a generic JSONL, JSON-list, CSV or TSV annotation file (see module docstring)."""
    path = Path(path)
    text, sha256 = _decode(path)
    name, spec = detect_corpus(path, None, corpus)
    listing = Listing(name, path.name, sha256, spec=spec)
    b = _Builder(listing, Path(images_dir).resolve(), spec.captions_per_image if spec else None)
    suffix = path.suffix.lower()
    split_counts: dict[str, int] = {}

    def count(split):
        if isinstance(split, str):
            split_counts[split] = split_counts.get(split, 0) + 1

    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        cols = reader.fieldnames or []
        if not any(c in cols for c in _IMAGE_FIELDS):
            raise InputError(f"{path.name}: no image column (one of {', '.join(_IMAGE_FIELDS)}) in header {cols}")
        if "captions" not in cols and not any(c in cols for c in _CAPTION_FIELDS):
            raise InputError(f"{path.name}: no caption column (captions or one of {', '.join(_CAPTION_FIELDS)})")
        groups: dict[object, dict] = {}
        order: list[object] = []
        for lineno, row in enumerate(reader, start=2):
            where = f"{path.name} line {lineno}"
            if None in row:  # more fields than header columns
                b.problem(where, "more fields than header columns")
                continue
            fname, caps, split, image_id = _record_fields(row)
            if "captions" in row and isinstance(row["captions"], str) and row["captions"].lstrip().startswith("["):
                try:
                    caps = json.loads(row["captions"])
                except json.JSONDecodeError as exc:
                    b.problem(fname if isinstance(fname, str) and fname else where,
                              f"captions column is not a JSON list ({exc.msg})")
                    continue
            key = fname if isinstance(fname, str) and fname else where
            g = groups.get(key)
            if g is None:
                groups[key] = {"where": where, "fname": fname, "caps": list(caps) if isinstance(caps, list) else caps,
                               "split": split, "image_id": image_id}
                order.append(key)
                count(split)
            else:
                if g["split"] != split:
                    b.problem(str(key), f"listed in split {g['split']!r} ({g['where']}) and {split!r} ({where})")
                    g["conflict"] = True
                    continue
                if isinstance(g["caps"], list) and isinstance(caps, list):
                    g["caps"].extend(caps)
        for key in order:
            g = groups[key]
            if g.get("conflict"):
                continue
            b.add(g["where"], g["fname"], g["split"], g["caps"], g["image_id"])
    else:
        # records are parsed as they are added: a JSONL file's never all live at once
        if suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
            records = _jsonl_records(text.splitlines(), path.name, b)
        else:
            try:
                data = _JSON.decode(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path.name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
            if not isinstance(data, list):
                raise InputError(f"{path.name}: expected a JSON list of records or a Karpathy 'images' object")
            records = ((f"{path.name} record {i}", r) for i, r in enumerate(data))
        del text
        for where, rec in records:
            if not isinstance(rec, dict):
                b.problem(where, f"record is not an object ({type(rec).__name__})")
                continue
            fname, caps, split, image_id = _record_fields(rec)
            count(split)
            b.add(where, fname, split, caps, image_id)
    _check_counts(listing, len(listing.samples) + len(listing.problems), split_counts)
    return listing
