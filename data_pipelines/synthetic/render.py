"""NumPy rendering of the synthetic frames: camera backgrounds, people, occluders.

Everything is vectorised over the frames of a tracklet: a person is drawn from per-frame box
arrays `(T,)` onto a canvas `(T, H, W, 3)` float32 in [0, 1]. Body parts are defined in units of
the person's height `hp`: `u = (x - cx) / hp` (0 at the body axis), `v = (y - top) / hp` (0 at
the top of the head, 1 at the soles).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Saturated colours shared by clothing, background clutter and occluders (the clutter reuses
# clothing colours on purpose: a model that looks at the background confuses identities).
PALETTE = np.asarray([
    (0.85, 0.10, 0.10),  # red
    (0.10, 0.60, 0.15),  # green
    (0.12, 0.25, 0.85),  # blue
    (0.95, 0.85, 0.10),  # yellow
    (0.95, 0.95, 0.95),  # white
    (0.08, 0.08, 0.08),  # black
    (0.50, 0.50, 0.50),  # grey
    (0.95, 0.50, 0.05),  # orange
    (0.55, 0.15, 0.70),  # purple
    (0.10, 0.80, 0.85),  # cyan
    (0.45, 0.28, 0.12),  # brown
    (0.95, 0.55, 0.75),  # pink
], np.float32)
HAIR = np.asarray([
    (0.05, 0.04, 0.03), (0.30, 0.18, 0.08), (0.85, 0.70, 0.35), (0.70, 0.70, 0.70),
    (0.60, 0.20, 0.05),
], np.float32)
SKIN = np.asarray([
    (0.96, 0.80, 0.68), (0.87, 0.66, 0.50), (0.65, 0.45, 0.30), (0.40, 0.26, 0.16),
], np.float32)
SHOES = np.asarray((0.12, 0.10, 0.10), np.float32)
HEIGHTS = (0.84, 0.90, 0.96)  # person height / frame height
WIDTHS = (0.80, 1.00, 1.22)  # horizontal build factor
PATTERNS = ("plain", "stripes", "checks", "logo")

# Attribute name -> number of values (the identity's look; see `Identity`).
ATTRIBUTES = {
    "upper": len(PALETTE),
    "lower": len(PALETTE),
    "pattern": len(PATTERNS),
    "pattern_color": len(PALETTE),
    "hair": len(HAIR),
    "long_hair": 2,
    "skin": len(SKIN),
    "height": len(HEIGHTS),
    "build": len(WIDTHS),
    "short_sleeves": 2,
    "shorts": 2,
    "bag": len(PALETTE) + 1,  # 0: no bag, else 1 + palette index of a shoulder bag
}


@dataclasses.dataclass(frozen=True)
class Identity:
  """A person's look: indices into the tables above (one field per `ATTRIBUTES` key)."""

  upper: int
  lower: int
  pattern: int
  pattern_color: int
  hair: int
  long_hair: int
  skin: int
  height: int
  build: int
  short_sleeves: int
  shorts: int
  bag: int

  def as_tuple(self) -> tuple[int, ...]:
    return dataclasses.astuple(self)

  def describe(self) -> dict:
    """Human-readable attributes (for the JSON sidecar)."""
    names = ("red", "green", "blue", "yellow", "white", "black", "grey", "orange", "purple",
             "cyan", "brown", "pink")
    return {
        "upper": names[self.upper], "lower": names[self.lower],
        "pattern": PATTERNS[self.pattern], "pattern_color": names[self.pattern_color],
        "hair": self.hair, "long_hair": bool(self.long_hair), "skin": self.skin,
        "height": HEIGHTS[self.height], "build": WIDTHS[self.build],
        "short_sleeves": bool(self.short_sleeves), "shorts": bool(self.shorts),
        "bag": names[self.bag - 1] if self.bag else None,
    }


@dataclasses.dataclass(frozen=True)
class PersonBoxes:
  """Where a person is drawn in each frame: arrays `(T,)` of pixels, plus visibility and view.

  `cx`: x of the body axis; `top`: y of the top of the head; `hp`: person height; `phase`:
  walking phase (radians); `visible`: bool, frames where the person is drawn; `back`: seen from
  behind (tracklet-level).
  """

  cx: np.ndarray
  top: np.ndarray
  hp: np.ndarray
  phase: np.ndarray
  visible: np.ndarray
  back: bool


