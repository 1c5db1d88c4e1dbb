"""Drawing a sampled scene: land cover, linear features, objects placed where they fit, clutter and noise.

:func:`render_scene` returns the attributes of what was actually drawn (counts shrink and locations
are dropped when objects do not fit), so captions built from them never mention anything absent.
Given a ``coarse_rng``, everything above the object scale (land cover textures, region boundary,
linear features, sun direction, building grid, overall tint) is drawn from it and the objects, clutter
and sensor noise from ``rng``: images rendered with equal coarse streams share their whole layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .scenes import Knobs, Linear, ObjectGroup, Region, SceneAttrs, _pick
from .textures import TEXTURES, _cover, _dilate, _fbm, _frame, _grid, _jit, _paint, _rect_d, _value_noise, region_mask

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


# Fine-scale corpus colours (scenes.COLOURS) of roofs and vehicles.
COLOUR_RGB = {"red": (0.85, 0.15, 0.12), "white": (0.95, 0.95, 0.93), "blue": (0.15, 0.35, 0.92),
              "yellow": (0.97, 0.85, 0.10)}


def draw_building(img, S, x, y, theta, size, rng, shadow, colour=None):
    a, b = size * rng.uniform(0.8, 1.2), size * rng.uniform(0.55, 0.9)
    sl, u, v = _local(S, x, y, a + b + 0.03, theta)
    su, sv = _frame(np.float32(shadow[0]), np.float32(shadow[1]), 0, 0, theta)
    _paint(img[sl], 0.55 * _cover(_rect_d(u - su, v - sv, a, b), S), (0.05, 0.05, 0.06))
    if colour is None:
        roof = _jit(rng, _pick(rng, ((0.80, 0.24, 0.18), (0.94, 0.93, 0.90), (0.30, 0.45, 0.78),
                                     (0.70, 0.82, 0.88))), 0.05)
    else:
        roof = _jit(rng, COLOUR_RGB[colour], 0.05)
    _paint(img[sl], _cover(_rect_d(u, v, a, b), S), roof)
    _paint(img[sl], 0.45 * _cover(_rect_d(u, v, a - 0.6 / S, 0.45 / S), S), roof * 0.6)


def draw_tank(img, S, x, y, theta, size, rng, shadow):
    r = size * rng.uniform(0.7, 0.85)
    sl, u, v = _local(S, x, y, r + 0.03, 0.0)
    _paint(img[sl], 0.55 * _cover(np.hypot(u - shadow[0], v - shadow[1]) - r, S), (0.05, 0.05, 0.06))
    d = np.hypot(u, v)
    _paint(img[sl], _cover(d - r, S), _jit(rng, (0.93, 0.93, 0.91), 0.02))
    _paint(img[sl], 0.5 * _cover(np.abs(d - r * 0.62) - 0.5 / S, S), (0.55, 0.55, 0.55))


def draw_vehicle(img, S, x, y, theta, size, rng, shadow, colour=None):
    a, b = size * 0.55, size * 0.3
    sl, u, v = _local(S, x, y, a + 0.02, theta)
    if colour is None:
        col = _jit(rng, _pick(rng, ((0.92, 0.15, 0.12), (0.95, 0.95, 0.95), (0.98, 0.85, 0.10),
                                    (0.15, 0.40, 0.95))), 0.05)
    else:
        col = _jit(rng, COLOUR_RGB[colour], 0.05)
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


def render_scene(attrs: SceneAttrs, rng: np.random.Generator, S: int, k: Knobs,
                 coarse_rng: np.random.Generator | None = None) -> tuple[np.ndarray, SceneAttrs]:
    """Draw ``attrs``; returns (HxWx3 uint8, attrs of what was actually drawn).

    ``coarse_rng`` (default: ``rng``) draws everything above the object scale; see the module docstring.
    """
    crng = rng if coarse_rng is None else coarse_rng
    covers = attrs.covers
    img = TEXTURES[covers[0]](crng, S, k).copy()
    water = np.full((S, S), 1.0 if covers[0] == "water" else 0.0, np.float32)
    if len(attrs.regions) > 1:
        mask = region_mask(crng, S, attrs.regions[1].side)
        _paint(img, mask, TEXTURES[covers[1]](crng, S, k))
        if covers[1] == "water":
            water = mask
        elif covers[0] == "water":
            water = 1 - mask
    sea = water.copy() if "water" in covers else None
    lines, footprint = [], np.zeros((S, S), np.float32)
    for lin in attrs.linear:
        g = _line_geom(crng, lin, k.obj_scale)
        river = LINE_DRAWERS[lin.kind](img, g, crng, S)
        if river is not None:
            water = np.maximum(water, river)
        footprint = np.maximum(footprint, g.footprint)
        lines.append(g)
    shadow_dir = crng.uniform(0, 2 * math.pi)
    shadow = (0.012 * math.cos(shadow_dir), 0.012 * math.sin(shadow_dir))
    ctx = {"lines": lines, "water": water, "grid_angle": crng.uniform(0, math.pi / 2)}
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
            placed = _place(rng, ObjectGroup(grp.kind, grp.count, None, grp.colour), size, ctx, taken)
        if placed:
            drawn.append((grp.kind, size, placed, grp.colour))
            out_groups[j >= len(groups)].append(ObjectGroup(grp.kind, len(placed), loc, grp.colour))
    for kind, size, placed, colour in drawn:
        extra_kw = {} if colour is None else {"colour": colour}
        for x, y, th in placed:
            OBJECT_DRAWERS[kind](img, S, x, y, th, size, rng, shadow, **extra_kw)
    _clutter(img, rng, S, k)
    img *= 1 + crng.normal(0, k.colour_jitter, 3).astype(np.float32)
    img += np.float32(crng.normal(0, k.colour_jitter / 3))
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

