"""Ablation v2 (issue 17): the statistics, pure NumPy / SciPy (no JAX, no TensorFlow).

- `t_interval`: the paired difference of two variants over seeds (same seed = same pretrained
  trunk, same benchmark, same batch order and augmentation draws) with its 95% Student-t
  interval. Why over seeds and not a bootstrap over queries: the v1 table's noise is
  seed-to-seed training noise (seed std 2-9 mAP), which a query bootstrap of one trained model
  does not see; the seed is the unit that is replicated, so the interval is over seeds.
- `required_seeds`: how many seeds a paired difference needs so that a true difference of
  `delta` points excludes 0 from the 95% interval with probability `power` (normal
  approximation with Student-t quantiles: n >= ((t_{1-a/2, n-1} + t_{power, n-1}) sd / delta)^2),
  or, with `power=None`, so that the expected half-width is at most `delta`.
- `settle_step`: the step from which a statistic logged over training stays within `tol` of
  its last value; `settled` says whether that step lies in the first `1 - window` of training,
  i.e. the statistic did not move by more than `tol` over the last `window` of it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import stats as sps


def t_interval(diffs: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
  """Mean of `diffs` with its Student-t interval: {n, mean, sd, half, lo, hi} (NaN when n < 2)."""
  d = np.asarray(list(diffs), np.float64)
  n = int(d.size)
  if n == 0:
    return {"n": 0, "mean": math.nan, "sd": math.nan, "half": math.nan, "lo": math.nan,
            "hi": math.nan}
  mean = float(d.mean())
  if n < 2:
    return {"n": 1, "mean": mean, "sd": math.nan, "half": math.nan, "lo": math.nan,
            "hi": math.nan}
  sd = float(d.std(ddof=1))
  half = float(sps.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))
  return {"n": n, "mean": mean, "sd": sd, "half": half, "lo": mean - half, "hi": mean + half}


def required_seeds(sd: float, delta: float = 2.0, confidence: float = 0.95,
                   power: float | None = 0.8, max_n: int = 1000) -> int:
  """Smallest n (>= 2) for which a paired difference with seed sd `sd` resolves `delta`
  (see the module docstring); `max_n` + 1 if none up to `max_n` does."""
  if sd <= 0:
    return 2
  for n in range(2, max_n + 1):
    q = sps.t.ppf(0.5 + confidence / 2, n - 1)
    if power is not None:
      q += sps.t.ppf(power, n - 1)
    if q * sd / math.sqrt(n) <= delta:
      return n
  return max_n + 1


def settle_step(steps: Sequence[int], values: Sequence[float | None], tol: float) -> int | None:
  """First logged step from which every later value is within `tol` of the last one (None
  without values)."""
  pts = [(int(s), float(v)) for s, v in zip(steps, values) if v is not None]
  if not pts:
    return None
  last = pts[-1][1]
  first = pts[-1][0]
  for s, v in reversed(pts):
    if abs(v - last) > tol:
      break
    first = s
  return first


def settled(steps: Sequence[int], values: Sequence[float | None], tol: float,
            window: float) -> bool | None:
  """Whether the statistic stayed within `tol` of its final value over the last `window`
  (fraction) of training; None without values."""
  s = settle_step(steps, values, tol)
  if s is None:
    return None
  total = max(int(x) for x in steps)
  return s <= total * (1.0 - window)


# ------------------------------------------------------------------------------ tables
def fmt_ci(c: Mapping[str, Any]) -> str:
  if c["n"] == 0 or math.isnan(c["mean"]):
    return "-"
  if c["n"] < 2:
    return f"{c['mean']:+.1f} (n=1)"
  mark = " *" if c["lo"] > 0 or c["hi"] < 0 else ""
  return f"{c['mean']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}]{mark}"


def fmt_mean_sd(values: Sequence[float]) -> str:
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return "-"
  if v.size == 1:
    return f"{v[0]:.1f}"
  return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def paired(records: Sequence[Mapping[str, Any]], family: str, a: str, b: str,
           metric: str = "mAP") -> dict[str, Any]:
  """`a` - `b` on `family` per common seed (points) with its t interval; + the seeds, diffs."""
  val = {(r["family"], r["variant"], r["seed"]): r["test"][metric] * 100.0 for r in records}
  seeds = sorted(s for (f, v, s) in val if f == family and v == a and (f, b, s) in val)
  diffs = [val[(family, a, s)] - val[(family, b, s)] for s in seeds]
  return {**t_interval(diffs), "seeds": seeds, "diffs": diffs}


def main_table(records: Sequence[Mapping[str, Any]], families: Sequence[str],
               variants: Sequence[str], metric: str = "mAP") -> str:
  """Markdown: one row per variant, one column per family, mean ± sd (n) of `metric` (%)."""
  head = ["variant"] + [f"{f}: {metric}" for f in families]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for v in variants:
    cells = [f"`{v}`"]
    for f in families:
      vals = [r["test"][metric] * 100.0 for r in records
              if r["family"] == f and r["variant"] == v]
      cells.append(f"{fmt_mean_sd(vals)} (n={len(vals)})" if vals else "-")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _pair_table(records: Sequence[Mapping[str, Any]], families: Sequence[str],
                pairs: Sequence[tuple[str, str]], column: str,
                cell: Callable[[str, str, str], str]) -> str:
  """Markdown: one row per pair `a - b` whose variants both ran, one column per family
  ("<family>: <column>"), `cell(family, a, b)` in each."""
  head = ["difference"] + [f"{f}: {column}" for f in families]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  have = {r["variant"] for r in records}
  for a, b in pairs:
    if a in have and b in have:
      cells = [f"`{a}` - `{b}`"] + [cell(f, a, b) for f in families]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def difference_table(records: Sequence[Mapping[str, Any]], families: Sequence[str],
                     pairs: Sequence[tuple[str, str]], metric: str = "mAP") -> str:
  """Markdown: one row per pair, one column per family, mean [95% CI] of the paired
  difference in points; `*` where the interval excludes 0."""
  return _pair_table(records, families, pairs, metric,
                     lambda f, a, b: fmt_ci(paired(records, f, a, b, metric)))


def memory_table(records: Sequence[Mapping[str, Any]], families: Sequence[str],
                 variants: Sequence[str]) -> str:
  """Markdown: the memory statistics at the end of training (mean over seeds), how many runs
  had settled (every statistic within its tolerance over the last window) and how many had
  moved (some statistic away from its step-0 value: `ablation_v2.MOVED`)."""
  keys = (("spatial_entropy", "SM entropy / log M"), ("temporal_entropy", "TM entropy / log N"),
          ("weight_contrast", "L (w_clean - w_distractor)"),
          ("readout_ratio", "‖BN(read-out)‖ / ‖f_o‖"))
  head = ["family", "variant"] + [label for _, label in keys] + ["runs settled / moved"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for f in families:
    for v in variants:
      rs = [r for r in records if r["family"] == f and r["variant"] == v]
      if not rs:
        continue
      cells = [f, f"`{v}`"]
      for k, _ in keys:
        vals = [r["memory_final"].get(k) for r in rs]
        vals = [x for x in vals if x is not None]
        cells.append(f"{np.mean(vals):.3f}" if vals else "-")
      ok = [r["settle"]["all"] for r in rs]
      moved = [r["settle"].get("any_moved") for r in rs]
      cells.append("-" if all(x is None for x in ok) else
                   f"{sum(bool(x) for x in ok)}/{len(rs)} settled, "
                   f"{sum(bool(x) for x in moved)}/{len(rs)} moved")
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def needed_table(records: Sequence[Mapping[str, Any]], families: Sequence[str],
                 pairs: Sequence[tuple[str, str]], delta: float = 2.0,
                 metric: str = "mAP") -> str:
  """Markdown: observed sd of each paired difference and the seeds `required_seeds` asks for
  to resolve `delta` points with 80% power at that sd ("sd / n needed" per family)."""

  def cell(f: str, a: str, b: str) -> str:
    c = paired(records, f, a, b, metric)
    return "-" if c["n"] < 2 else f"{c['sd']:.1f} / {required_seeds(c['sd'], delta)}"

  return _pair_table(records, families, pairs, "sd / n needed", cell)
