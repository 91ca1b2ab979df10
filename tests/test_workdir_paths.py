"""No workdir path goes through os-level file functions: an AST scan of `stmn_jax/`.

A workdir may be `gs://bucket/run` (`stmn_jax/workdir_io.py`), which `os`, `open`, `shutil`,
`glob`, `pathlib` and NumPy's file functions take for a relative local path. So these calls
are forbidden outright in the library (`FORBIDDEN`): code that reads or writes a workdir uses
`etils.epath.Path`. The few calls on paths that are never workdirs (dataset frames, config
files, user-given weight files, the kernel-locked file of a local workdir, ...) are listed in
`ALLOWED`, each with its reason, keyed by (file, enclosing function, call); an entry that no
longer matches a call fails too, so the list stays as small as the code.
"""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "stmn_jax"

FORBIDDEN = (
    "open", "os.open", "os.makedirs", "os.mkdir", "os.listdir", "os.scandir", "os.walk",
    "os.remove", "os.unlink", "os.rmdir", "os.removedirs", "os.rename", "os.replace",
    "os.path.join", "os.path.exists", "os.path.lexists", "os.path.isfile", "os.path.isdir",
    "os.path.getsize", "os.path.getmtime", "glob.glob", "glob.iglob", "shutil.*",
    "pathlib.Path", "pathlib.PurePath", "numpy.save", "numpy.savez", "numpy.savez_compressed",
    "numpy.load", "numpy.savetxt", "numpy.loadtxt", "tensorflow.io.gfile.*",
)

ALLOWED = {
    ("stmn_jax/app.py", "default_workdir", "os.path.join"):
        "builds the default workdir string `workdir/<config>` (relative, local); no file access",
    ("stmn_jax/config_files.py", "load_config_file", "os.path.isfile"):
        "the --config file (user input, a local Python file)",
    ("stmn_jax/features_io.py", "write_features", "numpy.save"):
        "writes into a file object opened through epath",
    ("stmn_jax/features_io.py", "_load_npy", "numpy.load"):
        "a local path (memory-mapped with mmap), or a BytesIO read through epath",
    ("stmn_jax/figures.py", "_tile", "os.path.isfile"):
        "a dataset frame drawn in a tile, not a workdir file",
    ("stmn_jax/visualize.py", "_ranking_step", "os.path.isfile"):
        "whether the dataset's frames are files (visrank copies them), not a workdir file",
    ("stmn_jax/workdir_lock.py", "_lock_here", "os.open"):
        "local workdirs only (object stores return before): fcntl locks a file descriptor",
    ("stmn_jax/workdir_lock.py", "_lock_here", "os.path.join"):
        "the same local kernel-locked file",
    ("stmn_jax/models/torchvision_weights.py", "load_state_dict", "os.path.isfile"):
        "a user-given ImageNet weight file (config.model.pretrained), never a workdir",
    ("stmn_jax/models/torchvision_weights.py", "_load_npz", "numpy.load"):
        "a user-given ImageNet weight file (.npz), never a workdir",
    ("stmn_jax/models/torchvision_weights.py", "save_state_dict", "numpy.savez"):
        "the --dst of the weight converter (a user-given local file), never a workdir",
    ("stmn_jax/ranking/cli.py", "load_features", "numpy.load"):
        "the ranking CLI's user-given .npz of features (a local file), not a mode's workdir",
}


def _aliases(tree: ast.Module) -> dict[str, str]:
  """Local names of imported modules / functions -> their full dotted names."""
  names = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        names[a.asname or a.name] = f"{node.module}.{a.name}"
  return names


def _dotted(node: ast.AST) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value)
    return f"{base}.{node.attr}" if base else None
  return None


def _forbidden(name: str) -> bool:
  return any(name == f or (f.endswith(".*") and name.startswith(f[:-1])) for f in FORBIDDEN)


def scan(source: str) -> list[tuple[str, str, int]]:
  """(enclosing function or "<module>", forbidden call, line) of every forbidden call."""
  tree = ast.parse(source)
  aliases = _aliases(tree)
  found = []

  def visit(node: ast.AST, where: str) -> None:
    for child in ast.iter_child_nodes(node):
      inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
      if isinstance(child, ast.Call):
        name = _dotted(child.func)
        if name is not None:
          head, _, rest = name.partition(".")
          full = aliases.get(head, head) + (f".{rest}" if rest else "")
          if _forbidden(full):
            found.append((where, full, child.lineno))
      visit(child, inner)

  visit(tree, "<module>")
  return found


def _package_calls() -> dict[tuple[str, str, str], list[int]]:
  calls: dict[tuple[str, str, str], list[int]] = {}
  for path in sorted((REPO / PACKAGE).rglob("*.py")):
    rel = path.relative_to(REPO).as_posix()
    for where, name, line in scan(path.read_text()):
      calls.setdefault((rel, where, name), []).append(line)
  return calls


def test_no_os_level_file_calls_outside_the_allowlist():
  calls = _package_calls()
  bad = [f"{f}:{lines[0]} in {where}(): {name}(...)" for (f, where, name), lines in
         sorted(calls.items()) if (f, where, name) not in ALLOWED]
  assert not bad, ("os-level file calls in the library (workdirs may be gs://: use "
                   "etils.epath, see stmn_jax/workdir_io.py; a call on a path that is never a "
                   "workdir goes into ALLOWED with its reason):\n  " + "\n  ".join(bad))
  stale = sorted(k for k in ALLOWED if k not in calls)
  assert not stale, f"ALLOWED entries that match no call any more (remove them): {stale}"


def test_the_scan_sees_every_spelling():
  source = '''
import os
import os.path as osp
import shutil
import numpy as np
import tensorflow as tf
from glob import glob
from pathlib import Path
from shutil import copy as cp

def f(w):
  os.makedirs(w)
  open(w)
  osp.join(w, "x")
  shutil.rmtree(w)
  np.save(w, 1)
  tf.io.gfile.makedirs(w)
  glob(w)
  Path(w)
  cp(w, w)
  os.path.abspath(w)  # a string operation: allowed

def g(w):
  def inner():
    os.replace(w, w)
  return inner
'''
  assert [(where, name) for where, name, _ in scan(source)] == [
      ("f", "os.makedirs"), ("f", "open"), ("f", "os.path.join"), ("f", "shutil.rmtree"),
      ("f", "numpy.save"), ("f", "tensorflow.io.gfile.makedirs"), ("f", "glob.glob"),
      ("f", "pathlib.Path"), ("f", "shutil.copy"), ("inner", "os.replace")]
