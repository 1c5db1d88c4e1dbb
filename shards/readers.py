"""Annotation readers and image checks.

Layouts read:

* Karpathy JSON (RSICD ``dataset_rsicd.json``, RSITMD ``dataset_RSITMD.json``, UCM-Captions and
  Sydney-Captions ``dataset.json``, and ``shards.synth``'s ``dataset_synth.json``)::

      {"images": [{"filename", "imgid", "split", "sentences": [{"raw", ...}, ...]}, ...],
       "dataset": NAME}

  Only ``filename``, ``split`` and ``sentences[*].raw`` are needed (``imgid`` becomes image_id).
* Generic JSONL (one object per line) or a JSON list of such objects, with an image field
  (``filename``/``image``/``path``/``filepath``/``file``), ``captions`` (list or string) or
  ``caption``/``text``/``title``, optional ``split`` (default ``train``) and ``image_id``.
* Generic CSV/TSV with the same column names; rows naming the same image are merged (one caption per
  row, in file order), or a ``captions`` column may hold a JSON list.

Policy for bad input (each problem names the file and the reason):

* Unreadable annotation file, invalid JSON (Karpathy/JSON list) or a wrong top-level schema: fatal,
  raises :class:`InputError` whatever ``on_error`` says (no sample can be trusted).
* Per sample (quarantined with ``on_error="skip"``, fatal with ``"fail"``): a record that is not an
  object, a missing/invalid filename, a filename escaping the image folder (``../x``, absolute paths),
  missing/invalid split, no usable caption, a caption that is not text or not valid UTF-8, a duplicate
  filename or sample key (the first occurrence is kept, later ones are problems), a bad JSONL line,
  and (checked by :func:`inspect_image`) a missing, zero-byte, undecodable, truncated or unsupported
  image.
* Warnings only (recorded in the manifest, never quarantined): a caption count other than the
  corpus' expectation (known corpora: 5; generic: none), blank captions that were dropped, image and
  split counts that differ from a known corpus' published sizes (with a hint when the file looks like
  a swapped UCM/Sydney copy), and image sizes that differ from the corpus' native size.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "InputError",
    "Problem",
    "Sample",
    "Listing",
    "CorpusSpec",
    "KNOWN_CORPORA",
    "read_annotations",
    "read_karpathy",
    "read_generic",
    "detect_corpus",
    "inspect_image",
    "encode_image",
    "ImageInfo",
]

SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]")
# Image formats kept as stored, PIL format name -> shard member extension.
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif"}


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


@dataclass(frozen=True)
class Sample:
    """One image with all its captions."""

    corpus: str
    key: str
    split: str
    filename: str  # as written in the annotations, relative to the image folder
    image_path: str  # absolute local path
    captions: tuple[str, ...]
    image_id: str | int


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


def _decode(path: Path) -> tuple[str, bytes]:
    """Read a text file; invalid UTF-8 bytes survive as surrogates and are reported per record."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read annotations: {exc.strerror or exc}") from exc
    text = raw.decode("utf-8", "surrogateescape")
    return text.removeprefix("\ufeff"), raw


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
        self.expected_captions = expected_captions
        self.seen_files: dict[str, str] = {}
        self.seen_keys: dict[str, str] = {}

    def problem(self, source: str, reason: str, split: str | None = None, key: str | None = None):
        self.listing.problems.append(Problem(source, reason, split, key))

    def add(self, where: str, filename, split, captions, image_id) -> None:
        """Validate one record and append a Sample or a Problem. ``where`` names the record."""
        L = self.listing
        if not isinstance(filename, str) or not filename.strip():
            self.problem(where, "missing or empty image filename")
            return
        bad = _bad_text(filename)
        if bad:
            self.problem(where, f"image filename is not valid UTF-8 ({bad})")
            return
        src = filename
        split_ok = isinstance(split, str) and SPLIT_RE.match(split)
        if split is None:
            self.problem(src, "missing split")
            return
        if not split_ok:
            self.problem(src, f"invalid split {split!r} (expected letters, digits, '_' or '-')")
            return
        if filename.startswith(("/", "\\")) or _DRIVE.match(filename):
            self.problem(src, "absolute image path escapes the image folder", split)
            return
        parts = [x for x in filename.replace("\\", "/").split("/") if x not in ("", ".")]
        if ".." in parts:
            self.problem(src, "image path escapes the image folder ('..')", split)
            return
        if not parts:
            self.problem(where, "missing or empty image filename")
            return
        rel = "/".join(parts)
        key = sample_key(L.corpus, rel)
        if not isinstance(captions, list):
            self.problem(src, "no captions (missing or not a list)", split, key)
            return
        texts: list[str] = []
        blank = 0
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                what = "is missing" if c is None else f"is not text ({type(c).__name__})"
                self.problem(src, f"caption {i + 1} {what}", split, key)
                return
            bad = _bad_text(c)
            if bad:
                self.problem(src, f"caption {i + 1} is not valid UTF-8 ({bad})", split, key)
                return
            c = c.strip()
            if c:
                texts.append(c)
            else:
                blank += 1
        if not texts:
            self.problem(src, "no captions (empty list or only blank captions)", split, key)
            return
        if blank:
            L.warnings.append(f"{src}: dropped {blank} blank caption(s)")
        if rel in self.seen_files:
            self.problem(src, f"duplicate filename (first listed at {self.seen_files[rel]})", split, key)
            return
        if key in self.seen_keys:
            self.problem(src, f"sample key {key!r} collides with {self.seen_keys[key]}", split, key)
            return
        self.seen_files[rel] = where
        self.seen_keys[key] = filename
        if self.expected_captions and len(texts) != self.expected_captions:
            L.warnings.append(f"{src}: {len(texts)} captions, {L.corpus} expects {self.expected_captions}")
        if image_id is None or isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
            image_id = parts[-1].rsplit(".", 1)[0] if "." in parts[-1] else parts[-1]
        L.samples.append(Sample(L.corpus, key, split, filename, os.path.join(self.images_dir, *parts),
                                tuple(texts), image_id))


