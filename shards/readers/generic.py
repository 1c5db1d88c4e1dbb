"""Generic reader: JSONL, a JSON list, CSV or TSV of records sharing one set of field names."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .corpora import _check_counts, _count_split, detect_corpus
from .jsonstream import JSONStream, OnRead, _HashingReader, first_char, open_text
from .records import _JSON, Checked, InputError, Listing, Problem, Sample, _Builder, json_error, read_error

MapTasks = Callable[[Callable, Iterable], Iterable]  # fn over items elsewhere (processes, a cluster), results in order
TaskRunner = Callable[[], MapTasks]  # called once a file is to be read in tasks (it may start a cluster)
_PART_BYTES = 1 << 21  # a JSONL file's share a task reads: whole lines, about this many bytes
# Smaller files are read here: the workers are still starting (a spawned process imports for about 0.3 s), and
# reading 20,000 records here while they start beat waiting for them (1.12-1.18 s against 1.19-1.22 s in all).
_TASKS_MIN_BYTES = 8 * _PART_BYTES

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


def _jsonl_records(lines: Iterable[str], name: str, b: _Builder, first_line: int = 1) -> Iterator[tuple[str, object]]:
    """(where, record) for each non-blank line, parsed as it is reached (invalid ones become problems)."""
    for lineno, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            yield where, _JSON.decode(line)
        except json.JSONDecodeError as exc:
            b.problem(where, f"invalid JSON: {exc.msg} (column {exc.colno})")


def _record(where: str, rec: object, b: _Builder, split_counts: dict[str, int]) -> Checked | None:
    """One JSON record checked on its own (:meth:`_Builder.check`), its split counted."""
    if not isinstance(rec, dict):
        b.problem(where, f"record is not an object ({type(rec).__name__})")
        return None
    fname, caps, split, image_id = _record_fields(rec)
    _count_split(split_counts, split)
    return b.check(where, fname, split, caps, image_id)


@dataclass(frozen=True)
class JSONLPart:
    """A task's share of a JSONL file: whole lines, the first of them line ``first_line``."""

    name: str  # the file's name, as problems cite it
    corpus: str
    images_dir: str  # resolved
    first_line: int
    data: bytes
    at_start: bool  # the file's first bytes (a BOM there is dropped)


@dataclass(frozen=True)
class PartRecords:
    """What a part's task found, in file order once merged (:meth:`events`). Samples travel as one
    list per field: the driver rebuilds them in a third of the time unpickling Sample objects takes."""

    fields: tuple[list, ...]  # Sample's fields, one list each, for the records that passed
    wheres: list[str]
    rels: list[str]
    blanks: list[int]
    problems: list[tuple[int, Problem]]  # each with how many passed records precede it
    split_counts: dict[str, int]

    def events(self) -> Iterator[Problem | Checked]:
        problems = iter(self.problems)
        after, problem = next(problems, (None, None))
        for i, (where, rel, blank, sample) in enumerate(zip(self.wheres, self.rels, self.blanks,
                                                           map(Sample, *self.fields))):
            while after == i:
                yield problem
                after, problem = next(problems, (None, None))
            yield Checked(where, rel, blank, sample)
        while problem is not None:
            yield problem
            after, problem = next(problems, (None, None))


def read_jsonl_part(part: JSONLPart) -> PartRecords:
    """A task: check the records of one part of a JSONL file on their own, as the serial reader
    does (the duplicate checks, which need every earlier record, stay with the caller)."""
    b = _Builder(Listing(part.corpus, part.name, ""), Path(part.images_dir), None)
    lines = io.TextIOWrapper(io.BytesIO(part.data), encoding="utf-8-sig" if part.at_start else "utf-8",
                             errors="surrogateescape", newline="")
    checked: list[Checked] = []
    problems: list[tuple[int, Problem]] = []
    found = b.listing.problems
    split_counts: dict[str, int] = {}
    for where, rec in _jsonl_records(lines, part.name, b, part.first_line):
        c = _record(where, rec, b, split_counts)
        problems += ((len(checked), p) for p in found[len(problems):])  # an invalid line's, then this record's
        if c is not None:
            checked.append(c)
    problems += ((len(checked), p) for p in found[len(problems):])
    samples = [c.sample for c in checked]
    return PartRecords(tuple([getattr(s, f) for s in samples] for f in Sample.__slots__), [c.where for c in checked],
                       [c.rel for c in checked], [c.blank for c in checked], problems, split_counts)


def _jsonl_parts(hashing: _HashingReader, name: str, corpus: str, images_dir: str) -> Iterator[JSONLPart]:
    """The file cut after a line end every ``_PART_BYTES`` or so, each part numbered by its first
    line (line ends as the serial reader counts them: LF, CR LF or a lone CR)."""
    tail, line, at_start = b"", 1, True
    while block := hashing.read(_PART_BYTES):
        data = tail + block
        cut = data.rfind(b"\n") + 1
        if not cut:  # no line end yet: one line longer than a part
            tail = data
            continue
        part, tail = data[:cut], data[cut:]
        yield JSONLPart(name, corpus, images_dir, line, part, at_start)
        line += part.count(b"\n") + (part.count(b"\r") - part.count(b"\r\n") if b"\r" in part else 0)
        at_start = False
    if tail:
        yield JSONLPart(name, corpus, images_dir, line, tail, at_start)


def read_generic(path: str | Path, images_dir: str | Path, corpus: str | None = None, *,
                 on_read: OnRead | None = None, tasks: TaskRunner | None = None) -> Listing:
    """Read a generic JSONL, JSON-list, CSV or TSV annotation file (see module docstring). The file is
    read a line (JSONL, CSV) or a record (JSON list) at a time. With ``tasks``, the records of a JSONL
    file of ``_TASKS_MIN_BYTES`` or more are checked in tasks, a part of the file each
    (:func:`read_jsonl_part`), and the result is the same: the caller only reads and hashes the file and
    checks for duplicates."""
    path = Path(path)
    name, spec = detect_corpus(path, None, corpus)
    listing = Listing(name, path.name, "", spec=spec)
    b = _Builder(listing, Path(images_dir).resolve(), spec.captions_per_image if spec else None)
    suffix = path.suffix.lower()
    split_counts: dict[str, int] = {}
    try:
        if suffix in (".csv", ".tsv"):
            text, hashing = open_text(path, on_read)
            with text:
                _read_csv(text, path.name, b, split_counts)
        elif ((listed := suffix == ".json" or (suffix != ".jsonl" and first_char(path) == "[")) or tasks is None
              or path.stat().st_size < _TASKS_MIN_BYTES):
            text, hashing = open_text(path, on_read)
            with text:
                _read_json_records(text, path.name, listed, b, split_counts)
        else:
            with _HashingReader(open(path, "rb"), on_read) as hashing:  # noqa: SIM115 -- closed by the with
                for part in tasks()(read_jsonl_part, _jsonl_parts(hashing, path.name, name, b.images_dir)):
                    for event in part.events():
                        if isinstance(event, Problem):
                            listing.problems.append(event)
                        else:
                            b.accept(event)
                    for split, n in part.split_counts.items():
                        split_counts[split] = split_counts.get(split, 0) + n
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
            if (checked := _record(where, rec, b, split_counts)) is not None:
                b.accept(checked)
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
