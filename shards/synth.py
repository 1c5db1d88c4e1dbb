"""Procedural remote-sensing-like image-text corpus in the Karpathy layout (RSICD/RSITMD style).

Each image is a top-down scene sampled from discrete attributes at three scales, matching the
multi-scale alignment the model learns:

* large scale  - one or two land-cover regions (farmland, forest, desert, water, residential; plus
  grassland, bare land and industrial at higher difficulty);
* medium scale - zero to two linear features (road, river, runway, railway);
* small scale  - object groups (buildings, vehicles, ships, planes, storage tanks) with a count and
  an optional location (left/right/top/bottom/center).

Placement, sizes, colours and noise are jittered; five varied captions per image are generated
from the attributes that were actually drawn, so captions never mention anything absent.

``generate_corpus(out_dir)`` writes ``out_dir/images/<file>`` and ``out_dir/dataset_synth.json``::

    {"images": [{"filename", "imgid", "split", "sentids",
                 "sentences": [{"raw", "tokens", "imgid", "sentid"}], "synth_attrs": {...}}],
     "dataset": "synth", "synth_config": {...}}

``synth_attrs`` / ``synth_config`` are extra keys that corpus readers ignore. Output is a pure
function of the arguments (per-image random streams seeded by ``(seed, imgid)``; fixed encoder
settings; no timestamps), so it is byte-identical across runs and across ``workers``.
"""

from __future__ import annotations

import io
import json
import math
import os
import pathlib
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_SPLITS", "LANDCOVERS", "LINEAR_KINDS", "OBJECT_KINDS", "LOCATIONS", "Knobs",
    "Region", "Linear", "ObjectGroup", "SceneAttrs", "knobs", "sample_attrs", "render_scene",
    "describe_scene", "make_sample", "generate_corpus",
]

GENERATOR_VERSION = 1
ANNOTATION_NAME = "dataset_synth.json"
DEFAULT_SPLITS: Mapping[str, int] = {"train": 800, "val": 100, "test": 100}
IMAGE_FORMATS = ("jpg", "png", "tif")
JPEG_QUALITY = 92

LANDCOVERS = ("farmland", "forest", "desert", "water", "residential", "grassland", "bare_land",
              "industrial")
LINEAR_KINDS = ("road", "river", "runway", "railway")
OBJECT_KINDS = ("building", "vehicle", "ship", "plane", "tank")
LOCATIONS = ("left", "right", "top", "bottom", "center")
ORIENTATIONS = ("horizontal", "vertical", "diagonal")
MANY = 7  # counts >= MANY are described as "many"

_DIFFICULTY_NAMES = {"easy": 0.0, "medium": 0.5, "hard": 1.0}


# ==================================================================================================
# attributes


@dataclass
class Region:
    """A land-cover region: the background (``side=None``) or a second region on one side."""
    cover: str
    side: str | None = None


@dataclass
class Linear:
    kind: str
    orientation: str


@dataclass
class ObjectGroup:
    kind: str
    count: int
    location: str | None = None


@dataclass
class SceneAttrs:
    """Discrete scene description. After :func:`render_scene` it describes what was drawn."""
    regions: list[Region]
    linear: list[Linear] = field(default_factory=list)
    objects: list[ObjectGroup] = field(default_factory=list)
    distractors: list[ObjectGroup] = field(default_factory=list)  # drawn, never captioned

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> "SceneAttrs":
        return cls([Region(**r) for r in d["regions"]], [Linear(**x) for x in d.get("linear", [])],
                   [ObjectGroup(**o) for o in d.get("objects", [])],
                   [ObjectGroup(**o) for o in d.get("distractors", [])])

    @property
    def covers(self) -> list[str]:
        return [r.cover for r in self.regions]

    def drawn_object_kinds(self) -> set[str]:
        return {g.kind for g in self.objects + self.distractors}


@dataclass(frozen=True)
class Knobs:
    """Sampling/rendering parameters derived from the difficulty level (0 easy .. 1 hard)."""
    level: float

    @property
    def landcovers(self) -> tuple[str, ...]:
        return LANDCOVERS[:5 + int(round(3 * self.level))]

    @property
    def count_choices(self) -> tuple[int | str, ...]:
        return (1, 2, 3, "many") if self.level < 0.34 else (1, 2, 3, 4, 5, "many")

    def __getattr__(self, name):  # scalar knobs interpolate linearly between easy and hard
        try:
            lo, hi = _KNOB_RANGE[name]
        except KeyError:
            raise AttributeError(name) from None
        return lo + (hi - lo) * self.level


_KNOB_RANGE = {
    "p_two_regions": (0.35, 0.6),
    "p_no_linear": (0.35, 0.2),
    "p_two_linear": (0.15, 0.35),
    "p_no_objects": (0.05, 0.12),
    "p_second_group": (0.0, 0.5),
    "p_location": (0.6, 0.6),
    "obj_scale": (1.0, 0.7),
    "colour_jitter": (0.03, 0.10),
    "noise": (0.012, 0.05),
    "texture": (1.0, 1.8),
    "p_distractor": (0.0, 0.7),
    "clutter": (0.0, 30.0),
    "p_haze": (0.0, 0.4),
}


def knobs(difficulty: str | float | Knobs) -> Knobs:
    if isinstance(difficulty, Knobs):
        return difficulty
    if isinstance(difficulty, str):
        if difficulty not in _DIFFICULTY_NAMES:
            raise ValueError(f"difficulty must be one of {sorted(_DIFFICULTY_NAMES)} or a float in [0, 1], "
                             f"got {difficulty!r}")
        return Knobs(_DIFFICULTY_NAMES[difficulty])
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)) or not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty must be 'easy', 'medium', 'hard' or a float in [0, 1], got {difficulty!r}")
    return Knobs(float(difficulty))


