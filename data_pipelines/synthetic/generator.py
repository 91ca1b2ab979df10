"""The synthetic benchmark: identities, tracklet plan, distractor events, files on disk.

Determinism: every random quantity comes from its own stream,
`np.random.SeedSequence([seed, stream, *keys])` (per tracklet, `keys` = its uid), and the
camera, appearance and distractor streams draw a fixed number of values whatever the knobs. So
the same seed gives the same bytes, and turning one distractor off leaves every frame it did
not touch bit-identical.

People are drawn from sprites (`render.make_sprite`: each identity pre-drawn at 8 walking
phases) resampled into each frame's box, on a window of the camera's static scene; then the
occluder, the camera's colour cast and sensor noise. JPEGs are written by a few threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipelines.synthetic import layouts
from data_pipelines.synthetic import render
from data_pipelines.synthetic.spec import GENERATOR_VERSION, SyntheticSpec, make_spec
from data_pipelines.tracklets import Tracklet, split_counts

META_FILE = "synthetic_meta.json"
SPEC_FILE = "spec.json"
FLAGS = ("occluded", "misaligned", "out_of_frame", "other_person")
_STREAMS = {"identities": 1, "plan": 2, "camera": 3, "gain": 4, "base": 5, "noise": 6,
            "occlusion": 7, "exit": 8, "misalign": 9, "intruder": 10}
_CHUNK = 32  # frames rendered at once (bounds memory for long tracklets at large sizes)
_NOISE_BANK = 32  # sensor-noise frames drawn once per generation, picked per frame
_WRITERS = 1  # a thread encoding and writing JPEGs while the main thread renders
_SPRITE_BYTES = 96 << 20  # sprite cache budget (all sprites of the default fit)


def _rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, _STREAMS[stream], *keys]))


# ----------------------------------------------------------------------------- identities


def _random_identity(rng: np.random.Generator) -> render.Identity:
  a = {name: int(rng.integers(n)) for name, n in render.ATTRIBUTES.items()}
  a["bag"] = a["bag"] if rng.random() < 0.4 else 0  # most people carry no bag
  return _fix(render.Identity(**a))


def _fix(ident: render.Identity) -> render.Identity:
  """Keeps the pattern visible: its colour must differ from the shirt's."""
  if ident.pattern_color == ident.upper:
    ident = dataclasses.replace(
        ident, pattern_color=(ident.upper + 4) % len(render.PALETTE))
  return ident


def make_identities(spec: SyntheticSpec) -> tuple[list[render.Identity], list[dict]]:
  """All identities (train first, then test) and, for each, whether it is a near copy.

  A fraction `similar_fraction` of identities copies an earlier identity of the same split
  and changes exactly one attribute. Returns (identities, [{"similar_to", "differs_in"}]).
  Identity i has pid i + 1.
  """
  rng = _rng(spec.seed, "identities")
  names = list(render.ATTRIBUTES)
  idents: list[render.Identity] = []
  notes: list[dict] = []
  seen: set[tuple[int, ...]] = set()
  for i in range(spec.num_ids):
    first = 0 if i < spec.num_train_ids else spec.num_train_ids
    note = {"similar_to": None, "differs_in": None}
    cand = None
    if i > first and rng.random() < spec.similar_fraction:
      j = first + int(rng.integers(i - first))
      for _ in range(20):
        attr = names[int(rng.integers(len(names)))]
        n = render.ATTRIBUTES[attr]
        old = getattr(idents[j], attr)
        new = (old + 1 + int(rng.integers(n - 1))) % n
        c = dataclasses.replace(idents[j], **{attr: new})
        if c == _fix(c) and c.as_tuple() not in seen:
          cand, note = c, {"similar_to": j + 1, "differs_in": attr}
          break
    while cand is None or cand.as_tuple() in seen:
      cand = _random_identity(rng)
      note = {"similar_to": None, "differs_in": None}
    seen.add(cand.as_tuple())
    idents.append(cand)
    notes.append(note)
  return idents, notes


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class TrackletPlan:
  """One tracklet to render. `uid` keys its random streams (same in both layouts)."""

  uid: int
  pid: int  # raw pid: >= 1 a person, 0 a distractor box, -1 junk
  camera: int  # 1-based
  number: int  # MARS: per (pid, camera); DukeV: per pid
  length: int
  split: str  # "train" or "test"
  query: bool
  kind: str  # "person", "distractor" or "junk"
  identity: int  # index into the identities (for distractor/junk: the partly seen person)


