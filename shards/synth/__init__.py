"""Procedural remote-sensing-like image-text corpus in the Karpathy layout (RSICD/RSITMD style).

Each image is a top-down scene sampled from discrete attributes at three scales (land cover, linear
features, object groups), matching the multi-scale alignment the model learns; its five captions
come from the attributes that were actually drawn.

What the generator varies, image to image (default corpus): the land cover (one region, or two with the
second on one side), zero to two linear features (road, river, runway, railway) and their orientation, up
to two object groups (kind, count, optional location), object placement, roof and vehicle colours (not
captioned), textures, tint and noise; ``difficulty`` widens every range (more covers, counts and groups,
smaller objects, uncaptioned distractors, clutter, haze). The caption wording is sampled per caption.

Fine-scale corpus (``generate_corpus(..., fine_scale=True, group_size=4)``, ``msa corpus synth
--fine-scale``): images come in groups that share their coarse layout exactly (land cover and sides,
linear features with their geometry, textures, sun direction, tint: one random stream per group) and
differ only in their small objects: count (1-5), location and, for buildings and vehicles, colour (red,
white, blue, yellow), all named in every caption. Telling a group's images apart takes the small scale,
so a model that aligns only global, coarse content is at a disadvantage.

One module per job:

* :mod:`.scenes`   - the attribute model and its sampling, with the difficulty knobs;
* :mod:`.textures` - canvas primitives and land-cover textures;
* :mod:`.render`   - drawing a scene (linear features, objects, clutter, noise);
* :mod:`.captions` - caption text;
* :mod:`.corpus`   - writing images and ``dataset_synth.json`` (:func:`generate_corpus`).
"""

from .captions import describe_scene
from .corpus import DEFAULT_SPLITS, generate_corpus, make_group, make_sample
from .render import render_scene
from .scenes import (
    LANDCOVERS,
    LINEAR_KINDS,
    LOCATIONS,
    OBJECT_KINDS,
    Knobs,
    Linear,
    ObjectGroup,
    Region,
    SceneAttrs,
    knobs,
    sample_attrs,
)

__all__ = [
    "DEFAULT_SPLITS", "LANDCOVERS", "LINEAR_KINDS", "OBJECT_KINDS", "LOCATIONS", "Knobs",
    "Region", "Linear", "ObjectGroup", "SceneAttrs", "knobs", "sample_attrs", "render_scene",
    "describe_scene", "make_sample", "make_group", "generate_corpus",
]
