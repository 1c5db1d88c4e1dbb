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

Adding a corpus format: write ``read_<format>(path, images_dir, corpus=None) -> Listing`` in a new
module here, next to :mod:`.karpathy` and :mod:`.generic` (build the listing with
:class:`.records._Builder` so the policy above holds), route to it in :func:`read_annotations`
below and export it. Another container for the generic record fields belongs in :mod:`.generic`.

Modules: :mod:`.records` (samples, problems, shared record checks), :mod:`.corpora` (known corpora),
:mod:`.karpathy` and :mod:`.generic` (the formats), :mod:`.jsonstream` (files read a piece at a time: no
reader holds a whole annotation file), :mod:`.images` (image checks and re-encoding).
"""

from __future__ import annotations

from pathlib import Path

from .corpora import KNOWN_CORPORA, CorpusSpec, detect_corpus
from .generic import MapTasks, TaskRunner, read_generic
from .images import MEMBER_EXT_LEN, ImageInfo, encode_image, image_digest, inspect_image, read_file, reencode
from .jsonstream import OnRead, first_char
from .karpathy import read_karpathy
from .records import InputError, Listing, Problem, Sample, read_error, sample_key

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
    "MapTasks",
    "TaskRunner",
    "detect_corpus",
    "inspect_image",
    "encode_image",
    "image_digest",
    "reencode",
    "ImageInfo",
    "MEMBER_EXT_LEN",
    "read_file",
    "sample_key",
]


def read_annotations(path: str | Path, images_dir: str | Path, corpus: str | None = None, *,
                     on_read: OnRead | None = None, tasks: TaskRunner | None = None) -> Listing:
    """Read any supported layout: ``.json`` holding an ``images`` object -> Karpathy, otherwise
    generic (JSON list, ``.jsonl``, ``.csv``, ``.tsv``). ``on_read(n)`` is told of each ``n`` bytes
    read (a progress bar's ``update``: a corpus of millions of records takes minutes to read).
    ``tasks()``, called when the layout is one read in tasks, gives a function that runs a function over
    items elsewhere, in order: a JSONL file's records are parsed and checked there, a part of the file
    each (the only layout whose records can be found without parsing what precedes them); the listing
    is the same."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: annotation file not found")
    if path.suffix.lower() == ".json":
        try:
            karpathy = first_char(path) == "{"
        except OSError as exc:
            raise read_error(path, exc) from exc
        if karpathy:
            return read_karpathy(path, images_dir, corpus, on_read=on_read)
    return read_generic(path, images_dir, corpus, on_read=on_read, tasks=tasks)