def _paint(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray) -> np.ndarray:
  """canvas (T,H,W,3), mask broadcastable to (T,H,W) bool, color (3,) -> painted canvas."""
  np.copyto(canvas, color, where=mask[..., None])
  return canvas


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates `(1, H, 1)` and `(1, 1, W)`."""
  yy = np.arange(h, dtype=np.float32)[None, :, None] + 0.5
  xx = np.arange(w, dtype=np.float32)[None, None, :] + 0.5
  return yy, xx


class _Layers:
  """Paints parts into a label map `(T,H,W)` uint8 + shading, composited once at the end.

  Masks stay as small as their geometry allows ((T,H,1) bands times (T,1,W) columns) until
  they are combined, which keeps the drawing cheap.
  """

  def __init__(self, shape: tuple[int, int, int]):
    self.label = np.zeros(shape, np.uint8)
    self.shade = np.ones(shape, np.float32)
    self.colors = [np.zeros(3, np.float32)]
    self.shaded = [False]

  def put(self, mask: np.ndarray, color: np.ndarray, shade: np.ndarray | None = None):
    """Paints `color` where `mask` (broadcastable to (T,H,W)), optionally shaded."""
    self.colors.append(np.asarray(color, np.float32))
    self.shaded.append(shade is not None)
    np.copyto(self.label, len(self.colors) - 1, where=mask)
    if shade is not None:  # unshaded parts ignore the shade map (see composite)
      np.copyto(self.shade, shade, where=mask)

  def composite(self, canvas: np.ndarray) -> np.ndarray:
    if not canvas.flags.c_contiguous:
      canvas = np.ascontiguousarray(canvas)
    table = np.stack(self.colors)  # (K, 3)
    label = self.label.reshape(-1)
    where = np.flatnonzero(label)
    lab = label[where]
    shade = np.where(np.asarray(self.shaded)[lab], self.shade.reshape(-1)[where], 1.0)
    canvas.reshape(-1, 3)[where] = table[lab] * shade[:, None]
    return canvas


def _person_layers(ident: Identity, boxes: PersonBoxes, shape: tuple[int, int, int]) -> _Layers:
  """The person's parts painted into label layers of `shape` (T, H, W)."""
  t, h, w = shape
  yy, xx = _grid(h, w)
  hp = np.maximum(boxes.hp, 1.0)[:, None, None].astype(np.float32)
  u = (xx - boxes.cx[:, None, None]) / hp  # (T,1,W): 0 on the body axis
  v = (yy - boxes.top[:, None, None]) / hp  # (T,H,1): 0 at the top of the head, 1 at the soles
  vis = boxes.visible[:, None, None]
  bw = WIDTHS[ident.build]
  swing = np.sin(boxes.phase)[:, None, None].astype(np.float32)
  upper, lower = PALETTE[ident.upper], PALETTE[ident.lower]
  skin, hair = SKIN[ident.skin], HAIR[ident.hair]
  layers = _Layers((t, h, w))
  put = layers.put

  def band(v0, v1):
    return vis & (v >= v0) & (v < v1)

  # Long hair hangs behind the shoulders (drawn first, the torso covers it from the front).
  if ident.long_hair:
    put(band(0.05, 0.27) & (np.abs(u) < 0.075), hair)
  # Legs: two trouser legs that open and close with the walking phase.
  leg_half = 0.04 * bw
  spread = 0.027 * bw + 0.032 * np.abs(swing)
  for side in (-1.0, 1.0):
    du = np.abs(u - side * spread)
    cols = du < leg_half
    shade = 1.0 - 0.35 * np.clip(du / leg_half, 0, 1) ** 2
    if ident.shorts:
      put(band(0.56, 0.74) & cols, lower, shade)
      put(band(0.74, 0.95) & cols, skin, shade)
    else:
      put(band(0.56, 0.95) & cols, lower, shade)
    put(band(0.95, 1.0) & (np.abs(u - side * spread - 0.01) < leg_half * 1.15), SHOES)
  put(band(0.50, 0.58) & (np.abs(u) < 0.095 * bw), lower)
  # Arms swing opposite to each other along the body.
  torso_half = 0.108 * bw - 0.018 * np.clip((v - 0.17) / 0.35, 0, 1)  # (T,H,1)
  sleeve_end = 0.33 if ident.short_sleeves else 0.50
  for side in (-1.0, 1.0):
    du = side * (torso_half + 0.025 * bw) + 0.012 * side * swing
    dv = 0.02 * side * swing
    arm_u = np.abs(u - du) < 0.026 * bw
    put(vis & arm_u & (v >= 0.18 + dv) & (v < sleeve_end + dv), upper)
    put(vis & arm_u & (v >= sleeve_end + dv) & (v < 0.55 + dv), skin)
  # Torso with its pattern.
  torso = band(0.17, 0.52) & (np.abs(u) < torso_half)
  tshade = 1.0 - 0.3 * np.clip(np.abs(u) / torso_half, 0, 1) ** 2
  put(torso, upper, tshade)
  pat = PATTERNS[ident.pattern]
  pcol = PALETTE[ident.pattern_color]
  if pat == "stripes":
    put(torso & (np.mod((v - 0.17) / 0.07, 1.0) < 0.5), pcol, tshade)
  elif pat == "checks":
    put(torso & ((np.mod((v - 0.17) / 0.08, 1.0) < 0.5) ^ (np.mod(u / 0.08, 1.0) < 0.5)),
        pcol, tshade)
  elif pat == "logo" and not boxes.back:
    put(vis & (((u / 0.06) ** 2 + ((v - 0.31) / 0.06) ** 2) <= 1.0), pcol)
  # Shoulder bag: a strap across the chest and a bag at the hip.
  if ident.bag:
    bcol = PALETTE[ident.bag - 1]
    put(torso & (np.abs((u + 0.1 * bw) - (v - 0.2) * 0.55) < 0.018), bcol)
    put(band(0.42, 0.56) & (np.abs(u - 0.14 * bw) < 0.05), bcol)
  # Neck and head; seen from behind, the head is hair only.
  put(band(0.14, 0.18) & (np.abs(u) < 0.03), skin)
  head = vis & (((u / 0.062) ** 2 + ((v - 0.085) / 0.075) ** 2) <= 1.0)
  if boxes.back:
    put(head, hair)
  else:
    put(head, skin)
    put(head & (v < 0.055), hair)
  return layers


