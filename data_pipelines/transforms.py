"""TF ops on one clip: decode, resize, horizontal flip, random erasing, normalisation.

All randomness is stateless (`tf.random.stateless_*`) and comes from a seed derived from
`(config.seed, step, index in the global batch)` by `clip_seed`, so batches are reproducible
and a resumed run sees the same augmentations.

Order as the official STMN training transform: resize (to uint8, as PIL) -> [0, 1] -> normalise
-> random erasing (erased pixels set to 0 after normalisation, i.e. the mean colour), plus a
horizontal flip drawn once per tracklet and applied to all its frames.

Frames are decoded per clip as uint8; the float work of a whole batch (flip, normalise, erase)
is one XLA-compiled function (`finish_batch`), which writes the float32 batch in a single pass.
`train_clip` / `eval_clip` are the same computation written with the single ops, per clip.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import tensorflow as tf

# Tags that keep the random streams of one clip apart.
_FLIP_TAG = 1
_ERASE_TAG = 2

# Bounded version of the official "up to 100 attempts" loop: all attempts are drawn at once and
# the first one that fits is used.
ERASING_ATTEMPTS = 100

_GPU_HIDDEN = False


def clip_seed(seed: int | tf.Tensor, step: int | tf.Tensor, index: int | tf.Tensor) -> tf.Tensor:
  """A stateless seed for one clip: `(seed, step, index in the global batch)` -> (2,) int32."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.constant(0x5EED, tf.int64)])
  s = tf.random.experimental.stateless_fold_in(base, tf.cast(step, tf.int64))
  return tf.random.experimental.stateless_fold_in(s, tf.cast(index, tf.int64))