# --------------------------------------------------------------------------------------------------
# Karpathy layout


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


def read_karpathy(path: str | Path, images_dir: str | Path, corpus: str | None = None) -> Listing:
    """Read a Karpathy-layout JSON (RSICD, RSITMD, UCM, Sydney, synth)."""
    path = Path(path)
    text, raw = _decode(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path.name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{path.name}: not a Karpathy-layout file (expected an object with an 'images' list)")
    name, spec = detect_corpus(path, data, corpus)
    listing = Listing(name, path.name, hashlib.sha256(raw).hexdigest(), spec=spec)
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


# --------------------------------------------------------------------------------------------------
# generic layouts

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


def read_generic(path: str | Path, images_dir: str | Path, corpus: str | None = None) -> Listing:
    """Read a generic JSONL, JSON-list, CSV or TSV annotation file (see module docstring)."""
    path = Path(path)
    text, raw = _decode(path)
    name, spec = detect_corpus(path, None, corpus)
    listing = Listing(name, path.name, hashlib.sha256(raw).hexdigest(), spec=spec)
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
        records: list[tuple[str, object]] = []
        if suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith("[")):
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path.name} line {lineno}"
                try:
                    records.append((where, json.loads(line)))
                except json.JSONDecodeError as exc:
                    b.problem(where, f"invalid JSON: {exc.msg} (column {exc.colno})")
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path.name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
            if not isinstance(data, list):
                raise InputError(f"{path.name}: expected a JSON list of records or a Karpathy 'images' object")
            records = [(f"{path.name} record {i}", r) for i, r in enumerate(data)]
        for where, rec in records:
            if not isinstance(rec, dict):
                b.problem(where, f"record is not an object ({type(rec).__name__})")
                continue
            fname, caps, split, image_id = _record_fields(rec)
            count(split)
            b.add(where, fname, split, caps, image_id)
    _check_counts(listing, len(listing.samples) + len(listing.problems), split_counts)
    return listing