def draw_person_direct(canvas: np.ndarray, ident: Identity, boxes: PersonBoxes) -> np.ndarray:
  """Draws one person at full resolution, frame by frame (reference for `draw_person`)."""
  if not np.any(boxes.visible):
    return canvas
  return _person_layers(ident, boxes, canvas.shape[:3]).composite(canvas)


SPRITE_PHASES = 8  # walking phases pre-drawn per sprite
_U_HALF = 0.25  # a sprite spans u in [-0.25, 0.25) (arms and bag included)


@dataclasses.dataclass(frozen=True)
class Sprite:
  """A person pre-drawn at `SPRITE_PHASES` walking phases, in units of its height `S`.

  `rgb` (P, S, S//2, 3) uint8 and `alpha` (P, S, S//2) bool; column S//4 is the body axis.
  """

  rgb: np.ndarray
  alpha: np.ndarray


def make_sprite(ident: Identity, back: bool, size: int) -> Sprite:
  """Renders `ident` once per walking phase at person height `size` pixels."""
  p, sw = SPRITE_PHASES, size // 2
  boxes = PersonBoxes(
      cx=np.full(p, sw / 2, np.float32), top=np.zeros(p, np.float32),
      hp=np.full(p, size, np.float32),
      phase=(2 * np.pi * np.arange(p) / p).astype(np.float32),
      visible=np.ones(p, bool), back=back)
  layers = _person_layers(ident, boxes, (p, size, sw))
  canvas = layers.composite(np.zeros((p, size, sw, 3), np.float32))
  rgb = np.clip(np.rint(canvas * 255.0), 0, 255).astype(np.uint8)
  return Sprite(rgb, layers.label > 0)


