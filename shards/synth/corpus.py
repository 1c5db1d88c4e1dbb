"""Writing the synthetic corpus: images and a Karpathy-layout ``dataset_synth.json``.

``generate_corpus(out_dir)`` writes ``out_dir/images/<file>`` and ``out_dir/dataset_synth.json``::

    {"images": [{"filename", "imgid", "split", "sentids",
                 "sentences": [{"raw", "tokens", "imgid", "sentid"}], "synth_attrs": {...}}],
     "dataset": "synth", "synth_config": {...}}

``synth_attrs`` / ``synth_config`` are extra keys that corpus readers ignore. Output is a pure
function of the arguments (per-image random streams seeded by ``(seed, imgid)``; fixed encoder
settings; no timestamps), so it is byte-identical across runs and across ``workers``.

``fine_scale=True`` writes the fine-scale corpus instead: each split is cut into groups of
``group_size`` consecutive images that share one coarse layout, drawn from one stream per group
(land cover, region sides, linear features with their geometry, textures, sun, tint), and differ only
in their small objects (count 1-5, location, colour), drawn from per-image streams; no two images of
a group show the same (count, location, colour) of their objects, and every caption names them. Each
image gets ``synth_group`` (the imgid of its group's first image) and ``synth_config`` a
``fine_scale`` entry. The default corpus does not change by a byte.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from PIL import Image

from ..distributed import progress_bar
from .captions import _tokens, describe_scene
from .render import render_scene
from .scenes import SceneAttrs, knobs, sample_attrs, sample_fine_objects, sample_layout

GENERATOR_VERSION = 1
FINE_STREAM = 0x6F1E  # tags the fine-scale corpus's random streams apart from the default ones
FINE_ATTEMPTS = 25  # per image: resample its objects until they differ from the group's earlier images
ANNOTATION_NAME = "dataset_synth.json"
DEFAULT_SPLITS: Mapping[str, int] = {"train": 800, "val": 100, "test": 100}
IMAGE_FORMATS = ("jpg", "png", "tif")
JPEG_QUALITY = 92


def make_sample(seed: int, imgid: int, image_size: int = 64,
                difficulty: str | float = "easy") -> tuple[np.ndarray, list[str], SceneAttrs]:
    """One image (HxWx3 uint8), its captions and drawn attributes; pure function of the args."""
    k = knobs(difficulty)
    rng = np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, int(seed), int(imgid)]))
    intended = sample_attrs(rng, k)
    img, drawn = render_scene(intended, rng, int(image_size), k)
    return img, describe_scene(drawn, rng), drawn


def _fine_signature(attrs: SceneAttrs) -> tuple:
    return tuple((g.kind, g.count, g.location, g.colour) for g in attrs.objects)


def make_group(seed: int, first_imgid: int, n: int, image_size: int = 64, difficulty: str | float = "easy"
               ) -> list[tuple[np.ndarray, list[str], SceneAttrs]]:
    """A fine-scale group of ``n`` images (imgids ``first_imgid`` ..): one coarse layout, small objects that
    differ image to image; pure function of the args."""
    k = knobs(difficulty)
    group_stream = np.random.SeedSequence([GENERATOR_VERSION, FINE_STREAM, int(seed), int(first_imgid)])
    layout_stream, coarse_stream = group_stream.spawn(2)
    layout = sample_layout(np.random.default_rng(layout_stream), k)
    seen: set[tuple] = set()
    out = []
    for imgid in range(int(first_imgid), int(first_imgid) + n):
        rng = np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, FINE_STREAM, int(seed), imgid, 1]))
        for _ in range(FINE_ATTEMPTS):
            intended = SceneAttrs(layout.regions, layout.linear, sample_fine_objects(rng, layout))
            # a fresh copy of the group's coarse stream: every image draws the same background
            img, drawn = render_scene(intended, rng, int(image_size), k,
                                      coarse_rng=np.random.default_rng(coarse_stream))
            if _fine_signature(drawn) not in seen:
                break
        seen.add(_fine_signature(drawn))
        out.append((img, describe_scene(drawn, rng, fine=True), drawn))
    return out


def _encode(img: np.ndarray, fmt: str) -> bytes:
    im = Image.fromarray(img, "RGB")
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    elif fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:  # uncompressed baseline TIFF, tags are size/layout only (no DateTime/Software)
        im.save(buf, format="TIFF", compression="raw")
    return buf.getvalue()


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _render_chunk(job) -> list[tuple[list[str], dict]]:
    images_dir, seed, image_size, level, items = job
    out = []
    for imgid, filename in items:
        img, caps, attrs = make_sample(seed, imgid, image_size, level)
        _atomic_write(pathlib.Path(images_dir) / filename, _encode(img, filename.rsplit(".", 1)[1]))
        out.append((caps, attrs.to_json()))
    return out


def _render_groups(job) -> list[tuple[list[str], dict]]:
    images_dir, seed, image_size, level, groups = job
    out = []
    for items in groups:
        rendered = make_group(seed, items[0][0], len(items), image_size, level)
        for (_, filename), (img, caps, attrs) in zip(items, rendered):
            _atomic_write(pathlib.Path(images_dir) / filename, _encode(img, filename.rsplit(".", 1)[1]))
            out.append((caps, attrs.to_json()))
    return out


def generate_corpus(out_dir, *, splits: Mapping[str, int] = DEFAULT_SPLITS, image_size: int = 64,
                    seed: int = 0, image_format: str = "jpg", difficulty: str | float = "easy",
                    workers: int = 1, fine_scale: bool = False, group_size: int = 4,
                    progress: bool = False) -> pathlib.Path:
    """Write a synthetic corpus; returns the path of ``dataset_synth.json`` (written last).

    ``splits`` maps split name -> image count (images are numbered in that order);
    ``image_format`` is "jpg", "png", "tif" or "mixed" (cycles jpg/png/tif by imgid);
    ``difficulty`` is "easy" (default), "medium", "hard" or a float in [0, 1];
    ``workers`` > 1 renders in a process pool, with identical output;
    ``fine_scale`` writes groups of ``group_size`` images (within a split; the last group of a split may be
    smaller) that share their coarse layout and differ only in their small objects (module docstring);
    ``progress`` shows a tqdm bar on stderr.
    """
    k = knobs(difficulty)
    if not isinstance(fine_scale, bool):
        raise ValueError(f"fine_scale must be True or False, got {fine_scale!r}")
    if fine_scale and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2):
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if image_format not in IMAGE_FORMATS + ("mixed",):
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS + ('mixed',)}, got {image_format!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    for name, n in splits.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"invalid split name {name!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"split {name!r}: count must be a non-negative int, got {n!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    out = pathlib.Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    items: list[tuple[int, str, str]] = []  # (imgid, split, filename)
    for split, n in splits.items():
        for _ in range(n):
            i = len(items)
            ext = IMAGE_FORMATS[i % 3] if image_format == "mixed" else image_format
            items.append((i, split, f"synth_{i:06d}.{ext}"))
    chunk = max(1, min(64, -(-len(items) // (4 * workers))))  # chunking never changes the output
    if fine_scale:  # whole groups per job, split by split
        groups: list[list[tuple[int, str]]] = []
        for split in splits:
            members = [(i, f) for i, s, f in items if s == split]
            groups += [members[g:g + group_size] for g in range(0, len(members), group_size)]
        per_job = max(1, chunk // group_size)
        jobs = [(str(images_dir), int(seed), image_size, k.level, groups[g:g + per_job])
                for g in range(0, len(groups), per_job)]
        render = _render_groups
    else:
        jobs = [(str(images_dir), int(seed), image_size, k.level, [(i, f) for i, _, f in items[s:s + chunk]])
                for s in range(0, len(items), chunk)]
        render = _render_chunk
    results = []
    bar = progress_bar(len(items), "render", progress)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as ex:
            for part in ex.map(render, jobs):
                results += part
                bar.update(len(part))
    else:
        for job in jobs:
            part = render(job)
            results += part
            bar.update(len(part))
    bar.close()
    group_of = {i: members[0][0] for members in groups for i, _ in members} if fine_scale else {}

    images = []
    for (i, split, filename), (caps, attrs) in zip(items, results):
        sentids = [5 * i + j for j in range(len(caps))]
        images.append({
            "filename": filename, "imgid": i, "split": split, "sentids": sentids,
            "sentences": [{"raw": c, "tokens": _tokens(c), "imgid": i, "sentid": s} for c, s in zip(caps, sentids)],
            "synth_attrs": attrs,
        })
        if fine_scale:
            images[-1]["synth_group"] = group_of[i]
    config = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "image_size": image_size,
              "image_format": image_format, "difficulty": k.level, "splits": dict(splits)}
    if fine_scale:
        config["fine_scale"] = {"group_size": group_size}
    doc = {"images": images, "dataset": "synth", "synth_config": config}
    ann = out / ANNOTATION_NAME
    _atomic_write(ann, json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return ann