def read_annotations(path: str | Path, images_dir: str | Path, corpus: str | None = None) -> Listing:
    """Read any supported layout: ``.json`` holding an ``images`` object -> Karpathy, otherwise
    generic (JSON list, ``.jsonl``, ``.csv``, ``.tsv``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: annotation file not found")
    if path.suffix.lower() == ".json":
        head = path.open("rb").read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if head.startswith(b"{"):
            return read_karpathy(path, images_dir, corpus)
    return read_generic(path, images_dir, corpus)


# --------------------------------------------------------------------------------------------------
# images (run in worker processes: keep these functions free of heavy imports)


@dataclass(frozen=True)
class ImageInfo:
    ok: bool
    reason: str = ""
    size: int = 0
    sha256: str = ""
    ext: str = ""
    width: int = 0
    height: int = 0
    ahash: int | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)  # the bytes, when kept


def _average_hash(im) -> int | None:
    """8x8 average hash (64 bits); None for flat images, whose hash says nothing."""
    from PIL import Image

    small = im.convert("L").resize((8, 8), Image.Resampling.BOX)
    px = list(small.getdata())
    mean = sum(px) / 64.0
    bits = 0
    for v in px:
        bits = (bits << 1) | (1 if v > mean else 0)
    if bits in (0, (1 << 64) - 1):
        return None
    return bits


def read_file(path: str) -> bytes:
    """A whole file's bytes (os-level calls: about twice as fast as open().read() for small files)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        want = os.fstat(fd).st_size + 1
        chunks = []
        while True:
            chunk = os.read(fd, want)
            if chunk:
                chunks.append(chunk)
            if len(chunk) < want and want < 0x7FFFF000:  # a short read of a regular file: end of file
                break
            want = 1 << 20
        return b"".join(chunks)
    finally:
        os.close(fd)


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF_FAST = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive Huffman: what Pillow decodes


def _check_jpeg(data: bytes) -> tuple[int, int] | str | None:
    """Walk a JPEG's marker segments up to the first scan, as Pillow's header parser does, and check
    the end-of-image marker. Returns (width, height), a problem, or None to defer to Pillow."""
    n = len(data)
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "truncated JPEG (no end-of-image marker)"
    i, size = 2, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return "undecodable image (corrupt JPEG marker structure)"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
            continue
        seglen = (data[i + 2] << 8) | data[i + 3]
        if seglen < 2 or i + 2 + seglen > n:
            return "truncated JPEG (marker segment runs past the end)"
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _JPEG_SOF_FAST or seglen < 8 or data[i + 4] != 8:
                return None  # unusual frame type or precision: let Pillow judge it
            size = ((data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6])
            if 0 in size or data[i + 9] not in (1, 3, 4):
                return None
        elif marker == 0xDA:  # start of scan
            return size if size else "undecodable image (JPEG scan before any frame header)"
        i += 2 + seglen
    return "truncated JPEG (no scan data)"


def _check_png(data: bytes) -> tuple[int, int] | str:
    """Walk a PNG's chunks, checking each CRC through IEND (what Pillow's verify() does)."""
    n = len(data)
    i, size = 8, None
    while i + 12 <= n:
        length = int.from_bytes(data[i:i + 4], "big")
        ctype = data[i + 4:i + 8]
        end = i + 12 + length
        if end > n:
            return f"truncated PNG (chunk {ctype!r} runs past the end)"
        if zlib.crc32(data[i + 4:i + 8 + length]) != int.from_bytes(data[end - 4:end], "big"):
            return f"undecodable image (PNG chunk {ctype.decode('latin-1')} has a bad CRC)"
        if ctype == b"IHDR" and length >= 8:
            size = (int.from_bytes(data[i + 8:i + 12], "big"), int.from_bytes(data[i + 12:i + 16], "big"))
        elif ctype == b"IEND":
            return size if size else "undecodable image (PNG without IHDR)"
        i = end
    return "truncated PNG (no IEND chunk)"