def _draw_length(rng: np.random.Generator, spec: SyntheticSpec) -> int:
  u, v = rng.random(2)
  if u < spec.long_fraction and spec.max_length > spec.short_max_length:
    return spec.short_max_length + 1 + int(v * (spec.max_length - spec.short_max_length))
  return spec.min_length + int(v * (spec.short_max_length - spec.min_length + 1))


def make_plan(spec: SyntheticSpec) -> list[TrackletPlan]:
  """The tracklets in file order: train ids; then test junk (MARS only), distractors, ids.

  Each identity appears in `min..max_cameras_per_id` cameras with 1..max_tracklets_per_camera
  tracklets in each. MARS queries: one tracklet per (test id, camera); DukeV queries: one
  tracklet per test id. Every test id is seen by >= 2 cameras, so each query has a
  cross-camera match in the gallery.
  """
  rng = _rng(spec.seed, "plan")
  mars = spec.layout == "mars"
  people, uid = [], 0
  for i in range(spec.num_ids):
    split = "train" if i < spec.num_train_ids else "test"
    n_cams = int(rng.integers(spec.min_cameras_per_id, spec.max_cameras_per_id + 1))
    cams = sorted(int(c) + 1 for c in rng.choice(spec.num_cameras, n_cams, replace=False))
    per_cam = [int(rng.integers(1, spec.max_tracklets_per_camera + 1)) for _ in cams]
    lengths = [[_draw_length(rng, spec) for _ in range(k)] for k in per_cam]
    mars_q = [int(rng.integers(k)) for k in per_cam]
    duke_cam = int(rng.integers(n_cams))
    duke_q = (duke_cam, int(rng.integers(per_cam[duke_cam])))
    running = 0
    for c, (cam, ls) in enumerate(zip(cams, lengths)):
      for k, length in enumerate(ls):
        running += 1
        query = split == "test" and ((mars and k == mars_q[c]) or
                                     (not mars and (c, k) == duke_q))
        people.append(TrackletPlan(uid, i + 1, cam, k + 1 if mars else running, length,
                                   split, query, "person", i))
        uid += 1
  extras = {"distractor": [], "junk": []}
  for kind, pid, count in (("distractor", 0, spec.num_distractor_tracklets),
                           ("junk", -1, spec.num_junk_tracklets)):
    numbers: dict[int, int] = {}
    for _ in range(count):
      cam = int(rng.integers(1, spec.num_cameras + 1))
      length = _draw_length(rng, spec)
      who = spec.num_train_ids + int(rng.integers(spec.num_test_ids))
      key = cam if mars else 0
      numbers[key] = numbers.get(key, 0) + 1
      extras[kind].append(TrackletPlan(uid, pid, cam, numbers[key], length, "test", False,
                                       kind, who))
      uid += 1
  train = [t for t in people if t.split == "train"]
  test = [t for t in people if t.split == "test"]
  junk = extras["junk"] if mars else []  # DukeV has no junk
  return train + junk + extras["distractor"] + test


# ----------------------------------------------------------------------------- events


@dataclasses.dataclass(frozen=True)
class Events:
  """Everything that varies over the frames of one tracklet (arrays are `(T,)`)."""

  camera: int
  pan: np.ndarray  # int, window offset into the camera scene
  main: render.PersonBoxes
  main_identity: int
  intruder: render.PersonBoxes | None
  intruder_identity: int  # -1: none
  occluder: dict | None  # {"coverage" (T,), "side", "color", "color2", "period"}
  flags: dict[str, np.ndarray]  # FLAGS -> (T,) bool


def _span(u: float, span: float, t: int) -> int:
  """Frames touched: 1..ceil(span * t), from a uniform draw u."""
  top = max(1, math.ceil(span * t))
  return min(t, 1 + int(u * top))


