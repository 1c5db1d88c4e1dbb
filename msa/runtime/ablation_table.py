"""The ablation table: per-variant means and standard deviations over seeds, and each variant's mR
difference to the first variant with a paired t-based confidence interval.

A seed trains every variant from the same initialisation and the same data order, so differences are
taken seed by seed and only seeds present in both variants count. Pure Python (no scipy): the Student t
quantile comes from the regularised incomplete beta function (Numerical Recipes' continued fraction).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from msa.metrics import RECALL_KEYS

CONFIDENCE = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (no scipy needed)."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def _t_quantile_bisect(p: float, df: float) -> float:
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -_t_quantile_bisect(1.0 - p, df)
    high = 1.0
    while student_t_cdf(high, df) < p:
        high *= 2.0
    low = 0.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if student_t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2.0


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom: scipy's when installed, else
    the bisection of the exact CDF (regularised incomplete beta), which agrees with it to 1e-9."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return _t_quantile_bisect(p, df)
    return float(student_t.ppf(p, df))


def paired_difference(a: Mapping[Any, float], b: Mapping[Any, float], confidence: float = CONFIDENCE
                      ) -> dict[str, Any]:
    """mean(a[s] - b[s]) over the keys (seeds) both hold, with its paired t confidence interval.

    The interval is mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n), sd the sample standard deviation of
    the differences; with fewer than two pairs there is no interval (``ci_low``/``ci_high`` None).
    """
    pairs = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in pairs]
    out: dict[str, Any] = {"n_pairs": len(diffs), "seeds": pairs, "mean": None, "std": None,
                           "t_quantile": None, "ci_low": None, "ci_high": None, "confidence": confidence}
    if not diffs:
        return out
    out["mean"] = statistics.fmean(diffs)
    if len(diffs) >= 2:
        sd = statistics.stdev(diffs)
        t = t_quantile((1.0 + confidence) / 2.0, len(diffs) - 1)
        half = t * sd / math.sqrt(len(diffs))
        out.update(std=sd, t_quantile=t, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def ablation_table(rows: Sequence[Mapping[str, Any]], variants: Sequence[str] | None = None, *,
                   keys: Sequence[str] = RECALL_KEYS, confidence: float = CONFIDENCE) -> list[dict[str, Any]]:
    """Per-variant statistics over seeds; a pure function of the trial rows.

    ``rows``: one per finished trial, ``{"variant", "seed", <key>: value for key in keys}``. ``variants``
    fixes the order (default: first appearance); the first one is the reference of ``diff_mR``. Returns,
    per variant: ``variant``, ``n`` (seeds with results), ``seeds``, ``mean``/``std`` per key (sample
    standard deviation, ddof 1; None below two seeds), ``by_seed`` (key -> {seed: value}) and ``diff_mR``
    (paired_difference of mR to the reference; None for the reference itself). A variant without any
    finished trial is listed with n=0.
    """
    order = list(variants) if variants is not None else list(dict.fromkeys(r["variant"] for r in rows))
    by_variant: dict[str, dict[Any, Mapping[str, Any]]] = {name: {} for name in order}
    for row in rows:
        if row["variant"] not in by_variant:
            raise ValueError(f"row of unknown variant {row['variant']!r} (variants: {order})")
        if row["seed"] in by_variant[row["variant"]]:
            raise ValueError(f"two rows for variant {row['variant']!r}, seed {row['seed']!r}")
        by_variant[row["variant"]][row["seed"]] = row
    table = []
    for name in order:
        seeds = sorted(by_variant[name])
        by_seed = {k: {s: float(by_variant[name][s][k]) for s in seeds} for k in keys}
        table.append({
            "variant": name,
            "n": len(seeds),
            "seeds": seeds,
            "mean": {k: statistics.fmean(v.values()) if v else None for k, v in by_seed.items()},
            "std": {k: statistics.stdev(v.values()) if len(v) >= 2 else None for k, v in by_seed.items()},
            "by_seed": by_seed,
            "diff_mR": None,
        })
    if table and "mR" in keys:
        reference = table[0]["by_seed"]["mR"]
        for entry in table[1:]:
            entry["diff_mR"] = paired_difference(entry["by_seed"]["mR"], reference, confidence)
    return table


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ablation_markdown(table: Sequence[Mapping[str, Any]], *, title: str, keys: Sequence[str] = RECALL_KEYS,
                      notes: Sequence[str] = ()) -> str:
    """The table as markdown: mean +- sd per recall, and mR's paired difference to the first variant."""
    if not table:
        return f"# {title}\n\nno variants"
    reference = table[0]["variant"]
    confidence = next((e["diff_mR"]["confidence"] for e in table[1:] if e["diff_mR"]), CONFIDENCE)
    header = ["variant", "n", *keys, f"mR - {reference} [{confidence:.0%} CI, paired by seed]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [f"`{entry['variant']}`", str(entry["n"])]
        for key in keys:
            mean, std = entry["mean"][key], entry["std"][key]
            cells.append(_number(mean) if std is None else f"{mean:.2f} ± {std:.2f}")
        diff = entry["diff_mR"]
        if diff is None:
            cells.append("reference")
        elif diff["mean"] is None:
            cells.append("no paired seeds")
        elif diff["ci_low"] is None:
            cells.append(f"{diff['mean']:+.2f} (n={diff['n_pairs']}, no interval)")
        else:
            cells.append(f"{diff['mean']:+.2f} [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    text = [f"# {title}", "", *lines]
    if notes:
        text += ["", *notes]
    return "\n".join(text)
