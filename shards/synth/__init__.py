"""Procedural remote-sensing-like image-text corpus in the Karpathy layout (RSICD/RSITMD style).

Each image is a top-down scene sampled from discrete attributes at three scales (land cover, linear
features, object groups), matching the multi-scale alignment the model learns; its five captions
come from the attributes that were actually drawn. One module per job:

* :mod:`.scenes`   - the attribute model and its sampling, with the difficulty knobs;
* :mod:`.textures` - canvas primitives and land-cover textures;
* :mod:`.render`   - drawing a scene (linear features, objects, clutter, noise);
* :mod:`.captions` - caption text;
* :mod:`.corpus`   - writing images and ``dataset_synth.json`` (:func:`generate_corpus`).
"""

from .captions import describe_scene
from .corpus import DEFAULT_SPLITS, generate_corpus, make_sample
from .render import render_scene
from .scenes import (LANDCOVERS, LINEAR_KINDS, LOCATIONS, OBJECT_KINDS, Knobs, Linear, ObjectGroup, Region,
                     SceneAttrs, knobs, sample_attrs)

__all__ = [
    "DEFAULT_SPLITS", "LANDCOVERS", "LINEAR_KINDS", "OBJECT_KINDS", "LOCATIONS", "Knobs",
    "Region", "Linear", "ObjectGroup", "SceneAttrs", "knobs", "sample_attrs", "render_scene",
    "describe_scene", "make_sample", "generate_corpus",
]
