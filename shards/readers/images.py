"""Image checks and re-encoding for the shard writer.

These run in worker processes, so they stay free of heavy imports (Pillow is imported only when a
file needs it).
"""

from __future__ import annotations

import dataclasses
import io
import os
import zlib
from dataclasses import dataclass, field

import blake3

from .records import InputError

# Image formats kept as stored, PIL format name -> shard member extension.
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif"}
# Every member extension has this length, so a shard's tar layout follows from its keys and sizes before
# the images' formats are known (a one-pass write drafts its shards from the files' sizes).
(MEMBER_EXT_LEN,) = {len(ext) for ext in FORMAT_EXT.values()}


@dataclass(slots=True)
class ImageInfo:
    """What checking an image found. Slotted (a driver holds one per sample of the corpus: a third
    less memory) and pickled as its fields (tasks send millions back: faster than a dict); not
    frozen, as :class:`~shards.readers.Sample` is not (2.5x faster to build and to unpickle)."""

    ok: bool
    reason: str = ""
    size: int = 0
    digest: str = ""  # BLAKE3 of the bytes (image_digest)
    ext: str = ""
    width: int = 0
    height: int = 0
    ahash: int | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)  # the bytes, when kept

    def without_data(self) -> ImageInfo:
        """The same info without the bytes (what a task sends back; dataclasses.replace is 4x slower)."""
        return ImageInfo(self.ok, self.reason, self.size, self.digest, self.ext, self.width, self.height, self.ahash)

    def __reduce__(self):
        return ImageInfo, (self.ok, self.reason, self.size, self.digest, self.ext, self.width, self.height, self.ahash,
                           self.data)


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


def image_digest(data: bytes) -> str:
    """An image's content digest (hex): what content keys, the source digest and duplicate checks
    compare. BLAKE3, a cryptographic hash 3-4x faster than sha256 on one core, because every
    image is hashed twice on its way into a shard (here, and inside its shard's sha256)."""
    return blake3.blake3(data).hexdigest()


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
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


def _check_jpeg(data: bytes) -> tuple[int, int] | str | None:
    """Walk a JPEG's marker segments up to the first scan, as Pillow's header parser does, then check
    the end-of-image marker (what catches a file cut inside its scan data). Returns (width, height),
    a problem, or None to defer to Pillow (which checks the end-of-image marker too)."""
    header = _jpeg_header(data)
    if isinstance(header, tuple) and not _has_jpeg_eoi(data):
        return "truncated JPEG (no end-of-image marker)"
    return header


def _has_jpeg_eoi(data: bytes) -> bool:
    return data.rstrip(b"\x00").endswith(b"\xff\xd9")


def _jpeg_header(data: bytes) -> tuple[int, int] | str | None:
    """(width, height) from the marker segments before the first scan, a problem, or None."""
    n = len(data)
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
            return f"truncated PNG ({ctype.decode('latin-1')} chunk runs past the end)"
        if zlib.crc32(data[i + 4:i + 8 + length]) != int.from_bytes(data[end - 4:end], "big"):
            return f"undecodable image (PNG chunk {ctype.decode('latin-1')} has a bad CRC)"
        if ctype == b"IHDR" and length >= 8:
            size = (int.from_bytes(data[i + 8:i + 12], "big"), int.from_bytes(data[i + 12:i + 16], "big"))
        elif ctype == b"IEND":
            return size if size else "undecodable image (PNG without IHDR)"
        i = end
    return "truncated PNG (no IEND chunk)"


_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_TIFF_DEFAULTS = {258: (1,), 259: (1,), 266: (1,), 277: (1,), 278: (2**32 - 1,), 284: (1,), 339: (1,)}
_TIFF_READ = {256, 257, 258, 259, 262, 266, 273, 277, 278, 279, 284, 322, 338, 339}  # tags the check reads
_TIFF_PLAIN = {(1, 1), (2, 3)}  # (photometric, samples per pixel): 8-bit grey (min-is-black) and RGB


