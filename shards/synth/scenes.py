"""Scene model of the synthetic corpus: discrete attributes at three scales, and their sampling.

Kept apart from drawing and captions so both describe the same vocabulary:

* large scale  - one or two land-cover regions (farmland, forest, desert, water, residential; plus
  grassland, bare land and industrial at higher difficulty);
* medium scale - zero to two linear features (road, river, runway, railway);
* small scale  - object groups (buildings, vehicles, ships, planes, storage tanks) with a count and
  an optional location (left/right/top/bottom/center); in the fine-scale corpus also a colour
  (buildings' roofs and vehicles: red, white, blue, yellow).

Fine-scale groups (:func:`sample_layout`, :func:`sample_fine_objects`): one coarse layout (land cover
regions and sides, linear features and their orientation, the object kinds) shared by every image of a
group, and per image the small-scale attributes only: count (1-5), location (always given) and colour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

LANDCOVERS = ("farmland", "forest", "desert", "water", "residential", "grassland", "bare_land",
              "industrial")
LINEAR_KINDS = ("road", "river", "runway", "railway")
OBJECT_KINDS = ("building", "vehicle", "ship", "plane", "tank")
LOCATIONS = ("left", "right", "top", "bottom", "center")
ORIENTATIONS = ("horizontal", "vertical", "diagonal")
MANY = 7  # counts >= MANY are described as "many"
# Fine-scale corpus only: what varies inside a group (counts stay below MANY so each is named exactly).
FINE_COUNTS = (1, 2, 3, 4, 5)
COLOURS = ("red", "white", "blue", "yellow")
COLOURED_KINDS = ("building", "vehicle")

_DIFFICULTY_NAMES = {"easy": 0.0, "medium": 0.5, "hard": 1.0}


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
    colour: str | None = None  # fine-scale corpus only (COLOURS, for COLOURED_KINDS)


@dataclass
class SceneAttrs:
    """Discrete scene description. After :func:`render_scene` it describes what was drawn."""
    regions: list[Region]
    linear: list[Linear] = field(default_factory=list)
    objects: list[ObjectGroup] = field(default_factory=list)
    distractors: list[ObjectGroup] = field(default_factory=list)  # drawn, never captioned

    def to_json(self) -> dict:
        d = asdict(self)
        for group in d["objects"] + d["distractors"]:  # no colour key unless set: the default corpus's bytes
            if group["colour"] is None:
                del group["colour"]
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> SceneAttrs:
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



def sample_layout(rng: np.random.Generator, k: Knobs) -> SceneAttrs:
    """The coarse layout of a fine-scale group: a scene from :func:`sample_attrs` that has objects (resampled
    until it does); its regions, linear features and object kinds are shared by the whole group."""
    for _ in range(1000):
        attrs = sample_attrs(rng, k)
        if attrs.objects:
            return attrs
    raise RuntimeError("no scene with objects in 1000 draws")  # p_no_objects <= 0.12: never happens


def sample_fine_objects(rng: np.random.Generator, layout: SceneAttrs) -> list[ObjectGroup]:
    """One image's small-scale attributes for the layout's object kinds: count, location and colour."""
    return [ObjectGroup(g.kind, int(_pick(rng, FINE_COUNTS)), str(_pick(rng, LOCATIONS)),
                        str(_pick(rng, COLOURS)) if g.kind in COLOURED_KINDS else None)
            for g in layout.objects]