def inspect_image(path: str, want_ahash: bool = False, full_decode: bool = False, keep_data: bool = False) -> ImageInfo:
    """Read and check one image: exists, non-empty, a JPEG/PNG/TIFF that is not truncated.

    JPEG: marker segments up to the first scan and the end-of-image marker; PNG: every chunk's CRC
    through IEND (both parsed here, as Pillow's header parser / verify() would, at a fraction of
    the cost); TIFF and anything unusual: opened and fully decoded by Pillow. ``full_decode`` (and
    ``want_ahash``) decode every pixel of every image. ``keep_data`` returns the bytes in
    ``ImageInfo.data`` (the writer then need not read the file again)."""
    info = _inspect(path, want_ahash, full_decode)
    if info.data is not None and not keep_data:
        info = dataclasses.replace(info, data=None)
    return info


def _inspect(path: str, want_ahash: bool, full_decode: bool) -> ImageInfo:
    try:
        data = read_file(path)
    except FileNotFoundError:
        return ImageInfo(False, "image file not found")
    except IsADirectoryError:
        return ImageInfo(False, "image path is a directory")
    except OSError as exc:
        return ImageInfo(False, f"cannot read image: {exc.strerror or exc}")
    if not data:
        return ImageInfo(False, "image file is empty (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    if not (full_decode or want_ahash):
        fast = None
        if data[:3] == b"\xff\xd8\xff":
            fast, ext = _check_jpeg(data), "jpg"
        elif data[:8] == _PNG_SIG:
            fast, ext = _check_png(data), "png"
        if isinstance(fast, str):
            return ImageInfo(False, fast, len(data), digest)
        if fast is not None:
            return ImageInfo(True, "", len(data), digest, ext, fast[0], fast[1], data=data)
    info = _inspect_with_pillow(data, digest, want_ahash, full_decode)
    return dataclasses.replace(info, data=data) if info.ok else info


def _inspect_with_pillow(data: bytes, digest: str, want_ahash: bool, full_decode: bool) -> ImageInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        fmt = im.format
        ext = FORMAT_EXT.get(fmt or "")
        if ext is None:
            return ImageInfo(False, f"unsupported image format {fmt} (supported: JPEG, PNG, TIFF)", len(data), digest)
        w, h = im.size
        if fmt == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return ImageInfo(False, "truncated JPEG (no end-of-image marker)", len(data), digest)
        if fmt == "PNG" and not full_decode and not want_ahash:
            im.verify()  # chunk CRCs through IEND, without decompressing
        elif fmt == "TIFF" or full_decode or want_ahash:
            im.load()
        ahash = _average_hash(im) if want_ahash else None
    except UnidentifiedImageError:
        return ImageInfo(False, "not a decodable image", len(data), digest)
    except Image.DecompressionBombError as exc:
        return ImageInfo(False, f"image too large ({exc})", len(data), digest)
    except Exception as exc:  # noqa: BLE001 - malformed files raise all sorts (struct.error, SyntaxError...)
        what = "truncated image" if "truncat" in str(exc).lower() else "undecodable image"
        return ImageInfo(False, f"{what} ({type(exc).__name__}: {exc})", len(data), digest)
    return ImageInfo(True, "", len(data), digest, ext, w, h, ahash)


def encode_image(path: str, resize: int, expected_sha256: str) -> tuple[str, bytes]:
    """Re-encode an image so its shorter side is ``resize`` px (aspect kept; images already that
    small are re-encoded at their size). JPEG stays JPEG (quality 95, 4:4:4, no metadata); PNG and
    TIFF become PNG (lossless). Deterministic for a given Pillow build."""
    from PIL import Image

    data = read_file(path)
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        raise InputError(f"{path}: image changed while sharding")
    im = Image.open(io.BytesIO(data))
    fmt = im.format
    im.load()
    w, h = im.size
    scale = resize / min(w, h)
    if scale < 1:
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if fmt == "JPEG":
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        im.save(out, "JPEG", quality=95, subsampling=0, optimize=False)
        return "jpg", out.getvalue()
    if im.mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I", "P"):
        im = im.convert("RGB")
    im.save(out, "PNG", optimize=False, compress_level=6)
    return "png", out.getvalue()