def _check_tiff(data: bytes) -> tuple[int, int] | str | None:
    """Walk an uncompressed little-endian TIFF's first IFD and check every strip lies inside the file
    with exactly its rows' bytes (what catches a file cut inside its pixel data, the way Pillow's
    full decode would, without decoding). Returns (width, height), a problem, or None to defer to
    Pillow (compressed, tiled, big-endian, BigTIFF, 16-bit, palette, alpha...: anything unusual)."""
    n = len(data)
    if data[:4] != b"II*\x00" or n < 8:
        return None
    ifd = int.from_bytes(data[4:8], "little")
    if ifd < 8 or ifd + 2 > n:
        return "truncated TIFF (its first IFD starts past the end)"
    count = int.from_bytes(data[ifd:ifd + 2], "little")
    if ifd + 2 + 12 * count > n:
        return "truncated TIFF (its first IFD runs past the end)"
    tags: dict[int, tuple[int, ...]] = {}
    for e in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, typ = int.from_bytes(data[e:e + 2], "little"), int.from_bytes(data[e + 2:e + 4], "little")
        num = int.from_bytes(data[e + 4:e + 8], "little")
        width = _TIFF_TYPE_SIZE.get(typ)
        if width is None:
            return None
        at = e + 8 if num * width <= 4 else int.from_bytes(data[e + 8:e + 12], "little")
        if at + num * width > n:  # a tag the check does not read may be junk Pillow skips: let it judge
            return f"truncated TIFF (the values of tag {tag} run past the end)" if tag in _TIFF_READ else None
        if typ in (3, 4):  # SHORT, LONG: every tag the check reads
            tags[tag] = tuple(int.from_bytes(data[i:i + width], "little") for i in range(at, at + num * width, width))
    get = {**_TIFF_DEFAULTS, **tags}.get
    if 322 in tags or 338 in tags or any(get(t) != (1,) for t in (259, 266, 284, 339)):
        return None  # tiled, extra samples, compressed, reversed bit order, planar or non-integer samples
    spp, photometric = get(277)[0], get(262, (None,))[0]
    if (photometric, spp) not in _TIFF_PLAIN or get(258) != (8,) * spp:
        return None
    w, h = get(256, (0,))[0], get(257, (0,))[0]
    offsets, counts = get(273, ()), get(279, ())
    rows = min(get(278)[0], h) if h else 0
    if not (w and h and rows) or len(offsets) != len(counts) or len(offsets) != -(-h // rows):
        return None
    for i, (offset, size) in enumerate(zip(offsets, counts)):
        if size != min(rows, h - i * rows) * w * spp:
            return None  # strips of another size: let Pillow judge them
        if offset + size > n:
            return f"truncated TIFF (strip {i + 1} of {len(offsets)} runs past the end)"
    return w, h


def inspect_image(path: str, want_ahash: bool = False, full_decode: bool = False, keep_data: bool = False) -> ImageInfo:
    """Read and check one image: exists, non-empty, a JPEG/PNG/TIFF that is not truncated.

    JPEG: marker segments up to the first scan and the end-of-image marker; PNG: every chunk's CRC
    through IEND; plain TIFF (uncompressed 8-bit grey or RGB strips, as UCM, RSITMD and Sydney
    store them): the first IFD and every strip's extent (all parsed here, as Pillow's header parser /
    verify() / decoder would, at a fraction of the cost); any other TIFF and anything unusual:
    opened and fully decoded by Pillow. ``full_decode`` (and
    ``want_ahash``) decode every pixel of every image as well, after the same structural checks (so
    a PNG without IEND is refused in every mode). ``keep_data`` returns the bytes in
    ``ImageInfo.data`` (the writer then need not read the file again)."""
    info = _inspect(path, want_ahash, full_decode)
    if info.data is not None and not keep_data:
        info = info.without_data()
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
    digest = image_digest(data)
    fast = None
    if data[:3] == b"\xff\xd8\xff":
        fast, ext = _check_jpeg(data), "jpg"
    elif data[:8] == _PNG_SIG:
        fast, ext = _check_png(data), "png"
    elif data[:4] == b"II*\x00":
        fast, ext = _check_tiff(data), "tif"
    if isinstance(fast, str):
        return ImageInfo(False, fast, len(data), digest)
    if fast is not None and not (full_decode or want_ahash):
        return ImageInfo(True, "", len(data), digest, ext, fast[0], fast[1], data=data)
    info = _inspect_with_pillow(data, digest, want_ahash, full_decode)
    return dataclasses.replace(info, data=data) if info.ok else info


def _inspect_with_pillow(data: bytes, digest: str, want_ahash: bool, full_decode: bool) -> ImageInfo:
    from PIL import Image, UnidentifiedImageError

    fmt = None
    try:
        im = Image.open(io.BytesIO(data))
        fmt = im.format
        ext = FORMAT_EXT.get(fmt or "")
        if ext is None:
            return ImageInfo(False, f"unsupported image format {fmt} (supported: JPEG, PNG, TIFF)", len(data), digest)
        w, h = im.size
        if fmt == "JPEG" and not _has_jpeg_eoi(data):
            return ImageInfo(False, "truncated JPEG (no end-of-image marker)", len(data), digest)
        if fmt == "PNG" and not full_decode and not want_ahash:
            im.verify()  # chunk CRCs through IEND, without decompressing
        elif fmt == "TIFF" or full_decode or want_ahash:
            im.load()
        ahash = _average_hash(im) if want_ahash else None
    except UnidentifiedImageError:
        if data[:4] in _TIFF_MAGIC:
            return ImageInfo(False, "truncated or corrupt TIFF (its header cannot be read)", len(data), digest)
        return ImageInfo(False, "not a decodable image", len(data), digest)
    except Image.DecompressionBombError as exc:
        return ImageInfo(False, f"image too large ({exc})", len(data), digest)
    except Exception as exc:  # noqa: BLE001 - malformed files raise all sorts (struct.error, SyntaxError...)
        what = f"truncated {fmt or 'image'}" if "truncat" in str(exc).lower() else "undecodable image"
        return ImageInfo(False, f"{what} ({type(exc).__name__}: {exc})", len(data), digest)
    return ImageInfo(True, "", len(data), digest, ext, w, h, ahash)


def encode_image(path: str, resize: int, expected_digest: str) -> tuple[str, bytes]:
    """:func:`reencode` the image at ``path``, refusing a file that changed since it was checked."""
    data = read_file(path)
    if image_digest(data) != expected_digest:
        raise InputError(f"{path}: image changed while sharding")
    return reencode(data, resize)


def reencode(data: bytes, resize: int) -> tuple[str, bytes]:
    """Re-encode an image so its shorter side is ``resize`` px (aspect kept; images already that
    small are re-encoded at their size). JPEG stays JPEG (quality 95, 4:4:4, no metadata); PNG and
    TIFF become PNG (lossless). Deterministic for a given Pillow build."""
    from PIL import Image

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
