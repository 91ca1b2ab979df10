"""Read torchvision ResNet state dicts and copy them into `resnet.ResNetTrunk` / `ResNetStage`.

Files are read without running code: `.pth`/`.pt` through `torch.load(weights_only=True)`
(torch is imported only then), `.npz` through `np.load(allow_pickle=False)`, `.safetensors`
through `safetensors.numpy`. A state dict may be nested under "state_dict" or "model" and may
carry DataParallel's "module." prefix.

Mapping (torchvision key -> NNX variable): `<conv>.weight` (O, I, kh, kw) -> `Conv.kernel`
(kh, kw, I, O); `<bn>.weight/bias/running_mean/running_var` -> `BatchNorm.scale/bias/mean/var`;
`layerK.i.downsample.0/1` -> `downsample_conv/downsample_bn`. `num_batches_tracked` and
`fc.*` are ignored. Everything is checked before anything is assigned: a missing key, a shape
mismatch or an unexpected key under the loaded prefixes raises `WeightLoadError` naming the
key(s) (and the expected vs found shapes).

CLI (for users without torch at run time):
  python -m stmn_jax.models.torchvision_weights --src=resnet50.pth --dst=resnet50.npz
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Iterator, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from stmn_jax.models import resnet

NESTING_KEYS = ("state_dict", "model")
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_PREFIXES = ("fc.",)
BN_FIELDS = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))
TRUNK_PREFIXES = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")


class WeightLoadError(ValueError):
  """A state dict does not fit the module it is loaded into."""


# ------------------------------------------------------------------------------ reading files


def _to_numpy(value: Any, key: str, path: str) -> np.ndarray:
  """A torch tensor or array-like -> NumPy (float16/bfloat16 tensors become float32)."""
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach") and hasattr(value, "is_floating_point"):  # torch.Tensor
    t = value.detach().cpu()
    if t.is_floating_point() and t.element_size() < 4:
      t = t.float()
    return t.numpy()
  raise WeightLoadError(
      f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor / array"
  )


def normalize_state_dict(raw: Mapping[str, Any], path: str = "<state dict>") -> dict[str, np.ndarray]:
  """Unwrap "state_dict"/"model" nesting, strip "module." prefixes, convert to NumPy."""
  d: Any = raw
  while isinstance(d, Mapping):
    nested = [k for k in NESTING_KEYS if k in d and isinstance(d[k], Mapping)]
    if not nested:
      break
    d = d[nested[0]]
  if not isinstance(d, Mapping):
    raise WeightLoadError(f"{path}: expected a state dict (a mapping), got {type(d).__name__}")
  out: dict[str, np.ndarray] = {}
  for key, value in d.items():
    if not isinstance(key, str):
      raise WeightLoadError(f"{path}: state-dict key {key!r} is not a string")
    name = key[len("module."):] if key.startswith("module.") else key
    out[name] = _to_numpy(value, key, path)
  return out


def _load_torch(path: str) -> Mapping[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading {path} needs PyTorch, which is not installed. Convert it once where torch is "
        "available (python -m stmn_jax.models.torchvision_weights --src=FILE.pth "
        "--dst=FILE.npz) and pass the .npz or .safetensors file instead."
    ) from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors from weights_only, corrupt zip files, ...
    raise WeightLoadError(
        f"{path}: cannot read as a PyTorch weights file with weights_only=True "
        f"(only tensors and plain containers are accepted): {e}"
    ) from e


def _load_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except ValueError as e:  # object arrays need pickle: refused
    raise WeightLoadError(f"{path}: cannot read .npz without pickle: {e}") from e
  except Exception as e:
    raise WeightLoadError(f"{path}: not a readable .npz file: {e}") from e


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  try:
    return load_file(path)
  except Exception as e:
    raise WeightLoadError(f"{path}: not a readable .safetensors file: {e}") from e


LOADERS = {".pth": _load_torch, ".pt": _load_torch, ".npz": _load_npz, ".safetensors": _load_safetensors}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torchvision-style state dict from .pth/.pt, .npz or .safetensors, as NumPy arrays."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in LOADERS:
    raise WeightLoadError(
        f"{path}: unsupported weights file extension {ext!r}; expected one of {sorted(LOADERS)}"
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  return normalize_state_dict(LOADERS[ext](path), path)


# ------------------------------------------------------------------------- module <-> keys


def _conv_entries(conv: resnet.Conv, name: str) -> Iterator[tuple[str, nnx.Variable, str]]:
  yield f"{name}.weight", conv.kernel, "conv"


def _bn_entries(bn: nnx.BatchNorm, name: str) -> Iterator[tuple[str, nnx.Variable, str]]:
  for torch_field, attr in BN_FIELDS:
    yield f"{name}.{torch_field}", getattr(bn, attr), "plain"


def _block_entries(block: nnx.Module, name: str) -> Iterator[tuple[str, nnx.Variable, str]]:
  n_convs = 3 if isinstance(block, resnet.Bottleneck) else 2
  for i in range(1, n_convs + 1):
    yield from _conv_entries(getattr(block, f"conv{i}"), f"{name}.conv{i}")
    yield from _bn_entries(getattr(block, f"bn{i}"), f"{name}.bn{i}")
  if block.has_downsample:
    yield from _conv_entries(block.downsample_conv, f"{name}.downsample.0")
    yield from _bn_entries(block.downsample_bn, f"{name}.downsample.1")


def _stage_entries(blocks: Sequence[nnx.Module], name: str) -> Iterator[tuple[str, nnx.Variable, str]]:
  for i, block in enumerate(blocks):
    yield from _block_entries(block, f"{name}.{i}")


def trunk_entries(trunk: resnet.ResNetTrunk, prefix: str = "") -> list[tuple[str, nnx.Variable, str]]:
  """(torchvision key, variable, kind) for every weight / BN statistic of the trunk."""
  entries = list(_conv_entries(trunk.conv1, f"{prefix}conv1"))
  entries += _bn_entries(trunk.bn1, f"{prefix}bn1")
  for k in (1, 2, 3):
    entries += _stage_entries(getattr(trunk, f"layer{k}"), f"{prefix}layer{k}")
  return entries


def stage_entries(stage: resnet.ResNetStage, prefix: str = "layer4") -> list[tuple[str, nnx.Variable, str]]:
  """(torchvision key, variable, kind) for every weight / BN statistic of the stage."""
  return list(_stage_entries(stage.blocks, prefix))


def _torch_shape(variable: nnx.Variable, kind: str) -> tuple[int, ...]:
  shape = tuple(variable.get_value().shape)
  if kind == "conv":  # (kh, kw, I, O) -> (O, I, kh, kw)
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def _ignored(key: str) -> bool:
  return key.endswith(IGNORED_SUFFIXES) or key.startswith(IGNORED_PREFIXES)


def _assign(
    entries: list[tuple[str, nnx.Variable, str]],
    state_dict: Mapping[str, np.ndarray],
    prefixes: Sequence[str],
    what: str,
    strict: bool = True,
) -> None:
  """Check every entry against the state dict, then assign all (or raise, assigning none)."""
  problems: list[str] = []
  values = []
  for key, variable, kind in entries:
    if key not in state_dict:
      problems.append(f"missing key {key!r} (expected shape {_torch_shape(variable, kind)})")
      continue
    value = np.asarray(state_dict[key])
    expected = _torch_shape(variable, kind)
    if tuple(value.shape) != expected:
      problems.append(f"key {key!r}: expected shape {expected}, found {tuple(value.shape)}")
      continue
    if kind == "conv":
      value = value.transpose(2, 3, 1, 0)
    values.append((variable, value))
  if strict:
    known = {key for key, _, _ in entries}
    unexpected = sorted(
        k for k in state_dict
        if k.startswith(tuple(prefixes)) and k not in known and not _ignored(k)
    )
    problems += [f"unexpected key {k!r} (shape {tuple(np.shape(state_dict[k]))})" for k in unexpected]
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise WeightLoadError(f"state dict does not fit the {what}:\n  {shown}{more}")
  for variable, value in values:
    variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))


def load_into_trunk(
    trunk: resnet.ResNetTrunk,
    state_dict: Mapping[str, np.ndarray],
    prefix: str = "",
    strict: bool = True,
) -> None:
  """Copy conv1, bn1, layer1..layer3 (keys under `prefix`) into `trunk`, in place.

  Every parameter and BN statistic is assigned, so `trunk` may also be an abstract module
  from `nnx.eval_shape(lambda: ResNetTrunk(...))` (skips the random initialisation).

  `strict=False` ignores unexpected keys under those prefixes (missing keys and shape
  mismatches always raise).
  """
  prefixes = tuple(prefix + p for p in TRUNK_PREFIXES)
  _assign(trunk_entries(trunk, prefix), state_dict, prefixes, "ResNet trunk", strict)


def load_into_stage(
    stage: resnet.ResNetStage,
    state_dict: Mapping[str, np.ndarray],
    prefix: str = "layer4",
    strict: bool = True,
) -> None:
  """Copy `<prefix>.<i>.*` (torchvision layer4 by default) into `stage`, in place."""
  _assign(stage_entries(stage, prefix), state_dict, (prefix + ".",), f"ResNet stage {prefix!r}", strict)


# ---------------------------------------------------------------------------------- writing


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Write a NumPy state dict as .npz or .safetensors (chosen by the extension)."""
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}  # keeps 0-d shapes
  if ext == ".npz":
    np.savez(path, **arrays)
  elif ext == ".safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

    save_file(arrays, path)
  else:
    raise WeightLoadError(f"{path}: output must end in .npz or .safetensors, got {ext!r}")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m stmn_jax.models.torchvision_weights",
      description="Convert a torchvision ResNet state dict (.pth/.pt/.npz/.safetensors) to "
      ".npz or .safetensors, so it can be loaded without torch.",
  )
  parser.add_argument("--src", required=True, help="input weights file")
  parser.add_argument("--dst", required=True, help="output .npz or .safetensors file")
  args = parser.parse_args(argv)
  state_dict = load_state_dict(args.src)
  save_state_dict(state_dict, args.dst)
  n = sum(int(np.prod(v.shape)) for v in state_dict.values())
  print(f"wrote {len(state_dict)} arrays ({n:,} values) from {args.src} to {args.dst}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
