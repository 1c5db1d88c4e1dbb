"""Caption text: varied sentences about a drawn scene, built only from its attributes.

Fine-scale captions (``describe_scene(..., fine=True)``) every one name each object group with its
count, colour (when it has one) and location, beside the coarse layout the group shares.
"""

from __future__ import annotations

import re

import numpy as np

from .scenes import _OPPOSITE, MANY, Linear, ObjectGroup, SceneAttrs, _pick

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

    def __init__(self, attrs: SceneAttrs, rng, fine: bool = False):
        self.a, self.rng, self.fine = attrs, rng, fine

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
        if g.colour:  # "small building" -> "small red building"
            *adjectives, head = noun.split(" ")
            noun = " ".join([*adjectives, g.colour, head])
        if g.count == 1:
            det = self.pick((_article(noun), "one", "a single"))
            s = f"{det} {noun}"
        else:
            det = COUNT_WORDS[g.count] if g.count < MANY else self.pick(MANY_WORDS)
            s = f"{det} {_plural(noun)}"
        if g.location and (self.fine or self.rng.random() < loc_p):
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


def describe_scene(attrs: SceneAttrs, rng: np.random.Generator | None = None, n: int = 5,
                   fine: bool = False) -> list[str]:
    """``n`` distinct captions for a drawn scene.

    Caption 1 covers every scale present, one focuses on the objects (with their location), one on
    the land cover (with region sides); the rest use random subsets. Order is shuffled. With ``fine``
    (a scene with objects), every caption names every object group with its count, colour and location.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    fine = fine and bool(attrs.objects)
    p = _Phrases(attrs, rng, fine)
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
            s = _sentence(f | {"obj"} if fine else f, p)
            if s not in out:
                break
            f = frozenset(rng.permutation(avail)[:int(rng.integers(1, len(avail) + 1))].tolist())
        out.append(s)
    order = rng.permutation(len(out))
    return [out[i] + " ." for i in order]