def draw_person(canvas: np.ndarray, sprite: Sprite, boxes: PersonBoxes) -> np.ndarray:
  """Draws a person from its sprite on every frame where `boxes.visible`.

  canvas (T,H,W,3) float32 -> same. Nearest-neighbour resampling of the sprite into each
  frame's box (cx, top, hp); the walking phase picks the nearest pre-drawn phase.
  """
  t, h, w, _ = canvas.shape
  if not np.any(boxes.visible):
    return canvas
  if not canvas.flags.c_contiguous:
    canvas = np.ascontiguousarray(canvas)
  p, size, sw = sprite.alpha.shape
  hp = np.maximum(boxes.hp, 1.0).astype(np.float32)[:, None]
  ys = np.arange(h, dtype=np.float32)[None, :] + 0.5
  xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
  r = np.floor((ys - boxes.top[:, None]) / hp * size).astype(np.int32)  # (T, H)
  c = np.floor((xs - boxes.cx[:, None]) / hp * size + sw / 2).astype(np.int32)  # (T, W)
  row_ok = (r >= 0) & (r < size) & boxes.visible[:, None]
  col_ok = (c >= 0) & (c < sw)
  r, c = np.clip(r, 0, size - 1), np.clip(c, 0, sw - 1)
  ph = np.mod(np.rint(boxes.phase / (2 * np.pi) * p), p).astype(np.int32)  # (T,)
  # Flat sprite index of every pixel: phase, row and column offsets add up (T,H,W).
  flat = (ph[:, None, None] * (size * sw) + r[:, :, None] * sw) + c[:, None, :]
  ok = row_ok[:, :, None] & col_ok[:, None, :]
  alpha = sprite.alpha.reshape(-1).take(flat) & ok
  where = np.flatnonzero(alpha)
  if where.size:
    rgb = sprite.rgb.reshape(-1, 3).take(flat.reshape(-1)[where], axis=0)
    canvas.reshape(-1, 3)[where] = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
  return canvas


