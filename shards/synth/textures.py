"""Canvas primitives and the land-cover textures painted with them (the large scale of a scene).

The canvas is float32 HxWx3 in [0, 1]; geometry is in image-normalised units.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


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