def hide_gpus() -> None:
  """Keep TF off the accelerators (JAX owns them); call before TF runs its first op."""
  global _GPU_HIDDEN
  if _GPU_HIDDEN:
    return
  # A RuntimeError means TF already initialised its devices: nothing to hide any more.
  with contextlib.suppress(RuntimeError):
    tf.config.set_visible_devices([], "GPU")
  _GPU_HIDDEN = True


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/BMP/GIF bytes -> (h, w, 3) uint8 at the file's own size (the decoder)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def resize_frame(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """(h, w, 3) uint8 -> (H, W, 3) uint8, resized bilinearly if its size differs.

  `antialias=True` and rounding back to uint8 as PIL's bilinear resize (the official code's
  torchvision `Resize` on a PIL image, followed by `ToTensor`); frames already at (H, W) are
  returned as decoded.
  """
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))

  def resize():
    x = tf.image.resize(tf.cast(image, tf.float32), (height, width), method="bilinear",
                        antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)

  image = tf.cond(same, lambda: image, resize)
  image.set_shape([height, width, 3])
  return image


def decode_frame(encoded: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """Encoded JPEG/PNG bytes -> (H, W, 3) uint8 (`decode_rgb`, then `resize_frame`)."""
  return resize_frame(decode_rgb(encoded), height, width)


def decode_clip(encoded: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """(L,) encoded frames -> (L, H, W, 3) uint8."""
  return tf.map_fn(
      lambda e: decode_frame(e, height, width),
      encoded,
      fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8),
  )


def check_image(encoded: tf.Tensor, name: tf.Tensor) -> tf.Tensor:
  """`encoded` unchanged, after asserting it starts like a JPEG, PNG, BMP or GIF file.

  The error names the file (`name`), which the decoder's own message does not.
  """
  head = tf.strings.substr(encoded, 0, 4)
  ok = tf.reduce_any(tf.stack([
      tf.strings.substr(head, 0, 2) == b"\xff\xd8",  # JPEG
      head == b"\x89PNG",
      tf.strings.substr(head, 0, 2) == b"BM",
      tf.strings.substr(head, 0, 3) == b"GIF",
  ]))
  check = tf.debugging.Assert(ok, ["frame is not a JPEG/PNG/BMP/GIF image:", name])
  with tf.control_dependencies([check]):
    return tf.identity(encoded)


def read_frame(path: tf.Tensor) -> tf.Tensor:
  """A frame file -> (h, w, 3) uint8: read, header check (`check_image`), `decode_rgb`.

  The one way frames are read from files: the pipeline (`read_clip`) and the frame check before
  a run (`data_pipelines.frame_check`) both use it, so a frame passes the check only if training
  can read it.
  """
  return decode_rgb(check_image(tf.io.read_file(path), path))


def read_clip(paths: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """(L,) file paths -> (L, H, W, 3) uint8; only these files are read."""
  return tf.map_fn(
      lambda p: resize_frame(read_frame(p), height, width),
      paths,
      fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8),
  )


def normalize(frames: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """(..., 3) in [0, 1] -> (x - mean) / std per channel (ImageNet statistics by default)."""
  mean = tf.constant(mean, frames.dtype)
  std = tf.constant(std, frames.dtype)
  return (frames - mean) / std


def flip_clip(frames: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
  """(L, H, W, C) -> the same clip mirrored left-right if `flip` (a scalar bool), all frames."""
  return tf.where(flip, tf.reverse(frames, axis=[2]), frames)


def random_flip(frames: tf.Tensor, seed: tf.Tensor, prob: float) -> tuple[tf.Tensor, tf.Tensor]:
  """One flip decision per clip with probability `prob`: -> (flipped clip, flip bool)."""
  s = tf.random.experimental.stateless_fold_in(seed, _FLIP_TAG)
  flip = tf.random.stateless_uniform([], s) < prob
  return flip_clip(frames, flip), flip


def erasing_boxes(
    seed: tf.Tensor,
    num_frames: int,
    height: int,
    width: int,
    prob: float,
    area: Sequence[float],
    aspect: Sequence[float],
    attempts: int = ERASING_ATTEMPTS,
) -> tf.Tensor:
  """Random-erasing rectangles, one per frame: -> (L, 4) int32 `[top, left, h, w]`.

  Per frame: with probability `prob`, draw `attempts` candidates of area `U(area) * H * W` and
  aspect ratio `U(aspect)` (h / w, uniform as in the original Random Erasing code), keep the
  first with h < H and w < W, place it uniformly. `h = w = 0` means the frame is not erased.
  """
  s = tf.random.experimental.stateless_fold_in(seed, _ERASE_TAG)
  keys = tf.random.experimental.stateless_split(s, 4)
  shape = [num_frames, attempts]
  apply = tf.random.stateless_uniform([num_frames], keys[0]) < prob
  target = tf.random.stateless_uniform(shape, keys[1], area[0], area[1]) * float(height * width)
  ratio = tf.random.stateless_uniform(shape, keys[2], aspect[0], aspect[1])
  h = tf.cast(tf.round(tf.sqrt(target * ratio)), tf.int32)
  w = tf.cast(tf.round(tf.sqrt(target / ratio)), tf.int32)
  fits = (h < height) & (w < width) & (h > 0) & (w > 0)
  first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
  found = tf.reduce_any(fits, axis=1) & apply
  h = tf.where(found, tf.gather(h, first, batch_dims=1), 0)
  w = tf.where(found, tf.gather(w, first, batch_dims=1), 0)
  u = tf.random.stateless_uniform([num_frames, 2], keys[3])
  # top in [0, H - h], left in [0, W - w], inclusive (random.randint).
  top = tf.minimum(tf.cast(u[:, 0] * tf.cast(height - h + 1, tf.float32), tf.int32), height - h)
  left = tf.minimum(tf.cast(u[:, 1] * tf.cast(width - w + 1, tf.float32), tf.int32), width - w)
  return tf.stack([top, left, h, w], axis=1)


def box_masks(boxes: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """(L, 4) `[top, left, h, w]` -> (L, H, W, 1) float32, 1 inside the box."""
  rows = tf.range(height)[None, :]
  cols = tf.range(width)[None, :]
  top, left, h, w = (boxes[:, i : i + 1] for i in range(4))
  in_rows = (rows >= top) & (rows < top + h)  # (L, H)
  in_cols = (cols >= left) & (cols < left + w)  # (L, W)
  return tf.cast(in_rows[:, :, None, None] & in_cols[:, None, :, None], tf.float32)


def erase(frames: tf.Tensor, boxes: tf.Tensor, value: float = 0.0) -> tf.Tensor:
  """(L, H, W, C) -> the boxes filled with `value` (0 after normalisation = the mean colour)."""
  mask = box_masks(boxes, frames.shape[1], frames.shape[2])
  return frames * (1.0 - mask) + value * mask


def augment_params(seed: tf.Tensor, num_frames: int, height: int, width: int,
                   data_config) -> tuple[tf.Tensor, tf.Tensor]:
  """A clip's random augmentation: flip () bool (per clip), boxes (L, 4) int32 (per frame)."""
  flip = tf.random.stateless_uniform(
      [], tf.random.experimental.stateless_fold_in(seed, _FLIP_TAG)) < data_config.flip_prob
  boxes = erasing_boxes(
      seed, num_frames, height, width, data_config.erasing_prob,
      tuple(data_config.erasing_area), tuple(data_config.erasing_aspect),
  )
  return flip, boxes


