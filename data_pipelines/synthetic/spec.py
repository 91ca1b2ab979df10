"""The knobs of the synthetic benchmark: one frozen dataclass, validated, with clear errors.

Standard library only (no NumPy), so that `configs/` can read the defaults cheaply.

Every distractor has three knobs, `<name>_prob` (fraction of tracklets that get it),
`<name>_strength` (how strong it is, 0..1) and `<name>_span` (largest fraction of a tracklet's
frames it touches); any of the three at 0 turns the distractor off.
"""

from __future__ import annotations

import contextlib

import dataclasses
from typing import Any, Mapping

# Bump when a change of the generator changes its output for the same knobs, so that
# `ensure_generated` regenerates datasets written by an older version.
GENERATOR_VERSION = 1

LAYOUTS = ("mars", "dukev")
TEMPORAL_DISTRACTORS = ("occlusion", "exit", "misalign", "intruder")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """All knobs of the generator with their defaults (deterministic for `seed`)."""

  layout: str = "mars"  # "mars" or "dukev": the on-disk layout written
  seed: int = 0
  height: int = 128  # frame size in pixels (any size up to 256x128 and beyond works)
  width: int = 64
  jpeg_quality: int = 90
  # ---- identities and tracklets
  num_cameras: int = 6  # 2..9 (file names carry one camera digit)
  num_train_ids: int = 60
  num_test_ids: int = 40
  min_cameras_per_id: int = 2  # >= 2, so every query has a match in another camera
  max_cameras_per_id: int = 3
  max_tracklets_per_camera: int = 2  # tracklets per (id, camera): 1..this
  # Tracklet length: log-uniform in [min_length, short_max_length], except a fraction
  # `long_fraction` of tracklets, uniform in (short_max_length, max_length].
  min_length: int = 1
  short_max_length: int = 11
  max_length: int = 120
  long_fraction: float = 0.04
  # Test-set extras, as in MARS: pid 0 distractor boxes (kept in the gallery) and pid -1 junk
  # boxes (body fragments; MARS only, dropped by the readers).
  num_distractor_tracklets: int = 20
  num_junk_tracklets: int = 10
  # Fraction of identities made as a near copy of an earlier one that differs in one attribute.
  similar_fraction: float = 0.3
  back_view_prob: float = 0.3  # tracklets seen from behind (no face, no chest logo)
  # ---- spatial distractors and capture conditions
  clutter_strength: float = 1.0  # contrast of each camera's static background clutter
  clutter_density: float = 1.0  # amount of clutter objects per camera (0: plain ground / wall)
  illumination_strength: float = 0.5  # per-camera colour cast and brightness
  noise_std: float = 0.02  # per-pixel sensor noise (in [0, 1] intensity units)
  # ---- temporal distractors
  occlusion_prob: float = 0.3  # an object covers the person over the first frames
  occlusion_strength: float = 0.6  # covered fraction of the box (bottom or side)
  occlusion_span: float = 0.5
  exit_prob: float = 0.2  # the person walks out of the box over the last frames
  exit_strength: float = 1.0  # 1: fully out of the box at the last frame
  exit_span: float = 0.3
  misalign_prob: float = 0.3  # shifted / rescaled boxes on scattered frames
  misalign_strength: float = 0.6
  misalign_span: float = 0.4
  intruder_prob: float = 0.15  # a few frames show another person (tracker identity switch)
  intruder_strength: float = 1.0  # 1: the other person fully replaces the target
  intruder_span: float = 0.25

  def __post_init__(self):
    _validate(self)

  @property
  def num_ids(self) -> int:
    return self.num_train_ids + self.num_test_ids


def knob_names() -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(SyntheticSpec))


def defaults() -> dict[str, Any]:
  """The default knobs as a plain dict (for configs/synthetic.py)."""
  return dataclasses.asdict(SyntheticSpec())


def _error(name: str, expected: str, value: Any) -> ValueError:
  return ValueError(f"synthetic knob {name!r}: expected {expected}, got {value!r}")