def _other_identity(spec: SyntheticSpec, plan: TrackletPlan, u: float) -> int:
  first, n = ((0, spec.num_train_ids) if plan.split == "train"
              else (spec.num_train_ids, spec.num_test_ids))
  pool = [i for i in range(first, first + n) if i != plan.identity]
  return pool[min(len(pool) - 1, int(u * len(pool)))] if pool else -1


def make_events(spec: SyntheticSpec, plan: TrackletPlan,
                identities: Sequence[render.Identity]) -> Events:
  """The per-frame boxes, occluder and flags of one tracklet.

  Person tracklets get, each with probability `<name>_prob` and from its own random stream:
  - occlusion: an object covers `occlusion_strength` of the box (bottom, left or right) over
    the first 1..ceil(span*T) frames, moving away (coverage shrinks to half) -> "occluded";
  - misalign: on 1..ceil(span*T) scattered frames the box shifts (up to 0.3 W, 0.15 H) and
    rescales (up to +-35%), times the strength -> "misaligned";
  - exit: over the last frames the person slides sideways out of the box; strength 1 leaves
    the box empty at the last frame -> "out_of_frame";
  - intruder: a run of frames shows another person of the same split; strength 1 replaces
    the target (identity switch), less overlaps it from the side -> "other_person".
  Distractor (pid 0) boxes show the background with at most a sliver of a person; junk
  (pid -1) boxes show a cut-off, too-close part of a test person.
  """
  t, h, w = plan.length, spec.height, spec.width
  seed, uid = spec.seed, plan.uid
  pan_range = w // 2
  flags = {f: np.zeros(t, bool) for f in FLAGS}
  frames = np.arange(t, dtype=np.float32)

  base = _rng(seed, "base", uid)
  b = base.random(10)
  jitter = base.standard_normal((3, t)).astype(np.float32)
  back = bool(b[0] < spec.back_view_prob)
  phase = (b[1] * 2 * np.pi + frames * 2 * np.pi / (6.0 + 6.0 * b[2])).astype(np.float32)
  pan = np.clip(np.rint(b[3] * pan_range + (b[4] - 0.5) * 2.0 * frames), 0, pan_range)
  pan = pan.astype(np.int64)
  ident = identities[plan.identity]
  scale = 1.0 + 0.015 * jitter[2]
  hp = h * render.HEIGHTS[ident.height] * scale
  cx = w / 2 + 0.015 * w * jitter[0]
  top = (h - hp) / 2 + 0.01 * h * jitter[1]
  visible = np.ones(t, bool)

  if plan.kind == "distractor":  # a box on the background; at most a sliver of someone
    side = 1.0 if b[5] < 0.5 else -1.0
    cx = cx + side * (0.55 + 0.35 * b[6]) * w
  elif plan.kind == "junk":  # a body fragment: a close, cut-off box on part of a person
    hp = hp * (1.8 + 1.2 * b[5])
    top = top - hp * (0.6 * b[6]) - (hp - h) / 2
    cx = cx + (b[7] - 0.5) * 0.3 * w

  occluder, intruder, other = None, None, -1
  if plan.kind == "person":
    # Occluder over the first frames, moving away (coverage shrinks to half).
    r = _rng(seed, "occlusion", uid).random(6)
    if r[0] < spec.occlusion_prob and spec.occlusion_strength > 0 and spec.occlusion_span > 0:
      n = _span(r[1], spec.occlusion_span, t)
      cov = np.zeros(t, np.float32)
      cov[:n] = spec.occlusion_strength * (1.0 - 0.5 * np.arange(n) / n)
      c1 = int(r[3] * len(render.PALETTE))
      c2 = (c1 + 1 + int(r[4] * (len(render.PALETTE) - 1))) % len(render.PALETTE)
      occluder = {"coverage": cov, "side": min(2, int(r[2] * 3)),
                  "color": render.PALETTE[c1], "color2": render.PALETTE[c2],
                  "period": 3.0 + 5.0 * float(r[5])}
      flags["occluded"][:n] = True
    # Misaligned boxes on scattered frames: shift and scale jitter.
    rm = _rng(seed, "misalign", uid)
    r, order, mag = rm.random(2), rm.random(t), rm.random((4, t)).astype(np.float32)
    if r[0] < spec.misalign_prob and spec.misalign_strength > 0 and spec.misalign_span > 0:
      k = _span(r[1], spec.misalign_span, t)
      sel = np.zeros(t, bool)
      sel[np.argsort(order, kind="stable")[:k]] = True
      s = spec.misalign_strength
      sign = np.where(mag[3] < 0.5, -1.0, 1.0).astype(np.float32)
      cx = np.where(sel, cx + sign * s * 0.3 * w * (0.5 + 0.5 * mag[0]), cx)
      top = np.where(sel, top + s * 0.15 * h * (2 * mag[1] - 1), top)
      hp = np.where(sel, hp * (1.0 + s * 0.35 * (2 * mag[2] - 1)), hp)
      flags["misaligned"] |= sel
    # Leaving the box over the last frames.
    r = _rng(seed, "exit", uid).random(3)
    if r[0] < spec.exit_prob and spec.exit_strength > 0 and spec.exit_span > 0:
      n = _span(r[1], spec.exit_span, t)
      side = -1.0 if r[2] < 0.5 else 1.0
      ramp = np.zeros(t, np.float32)
      ramp[t - n:] = (np.arange(n, dtype=np.float32) + 1) / n
      cx = cx + side * spec.exit_strength * (w / 2 + 0.25 * hp) * ramp
      flags["out_of_frame"][t - n:] = True
    # Another person over a few frames (a tracker identity switch when strength is 1).
    ri = _rng(seed, "intruder", uid)
    r, ij = ri.random(7), ri.standard_normal((3, t)).astype(np.float32)
    other = _other_identity(spec, plan, float(r[3]))
    if (r[0] < spec.intruder_prob and spec.intruder_strength > 0 and spec.intruder_span > 0
        and other >= 0):
      k = _span(r[1], spec.intruder_span, t)
      start = 1 + int(r[2] * (t - k)) if t > k else 0
      start = min(start, t - k)
      sel = np.zeros(t, bool)
      sel[start:start + k] = True
      side = -1.0 if r[4] < 0.5 else 1.0
      ohp = h * render.HEIGHTS[identities[other].height] * (1.0 + 0.015 * ij[2])
      ocx = w / 2 + side * (1.0 - spec.intruder_strength) * 0.6 * w + 0.015 * w * ij[0]
      otop = (h - ohp) / 2 + 0.01 * h * ij[1]
      ophase = (r[5] * 2 * np.pi + frames * 2 * np.pi / 8.0).astype(np.float32)
      intruder = render.PersonBoxes(ocx, otop, ohp, ophase, sel,
                                    bool(r[6] < spec.back_view_prob))
      if spec.intruder_strength >= 1.0:
        visible = visible & ~sel
      flags["other_person"] |= sel
    else:
      other = -1
  main = render.PersonBoxes(np.asarray(cx, np.float32) * np.ones(t, np.float32),
                            np.asarray(top, np.float32) * np.ones(t, np.float32),
                            np.asarray(hp, np.float32) * np.ones(t, np.float32),
                            phase, visible, back)
  return Events(plan.camera, pan, main, plan.identity, intruder, other, occluder, flags)


