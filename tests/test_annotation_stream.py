"""Annotation files read a piece at a time: the same values and errors as reading them whole."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from shards.readers import read_annotations
from shards.readers.jsonstream import JSONStream

VALID = [
    '{"images": [{"a": 1, "b": [1, 2, {"c": null}]}, 2, 3.5e10, -12345678901234567890, "x\\u00e9\\n\\"", true,'
    ' null, [], {}], "dataset": "rsicd"}',
    '\n\n  {\r\n "dataset" :\t"x" ,\n "images"\n:\n[\n1234567\n,\n"caf\u00e9 \U0001f30d"\n]\n}\n\n',
    '{"images": [1], "images": [2, 3]}',  # a repeated key: the last counts
    "{}",
    "[]",
    "[1, 22, 333, 4444, 55555, 0.5, -7]",
    '  [{"k": "v"}, "a long string that crosses many chunk boundaries", 1e-7]  ',
    "12345",
    '"just a string"',
]

INVALID = [
    '{"images": [1, 2,]}',
    '{"a": 1,}',
    '{"a" 1}',
    '{"a": 1 "b": 2}',
    "{1: 2}",
    "[1 2]",
    '{"a": 1}\n  x',
    '{"images": [\n  {"f": "ok"},\n  {"f": "unterminated\n]}',
    '{"images": [\n  tru\n]}',
    "",
    "   \n  ",
    '{"images": [1, 2]',
    "[1, 2, 3",
    '{\n "a": [1,\n 2,\n 3,, 4]}',
]


def _walk(text: str, chunk: int):
    """Read ``text`` through a JSONStream as the readers do: a top-level object's lists an element at a time."""
    doc = JSONStream(io.StringIO(text), json.JSONDecoder(), chunk_chars=chunk)
    first = doc.peek()
    if first == "{":
        out = {key: list(doc.elements()) if doc.peek() == "[" else doc.value() for key in doc.keys()}
    elif first == "[":
        out = list(doc.elements())
    else:
        out = doc.value()
    doc.end()
    return out


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_stream_decodes_what_json_loads_decodes_whatever_the_chunk_size(chunk):
    for text in VALID:
        assert _walk(text, chunk) == json.loads(text), (text, chunk)


@pytest.mark.parametrize("chunk", [1, 2, 5, 1 << 20])
def test_stream_errors_are_json_loads_errors_at_the_same_place(chunk):
    for text in INVALID:
        with pytest.raises(json.JSONDecodeError) as want:
            json.loads(text)
        with pytest.raises(json.JSONDecodeError) as got:
            _walk(text, chunk)
        w, g = want.value, got.value
        assert (g.msg, g.lineno, g.colno, g.pos) == (w.msg, w.lineno, w.colno, w.pos), (text, chunk)


@pytest.mark.parametrize("indent", [None, 1])
def test_elements_take_one_decoder_call_each_but_where_a_chunk_ends(indent):
    """The records of a list are most of a file's reading time: each is decoded by one call, also
    after the buffer has been refilled (once it fell back to the general path for every later one)."""

    class Counting(json.JSONDecoder):
        calls = 0

        def raw_decode(self, s, idx=0):
            self.calls += 1
            return super().raw_decode(s, idx)

    records = [{"filename": f"{i:05d}.jpg", "sentences": [{"raw": "a scene " * (i % 9)}], "imgid": i}
               for i in range(2000)]
    text = json.dumps({"images": records, "dataset": "x"}, indent=indent)
    decoder, chunk = Counting(), 4096
    doc = JSONStream(io.StringIO(text), decoder, chunk_chars=chunk)
    got = {key: list(doc.elements()) if key == "images" else doc.value() for key in doc.keys()}
    doc.end()
    assert got == {"images": records, "dataset": "x"}
    assert decoder.calls <= len(records) + 4 + 3 * (len(text) // chunk + 1)  # keys, dataset, retries at chunk ends


def _karpathy(records: list[dict], dataset_last: bool) -> str:
    body = json.dumps(records, indent=1)
    return (f'{{"images": {body},\r\n "dataset": "rsicd"}}' if dataset_last
            else f'{{"dataset": "rsicd", "images": {body}}}')


def test_karpathy_file_is_read_whole_or_streamed_alike(tmp_path):
    """RSICD's file names its dataset after the images list: the corpus (in every key) is still found,
    the samples and problems equal those of the same records with the name first, and the digest
    covers the file's bytes (a BOM included). The files span several of the reader's 1 MiB chunks."""
    images = tmp_path / "images"
    images.mkdir()
    records = [{"filename": f"{i:05d}.jpg", "imgid": i, "split": "train" if i % 3 else "test",
                "sentences": [{"raw": f"scene {i} view {j} caf\u00e9", "tokens": ["scene"] * 20} for j in range(5)]}
               for i in range(3000)]
    records[7] = "not an object"
    records[9]["sentences"] = [{"raw": 5}]
    listings = []
    for name, last in (("first.json", False), ("last.json", True)):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + _karpathy(records, last).encode())
        read: list[int] = []
        lst = read_annotations(path, images, on_read=read.append)
        assert lst.annotations_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert sum(read) == path.stat().st_size > 3 << 20  # what a progress bar is told
        listings.append(lst)
    first, last = listings
    assert last.corpus == first.corpus == "rsicd"
    assert last.samples == first.samples
    assert [(s.key, s.split, s.captions, s.image_id) for s in first.samples] == [
        (f"rsicd_{r['filename'][:5]}", r["split"], tuple(x["raw"] for x in r["sentences"]), r["imgid"])
        for i, r in enumerate(records) if i not in (7, 9)]
    assert [str(p) for p in first.problems] == ["first.json record 7: record is not an object (str)",
                                                "00009.jpg: caption 1 is not text (int)"]
    assert [p.reason for p in last.problems] == [p.reason for p in first.problems]


def test_generic_files_are_read_line_by_line_with_the_same_results(tmp_path):
    """JSONL with CRLF endings and a U+2028 inside a caption (a line break for str.splitlines, not
    for a JSONL file), a JSON list and a CSV with a quoted multi-line caption."""
    images = tmp_path / "images"
    images.mkdir()
    rows = [{"image": f"p{i}.png", "captions": [f"caption {i}\u2028more"], "split": "train"} for i in range(50)]
    jsonl = tmp_path / "ann.jsonl"
    jsonl.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\r\n")
    listed = tmp_path / "ann.json"
    listed.write_text(json.dumps(rows))
    for path in (jsonl, listed):
        read: list[int] = []
        lst = read_annotations(path, images, corpus="c", on_read=read.append)
        assert sum(read) == path.stat().st_size
        assert not lst.problems, lst.problems
        assert [s.captions for s in lst.samples] == [(f"caption {i}\u2028more",) for i in range(50)]
        assert lst.annotations_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    csv_path = tmp_path / "ann.csv"
    csv_path.write_text('image,caption\r\np0.png,"two\r\nlines"\r\np1.png,plain\r\np2.png,x,extra\r\n', newline="")
    lst = read_annotations(csv_path, images)
    assert [(s.filename, s.captions) for s in lst.samples] == [("p0.png", ("two\r\nlines",)), ("p1.png", ("plain",))]
    assert [str(p) for p in lst.problems] == ["ann.csv line 5: more fields than header columns"]  # lines, not rows
