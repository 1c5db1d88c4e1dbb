"""Which shard each sample goes to, decided by its key, so that changing, adding or removing some
samples rewrites only the shards that hold them.

Each split is cut on its own. Its samples, ordered by h = sha1(sample key) (stable, and it spreads
classes across shards), form the root of a binary trie; a node over ``shard_size`` samples or
``shard_bytes`` bytes is split in two by the next bit of h until every leaf fits (one sample is
always a leaf). Every non-empty leaf is a shard, its samples in h order. Hence:

* Locality: a sample's shard depends on its key and on the totals of its own ancestors only.
  Adding or changing a sample rewrites the leaf that receives it (split when it overflows);
  removing one rewrites its leaf, merged with its sibling leaf when their parent fits again (under
  a byte limit, with the leaves of the lowest ancestor that fits again). No other shard changes
  name or bytes, so the writer keeps it (:func:`shards.shardfile.content_key` tells).
* Sizes: a shard holds at most ``shard_size`` samples (and ``shard_bytes`` bytes unless it is a
  single sample). A leaf splits only when it is over the limit, so its halves hold about half the
  limit each, up to binomial noise (for 1000 samples: 1 sd = 16 samples): shards hold between about
  half and all of ``shard_size``, as a B-tree's nodes do. Far below that only when the limit is a
  handful of samples and chance leaves a side nearly empty.
* Names: ``<split>-NNNNNN.tar``, NNNNNN the start of the leaf's range of h in units of 2^-19, so
  names sort in h order and stay put when other leaves split or merge. A leaf deeper than 19 bits
  (a split with more than 2^19 shards) appends its further bits as binary digits.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections.abc import Sequence

from .shardfile import END_BYTES

__all__ = ["order_hash", "leaf_label", "cut"]

HASH_BITS = 160
NAME_BITS = 19  # 2^19 - 1 = 524287: six decimal digits


def order_hash(key: str) -> int:
    """h: the sample key's sha1 as an integer (its order in a split and its path in the trie)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest(), "big")


def leaf_label(depth: int, prefix: int) -> str:
    """The name digits of the trie node at ``depth`` whose h values start with the bits ``prefix``."""
    if depth <= NAME_BITS:
        return f"{prefix << (NAME_BITS - depth):06d}"
    extra = depth - NAME_BITS
    return f"{prefix >> extra:06d}{prefix & ((1 << extra) - 1):0{extra}b}"


def cut(hashes: Sequence[int], sizes: Sequence[int], shard_size: int, shard_bytes: int) -> list[tuple[str, int, int]]:
    """The leaves over ``hashes`` (ascending h of a split's samples; ``sizes`` their tar bytes) as
    ``(label, lo, hi)``: the leaf holds samples ``lo:hi``. Leaves come in h order."""
    total = [0, *itertools.accumulate(sizes)]
    leaves: list[tuple[str, int, int]] = []
    stack = [(0, 0, 0, len(hashes))]  # (depth, prefix, lo, hi), the leftmost node on top: leaves come in h order
    while stack:  # a loop, not a recursive closure: that would be a cycle, kept alive while the writer pauses the GC
        depth, prefix, lo, hi = stack.pop()
        n = hi - lo
        if n == 0:
            continue
        if n == 1 or depth == HASH_BITS or (n <= shard_size and total[hi] - total[lo] + END_BYTES <= shard_bytes):
            leaves.append((leaf_label(depth, prefix), lo, hi))
            continue
        right = (prefix << 1) | 1
        mid = bisect.bisect_left(hashes, right << (HASH_BITS - depth - 1), lo, hi)
        stack += [(depth + 1, right, mid, hi), (depth + 1, prefix << 1, lo, mid)]
    return leaves