def _finish(frames, flip, boxes, valid, mean, std):
  """The fused per-batch step; see `finish_batch`."""
  # Dynamic shapes: with reduce_retracing, a second batch size retraces with unknown dims.
  shape = tf.shape(frames)
  height, width = shape[2], shape[3]
  x = tf.cast(frames, tf.float32)
  x = tf.where(flip[:, None, None, None, None], tf.reverse(x, axis=[3]), x)
  x = (x * (1.0 / 255.0) - mean) / std
  rows = tf.range(height)[None, None, :]
  cols = tf.range(width)[None, None, :]
  top, left, h, w = (boxes[..., i : i + 1] for i in range(4))  # (B, L, 1)
  in_rows = (rows >= top) & (rows < top + h)  # (B, L, H)
  in_cols = (cols >= left) & (cols < left + w)  # (B, L, W)
  erased = in_rows[:, :, :, None, None] & in_cols[:, :, None, :, None]
  erased = erased | ~valid[:, None, None, None, None]
  return tf.where(erased, tf.zeros_like(x), x)


_FINISHERS: dict = {}


def finish_batch(frames: tf.Tensor, flip: tf.Tensor, boxes: tf.Tensor, valid: tf.Tensor,
                 mean: Sequence[float], std: Sequence[float], jit: bool = True) -> tf.Tensor:
  """(B, L, H, W, 3) uint8 -> float32: flip clips, normalise, erase boxes, zero invalid rows.

  `flip` (B,) bool, `boxes` (B, L, 4) `[top, left, h, w]`, `valid` (B,) bool. Written as one
  XLA-compiled function (`jit`), so the float batch is produced in a single pass over memory:
  equal to `erase(normalize(flip_clip(frames / 255)))` clip by clip.
  """
  key = (tuple(float(m) for m in mean), tuple(float(s) for s in std), bool(jit))
  fn = _FINISHERS.get(key)
  if fn is None:
    m = np.asarray(key[0], np.float32)
    sd = np.asarray(key[1], np.float32)
    fn = tf.function(lambda f, fl, b, v: _finish(f, fl, b, v, m, sd), jit_compile=key[2],
                     reduce_retracing=True)
    _FINISHERS[key] = fn
  return fn(frames, flip, boxes, valid)


def train_clip(frames: tf.Tensor, seed: tf.Tensor, data_config) -> tf.Tensor:
  """(L, H, W, 3) uint8 -> flipped (per clip), normalised, erased (per frame) float32.

  Reference composition of the single ops (the pipeline uses `augment_params` + the fused
  `finish_batch`, which gives the same values).
  """
  num_frames, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
  flip, boxes = augment_params(seed, num_frames, height, width, data_config)
  x = flip_clip(tf.cast(frames, tf.float32) / 255.0, flip)
  x = normalize(x, data_config.mean, data_config.std)
  return erase(x, boxes, 0.0)


def eval_clip(frames: tf.Tensor, data_config) -> tf.Tensor:
  """(L, H, W, 3) uint8 -> normalised float32 (no randomness)."""
  return normalize(tf.cast(frames, tf.float32) / 255.0, data_config.mean, data_config.std)
