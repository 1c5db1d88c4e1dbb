"""Phase 2 of :func:`shards.writer.write_shards`: which shards to write, what each holds, and
which of a previous set's shards can stay (:mod:`shards.assign` decides where each sample goes)."""

from __future__ import annotations

import itertools
from collections import defaultdict
from operator import itemgetter

from .assign import cut, order_hash
from .manifest import SCHEMA_VERSION, Manifest, ShardInfo, shard_name
from .readers import ImageInfo, Sample
from .shardfile import TAR_MTIME, Member, ShardPlan, content_key
from .storage import Store

__all__ = ["content_salt", "plan_shards", "final_plan", "unchanged_shards"]


def content_salt(resize: int | None) -> str:
    salt = f"schema {SCHEMA_VERSION}; mtime {TAR_MTIME}; image digest blake3; resize {resize}"
    if resize:
        import PIL

        salt += f"; pillow {PIL.__version__}"  # re-encoded bytes depend on the encoder build
    return salt


def plan_shards(good: list[tuple[Sample, ImageInfo]], *, shard_size: int, shard_bytes: int,
                salt: str | None) -> dict[str, list[ShardPlan]]:
    """Split -> its shards, in name order (:mod:`shards.assign`); ``salt`` None: drafts, whose
    content keys are left empty (their tasks compute them)."""
    by_split: dict[str, list[tuple[int, int, Member]]] = defaultdict(list)
    # Members and their sizes are made in the corpus' order, the order the samples lie in memory: made after the
    # sort by h, each read a sample from anywhere (80,000 samples: 2-4 us a sample more, cache misses).
    for s, info in good:
        member = Member(s.key, s.image_path, info.ext, info.size, info.digest, s.meta)
        by_split[s.split].append((order_hash(s.key), member.tar_bytes(), member))
    plans: dict[str, list[ShardPlan]] = {}
    for split in sorted(by_split):
        rows = sorted(by_split[split], key=itemgetter(0))
        members = [m for _, _, m in rows]
        leaves = cut([h for h, _, _ in rows], [n for _, n, _ in rows], shard_size, shard_bytes)
        plans[split] = [ShardPlan(shard_name(split, label),
                                  "" if salt is None else content_key(members[lo:hi], salt), tuple(members[lo:hi]))
                        for label, lo, hi in leaves]
    return plans


def final_plan(drafts: dict[str, list[ShardPlan]], found: dict[str, ImageInfo],
               good: list[tuple[Sample, ImageInfo]], *, shard_size: int, shard_bytes: int,
               salt: str) -> dict[str, list[ShardPlan]]:
    """The plan from every image's check, after a one-pass write: a split whose drafted images all
    passed with the sizes they were drafted with keeps the drafts' cut (same samples, same sizes),
    now with the checked members and their content keys; any other split is planned again. Each
    kept split's list of drafts becomes its plan in place, so the drafts' members are freed as it goes."""
    plans: dict[str, list[ShardPlan]] = {}
    again: set[str] = set()
    for split, shards in drafts.items():
        if not all(found[m.key].ok and found[m.key].size == m.size for draft in shards for m in draft.members):
            again.add(split)
            continue
        for i, draft in enumerate(shards):
            members = tuple(Member(m.key, m.path, found[m.key].ext, m.size, found[m.key].digest, m.meta)
                            for m in draft.members)
            shards[i] = ShardPlan(draft.name, content_key(members, salt), members)
        plans[split] = shards
    if again:
        plans.update(plan_shards([(s, i) for s, i in good if s.split in again], shard_size=shard_size,
                                 shard_bytes=shard_bytes, salt=salt))
    return {split: plans[split] for split in sorted(plans)}


def unchanged_shards(store: Store, old: Manifest | None, plans: dict[str, list[ShardPlan]]) -> dict[str, ShardInfo]:
    """Shards of the previous set that the plan would write again byte for byte (same name and
    content key) and that are still there with their size: kept, not rewritten."""
    if old is None or old.schema_version != SCHEMA_VERSION:
        return {}
    previous = {s.name: s for s in old.shards() if s.content}
    present = store.list_files()
    kept = {}
    for plan in itertools.chain.from_iterable(plans.values()):
        o = previous.get(plan.name)
        if o is not None and o.content == plan.content and present.get(plan.name) == o.bytes:
            kept[plan.name] = o
    return kept