def _coerce(name: str, kind: type, value: Any) -> Any:
  """Converts `value` (possibly a CLI string) to the knob's type, or raises naming the knob."""
  if kind is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
      return value.lower() in ("true", "1", "yes")
    raise _error(name, "a bool", value)
  if kind is int:
    if isinstance(value, bool):
      raise _error(name, "an integer", value)
    if isinstance(value, int):
      return int(value)
    if isinstance(value, float) and value.is_integer():
      return int(value)
    if isinstance(value, str):
      with contextlib.suppress(ValueError):  # not a number: the error below names the field
        return int(value)
    raise _error(name, "an integer", value)
  if kind is float:
    if isinstance(value, bool):
      raise _error(name, "a number", value)
    if isinstance(value, (int, float)):
      return float(value)
    if isinstance(value, str):
      with contextlib.suppress(ValueError):  # not a number: the error below names the field
        return float(value)
    raise _error(name, "a number", value)
  if kind is str:
    if isinstance(value, str):
      return value
    raise _error(name, "a string", value)
  raise TypeError(f"knob {name!r} has an unsupported type {kind}")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def make_spec(spec: SyntheticSpec | Mapping[str, Any] | None = None, **overrides) -> SyntheticSpec:
  """A validated `SyntheticSpec` from a spec or mapping plus keyword overrides.

  Values are converted to the knob's type (CLI strings work). An unknown knob name raises a
  ValueError naming it and listing the valid knobs.
  """
  if spec is None:
    base = {}
  elif isinstance(spec, SyntheticSpec):
    base = dataclasses.asdict(spec)
  elif hasattr(spec, "to_dict"):  # ml_collections.ConfigDict
    base = dict(spec.to_dict())
  elif isinstance(spec, Mapping):
    base = dict(spec)
  else:
    raise TypeError(f"spec must be a SyntheticSpec or a mapping of knobs, got {type(spec)}")
  base.update(overrides)
  names = knob_names()
  unknown = sorted(k for k in base if k not in names)
  if unknown:
    raise ValueError(
        f"unknown synthetic knob(s) {', '.join(map(repr, unknown))}; valid knobs: "
        f"{', '.join(names)}"
    )
  kinds = {f.name: _TYPES[f.type] if isinstance(f.type, str) else f.type
           for f in dataclasses.fields(SyntheticSpec)}
  values = {k: _coerce(k, kinds[k], v) for k, v in base.items()}
  return SyntheticSpec(**values)


def _validate(s: SyntheticSpec) -> None:
  def need(cond: bool, name: str, expected: str):
    if not cond:
      raise _error(name, expected, getattr(s, name))

  need(s.layout in LAYOUTS, "layout", f"one of {LAYOUTS}")
  need(0 <= s.seed < 2**63, "seed", "an integer >= 0")
  need(16 <= s.height <= 2048, "height", "16 <= height <= 2048")
  need(8 <= s.width <= 1024, "width", "8 <= width <= 1024")
  need(1 <= s.jpeg_quality <= 100, "jpeg_quality", "1..100")
  need(2 <= s.num_cameras <= 9, "num_cameras", "2..9 (file names hold one camera digit)")
  need(1 <= s.num_train_ids, "num_train_ids", ">= 1")
  need(1 <= s.num_test_ids, "num_test_ids", ">= 1")
  need(s.num_ids <= 9998, "num_test_ids", "num_train_ids + num_test_ids <= 9998 (4-digit pids)")
  need(2 <= s.min_cameras_per_id <= s.num_cameras, "min_cameras_per_id",
       f"2..num_cameras ({s.num_cameras}) so that every query has a cross-camera match")
  need(s.min_cameras_per_id <= s.max_cameras_per_id <= s.num_cameras, "max_cameras_per_id",
       f"min_cameras_per_id ({s.min_cameras_per_id})..num_cameras ({s.num_cameras})")
  need(1 <= s.max_tracklets_per_camera <= 99, "max_tracklets_per_camera", "1..99")
  need(1 <= s.min_length, "min_length", ">= 1")
  need(s.min_length <= s.short_max_length, "short_max_length",
       f">= min_length ({s.min_length})")
  need(s.short_max_length <= s.max_length <= 999, "max_length",
       f"short_max_length ({s.short_max_length})..999 (3-digit MARS frame numbers)")
  need(s.num_distractor_tracklets >= 0, "num_distractor_tracklets", ">= 0")
  need(s.num_junk_tracklets >= 0, "num_junk_tracklets", ">= 0")
  need(s.noise_std >= 0, "noise_std", ">= 0")
  for name in ("long_fraction", "similar_fraction", "back_view_prob", "clutter_strength",
               "clutter_density", "illumination_strength"):
    need(0.0 <= getattr(s, name) <= 1.0, name, "a value in [0, 1]")
  for d in TEMPORAL_DISTRACTORS:
    for part in ("prob", "strength", "span"):
      name = f"{d}_{part}"
      need(0.0 <= getattr(s, name) <= 1.0, name, "a value in [0, 1]")