def _pick(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


# Objects that need a particular context; ships need water, which excludes roads/runways.
_NEEDS_LINEAR = {"vehicle": "road", "plane": "runway"}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def sample_attrs(rng: np.random.Generator, k: Knobs) -> SceneAttrs:
    """Sample the intended scene (counts/locations may shrink when rendering places objects)."""
    kinds: list[str] = []
    if rng.random() >= k.p_no_objects:
        kinds.append(_pick(rng, OBJECT_KINDS))
        if rng.random() < k.p_second_group:
            water = kinds[0] == "ship"
            compat = [o for o in OBJECT_KINDS if o != kinds[0]
                      and not (water and o in _NEEDS_LINEAR) and not (o == "ship" and kinds[0] in _NEEDS_LINEAR)]
            kinds.append(_pick(rng, compat))
    land = [c for c in k.landcovers if c != "water"]
    required = [_NEEDS_LINEAR[o] for o in kinds if o in _NEEDS_LINEAR]
    sides = ("left", "right", "top", "bottom")
    two = rng.random() < k.p_two_regions
    if "ship" in kinds:
        mode = _pick(rng, ("sea", "coast", "river"))
        if mode == "sea":
            regions = [Region("water")] + ([Region(_pick(rng, land), _pick(rng, sides))] if two else [])
        elif mode == "coast":
            regions = [Region(_pick(rng, land)), Region("water", _pick(rng, sides))]
        else:
            required.append("river")
            regions = [Region(_pick(rng, land))]
    else:
        regions = [Region(_pick(rng, land))]
    if two and len(regions) == 1:
        others = [c for c in k.landcovers if c != regions[0].cover and not (c == "water" and required)]
        regions.append(Region(_pick(rng, others), _pick(rng, sides)))
    linear: list[str] = list(dict.fromkeys(required))
    if "water" not in [r.cover for r in regions]:
        u = rng.random()
        n = 0 if u < k.p_no_linear else (2 if u > 1 - k.p_two_linear else 1)
        while len(linear) < n:
            linear.append(_pick(rng, [x for x in LINEAR_KINDS if x not in linear]))
    orients = list(rng.permutation(ORIENTATIONS))
    objects = []
    for o in kinds:
        c = _pick(rng, k.count_choices)
        if c == "many":
            c = int(rng.integers(MANY, 12))
        loc = _pick(rng, LOCATIONS) if rng.random() < k.p_location else None
        objects.append(ObjectGroup(o, int(c), loc))
    return SceneAttrs(regions, [Linear(kd, str(orients[i])) for i, kd in enumerate(linear)], objects)


# ==================================================================================================
# drawing primitives (float32 HxWx3 canvas in [0, 1]; geometry in image-normalised units)


@lru_cache(maxsize=8)
def _grid(S: int) -> tuple[np.ndarray, np.ndarray]:
    t = (np.arange(S, dtype=np.float32) + 0.5) / S
    return np.broadcast_to(t[None, :], (S, S)), np.broadcast_to(t[:, None], (S, S))


def _cover(dist: np.ndarray, S: int) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (negative inside), ~1 px soft edge."""
    return np.clip(0.5 - dist * S, 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, color) -> None:
    img += alpha[..., None] * (np.asarray(color, np.float32) - img)


def _frame(X, Y, cx, cy, theta):
    """Coordinates (u along theta, v across) relative to (cx, cy)."""
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = X - cx, Y - cy
    return dx * c + dy * s, dy * c - dx * s


def _rect_d(u, v, a, b):
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _value_noise(rng, S: int, cells: int) -> np.ndarray:
    """Smooth value noise in [0, 1] with ``cells`` lattice cells across the image."""
    g = rng.random((cells + 1, cells + 1), dtype=np.float32)
    t = (np.arange(S, dtype=np.float32) + 0.5) / S * cells
    i0 = np.minimum(t.astype(np.int64), cells - 1)
    f = t - i0
    f = f * f * (3 - 2 * f)
    i1 = i0 + 1
    fx, fy = f[None, :], f[:, None]
    top = g[i0][:, i0] * (1 - fx) + g[i0][:, i1] * fx
    bot = g[i1][:, i0] * (1 - fx) + g[i1][:, i1] * fx
    return top * (1 - fy) + bot * fy


def _fbm(rng, S, cells, octaves=3):
    out, amp, tot = np.zeros((S, S), np.float32), 1.0, 0.0
    for o in range(octaves):
        out += amp * _value_noise(rng, S, cells * 2 ** o)
        tot += amp
        amp *= 0.5
    return out / tot


def _jit(rng, color, amount):
    return np.clip(np.asarray(color, np.float32) * (1 + rng.normal(0, amount, 3)), 0, 1).astype(np.float32)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Max filter with a (2r+1)^2 square, separable, edge-padded."""
    if r <= 0:
        return mask
    S = mask.shape[0]
    p = np.pad(mask, r, mode="edge")
    m = np.max(np.stack([p[:, i:i + S] for i in range(2 * r + 1)]), axis=0)
    return np.max(np.stack([m[i:i + S] for i in range(2 * r + 1)]), axis=0)


# --- land cover textures -------------------------------------------------------------------------


def tex_farmland(rng, S, k):
    X, Y = _grid(S)
    u, v = _frame(X, Y, 0.5, 0.5, rng.uniform(0, math.pi))
    n = rng.uniform(2.5, 4.5)
    fu, fv = u * n + rng.random(), v * n * rng.uniform(0.6, 1.2) + rng.random()
    pu, pv = np.floor(fu).astype(np.int64), np.floor(fv).astype(np.int64)
    pal = np.stack([_jit(rng, c, 0.06 * k.texture) for c in
                    ((0.42, 0.62, 0.22), (0.66, 0.70, 0.30), (0.32, 0.50, 0.18), (0.74, 0.66, 0.38),
                     (0.52, 0.66, 0.26))])
    pid = (pu * 7 + pv * 13) % len(pal)
    img = pal[pid]
    period = max(0.045, 3.0 / S)
    along = np.where((pu + pv) % 2 == 0, u, v)
    img *= (1 + 0.10 * k.texture * np.sin(2 * np.pi * along / period))[..., None]
    border = np.minimum(np.minimum(fu - pu, 1 - (fu - pu)), np.minimum(fv - pv, 1 - (fv - pv))) / n
    _paint(img, 0.5 * _cover(border - 0.6 / S, S), (0.30, 0.36, 0.20))
    return img


def tex_forest(rng, S, k):
    crowns = _fbm(rng, S, 14, 2)
    clumps = _value_noise(rng, S, 4)
    dark, light = _jit(rng, (0.08, 0.24, 0.09), 0.08), _jit(rng, (0.20, 0.42, 0.16), 0.08)
    t = np.clip((crowns - 0.3) * 2.2 + (clumps - 0.5) * 0.6 * k.texture, 0, 1)[..., None]
    img = dark + t * (light - dark)
    _paint(img, 0.6 * (crowns < 0.33).astype(np.float32), (0.05, 0.14, 0.06))
    return img.astype(np.float32)


def tex_desert(rng, S, k):
    X, Y = _grid(S)
    u, _ = _frame(X, Y, 0.5, 0.5, rng.uniform(0, math.pi))
    warp = _value_noise(rng, S, 3)
    dunes = np.sin(2 * np.pi * (u * rng.uniform(5, 9) + 1.2 * warp))
    tone = _value_noise(rng, S, 4) - 0.5
    base = _jit(rng, (0.88, 0.74, 0.50), 0.04)
    return (base * (1 + (0.06 * dunes + 0.10 * tone) * k.texture)[..., None]).astype(np.float32)


def tex_water(rng, S, k):
    X, Y = _grid(S)
    base = _jit(rng, (0.10, 0.28, 0.52), 0.05)
    tone = _value_noise(rng, S, 3) - 0.5
    u, _ = _frame(X, Y, 0.5, 0.5, rng.uniform(0, math.pi))
    ripples = np.sin(2 * np.pi * u * rng.uniform(10, 16) + 3 * _value_noise(rng, S, 5))
    return (base * (1 + (0.12 * tone + 0.03 * ripples) * k.texture)[..., None]).astype(np.float32)


def _blocks(rng, S, cell, street, roofs, street_col, k, p_green=0.0):
    """A rotated grid of rectangular roofs separated by streets."""
    X, Y = _grid(S)
    u, v = _frame(X, Y, 0.5, 0.5, rng.uniform(-0.25, 0.25))
    fu, fv = u / cell + rng.random(), v / (cell * rng.uniform(0.8, 1.3)) + rng.random()
    iu, iv = np.floor(fu).astype(np.int64), np.floor(fv).astype(np.int64)
    pal = np.stack([_jit(rng, c, 0.07 * k.texture) for c in roofs])
    h = (iu * 73856093 ^ iv * 19349663) % 9973
    img = pal[h % len(pal)]
    if p_green:
        green = (h % 100) < p_green * 100
        img = np.where(green[..., None], _jit(rng, (0.28, 0.46, 0.22), 0.05), img)
    du, dv = np.abs(fu - iu - 0.5), np.abs(fv - iv - 0.5)
    d = np.maximum(du - (0.5 - street), dv - (0.5 - street)) * cell
    out = np.broadcast_to(_jit(rng, street_col, 0.04), img.shape).astype(np.float32).copy()
    _paint(out, _cover(d, S), img)
    return out


def tex_residential(rng, S, k):
    roofs = ((0.72, 0.34, 0.26), (0.60, 0.58, 0.60), (0.85, 0.82, 0.78), (0.48, 0.40, 0.36),
             (0.66, 0.46, 0.34))
    return _blocks(rng, S, rng.uniform(0.08, 0.11), 0.18, roofs, (0.52, 0.52, 0.50), k, p_green=0.12)


def tex_industrial(rng, S, k):
    roofs = ((0.78, 0.79, 0.80), (0.58, 0.62, 0.66), (0.40, 0.52, 0.66), (0.70, 0.70, 0.66))
    return _blocks(rng, S, rng.uniform(0.20, 0.28), 0.12, roofs, (0.45, 0.45, 0.44), k)


def tex_grassland(rng, S, k):
    base = _jit(rng, (0.50, 0.66, 0.34), 0.05)
    tone = _fbm(rng, S, 6, 2) - 0.5
    img = (base * (1 + 0.18 * tone * k.texture)[..., None]).astype(np.float32)
    _paint(img, 0.7 * (_value_noise(rng, S, 24) > 0.9).astype(np.float32), (0.26, 0.40, 0.18))
    return img


def tex_bare_land(rng, S, k):
    base = _jit(rng, (0.62, 0.53, 0.43), 0.05)
    tone = _fbm(rng, S, 5, 3) - 0.5
    return (base * (1 + 0.25 * tone * k.texture)[..., None]).astype(np.float32)


TEXTURES = {"farmland": tex_farmland, "forest": tex_forest, "desert": tex_desert, "water": tex_water,
            "residential": tex_residential, "grassland": tex_grassland, "bare_land": tex_bare_land,
            "industrial": tex_industrial}


def region_mask(rng, S, side: str) -> np.ndarray:
    """Soft mask of a region occupying one side of the image, with a wobbly boundary."""
    X, Y = _grid(S)
    t = rng.uniform(0.38, 0.62)
    wob = 0.10 * (_value_noise(rng, S, 3) - 0.5) + 0.03 * (_value_noise(rng, S, 8) - 0.5)
    coord = {"left": -X, "right": X, "top": -Y, "bottom": Y}[side]
    t = t if side in ("right", "bottom") else -t
    return _cover(t + wob - coord, S)


# --- linear features -----------------------------------------------------------------------------


@dataclass
class _LineGeom:
    """Geometry of a drawn linear feature: centre line v = amp*sin(2*pi*freq*u + phase)."""
    kind: str
    cx: float
    cy: float
    theta: float
    width: float
    amp: float = 0.0
    freq: float = 0.0
    phase: float = 0.0
    half_len: float = 2.0
    apron_side: int = 0
    footprint: np.ndarray | None = None

    def centre_v(self, u):
        return self.amp * np.sin(2 * np.pi * self.freq * u + self.phase)

    def to_xy(self, u, v):
        c, s = math.cos(self.theta), math.sin(self.theta)
        vv = v + self.centre_v(u)
        return self.cx + u * c - vv * s, self.cy + u * s + vv * c

    def angle_at(self, u):
        slope = self.amp * 2 * np.pi * self.freq * np.cos(2 * np.pi * self.freq * u + self.phase)
        return self.theta + np.arctan(slope)


_ORIENT_ANGLE = {"horizontal": 0.0, "vertical": math.pi / 2}


def _line_geom(rng, lin: Linear, obj_scale: float) -> _LineGeom:
    base = _ORIENT_ANGLE.get(lin.orientation)
    if base is None:
        base = _pick(rng, (math.pi / 4, 3 * math.pi / 4))
    theta = base + rng.uniform(-0.12, 0.12)
    off = rng.uniform(-0.17, 0.17)
    cx, cy = 0.5 - off * math.sin(theta), 0.5 + off * math.cos(theta)
    if lin.kind == "road":
        return _LineGeom("road", cx, cy, theta, rng.uniform(0.065, 0.08) * max(obj_scale, 0.8))
    if lin.kind == "river":
        return _LineGeom("river", cx, cy, theta, rng.uniform(0.09, 0.13), amp=rng.uniform(0.04, 0.08),
                         freq=rng.uniform(0.7, 1.5), phase=rng.uniform(0, 2 * math.pi))
    if lin.kind == "runway":
        # keep the runway (and its apron) away from the border so the ends show
        cx, cy = 0.5 - off * 0.5 * math.sin(theta), 0.5 + off * 0.5 * math.cos(theta)
        return _LineGeom("runway", cx, cy, theta, rng.uniform(0.11, 0.13), half_len=rng.uniform(0.40, 0.46),
                         apron_side=int(_pick(rng, (-1, 1))))
    return _LineGeom("railway", cx, cy, theta, rng.uniform(0.05, 0.06))


def draw_road(img, g: _LineGeom, rng, S):
    X, Y = _grid(S)
    u, v = _frame(X, Y, g.cx, g.cy, g.theta)
    av = np.abs(v)
    shoulder = _cover(av - g.width / 2 - 1.0 / S, S)
    _paint(img, 0.6 * shoulder, _jit(rng, (0.70, 0.68, 0.62), 0.03))
    road = _cover(av - g.width / 2, S)
    _paint(img, road, _jit(rng, (0.30, 0.30, 0.32), 0.05))
    dash = (np.mod(u * 10, 1) < 0.5) * _cover(av - 0.45 / S, S)
    _paint(img, 0.8 * dash, (0.92, 0.86, 0.40))
    g.footprint = shoulder


def draw_river(img, g: _LineGeom, rng, S):
    X, Y = _grid(S)
    u, v = _frame(X, Y, g.cx, g.cy, g.theta)
    w = g.width * (1 + 0.15 * np.sin(2 * np.pi * (u * 2.3 + g.phase)))
    d = np.abs(v - g.centre_v(u)) - w / 2
    bank = _cover(d - 1.5 / S, S)
    _paint(img, 0.55 * bank, _jit(rng, (0.62, 0.58, 0.40), 0.05))
    water = _cover(d, S)
    col = _jit(rng, (0.12, 0.30, 0.50), 0.05)
    _paint(img, water, col * (1 + 0.08 * (_value_noise(rng, S, 6)[..., None] - 0.5)))
    g.footprint = bank
    return water


def draw_runway(img, g: _LineGeom, rng, S):
    X, Y = _grid(S)
    u, v = _frame(X, Y, g.cx, g.cy, g.theta)
    au, av = np.abs(u), np.abs(v)
    hw, L = g.width / 2, g.half_len
    # apron (parking area) along one side, then a light safety strip, then the runway
    vc = g.apron_side * (hw + 0.03 + 0.075)
    apron = _cover(_rect_d(u, v - vc, L * 0.8, 0.075), S)
    _paint(img, apron, _jit(rng, (0.46, 0.46, 0.48), 0.04))
    strip = _cover(_rect_d(u, v, L + 0.03, hw + 0.025), S)
    _paint(img, 0.6 * strip, _jit(rng, (0.66, 0.68, 0.58), 0.04))
    body = _cover(_rect_d(u, v, L, hw), S)
    _paint(img, body, _jit(rng, (0.25, 0.25, 0.27), 0.04))
    lw = max(0.6 / S, 0.006)
    centre = (np.mod(u * 9, 1) < 0.55) * _cover(av - lw, S) * (au < L - 0.07)
    edges = _cover(np.abs(av - (hw - 1.2 / S)) - lw * 0.8, S) * (au < L)
    keys = (np.abs(au - (L - 0.035)) < 0.02) * (np.mod(v / (g.width / 6), 1) < 0.5) * (av < hw - 1.5 / S)
    _paint(img, np.clip(centre + edges + keys, 0, 1) * 0.9, (0.95, 0.95, 0.95))
    g.footprint = np.maximum(apron, strip)


def draw_railway(img, g: _LineGeom, rng, S):
    X, Y = _grid(S)
    u, v = _frame(X, Y, g.cx, g.cy, g.theta)
    av = np.abs(v)
    bed = _cover(av - g.width / 2, S)
    _paint(img, bed, _jit(rng, (0.55, 0.48, 0.40), 0.05))
    period = max(0.02, 2.5 / S)
    ties = (np.mod(u / period, 1) < 0.45) * _cover(av - g.width * 0.38, S)
    _paint(img, 0.8 * ties, (0.32, 0.22, 0.15))
    rails = _cover(np.abs(av - g.width * 0.2) - 0.35 / S, S)
    _paint(img, 0.9 * rails, (0.78, 0.78, 0.80))
    g.footprint = bed


LINE_DRAWERS = {"road": draw_road, "river": draw_river, "runway": draw_runway, "railway": draw_railway}


# --- objects (drawn in a local window around each object) ----------------------------------------


def _window(S, x, y, r):
    r0, r1 = max(0, int((y - r) * S) - 1), min(S, int((y + r) * S) + 2)
    c0, c1 = max(0, int((x - r) * S) - 1), min(S, int((x + r) * S) + 2)
    return np.s_[r0:r1, c0:c1]


def _local(S, x, y, r, theta):
    sl = _window(S, x, y, r)
    X, Y = _grid(S)
    u, v = _frame(X[sl], Y[sl], x, y, theta)
    return sl, u, v


def draw_building(img, S, x, y, theta, size, rng, shadow):
    a, b = size * rng.uniform(0.8, 1.2), size * rng.uniform(0.55, 0.9)
    sl, u, v = _local(S, x, y, a + b + 0.03, theta)
    su, sv = _frame(np.float32(shadow[0]), np.float32(shadow[1]), 0, 0, theta)
    _paint(img[sl], 0.55 * _cover(_rect_d(u - su, v - sv, a, b), S), (0.05, 0.05, 0.06))
    roof = _jit(rng, _pick(rng, ((0.80, 0.24, 0.18), (0.94, 0.93, 0.90), (0.30, 0.45, 0.78),
                                 (0.70, 0.82, 0.88))), 0.05)
    _paint(img[sl], _cover(_rect_d(u, v, a, b), S), roof)
    _paint(img[sl], 0.45 * _cover(_rect_d(u, v, a - 0.6 / S, 0.45 / S), S), roof * 0.6)


def draw_tank(img, S, x, y, theta, size, rng, shadow):
    r = size * rng.uniform(0.7, 0.85)
    sl, u, v = _local(S, x, y, r + 0.03, 0.0)
    _paint(img[sl], 0.55 * _cover(np.hypot(u - shadow[0], v - shadow[1]) - r, S), (0.05, 0.05, 0.06))
    d = np.hypot(u, v)
    _paint(img[sl], _cover(d - r, S), _jit(rng, (0.93, 0.93, 0.91), 0.02))
    _paint(img[sl], 0.5 * _cover(np.abs(d - r * 0.62) - 0.5 / S, S), (0.55, 0.55, 0.55))


def draw_vehicle(img, S, x, y, theta, size, rng, shadow):
    a, b = size * 0.55, size * 0.3
    sl, u, v = _local(S, x, y, a + 0.02, theta)
    col = _jit(rng, _pick(rng, ((0.92, 0.15, 0.12), (0.95, 0.95, 0.95), (0.98, 0.85, 0.10),
                                (0.15, 0.40, 0.95))), 0.05)
    _paint(img[sl], _cover(_rect_d(u, v, a, b), S), col)
    _paint(img[sl], 0.5 * _cover(_rect_d(u - a * 0.3, v, a * 0.25, b * 0.7), S), (0.1, 0.12, 0.16))


def draw_ship(img, S, x, y, theta, size, rng, shadow):
    a, b = size * rng.uniform(0.95, 1.1), max(size * 0.36, 1.1 / S)
    sl, u, v = _local(S, x, y, 2.6 * a, theta)
    wake = np.hypot((u + 1.3 * a) / (1.4 * a), v / (b * 1.3)) - 1
    _paint(img[sl], 0.3 * _cover(wake * b, S), (0.80, 0.86, 0.90))
    hull = np.maximum(np.abs(u) - a, (np.hypot(np.maximum(np.abs(u) - 0.5 * a, 0) / (0.5 * a), v / b) - 1) * b)
    _paint(img[sl], _cover(hull, S), _jit(rng, (0.97, 0.97, 0.95), 0.02))
    _paint(img[sl], 0.4 * _cover(_rect_d(u + 0.3 * a, v, 0.18 * a, 0.45 * b), S), (0.60, 0.60, 0.64))


def draw_plane(img, S, x, y, theta, size, rng, shadow):
    L = size * 1.05
    sl, u, v = _local(S, x, y, L + 0.03, theta)
    col = _jit(rng, (0.96, 0.96, 0.97), 0.01)

    def body(du, dv):
        fus = _rect_d(u - du, v - dv, L, max(0.18 * size, 0.6 / S))
        wing = _rect_d(u - du - 0.1 * L, v - dv, max(0.2 * size, 0.7 / S), 0.95 * L)
        tail = _rect_d(u - du + 0.8 * L, v - dv, max(0.12 * size, 0.5 / S), 0.4 * L)
        return np.minimum(np.minimum(fus, wing), tail)

    su, sv = _frame(np.float32(shadow[0]), np.float32(shadow[1]), 0, 0, theta)
    _paint(img[sl], 0.5 * _cover(body(su, sv), S), (0.05, 0.05, 0.06))
    _paint(img[sl], _cover(body(0, 0), S), col)


OBJECT_DRAWERS = {"building": draw_building, "tank": draw_tank, "vehicle": draw_vehicle,
                  "ship": draw_ship, "plane": draw_plane}
OBJECT_SIZE = {"building": 0.06, "tank": 0.055, "vehicle": 0.07, "ship": 0.07, "plane": 0.07}
OBJECT_SPACING = {"building": 2.3, "tank": 2.0, "vehicle": 1.5, "ship": 2.4, "plane": 2.3}  # x size


# --- placement -----------------------------------------------------------------------------------


def _in_zone(x, y, loc):
    if loc is None:
        return np.ones_like(x, bool)
    return {"left": x < 0.42, "right": x > 0.58, "top": y < 0.42, "bottom": y > 0.58,
            "center": (np.abs(x - 0.5) < 0.22) & (np.abs(y - 0.5) < 0.22)}[loc]


def _lookup(mask, x, y):
    S = mask.shape[0]
    return mask[np.clip((y * S).astype(np.int64), 0, S - 1), np.clip((x * S).astype(np.int64), 0, S - 1)]


def _candidates(rng, kind, ctx, T=300):
    """(x, y, theta) candidate arrays for one object kind, before zone/spacing checks."""
    lines = {g.kind: g for g in ctx["lines"]}
    base = ctx["grid_angle"]
    if kind == "vehicle":
        g = lines["road"]
        u = rng.uniform(-0.8, 0.8, T)
        v = rng.choice((-0.23, 0.23), T) * g.width
        x, y = g.to_xy(u, v)
        return x, y, np.full(T, g.theta) + rng.choice((0, math.pi), T)
    if kind == "plane":
        g = lines["runway"]
        u = rng.uniform(-g.half_len * 0.72, g.half_len * 0.72, T)
        on_rw = rng.random(T) < 0.15
        v = np.where(on_rw, 0.0, g.apron_side * (g.width / 2 + 0.105) + rng.uniform(-0.01, 0.01, T))
        x, y = g.to_xy(u, v)
        th = np.where(on_rw, g.theta, g.theta - g.apron_side * math.pi / 2) + rng.uniform(-0.15, 0.15, T)
        return x, y, th
    if kind == "ship" and ctx["sea"] is None:
        g = lines["river"]
        u = rng.uniform(-0.8, 0.8, T)
        v = rng.uniform(-0.15, 0.15, T) * g.width
        x, y = g.to_xy(u, v)
        return x, y, g.angle_at(u) + rng.choice((0, math.pi), T)
    x, y = rng.uniform(0, 1, T), rng.uniform(0, 1, T)
    if kind == "ship":
        ok = _lookup(ctx["sea"], x, y) > 0.5
        th = rng.uniform(0, 2 * math.pi, T)
    else:
        ok = _lookup(ctx["free_land"], x, y) > 0.5
        th = base + rng.integers(0, 2, T) * (math.pi / 2) + rng.uniform(-0.1, 0.1, T)
    return x[ok], y[ok], th[ok]


def _place(rng, group: ObjectGroup, size, ctx, taken: list) -> list[tuple[float, float, float]]:
    x, y, th = _candidates(rng, group.kind, ctx)
    m = size * 1.3
    ok = (x > m) & (x < 1 - m) & (y > m) & (y < 1 - m) & _in_zone(x, y, group.location)
    if group.kind in ("vehicle", "plane"):  # stay off water/rivers
        ok &= _lookup(ctx["water"], x, y) < 0.5
    x, y, th = x[ok], y[ok], th[ok]
    same = OBJECT_SPACING[group.kind] * size
    placed: list[tuple[float, float, float]] = []
    for xi, yi, ti in zip(x.tolist(), y.tolist(), th.tolist()):
        if len(placed) >= group.count:
            break
        ok = True
        for px, py, ps, pk in taken:
            d_min = same if pk == group.kind else 1.3 * (size + ps)
            if (xi - px) ** 2 + (yi - py) ** 2 < d_min ** 2:
                ok = False
                break
        if ok:
            taken.append((xi, yi, size, group.kind))
            placed.append((xi, yi, ti))
    return placed


# --- whole scene ---------------------------------------------------------------------------------


def render_scene(attrs: SceneAttrs, rng: np.random.Generator, S: int, k: Knobs) -> tuple[np.ndarray, SceneAttrs]:
    """Draw ``attrs``; returns (HxWx3 uint8, attrs of what was actually drawn)."""
    covers = attrs.covers
    img = TEXTURES[covers[0]](rng, S, k).copy()
    water = np.full((S, S), 1.0 if covers[0] == "water" else 0.0, np.float32)
    if len(attrs.regions) > 1:
        mask = region_mask(rng, S, attrs.regions[1].side)
        _paint(img, mask, TEXTURES[covers[1]](rng, S, k))
        if covers[1] == "water":
            water = mask
        elif covers[0] == "water":
            water = 1 - mask
    sea = water.copy() if "water" in covers else None
    lines, footprint = [], np.zeros((S, S), np.float32)
    for lin in attrs.linear:
        g = _line_geom(rng, lin, k.obj_scale)
        river = LINE_DRAWERS[lin.kind](img, g, rng, S)
        if river is not None:
            water = np.maximum(water, river)
        footprint = np.maximum(footprint, g.footprint)
        lines.append(g)
    shadow_dir = rng.uniform(0, 2 * math.pi)
    shadow = (0.012 * math.cos(shadow_dir), 0.012 * math.sin(shadow_dir))
    ctx = {"lines": lines, "water": water, "grid_angle": rng.uniform(0, math.pi / 2)}
    pad = max(1, int(math.ceil(0.06 * k.obj_scale * S)))
    ctx["sea"] = None if sea is None else 1 - _dilate(1 - sea, pad)
    ctx["free_land"] = 1 - _dilate(np.maximum(water, footprint), pad)
    taken: list = []
    drawn = []
    groups = list(attrs.objects)
    extra = []
    if rng.random() < k.p_distractor:  # an unmentioned small group of a land object
        kinds = [o for o in ("building", "tank") if o not in {g.kind for g in groups}]
        if kinds:
            extra.append(ObjectGroup(_pick(rng, kinds), int(rng.integers(1, 3)), None))
    out_groups: list[list[ObjectGroup]] = [[], []]
    for j, grp in enumerate(groups + extra):
        size = OBJECT_SIZE[grp.kind] * k.obj_scale * rng.uniform(0.9, 1.1) * (0.6 if j >= len(groups) else 1)
        placed = _place(rng, grp, size, ctx, taken)
        loc = grp.location
        if not placed and loc is not None:  # location impossible here: drop it
            loc = None
            placed = _place(rng, ObjectGroup(grp.kind, grp.count, None), size, ctx, taken)
        if placed:
            drawn.append((grp.kind, size, placed))
            out_groups[j >= len(groups)].append(ObjectGroup(grp.kind, len(placed), loc))
    for kind, size, placed in drawn:
        for x, y, th in placed:
            OBJECT_DRAWERS[kind](img, S, x, y, th, size, rng, shadow)
    _clutter(img, rng, S, k)
    img *= 1 + rng.normal(0, k.colour_jitter, 3).astype(np.float32)
    img += np.float32(rng.normal(0, k.colour_jitter / 3))
    img += rng.normal(0, k.noise, img.shape).astype(np.float32)
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out, SceneAttrs([Region(r.cover, r.side) for r in attrs.regions],
                           [Linear(x.kind, x.orientation) for x in attrs.linear], out_groups[0], out_groups[1])


def _clutter(img, rng, S, k):
    """Unlabelled specks and haze (hard mode only)."""
    n = int(rng.poisson(k.clutter)) if k.clutter > 0 else 0
    for _ in range(n):
        x, y = rng.random(2)
        sl, u, v = _local(S, x, y, 0.02, rng.uniform(0, math.pi))
        _paint(img[sl], 0.7 * _cover(_rect_d(u, v, rng.uniform(0.3, 1.2) / S, rng.uniform(0.3, 1.0) / S), S),
               rng.uniform(0.1, 0.9, 3))
    if rng.random() < k.p_haze:
        _paint(img, rng.uniform(0.15, 0.4) * _fbm(rng, S, 3, 3), (0.92, 0.93, 0.95))


# ==================================================================================================
# captions

LC_NAMES = {
    "farmland": ("farmland", "farm fields", "cultivated fields", "cropland", "green fields", "striped fields"),
    "forest": ("a forest", "woodland", "dense trees", "a dense forest", "a wooded area"),
    "desert": ("a desert", "a sandy area", "a sandy desert", "sand dunes"),
    "water": ("the sea", "water", "a lake", "open water", "blue water"),
    "residential": ("a dense residential area", "a residential area", "a residential district",
                    "a neighborhood", "rows of houses"),
    "grassland": ("grassland", "a meadow", "a grassy area"),
    "bare_land": ("bare land", "bare soil", "barren land", "an open dirt area"),
    "industrial": ("an industrial area", "an industrial zone", "factories"),
}
LIN_NAMES = {  # (article, noun)
    "road": (("a", "road"), ("a", "street"), ("a", "highway"), ("a", "paved road")),
    "river": (("a", "river"), ("a", "winding river"), ("a", "stream"), ("a", "curving river")),
    "runway": (("a", "runway"), ("an", "airport runway"), ("an", "airstrip"), ("a", "long runway")),
    "railway": (("a", "railway"), ("a", "railroad"), ("a", "railway line"), ("a", "rail track")),
}
OBJ_NOUNS = {
    "building": ("building", "small building", "flat-roofed building"),
    "vehicle": ("car", "vehicle", "small car"),
    "ship": ("ship", "boat", "vessel"),
    "plane": ("plane", "airplane", "aircraft"),
    "tank": ("storage tank", "oil tank", "round storage tank"),
}
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
MANY_WORDS = ("many", "numerous", "plenty of", "a large number of")
LOC_PHRASES = {
    "left": ("on the left", "on the left side", "in the left part of the image"),
    "right": ("on the right", "on the right side", "in the right part of the image"),
    "top": ("at the top", "in the upper part", "near the top of the image"),
    "bottom": ("at the bottom", "in the lower part", "near the bottom of the image"),
    "center": ("in the center", "in the middle", "in the middle of the image"),
}
SIDE_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
LIN_VERBS = (("runs through", "run through"), ("crosses", "cross"), ("cuts across", "cut across"),
             ("passes through", "pass through"))
OBJ_LIN_PREDS = {  # (singular, plural) verb phrases linking an object group to its linear feature
    "building": (("stands beside", "stand beside"), ("is located along", "are located along"),
                 ("is next to", "are next to")),
    "tank": (("stands beside", "stand beside"), ("sits near", "sit near"), ("is next to", "are next to")),
    "vehicle": (("is parked on", "are parked on"), ("drives along", "drive along"), ("is on", "are on")),
    "plane": (("is parked beside", "are parked beside"), ("stands next to", "stand next to"),
              ("waits beside", "are lined up beside")),
    "ship": (("sails on", "sail on"), ("is on", "are on"), ("is moored on", "are moored on")),
}
OBJ_LC_PREDS = {
    "ship": (("sails on", "sail on"), ("floats on", "float on"), ("is anchored in", "are anchored in")),
    None: (("stands in", "stand in"), ("is located in", "are located in"), ("is in", "are in")),
}
_LINK = {"vehicle": "road", "plane": "runway", "ship": "river"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(noun: str) -> str:
    return noun if noun.endswith("aircraft") else noun + "s"


class _Phrases:
    """Random phrase builders over one scene."""

    def __init__(self, attrs: SceneAttrs, rng):
        self.a, self.rng = attrs, rng

    def pick(self, seq):
        return _pick(self.rng, seq)

    def lc(self, sides=False) -> str:
        regs = self.a.regions
        first = self.pick(LC_NAMES[regs[0].cover])
        if len(regs) == 1:
            return first
        second, side = self.pick(LC_NAMES[regs[1].cover]), regs[1].side
        if sides or self.rng.random() < 0.4:
            return f"{first} {SIDE_PHRASE[_OPPOSITE[side]]} and {second} {SIDE_PHRASE[side]}"
        return self.pick((f"{first} and {second}", f"{first} next to {second}", f"{first} bordered by {second}"))

    def lc_in(self) -> str:
        if len(self.a.regions) == 1:
            prep = "on" if self.a.regions[0].cover == "water" else "in"
            return f"{prep} {self.lc()}"
        return f"{'on' if self.a.regions[0].cover == 'water' else 'in'} {self.lc()}"

    def lin_one(self, lin: Linear) -> str:
        art, noun = self.pick(LIN_NAMES[lin.kind])
        if self.rng.random() < 0.3 and noun in ("road", "river", "runway", "railway", "street", "highway"):
            return f"a {lin.orientation} {noun}"
        return f"{art} {noun}"

    def lin(self) -> tuple[str, bool]:
        order = self.rng.permutation(len(self.a.linear)).tolist()
        parts = [self.lin_one(self.a.linear[i]) for i in order]
        return " and ".join(parts), len(parts) > 1

    def group(self, g: ObjectGroup, loc_p=0.8) -> str:
        noun = self.pick(OBJ_NOUNS[g.kind])
        if g.count == 1:
            det = self.pick((_article(noun), "one", "a single"))
            s = f"{det} {noun}"
        else:
            det = COUNT_WORDS[g.count] if g.count < MANY else self.pick(MANY_WORDS)
            s = f"{det} {_plural(noun)}"
        if g.location and self.rng.random() < loc_p:
            s += " " + self.pick(LOC_PHRASES[g.location])
        return s

    def obj(self, loc_p=0.8) -> tuple[str, bool]:
        """Object phrase and whether a following verb is plural."""
        gs = self.a.objects
        text = " and ".join(self.group(g, loc_p) for g in gs)
        return text, len(gs) > 1 or gs[0].count > 1

    def there(self) -> str:
        """'there is' / 'there are', agreeing with the first object group."""
        return "there are" if self.a.objects[0].count > 1 else "there is"

    def target(self) -> tuple[Linear, bool]:
        """The linear feature the (first) object group relates to, and whether that group's own
        verbs apply (single group; vehicles/planes/ships name the road/runway/river they are on)."""
        kind = _LINK.get(self.a.objects[0].kind)
        single = len(self.a.objects) == 1
        if kind is None:
            return self.pick(self.a.linear), single
        for x in self.a.linear:
            if x.kind == kind:
                return x, single
        return self.pick(self.a.linear), False


def _be(plural: bool) -> str:
    return "are" if plural else "is"


def _sentence(focus: frozenset, p: _Phrases) -> str:
    if focus == {"lc", "lin", "obj"}:
        (L, lp), (O, op) = p.lin(), p.obj()
        verb = p.pick(LIN_VERBS)[lp]
        return p.pick((
            f"{L} {verb} {p.lc()} with {O}",
            f"{L} with {O} next to {p.lc()}",
            f"an aerial image of {p.lc()} with {L} and {O}",
            f"{p.lc()} crossed by {L} with {O}",
            f"in this image {L} {verb} {p.lc()} and {p.there()} {O}",
        ))
    if focus == {"lin", "obj"} or focus == {"lc", "lin", "obj", "link"}:
        (O, op), (t, specific) = p.obj(), p.target()
        T = p.lin_one(t)
        pred = p.pick(OBJ_LIN_PREDS[p.a.objects[0].kind])[op] if specific else _be(op) + " near"
        if "lc" in focus:
            return p.pick((f"{O} {pred} {T} {p.lc_in()}", f"{p.there()} {O} next to {T} {p.lc_in()}"))
        return p.pick((f"{O} {pred} {T}", f"{T} with {O}", f"{p.there()} {O} next to {T}"))
    if focus == {"lc", "obj"}:
        O, op = p.obj()
        kinds = {g.kind for g in p.a.objects}
        on_water = kinds == {"ship"} and p.a.covers == ["water"]
        pred = p.pick(OBJ_LC_PREDS["ship" if on_water else None])[op]
        return p.pick((
            f"{p.lc()} with {O}",
            f"{p.there()} {O} {p.lc_in()}",
            f"{O} {pred} {p.lc()}" if on_water else f"{O} {p.lc_in()}",
            f"an aerial view of {O} {p.lc_in()}",
        ))
    if focus == {"lc", "lin"}:
        L, lp = p.lin()
        return p.pick((
            f"{L} {p.pick(LIN_VERBS)[lp]} {p.lc()}",
            f"{p.lc()} crossed by {L}",
            f"an aerial view of {p.lc()} with {L}",
            f"{p.lc()} divided by {L}",
        ))
    if focus == {"lc"}:
        return p.pick((
            f"an aerial view of {p.lc(sides=True)}",
            f"a large area of {p.lc()}",
            f"this image shows {p.lc(sides=True)}",
            f"{p.lc(sides=True)} seen from above",
            f"a satellite image of {p.lc()}",
            p.lc(sides=True),
        ))
    if focus == {"obj"}:
        O, op = p.obj(loc_p=1.0)
        return p.pick((f"{p.there()} {O} in the image", f"an image with {O}", f"{O} seen from above"))
    if focus == {"lin"}:
        L, _ = p.lin()
        return p.pick((f"{L} seen from above", f"an aerial view of {L}"))
    raise AssertionError(focus)


def _tokens(raw: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", raw.lower())


def describe_scene(attrs: SceneAttrs, rng: np.random.Generator | None = None, n: int = 5) -> list[str]:
    """``n`` distinct captions for a drawn scene.

    Caption 1 covers every scale present, one focuses on the objects (with their location), one on
    the land cover (with region sides); the rest use random subsets. Order is shuffled.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    p = _Phrases(attrs, rng)
    avail = ["lc"] + (["lin"] if attrs.linear else []) + (["obj"] if attrs.objects else [])
    focuses: list[frozenset] = [frozenset(avail)]
    if attrs.objects:
        other = [x for x in avail if x != "obj"]
        focuses.append(frozenset({"obj", p.pick(other)}) if attrs.linear else frozenset({"obj", "lc"}))
        if attrs.linear:
            focuses.append(frozenset({"lc", "lin", "obj", "link"}))
    lc_only = len(avail) == 1 or rng.random() < 0.3
    focuses.append(frozenset({"lc"}) if lc_only else frozenset({"lc", p.pick(avail[1:])}))
    while len(focuses) < n:
        size = int(rng.integers(min(2, len(avail)), len(avail) + 1))
        focuses.append(frozenset(rng.permutation(avail)[:size].tolist()))
    out: list[str] = []
    for f in focuses[:n]:
        for _ in range(40):
            s = _sentence(f, p)
            if s not in out:
                break
            f = frozenset(rng.permutation(avail)[:int(rng.integers(1, len(avail) + 1))].tolist())
        out.append(s)
    order = rng.permutation(len(out))
    return [out[i] + " ." for i in order]


# ==================================================================================================
# corpus writer


def make_sample(seed: int, imgid: int, image_size: int = 64,
                difficulty: str | float = "easy") -> tuple[np.ndarray, list[str], SceneAttrs]:
    """One image (HxWx3 uint8), its captions and drawn attributes; pure function of the args."""
    k = knobs(difficulty)
    rng = np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, int(seed), int(imgid)]))
    intended = sample_attrs(rng, k)
    img, drawn = render_scene(intended, rng, int(image_size), k)
    return img, describe_scene(drawn, rng), drawn


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


def generate_corpus(out_dir, *, splits: Mapping[str, int] = DEFAULT_SPLITS, image_size: int = 64,
                    seed: int = 0, image_format: str = "jpg", difficulty: str | float = "easy",
                    workers: int = 1) -> pathlib.Path:
    """Write a synthetic corpus; returns the path of ``dataset_synth.json`` (written last).

    ``splits`` maps split name -> image count (images are numbered in that order);
    ``image_format`` is "jpg", "png", "tif" or "mixed" (cycles jpg/png/tif by imgid);
    ``difficulty`` is "easy" (default), "medium", "hard" or a float in [0, 1];
    ``workers`` > 1 renders in a process pool, with identical output.
    """
    k = knobs(difficulty)
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
    jobs = [(str(images_dir), int(seed), image_size, k.level, [(i, f) for i, _, f in items[s:s + chunk]])
            for s in range(0, len(items), chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as ex:
            results = [r for part in ex.map(_render_chunk, jobs) for r in part]
    else:
        results = [r for job in jobs for r in _render_chunk(job)]

    images = []
    for (i, split, filename), (caps, attrs) in zip(items, results):
        sentids = [5 * i + j for j in range(len(caps))]
        images.append({
            "filename": filename, "imgid": i, "split": split, "sentids": sentids,
            "sentences": [{"raw": c, "tokens": _tokens(c), "imgid": i, "sentid": s} for c, s in zip(caps, sentids)],
            "synth_attrs": attrs,
        })
    doc = {"images": images, "dataset": "synth",
           "synth_config": {"generator_version": GENERATOR_VERSION, "seed": int(seed), "image_size": image_size,
                            "image_format": image_format, "difficulty": k.level, "splits": dict(splits)}}
    ann = out / ANNOTATION_NAME
    _atomic_write(ann, json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    return ann
