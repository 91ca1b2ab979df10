"""DukeMTMC-VideoReID (Wu et al., CVPR 2018) in its released layout.

    <root>/                                  (the DukeMTMC-VideoReID folder)
      train/<pid4>/<tracklet4>/*.jpg
      query/<pid4>/<tracklet4>/*.jpg
      gallery/<pid4>/<tracklet4>/*.jpg

Frame names come in two styles: `0001C6F0099X30823.jpg` (old) and `0001_C6_F0099_X30823.jpg`
(new): pid, camera (1..8, stored as 0..7) after `C`, frame number after `F`. Every image of a
tracklet folder is used, sorted by its frame number (torchreid's lookup of F0001..F<n> loses the
frames of tracklets that do not start at F0001; that is a quirk, not the protocol). The pid is the
folder name; every frame's name must agree with it and with one camera.

Gallery protocols:
- "official" (default): the gallery folder plus the query tracklets that it does not already hold
  (same pid and tracklet folder), i.e. every test tracklet once, queries included, as MARS's
  official protocol. On the released data the gallery folder already holds each query tracklet
  (STMN's database script finds every query there), so this is the gallery folder itself.
- "torchreid": the gallery folder exactly as released.
pid 0 distractors (if any) are kept unless `distractors=False`; pid -1 junk is dropped.
"""

from __future__ import annotations

import os
import re

from data_pipelines import tracklets as tl
from data_pipelines.readers import common
from data_pipelines.readers.common import DatasetError

LAYOUT = """\
<root>/
  train/<pid4>/<tracklet4>/<pid4>C<cam>F<frame4>X<n>.jpg  (or <pid4>_C<cam>_F<frame4>_X<n>.jpg)
  query/<pid4>/<tracklet4>/...
  gallery/<pid4>/<tracklet4>/...
"""
PROTOCOLS = ("official", "torchreid")
_NAME_RE = re.compile(r"^(-?\d+)_?C(\d+)_?F(\d+)")


def _parse(path: str) -> tuple[int, int, int]:
  """Frame path -> (pid, camera 1-based, frame number)."""
  m = _NAME_RE.match(os.path.basename(path))
  if not m:
    raise DatasetError(f"DukeV frame {path!r}: name does not match <pid>C<cam>F<frame>... or "
                       "<pid>_C<cam>_F<frame>_...")
  return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _tracklet(folder: str, pid: int) -> tl.Tracklet:
  names = [n for n in os.listdir(folder) if common.is_image(n)]
  if not names:
    raise DatasetError(f"DukeV tracklet folder {folder!r} holds no images (empty tracklet)")
  parsed = [(_parse(os.path.join(folder, n)), n) for n in names]
  cams = {p[1] for p, _ in parsed}
  pids = {p[0] for p, _ in parsed}
  if pids != {pid} or len(cams) != 1:
    bad = next(n for p, n in parsed if p[0] != pid or p[1] != parsed[0][0][1])
    raise DatasetError(f"DukeV tracklet {folder!r}: frames disagree with folder pid {pid} / one "
                       f"camera (pids {sorted(pids)}, cameras {sorted(cams)}; e.g. "
                       f"{os.path.join(folder, bad)!r})")
  parsed.sort(key=lambda x: (x[0][2], x[1]))
  return tl.Tracklet(frames=tuple(os.path.join(folder, n) for _, n in parsed), pid=pid,
                     camid=cams.pop() - 1)


def _read_part(part_dir: str) -> list[tuple[str, tl.Tracklet]]:
  """[(pid4/tracklet4 key, Tracklet)] for every tracklet folder of one part (train/query/...)."""
  out = []
  for pid_name in common.sorted_subdirs(part_dir):
    if not pid_name.lstrip("-").isdigit():
      raise DatasetError(f"DukeV folder {os.path.join(part_dir, pid_name)!r}: expected a "
                         "numeric person folder (<pid4>)")
    pid = int(pid_name)
    if pid == -1:
      continue
    pid_dir = os.path.join(part_dir, pid_name)
    for track_name in common.sorted_subdirs(pid_dir):
      out.append((f"{pid_name}/{track_name}", _tracklet(os.path.join(pid_dir, track_name), pid)))
  return out


@common.register("dukev")
def read(
    root: str,
    protocol: str = "official",
    distractors: bool = True,
    verify_images: bool = False,
    check_files: str = "size",
) -> tl.Split:
  """Reads DukeMTMC-VideoReID under `root` (layout in the module docstring) -> Split.

  `verify_images` / `check_files`: see `common.check_split`.
  """
  if protocol not in PROTOCOLS:
    raise DatasetError(f"DukeV protocol {protocol!r}: expected one of {PROTOCOLS}")
  common.require_dir(root, "DukeMTMC-VideoReID root folder", LAYOUT)
  parts = {
      p: _read_part(common.require_dir(os.path.join(root, p), f"DukeV folder {p}/", LAYOUT))
      for p in ("train", "query", "gallery")
  }
  keep = (lambda t: distractors or t.pid != 0)
  query = [t for _, t in parts["query"] if keep(t)]
  gallery = [t for _, t in parts["gallery"]]
  if protocol == "official":
    in_gallery = {k for k, _ in parts["gallery"]}
    gallery += [t for k, t in parts["query"] if k not in in_gallery]
  split = tl.Split(
      name="dukev",
      train=tl.relabel(t for _, t in parts["train"]),
      query=tuple(query),
      gallery=tuple(t for t in gallery if keep(t)),
  )
  return common.check_split(split, verify_images, check_files)
