"""A fake Cloud Storage for tests, offline: `gs://BUCKET/...` is a local folder, seen only
through `etils.epath` (and orbax's TensorStore, which takes its own route).

- `etils.epath.testing.mock_epath` routes every epath call on a `gs://` path to the same call on
  `ROOT/BUCKET/...` and records it. epath's "is TensorFlow installed" check (cached) answers
  no, so that epath picks the mocked backend for `gs://` (with TensorFlow it would go to
  tf.io.gfile, i.e. the network).
- Orbax writes and reads its arrays through TensorStore, which talks to GCS itself: its
  kvstore spec for a `gs://` path (`gcs_utils.get_kvstore_for_gcs`) is replaced by TensorStore's
  `file` driver on the mapped folder, and the bucket lookup that orbax makes to ask whether the
  bucket has a hierarchical namespace (`gcs_utils.get_bucket`, google-cloud-storage) answers
  "no". Everything else of orbax's `gs://` route is the real one (no atomic rename: a step is
  committed by a `commit_success.txt` object; deletions through `gcs_utils.rmtree`).
- The current directory becomes a folder holding a regular *file* named `gs:`, so any `os` /
  `open` / `shutil` / `np.save` call, or any `os.path.abspath`, applied to a `gs://...` string
  fails (`gs:/bucket/...` cannot be created under a file) instead of quietly writing a local
  `gs:/` tree. That is what proves the code under test used epath for the workdir.

Not covered: TensorFlow's own GCS filesystem (clu's TensorBoard writer, tf.saved_model) and
TensorStore's `gcs` driver; they are upstream code with their own tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import types
from typing import Any, Iterator

from etils.epath import gpath
from etils.epath import testing as epath_testing

PREFIX = "gs://"


@dataclasses.dataclass
class FakeGcs:
  """`root`: the local folder behind `gs://`; `calls`: (epath function, path) of every mocked
  epath call on a `gs://` path, in order."""

  root: pathlib.Path
  calls: list[tuple[str, str]] = dataclasses.field(default_factory=list)

  def local(self, path: Any) -> str:
    """`gs://BUCKET/x` -> `ROOT/BUCKET/x`; any other path unchanged."""
    path = os.fspath(path)
    return str(self.root / path[len(PREFIX):]) if path.startswith(PREFIX) else path

  def uri(self, local: str) -> str:
    """The inverse of `local` for a path under `root`."""
    return PREFIX + os.path.relpath(local, self.root)

  def written(self) -> set[str]:
    """The `gs://` paths opened for writing through epath."""
    return {p for fn, p in self.calls if fn == "open:w"}


def _mock_fns(fs: FakeGcs) -> dict[str, Any]:
  def one(name):
    def fn(original, path, *args, **kwargs):
      if os.fspath(path).startswith(PREFIX):
        mode = args[0] if name == "open" and args else kwargs.get("mode", "")
        fs.calls.append((f"{name}:{'w' if set(mode) & set('wa+') else 'r'}" if name == "open"
                         else name, os.fspath(path)))
      return original(fs.local(path), *args, **kwargs)
    return fn

  def two(name):
    def fn(original, path, dst, *args, **kwargs):
      for p in (path, dst):
        if os.fspath(p).startswith(PREFIX):
          fs.calls.append((name, os.fspath(p)))
      return original(fs.local(path), fs.local(dst), *args, **kwargs)
    return fn

  def glob(original, pattern):
    pattern = os.fspath(pattern)
    if not pattern.startswith(PREFIX):
      return original(pattern)
    fs.calls.append(("glob", pattern))
    return [fs.uri(p) for p in original(fs.local(pattern))]

  def walk(original, top, **kwargs):
    top = os.fspath(top)
    remote = top.startswith(PREFIX)
    if remote:
      fs.calls.append(("walk", top))
    for folder, dirs, files in original(fs.local(top), **kwargs):
      yield (fs.uri(folder) if remote else folder), dirs, files

  fns = {name: one(name) for name in ("open", "exists", "isdir", "listdir", "makedirs",
                                      "mkdir", "remove", "rmtree", "stat")}
  fns.update({name: two(name) for name in ("rename", "replace", "copy")})
  return dict(fns, glob=glob, walk=walk)


@contextlib.contextmanager
def fake_gcs(root: pathlib.Path, cwd: pathlib.Path, monkeypatch) -> Iterator[FakeGcs]:
  """The fake `gs://` of the module docstring, backed by `root`, with `cwd` (an empty folder)
  as the current directory; undone on exit (with `monkeypatch`)."""
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top

  root.mkdir(parents=True, exist_ok=True)
  cwd.mkdir(parents=True, exist_ok=True)
  (cwd / "gs:").write_text("a file: os-level access to a gs:// string fails under it\n")
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  fs = FakeGcs(root=root)
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": fs.local(path)})
  monkeypatch.setattr(gcs_utils, "get_bucket",
                      lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))
  with epath_testing.mock_epath(**_mock_fns(fs)):
    yield fs