# ----------------------------------------------------------------------------- rendering


@dataclasses.dataclass(frozen=True)
class Scene:
  """What every tracklet of a generation shares: identities and the cameras."""

  spec: SyntheticSpec
  identities: tuple[render.Identity, ...]
  backgrounds: tuple[np.ndarray, ...]  # per camera (H, W + W//2, 3)
  gains: tuple[np.ndarray, ...]  # per camera (3,)
  noise: np.ndarray  # (_NOISE_BANK, H, W, 3) float32 sensor noise * 255 + 0.5, picked per frame
  sprites: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def sprite(self, identity: int, back: bool) -> render.Sprite:
    """The identity's sprite, cached (oldest dropped first past the byte budget)."""
    key = (identity, back)
    if key not in self.sprites:
      if sum(x.rgb.nbytes + x.alpha.nbytes for x in self.sprites.values()) > _SPRITE_BYTES:
        self.sprites.pop(next(iter(self.sprites)))
      self.sprites[key] = render.make_sprite(
          self.identities[identity], back, max(32, 2 * (self.spec.height // 2)))
    return self.sprites[key]


def make_scene(spec: SyntheticSpec) -> Scene:
  idents, _ = make_identities(spec)
  backgrounds, gains = [], []
  for cam in range(1, spec.num_cameras + 1):
    backgrounds.append(render.camera_background(
        _rng(spec.seed, "camera", cam), spec.height, spec.width,
        spec.width + spec.width // 2, spec.clutter_strength, spec.clutter_density))
    g = _rng(spec.seed, "gain", cam).random(4).astype(np.float32)
    s = spec.illumination_strength
    gains.append((1.0 + s * 0.25 * (2 * g[:3] - 1)) * (1.0 + s * 0.2 * (2 * g[3] - 1)))
  noise = _rng(spec.seed, "noise").standard_normal(
      (_NOISE_BANK, spec.height, spec.width, 3), dtype=np.float32)
  noise = noise * np.float32(spec.noise_std * 255.0) + np.float32(0.5)
  return Scene(spec, tuple(idents), tuple(backgrounds), tuple(gains), noise)


def _take(boxes: render.PersonBoxes, sl: slice) -> render.PersonBoxes:
  return render.PersonBoxes(boxes.cx[sl], boxes.top[sl], boxes.hp[sl], boxes.phase[sl],
                            boxes.visible[sl], boxes.back)


def render_tracklet(scene: Scene, plan: TrackletPlan,
                    events: Events | None = None) -> tuple[np.ndarray, Events]:
  """One tracklet's frames `(T, H, W, 3)` uint8 and its events (flags per frame)."""
  spec = scene.spec
  if events is None:
    events = make_events(spec, plan, scene.identities)
  noise_index = _rng(spec.seed, "noise", plan.uid).integers(_NOISE_BANK, size=plan.length)
  out = np.empty((plan.length, spec.height, spec.width, 3), np.uint8)
  for s0 in range(0, plan.length, _CHUNK):
    sl = slice(s0, min(plan.length, s0 + _CHUNK))
    canvas = render.background_frames(scene.backgrounds[plan.camera - 1], events.pan[sl],
                                      spec.width)
    canvas = render.draw_person(canvas, scene.sprite(events.main_identity, events.main.back),
                                _take(events.main, sl))
    if events.intruder is not None:
      canvas = render.draw_person(
          canvas, scene.sprite(events.intruder_identity, events.intruder.back),
          _take(events.intruder, sl))
    if events.occluder is not None:
      o = events.occluder
      canvas = render.draw_occluder(canvas, o["coverage"][sl], o["side"], o["color"],
                                    o["color2"], o["period"])
    out[sl] = render.finish(canvas, scene.gains[plan.camera - 1], scene.noise[noise_index[sl]])
  return out, events


# ----------------------------------------------------------------------------- writing


def _is_reader_query(t: TrackletPlan) -> bool:
  return t.split == "test" and t.query


def _summary(spec: SyntheticSpec, plan: Sequence[TrackletPlan], paths: Sequence[Sequence[str]],
             flag_counts: dict) -> dict:
  """Counts per part as the readers see them under the official protocol.

  MARS gallery: the test rows but pid -1 junk (queries included); DukeV gallery: the gallery
  folder, which holds the queries too. So both: every test tracklet but junk.
  """
  def tr(t, p):
    return Tracklet(tuple(p), t.pid, t.camera - 1)

  train = [tr(t, p) for t, p in zip(plan, paths) if t.split == "train"]
  query = [tr(t, p) for t, p in zip(plan, paths) if _is_reader_query(t)]
  gallery = [tr(t, p) for t, p in zip(plan, paths) if t.split == "test" and t.pid != -1]
  return {
      "layout": spec.layout,
      "splits": {"train": split_counts(train), "query": split_counts(query),
                 "gallery": split_counts(gallery)},
      "distractor_tracklets": sum(t.kind == "distractor" for t in plan),
      "junk_tracklets": sum(t.kind == "junk" for t in plan),
      "total_frames": int(sum(t.length for t in plan)),
      "flagged": flag_counts,
  }


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")


def _sidecar_entry(spec: SyntheticSpec, t: TrackletPlan, rel: list[str], ev: Events) -> dict:
  return {
      "pid": t.pid, "camid": t.camera - 1, "camera": t.camera,
      "split": t.split if spec.layout == "mars" else layouts.dukev_folder(t),
      "query": t.query, "kind": t.kind, "tracklet": t.number, "frames": rel,
      "view": "back" if ev.main.back else "front",
      "other_pid": ev.intruder_identity + 1 if ev.intruder_identity >= 0 else None,
      "distractors": [f for f in FLAGS if ev.flags[f].any()],
      **{f: ev.flags[f].astype(int).tolist() for f in FLAGS},
      **({"gallery_frames": layouts.dukev_gallery_copy(rel)}
         if spec.layout == "dukev" and t.query else {}),
  }


def _render_and_write(scene: Scene, plan: Sequence[TrackletPlan],
                      paths: Sequence[list[str]], out_dir: str) -> tuple[list[dict], dict]:
  """Renders every tracklet and writes its JPEGs; returns sidecar entries and flag counts.

  JPEG encoding and file writes release the GIL, so a few writer threads overlap them with
  the rendering (each file's bytes do not depend on the order).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  quality = scene.spec.jpeg_quality

  def write(frames: np.ndarray, files: list[str]) -> None:
    for img, path in zip(frames, files):
      Image.fromarray(img).save(path, "JPEG", quality=quality)

  entries: list[dict] = []
  counts = {"frames": {f: 0 for f in FLAGS}, "tracklets": {f: 0 for f in FLAGS}}
  made_dirs: set[str] = set()
  pending: list[concurrent.futures.Future] = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=_WRITERS) as pool:
    try:
      for t, rel in zip(plan, paths):
        frames, ev = render_tracklet(scene, t)
        files = list(rel)
        if scene.spec.layout == "dukev" and t.query:  # DukeV's gallery holds the queries too
          files += layouts.dukev_gallery_copy(rel)
          frames = np.concatenate([frames, frames])
        for folder in {os.path.dirname(f) for f in files} - made_dirs:
          os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
          made_dirs.add(folder)
        pending.append(pool.submit(write, frames, [os.path.join(out_dir, p) for p in files]))
        while len(pending) > 4 * _WRITERS:  # bounded memory
          pending.pop(0).result()
        for f in FLAGS:
          counts["frames"][f] += int(ev.flags[f].sum())
          counts["tracklets"][f] += int(ev.flags[f].any())
        entries.append(_sidecar_entry(scene.spec, t, rel, ev))
      for fut in pending:
        fut.result()  # re-raises a writer's error
    except BaseException:
      for fut in pending:
        fut.cancel()
      raise
  return entries, counts


def generate(out_dir: str, spec: SyntheticSpec | Mapping[str, Any] | None = None,
             **overrides) -> dict:
  """Renders the benchmark into `out_dir` (new or empty) in `spec.layout`; returns a summary.

  Writes the layout, `synthetic_meta.json` (per tracklet: pid, camid, split, frames and the
  per-frame distractor flags) and, last, `spec.json` (the knobs; its presence marks a
  complete dataset). The summary holds per-part counts {ids, tracklets, frames, cameras} as
  the readers will see them, flag counts, and the seconds taken.
  """
  start = time.perf_counter()
  spec = make_spec(spec, **overrides)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(
        f"{out_dir}: not empty; generate() writes into a new or empty folder "
        "(use ensure_generated() to replace an older synthetic dataset atomically)")
  os.makedirs(out_dir, exist_ok=True)
  scene = make_scene(spec)
  _, notes = make_identities(spec)
  plan = make_plan(spec)
  paths = layouts.frame_paths(plan, spec.layout)
  entries, flag_counts = _render_and_write(scene, plan, paths, out_dir)
  if spec.layout == "mars":
    layouts.write_mars_info(out_dir, layouts.mars_tables(plan, paths))
  summary = _summary(spec, plan, paths, flag_counts)
  identities = {
      str(i + 1): {**ident.describe(), **note}
      for i, (ident, note) in enumerate(zip(scene.identities, notes))
  }
  _write_json(os.path.join(out_dir, META_FILE), {
      "generator_version": GENERATOR_VERSION, "layout": spec.layout,
      "height": spec.height, "width": spec.width, "flags": list(FLAGS),
      "identities": identities, "tracklets": entries,
  })
  _write_json(os.path.join(out_dir, SPEC_FILE), {
      "generator_version": GENERATOR_VERSION, "knobs": dataclasses.asdict(spec),
      "summary": summary,
  })
  summary = dict(summary, root=out_dir, seconds=round(time.perf_counter() - start, 3))
  return summary


def read_spec(root: str) -> dict | None:
  """The `spec.json` of a generated dataset, or None when there is none (or it is unreadable)."""
  try:
    with open(os.path.join(root, SPEC_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _matches(root: str, spec: SyntheticSpec) -> dict | None:
  rec = read_spec(root)
  if (rec is not None and rec.get("generator_version") == GENERATOR_VERSION
      and rec.get("knobs") == dataclasses.asdict(spec)):
    return rec
  return None


def ensure_generated(root: str, knobs: SyntheticSpec | Mapping[str, Any] | None = None,
                     force: bool = False) -> str:
  """Generates the benchmark into `root` unless `root/spec.json` records the same knobs.

  `knobs` may be partial (defaults fill the rest); `knobs["layout"]` picks "mars" (default) or
  "dukev". Atomic: the data is rendered into a sibling temp folder that is renamed to `root`
  when complete, and an older synthetic dataset there is replaced only then; a folder that is
  not a synthetic dataset (no spec.json) is never deleted. Returns the folder holding the
  layout (`root`).
  """
  spec = make_spec(knobs)
  root = os.path.abspath(root)
  if not force and _matches(root, spec):
    return root
  if os.path.isdir(root) and os.listdir(root) and read_spec(root) is None:
    raise FileExistsError(
        f"{root}: exists and is not a synthetic dataset (no {SPEC_FILE}); refusing to "
        "overwrite it. Point config.dataset.root at a new or empty folder.")
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp = f"{root}.tmp-{tag}"
  try:
    summary = generate(tmp, spec)
    logging.info("synthetic benchmark generated in %.1f s into %s", summary["seconds"], root)
    old = None
    if os.path.lexists(root):
      if not force and _matches(root, spec):  # another process finished first
        shutil.rmtree(tmp)
        return root
      old = f"{root}.old-{tag}"
      os.rename(root, old)
    try:
      os.rename(tmp, root)
    except OSError:
      if _matches(root, spec):  # lost a race to a process with the same knobs
        shutil.rmtree(tmp)
      else:
        raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root


def load_meta(root: str) -> dict:
  """The JSON sidecar of a generated dataset (see `generate`)."""
  path = os.path.join(root, META_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise FileNotFoundError(f"{path}: no synthetic sidecar ({e})") from e


def meta_by_first_frame(meta: Mapping[str, Any]) -> dict[str, dict]:
  """Sidecar entries keyed by their first frame's path relative to the dataset root.

  DukeV query tracklets are also keyed by their gallery copy.
  """
  out = {}
  for e in meta["tracklets"]:
    out[e["frames"][0]] = e
    if e.get("gallery_frames"):
      out[e["gallery_frames"][0]] = e
  return out


def meta_for(root: str, tracklets: Sequence[Tracklet]) -> list[dict | None]:
  """The sidecar entry of each reader `Tracklet` read from `root` (None if not found).

  This is how per-frame distractor flags reach an analysis of the model, e.g. the temporal
  weights of occluded, misaligned and clean tracklets.
  """
  index = meta_by_first_frame(load_meta(root))
  base = os.path.abspath(root)
  rel = lambda p: os.path.relpath(os.path.abspath(p), base).replace(os.sep, "/")
  return [index.get(rel(t.frames[0])) for t in tracklets]
