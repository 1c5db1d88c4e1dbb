"""The writer's structural TIFF check (shards.readers.images._check_tiff) against Pillow's decoder.

Plain TIFFs (uncompressed 8-bit grey/RGB strips: UCM, RSITMD, Sydney) are checked without decoding;
the check must never pass a file Pillow cannot fully decode, must name the truncation of every cut
file, and must leave every other kind of TIFF to Pillow.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from shards.readers.images import ImageInfo, _check_tiff, inspect_image


def _plain_tiff(pixels: np.ndarray, rows_per_strip: int, reverse_strips: bool = False, junk_tag: bool = False) -> bytes:
    """A little-endian uncompressed TIFF written by hand: IFD first, then its strips (optionally in
    reverse file order), so strip layouts Pillow itself never writes are covered. ``junk_tag`` adds a
    Copyright tag whose 1000 characters would lie far past the end of the file."""
    h, w = pixels.shape[:2]
    spp = 1 if pixels.ndim == 2 else pixels.shape[2]
    strips = [pixels[r:r + rows_per_strip].tobytes() for r in range(0, h, rows_per_strip)]
    n = len(strips)
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, spp, None), (259, 3, 1, 1),
               (262, 3, 1, 2 if spp == 3 else 1), (273, 4, n, None), (277, 3, 1, spp),
               (278, 4, 1, rows_per_strip), (279, 4, n, None), (284, 3, 1, 1)]
    if junk_tag:
        entries.append((33432, 2, 1000, 10**6))
    ifd_size = 2 + 12 * len(entries) + 4
    extra_at = 8 + ifd_size
    bps = struct.pack(f"<{spp}H", *[8] * spp)
    offsets_at = extra_at + (len(bps) if spp > 2 else 0)
    counts_at = offsets_at + (4 * n if n > 1 else 0)
    data_at = counts_at + (4 * n if n > 1 else 0)
    order = list(range(n))[::-1] if reverse_strips else list(range(n))
    offsets, pos = [0] * n, data_at
    for i in order:
        offsets[i], pos = pos, pos + len(strips[i])
    values = {258: bps, 273: struct.pack(f"<{n}I", *offsets), 279: struct.pack(f"<{n}I", *map(len, strips))}
    where = {258: extra_at, 273: offsets_at, 279: counts_at}
    ifd, extra = struct.pack("<H", len(entries)), b""
    for tag, typ, count, value in entries:
        if value is not None:
            ifd += struct.pack("<HHII", tag, typ, count, value)
        elif len(values[tag]) <= 4:
            ifd += struct.pack("<HHI", tag, typ, count) + values[tag].ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, typ, count, where[tag])
            extra += values[tag]
    ifd += b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + extra + b"".join(strips[i] for i in order)


def _pillow_size(data: bytes) -> tuple[int, int] | None:
    """The size Pillow decodes ``data`` to, or None when its full decode fails."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im.size
    except Exception:  # noqa: BLE001 - whatever Pillow raises for a broken file
        return None


def _noise(h: int, w: int, spp: int, seed: int = 0) -> np.ndarray:
    shape = (h, w) if spp == 1 else (h, w, spp)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _pillow_tiff(mode: str, **save) -> bytes:
    arr = _noise(24, 20, {"L": 1, "RGB": 3, "RGBA": 4}.get(mode, 3))
    im = Image.fromarray(arr) if mode in ("L", "RGB", "RGBA") else Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, "TIFF", **save)
    return buf.getvalue()


PLAIN = {
    "pillow-rgb": lambda: _pillow_tiff("RGB"),
    "pillow-grey": lambda: _pillow_tiff("L"),
    "rgb-7-strips": lambda: _plain_tiff(_noise(25, 13, 3), rows_per_strip=4),
    "grey-3-strips-reversed": lambda: _plain_tiff(_noise(9, 31, 1), rows_per_strip=3, reverse_strips=True),
    "rgb-one-row-strips": lambda: _plain_tiff(_noise(5, 2, 3), rows_per_strip=1),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_tiff_passes_with_pillows_size_and_every_cut_is_named(name):
    data = PLAIN[name]()
    assert _check_tiff(data) == _pillow_size(data) is not None
    info = inspect_image_bytes(data)
    assert info.ok and (info.width, info.height) == _pillow_size(data) and info.ext == "tif"
    passed = 0
    for cut in range(len(data)):
        found = _check_tiff(data[:cut])
        if cut < 8:  # no complete header: Pillow names the problem (tests/test_shards.py)
            assert found is None
        elif isinstance(found, tuple):  # only bytes nothing reads were cut: Pillow must agree
            assert _pillow_size(data[:cut]) == found, cut
            passed += 1
        else:
            assert isinstance(found, str) and found.startswith("truncated TIFF"), (cut, found)
    assert passed == 0  # the hand-built and Pillow's layouts both end with pixel data


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore:Tag data larger than file")
@pytest.mark.parametrize("kind", ["lzw", "rgba", "palette", "16-bit", "big-endian", "tiled-tag", "bad-strip-size",
                                  "junk-tag"])
def test_other_tiffs_are_left_to_pillow(kind):
    if kind == "lzw":
        data = _pillow_tiff("RGB", compression="tiff_lzw")
    elif kind == "rgba":
        data = _pillow_tiff("RGBA")
    elif kind == "palette":
        data = _pillow_tiff("P")
    elif kind == "16-bit":
        data = _pillow_tiff("I;16")
    elif kind == "big-endian":
        data = b"MM\x00*" + _pillow_tiff("RGB")[4:]
    elif kind == "tiled-tag":  # tag 279 renumbered 322 (TileWidth): no longer a plain strip layout
        data = _plain_tiff(_noise(8, 8, 3), rows_per_strip=4)
        data = data.replace(struct.pack("<HH", 279, 4), struct.pack("<HH", 322, 4))
    elif kind == "junk-tag":  # a tag the check does not read points past the end: Pillow's call, not "truncated"
        data = _plain_tiff(_noise(8, 8, 3), rows_per_strip=4, junk_tag=True)
    else:  # one strip's byte count off by one: the check does not judge, Pillow does
        data = bytearray(_plain_tiff(_noise(8, 8, 3), rows_per_strip=8))
        at = data.index(struct.pack("<HHI", 279, 4, 1)) + 8
        data[at:at + 4] = struct.pack("<I", 8 * 8 * 3 - 1)
        data = bytes(data)
    assert _check_tiff(data) is None
    info = inspect_image_bytes(data)
    assert info.ok == (_pillow_size(data) is not None)


def test_cut_tiff_is_refused_in_every_mode(tmp_path):
    data = PLAIN["rgb-7-strips"]()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: len(data) - 10])
    for mode in ({}, {"full_decode": True}, {"want_ahash": True}):
        info = inspect_image(str(path), **mode)
        assert not info.ok and info.reason == "truncated TIFF (strip 7 of 7 runs past the end)", (mode, info)


def inspect_image_bytes(data: bytes):
    """inspect_image on ``data`` written to a temporary file."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".tif") as f:
        f.write(data)
        f.flush()
        return inspect_image(f.name)


def test_without_data_keeps_every_other_field():
    from dataclasses import fields

    info = ImageInfo(True, "why", 3, "ab" * 32, "tif", 4, 5, 123, data=b"abc")
    bare = info.without_data()
    assert bare.data is None
    assert all(getattr(bare, f.name) == getattr(info, f.name) for f in fields(ImageInfo) if f.name != "data")
