"""What every reader produces (samples, problems, a listing) and the per-record checks they share.

All formats hand their records to :class:`_Builder`, so the bad-input policy and the sample keys
are the same whatever the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .corpora import CorpusSpec

SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")


class InputError(Exception):
    """The corpus (annotations or images) is invalid; ``problems`` lists every finding."""

    def __init__(self, message: str, problems: list[Problem] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


@dataclass(frozen=True)
class Problem:
    """One bad sample or record. ``source`` is the image filename when known, else the annotation
    file with its record/line number."""

    source: str
    reason: str
    split: str | None = None
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"

    def to_dict(self) -> dict:
        return {"source": self.source, "reason": self.reason, "split": self.split, "key": self.key}


_STR = json.encoder.encode_basestring  # how json.dumps(ensure_ascii=False) writes a string (C-accelerated)


def sample_json(corpus: str, filename: str, split: str, captions: list[str], image_id: str | int) -> bytes:
    """A sample's json member: the bytes ``json.dumps(ensure_ascii=False, sort_keys=True,
    separators=(",", ":"))`` writes for its captions, corpus, filename, image_id and split, assembled
    directly (an int as ``json`` writes it, ``int.__repr__``): a third faster, per sample of the corpus."""
    iid = _STR(image_id) if isinstance(image_id, str) else int.__repr__(image_id)
    return (f'{{"captions":[{",".join(map(_STR, captions))}],"corpus":{_STR(corpus)},'
            f'"filename":{_STR(filename)},"image_id":{iid},"split":{_STR(split)}}}').encode()


@dataclass(slots=True)
class Sample:
    """One image with all its captions. The captions are held only inside ``meta``, the json member
    its shard stores: a driver holds every sample of a corpus, and as strings the captions took
    twice the memory of those bytes (the largest share of a sample's). Treated as immutable but not
    frozen: a frozen dataclass sets each field through ``object.__setattr__``, which made building
    one 2.5x slower, and the driver builds one a record (so are ImageInfo and Member)."""

    corpus: str
    key: str
    split: str
    filename: str  # as written in the annotations, relative to the image folder
    image_path: str  # absolute local path
    image_id: str | int
    meta: bytes  # the json member (sample_json)
    caption_count: int

    @classmethod
    def of(cls, corpus: str, key: str, split: str, filename: str, image_path: str, captions: list[str],
           image_id: str | int) -> Sample:
        """A sample of these (checked, stripped) captions, with its json member built from them."""
        return cls(corpus, key, split, filename, image_path, image_id,
                   sample_json(corpus, filename, split, captions, image_id), len(captions))

    @property
    def captions(self) -> tuple[str, ...]:
        """The captions, decoded from ``meta``."""
        return tuple(json.loads(self.meta)["captions"])


class Checked(NamedTuple):
    """A record that passed every check one record alone allows (:meth:`_Builder.check`)."""

    where: str  # the record's place in its file
    rel: str  # its image path, normalised: what a duplicate repeats
    blank: int  # blank captions dropped
    sample: Sample


def corpus_slug(name: str) -> str:
    """A corpus name usable in keys: lower case, [a-z0-9_-] only."""
    slug = _KEY_SAFE.sub("_", name.strip().lower()).strip("_")
    return slug or "corpus"


def sample_key(corpus: str, filename: str) -> str:
    """Stable key from the corpus and the image's relative filename, with no '.' in it.

    ``ucm`` + ``1.tif`` -> ``ucm_1``. When the name needs sanitising (sub-folders, dots, spaces),
    a short hash of the full filename is appended so distinct files never share a key."""
    stem = filename.rsplit(".", 1)[0] if "." in filename.rsplit("/", 1)[-1] else filename
    if _KEY_SAFE.search(stem) is None and stem:
        return f"{corpus}_{stem}"
    digest = hashlib.sha1(filename.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{corpus}_{_KEY_SAFE.sub('_', stem)}-{digest}"


@dataclass
class Listing:
    """What a reader found: the samples, per-sample problems, warnings and the corpus name."""

    corpus: str
    annotations: str  # file name (no directory) of the annotation file
    annotations_sha256: str
    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    spec: CorpusSpec | None = None


# --------------------------------------------------------------------------------------------------
# text helpers


def read_error(path: Path, exc: OSError) -> InputError:
    """The error for an annotation file that cannot be read."""
    return InputError(f"{path}: cannot read annotations: {exc.strerror or exc}")


def json_error(name: str, exc: json.JSONDecodeError) -> InputError:
    """The error for an annotation file that is not valid JSON, at its line and column."""
    return InputError(f"{name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")


_JSON = json.JSONDecoder()  # the readers' decoder (JSONStream calls its raw_decode)


def _bad_text(s: str) -> str | None:
    """None if ``s`` is valid Unicode text, else a description of the bad byte/char."""
    if s.isascii():
        return None
    try:
        s.encode("utf-8")
        return None
    except UnicodeEncodeError as exc:
        ch = s[exc.start]
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            return f"invalid UTF-8 byte 0x{code - 0xDC00:02x}"
        return f"lone surrogate U+{code:04X}"


# --------------------------------------------------------------------------------------------------
# shared record handling


class _Builder:
    def __init__(self, listing: Listing, images_dir: Path, expected_captions: int | None):
        self.listing = listing
        self.images_dir = str(images_dir)
        self.images_prefix = os.path.join(self.images_dir, "")  # + a plain file name: its path
        self.expected_captions = expected_captions
        self.seen_files: dict[str, str] = {}
        self.seen_keys: dict[str, str] = {}
        self.splits: dict[str, str] = {}  # split names already checked, each to the one string its samples share

    def problem(self, source: str, reason: str, split: str | None = None, key: str | None = None):
        self.listing.problems.append(Problem(source, reason, split, key))

    def add(self, where: str, filename, split, captions, image_id) -> None:
        """Validate one record and append a Sample or a Problem. ``where`` names the record."""
        checked = self.check(where, filename, split, captions, image_id)
        if checked is not None:
            self.accept(checked)

    def check(self, where: str, filename, split, captions, image_id) -> Checked | None:
        """What one record alone can tell: its sample, or None after appending its problem. The
        duplicate checks need every earlier record (:meth:`accept`); a task reading part of a file
        runs this half (:mod:`.generic`)."""
        if not isinstance(filename, str) or not filename.strip():
            self.problem(where, "missing or empty image filename")
            return None
        bad = None if filename.isascii() else _bad_text(filename)
        if bad:
            self.problem(where, f"image filename is not valid UTF-8 ({bad})")
            return None
        src = filename
        if split is None:
            self.problem(src, "missing split")
            return None
        known = self.splits.get(split) if isinstance(split, str) else None
        if known is None:
            if not (isinstance(split, str) and SPLIT_RE.match(split)):
                self.problem(src, f"invalid split {split!r} (expected letters, digits, '_' or '-')")
                return None
            self.splits[split] = known = split
        split = known
        if filename.startswith(("/", "\\")) or _DRIVE.match(filename):
            self.problem(src, "absolute image path escapes the image folder", split)
            return None
        if "/" in filename or "\\" in filename or filename == ".":
            parts = [x for x in filename.replace("\\", "/").split("/") if x not in ("", ".")]
        else:
            parts = [filename]  # a plain file name (the common case)
        if ".." in parts:
            self.problem(src, "image path escapes the image folder ('..')", split)
            return None
        if not parts:
            self.problem(where, "missing or empty image filename")
            return None
        rel = "/".join(parts)
        key = sample_key(self.listing.corpus, rel)
        if not isinstance(captions, list):
            self.problem(src, "no captions (missing or not a list)", split, key)
            return None
        texts = _plain_captions(captions)
        if texts is None:  # not all ASCII text: checked one by one
            texts = self._captions(src, split, key, captions)
            if texts is None:
                return None
        if not texts:
            self.problem(src, "no captions (empty list or only blank captions)", split, key)
            return None
        if image_id is None or isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
            image_id = parts[-1].rsplit(".", 1)[0] if "." in parts[-1] else parts[-1]
        image_path = self.images_prefix + rel if len(parts) == 1 else os.path.join(self.images_dir, *parts)
        sample = Sample.of(self.listing.corpus, key, split, filename, image_path, texts, image_id)
        return Checked(where, rel, len(captions) - len(texts), sample)

    def accept(self, checked: Checked) -> None:
        """Append a checked record's sample, or its problem if it repeats an earlier filename or key."""
        L, s = self.listing, checked.sample
        if checked.blank:
            L.warnings.append(f"{s.filename}: dropped {checked.blank} blank caption(s)")
        if checked.rel in self.seen_files:
            self.problem(s.filename, f"duplicate filename (first listed at {self.seen_files[checked.rel]})",
                         s.split, s.key)
            return
        if s.key in self.seen_keys:
            self.problem(s.filename, f"sample key {s.key!r} collides with {self.seen_keys[s.key]}", s.split, s.key)
            return
        self.seen_files[checked.rel] = checked.where
        self.seen_keys[s.key] = s.filename
        if self.expected_captions and s.caption_count != self.expected_captions:
            L.warnings.append(f"{s.filename}: {s.caption_count} captions, {L.corpus} expects {self.expected_captions}")
        L.samples.append(s)

    def _captions(self, src: str, split: str, key: str, captions: list) -> list[str] | None:
        """The non-blank captions, stripped; None after reporting the first one that is not valid text."""
        texts: list[str] = []
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                what = "is missing" if c is None else f"is not text ({type(c).__name__})"
                self.problem(src, f"caption {i + 1} {what}", split, key)
                return None
            bad = None if c.isascii() else _bad_text(c)
            if bad:
                self.problem(src, f"caption {i + 1} is not valid UTF-8 ({bad})", split, key)
                return None
            if c := c.strip():
                texts.append(c)
        return texts


def _plain_captions(captions: list) -> list[str] | None:
    """The non-blank captions, stripped, when all are ASCII text (the common case, checked in a few
    C calls); else None."""
    try:
        if not "".join(captions).isascii():
            return None
    except TypeError:  # something that is not text
        return None
    texts = [c.strip() for c in captions]
    return texts if all(texts) else [c for c in texts if c]