def camera_background(rng: np.random.Generator, height: int, width: int, pano_width: int,
                      clutter_strength: float, clutter_density: float) -> np.ndarray:
  """One camera's static scene `(H, pano_width, 3)` float32: wall, ground, clutter objects.

  The scene is wider than a frame; each tracklet sees a window of it (`pan` offsets), so the
  same clutter appears at the same places for every person that camera sees. All random
  numbers are drawn whatever the knobs, so the knobs do not change the other draws.
  """
  h, w = height, pano_width
  yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
  xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
  n_pal = len(PALETTE)
  draws = rng.random(64).astype(np.float32)  # fixed-size draws: layout independent of knobs
  picks = rng.integers(0, n_pal, size=16)
  horizon = h * (0.35 + 0.25 * draws[0])
  wall = 0.3 + 0.4 * PALETTE[picks[0]] * 0.6 + 0.1 * draws[1]
  scene = np.broadcast_to(wall, (h, w, 3)).astype(np.float32).copy()
  scene *= (0.85 + 0.15 * (yy / h))[..., None]
  ground = yy >= horizon
  ground_type = int(draws[2] * 3)  # 0 paving, 1 grass, 2 bricks
  g_noise = rng.random((h, w)).astype(np.float32)
  if ground_type == 0:
    cell = 4 + int(6 * draws[3])
    tiles = ((xx // cell + yy // cell) % 2).astype(np.float32)
    c1, c2 = PALETTE[picks[1]], PALETTE[(picks[1] + 4) % n_pal]
    paving = tiles[..., None] * c1 + (1 - tiles[..., None]) * c2
  elif ground_type == 1:
    stripe = (np.floor(xx / (6 + 6 * draws[3])) % 2).astype(np.float32)
    g = np.stack([0.15 + 0.1 * g_noise, 0.45 + 0.25 * g_noise + 0.1 * stripe,
                  0.1 + 0.08 * g_noise], -1)
    paving = g
  else:
    row = np.floor(yy / 5)
    offset = (row % 2) * 5
    mortar = (np.mod(yy, 5) < 1) | (np.mod(xx + offset, 10) < 1)
    c1 = PALETTE[picks[1]] * 0.8 + 0.1
    paving = np.where(mortar[..., None], np.float32(0.85), c1[None, None, :] *
                      (0.85 + 0.3 * g_noise[..., None]))
  paving = np.broadcast_to(paving, (h, w, 3))
  scene = np.where(ground[..., None], paving, scene)
  # Clutter objects at fixed places: poles, posters with stripes, parked objects.
  n_obj = int(round(clutter_density * (3 + 4 * draws[4])))
  for k in range(n_obj):
    a = draws[8 + 6 * k: 14 + 6 * k]  # n_obj <= 7, so within the 64 draws
    c1, c2 = PALETTE[picks[(2 + 2 * k) % 16]], PALETTE[picks[(3 + 2 * k) % 16]]
    kind = k % 3
    x0 = a[0] * w
    if kind == 0:  # a pole, full height
      pw = 2 + a[1] * 0.12 * width
      mask = (xx >= x0) & (xx < x0 + pw) & (yy >= 0)
      bands = (np.floor(yy / (4 + 8 * a[2])) % 2)[..., None] > 0
      color = np.where(bands, c1, c2 if a[3] > 0.5 else c1 * 0.6)
    elif kind == 1:  # a poster on the wall with a clothing-like pattern
      pw, ph = (0.25 + 0.35 * a[1]) * width, (0.15 + 0.25 * a[2]) * h
      y0 = max(2.0, horizon - ph - a[3] * 0.3 * h)
      mask = (xx >= x0) & (xx < x0 + pw) & (yy >= y0) & (yy < y0 + ph)
      if a[4] < 0.5:
        marks = (np.mod((yy - y0) / (3 + 3 * a[5]), 1.0) < 0.5)
      else:
        marks = (np.mod((yy - y0) / 4, 1.0) < 0.5) ^ (np.mod((xx - x0) / 4, 1.0) < 0.5)
      color = np.where(marks[..., None], c1, c2)
    else:  # a parked object on the ground (car-like body with dark wheels)
      pw, ph = (0.5 + 0.6 * a[1]) * width, (0.12 + 0.15 * a[2]) * h
      y1 = min(h, horizon + (h - horizon) * (0.5 + 0.5 * a[3]))
      body = (xx >= x0) & (xx < x0 + pw) & (yy >= y1 - ph) & (yy < y1 - 0.25 * ph)
      wheel_r = 0.25 * ph
      wheels = (((xx - x0 - 0.22 * pw) ** 2 + (yy - y1 + wheel_r) ** 2) < wheel_r ** 2) | (
          ((xx - x0 - 0.78 * pw) ** 2 + (yy - y1 + wheel_r) ** 2) < wheel_r ** 2)
      window = body & (yy < y1 - 0.7 * ph) & (np.mod((xx - x0) / (0.2 * pw + 1), 1.0) < 0.7)
      mask = body | wheels
      color = np.where(wheels[..., None], np.float32(0.05),
                       np.where(window[..., None], c2 * 0.5 + 0.4, c1))
    color = np.broadcast_to(color, (h, w, 3))
    scene = np.where(mask[..., None], color, scene)
  scene = scene + 0.06 * (g_noise[..., None] - 0.5)
  # Strength blends the scene towards plain mid grey (0: no spatial distractor at all).
  plain = np.float32(0.5)
  return np.clip(plain + clutter_strength * (scene - plain), 0.0, 1.0).astype(np.float32)


def background_frames(scene: np.ndarray, pan: np.ndarray, width: int) -> np.ndarray:
  """scene (H, Wp, 3), pan (T,) int offsets -> (T, H, width, 3) windows of the scene."""
  return np.stack([scene[:, p:p + width] for p in pan.tolist()])


def draw_occluder(canvas: np.ndarray, coverage: np.ndarray, side: int, color: np.ndarray,
                  color2: np.ndarray, period: float) -> np.ndarray:
  """An object in front of the person covering `coverage[t]` of the box from one side.

  canvas (T,H,W,3), coverage (T,) in [0, 1]; side 0: from the bottom (a car, a bench),
  1: from the left, 2: from the right (a pillar, a passer-by). Striped with color2.
  """
  _, h, w, _ = canvas.shape
  yy, xx = _grid(h, w)
  c = coverage[:, None, None].astype(np.float32)
  if side == 0:
    mask = yy >= h * (1.0 - c)
    marks = np.mod(yy / period, 1.0) < 0.3
  elif side == 1:
    mask = xx < w * c
    marks = np.mod(xx / period, 1.0) < 0.3
  else:
    mask = xx >= w * (1.0 - c)
    marks = np.mod(xx / period, 1.0) < 0.3
  mask = mask & (c > 0)
  canvas = _paint(canvas, mask, color)
  return _paint(canvas, mask & marks, color2)


def finish(canvas: np.ndarray, gain: np.ndarray, noise255: np.ndarray) -> np.ndarray:
  """Camera colour cast `gain` (3,) and sensor noise -> uint8 frames.

  `noise255` (T,H,W,3) is the noise in 0..255 units plus 0.5 (so that the truncating cast
  rounds). Overwrites `canvas` (a scratch buffer).
  """
  canvas *= gain * np.float32(255.0)
  canvas += noise255
  np.clip(canvas, 0.0, 255.0, out=canvas)
  return canvas.astype(np.uint8)
