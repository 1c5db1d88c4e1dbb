"""Generic reader: JSONL, a JSON list, CSV or TSV of records sharing one set of field names."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from .corpora import _check_counts, _count_split, detect_corpus
from .jsonstream import JSONStream, OnRead, first_char, open_text
from .records import _JSON, InputError, Listing, _Builder, json_error, read_error

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


def _jsonl_records(lines: Iterable[str], name: str, b: _Builder) -> Iterator[tuple[str, object]]:
    """(where, record) for each non-blank line, parsed as it is reached (invalid ones become problems)."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            yield where, _JSON.decode(line)
        except json.JSONDecodeError as exc:
            b.problem(where, f"invalid JSON: {exc.msg} (column {exc.colno})")


def read_generic(path: str | Path, images_dir: str | Path, corpus: str | None = None, *,
                 on_read: OnRead | None = None) -> Listing:
    """Read a generic JSONL, JSON-list, CSV or TSV annotation file (see module docstring). The file is
    read a line (JSONL, CSV) or a record (JSON list) at a time."""
    path = Path(path)
    name, spec = detect_corpus(path, None, corpus)
    listing = Listing(name, path.name, "", spec=spec)
    b = _Builder(listing, Path(images_dir).resolve(), spec.captions_per_image if spec else None)
    suffix = path.suffix.lower()
    split_counts: dict[str, int] = {}
    try:
        text, hashing = open_text(path, on_read)
        with text:
            if suffix in (".csv", ".tsv"):
                _read_csv(text, path.name, b, split_counts)
            else:
                listed = suffix == ".json" or (suffix != ".jsonl" and first_char(path) == "[")
                _read_json_records(text, path.name, listed, b, split_counts)
    except OSError as exc:
        raise read_error(path, exc) from exc
    listing.annotations_sha256 = hashing.sha256.hexdigest()
    _check_counts(listing, len(listing.samples) + len(listing.problems), split_counts)
    return listing


def _read_json_records(text, name: str, listed: bool, b: _Builder, split_counts: dict[str, int]) -> None:
    """JSONL (a record a line; a bad line is a problem) or a JSON list (invalid JSON is fatal)."""
    if listed:
        doc = JSONStream(text, _JSON)
        if doc.peek() != "[":
            raise InputError(f"{name}: expected a JSON list of records or a Karpathy 'images' object")
        records = ((f"{name} record {i}", r) for i, r in enumerate(doc.elements()))
    else:
        records = _jsonl_records(text, name, b)
    try:
        for where, rec in records:
            if not isinstance(rec, dict):
                b.problem(where, f"record is not an object ({type(rec).__name__})")
                continue
            fname, caps, split, image_id = _record_fields(rec)
            _count_split(split_counts, split)
            b.add(where, fname, split, caps, image_id)
        if listed:
            doc.end()
    except json.JSONDecodeError as exc:
        raise json_error(name, exc) from exc


def _read_csv(text, name: str, b: _Builder, split_counts: dict[str, int]) -> None:
    """CSV/TSV rows; rows naming the same image are merged in file order."""
    reader = csv.DictReader(text, delimiter="\t" if name.lower().endswith(".tsv") else ",")
    cols = reader.fieldnames or []
    if not any(c in cols for c in _IMAGE_FIELDS):
        raise InputError(f"{name}: no image column (one of {', '.join(_IMAGE_FIELDS)}) in header {cols}")
    if "captions" not in cols and not any(c in cols for c in _CAPTION_FIELDS):
        raise InputError(f"{name}: no caption column (captions or one of {', '.join(_CAPTION_FIELDS)})")
    groups: dict[object, dict] = {}
    first_line = reader.line_num + 1  # a row's own: a quoted field may span lines
    for row in reader:
        where = f"{name} line {first_line}"
        first_line = reader.line_num + 1
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
            _count_split(split_counts, split)
        elif g["split"] != split:
            b.problem(str(key), f"listed in split {g['split']!r} ({g['where']}) and {split!r} ({where})")
            g["conflict"] = True
        elif isinstance(g["caps"], list) and isinstance(caps, list):
            g["caps"].extend(caps)
    for g in groups.values():  # in first-listed order
        if not g.get("conflict"):
            b.add(g["where"], g["fname"], g["split"], g["caps"], g["image_id"])
