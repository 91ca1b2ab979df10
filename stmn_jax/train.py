"""Training and evaluation engine: optimizer, jitted train step over the mesh, the main loop.

The model and optimizer live as NNX objects but the step is a plain `jax.jit` over their split
state (`nnx.split` once, `nnx.merge` inside the step): parameters, batch statistics and
optimizer state are replicated, the batch is sharded on `"data"`, the state is donated.
BatchNorm statistics and triplet mining therefore cover the global batch (no `axis_name`).
Randomness is explicit: the step's key is `fold_in(PRNGKey(config.seed), step)`.

Resume is exact: a checkpoint holds model, optimizer, step and key; the data position comes
from `pipeline.train_iterator(start_step=step)`, which yields exactly the batches an
uninterrupted run sees from that step on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from flax import nnx
from jax.sharding import Mesh

from stmn_jax import checkpoints as ckpt_lib
from stmn_jax import sharding

LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]
ModelFn = Callable[[ml_collections.ConfigDict, int, nnx.Rngs], nnx.Module]


# ------------------------------------------------------------------------------ optimizer
def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
  """Step decay: `learning_rate * decay_factor ** floor(step / (decay_every_epochs * spe))`."""
  o = config.optim
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch = {steps_per_epoch}: expected >= 1")
  if o.decay_every_epochs < 1:
    raise ValueError(f"config.optim.decay_every_epochs = {o.decay_every_epochs}: expected >= 1")
  return optax.exponential_decay(
      init_value=o.learning_rate,
      transition_steps=o.decay_every_epochs * steps_per_epoch,
      decay_rate=o.decay_factor,
      staircase=True,
  )


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with coupled L2 (as `torch.optim.Adam(weight_decay=...)`) and the step schedule."""
  o = config.optim
  lr_fn = create_learning_rate_fn(config, steps_per_epoch)
  tx = optax.chain(
      optax.add_decayed_weights(o.weight_decay),
      optax.adam(lr_fn, b1=o.b1, b2=o.b2),
  )
  return tx, lr_fn


# ------------------------------------------------------------------------------ state
@dataclasses.dataclass
class TrainState:
  """Split NNX state of a run. `model_state` / `opt_state` are replicated jax.Arrays."""

  model_def_train: Any
  model_def_eval: Any
  opt_def: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key (2,), the run's base key
  step: int  # completed optimizer steps

  def model(self, train: bool = False) -> nnx.Module:
    """A fresh NNX module holding the current state (eval mode unless `train`)."""
    return nnx.merge(self.model_def_train if train else self.model_def_eval, self.model_state)

  def checkpoint_tree(self) -> dict:
    return {
        "model": nnx.to_pure_dict(self.model_state),
        "optimizer": nnx.to_pure_dict(self.opt_state),
        "step": np.asarray(self.step, np.int64),
        "rng": self.rng,
    }

  def load_checkpoint_tree(self, tree: Mapping[str, Any]) -> None:
    """Replaces the state by a checkpoint tree (new State objects; old ones untouched)."""
    model_state = jax.tree.map(lambda x: x, self.model_state)
    opt_state = jax.tree.map(lambda x: x, self.opt_state)
    nnx.replace_by_pure_dict(model_state, tree["model"])
    nnx.replace_by_pure_dict(opt_state, tree["optimizer"])
    self.model_state, self.opt_state = model_state, opt_state
    self.step = int(np.asarray(tree["step"]))
    self.rng = tree["rng"]


def default_model_fn(config, num_classes, rngs):
  from stmn_jax import models  # pylint: disable=g-import-not-at-top

  return models.create_model(config, num_classes, rngs)


def default_loss_fn(outputs, batch, config, rng=None):
  from stmn_jax import losses  # pylint: disable=g-import-not-at-top

  return losses.total_loss(outputs, batch, config, rng=rng)


def create_train_state(
    config: ml_collections.ConfigDict,
    num_classes: int,
    steps_per_epoch: int,
    mesh: Mesh,
    model_fn: ModelFn | None = None,
) -> tuple[TrainState, optax.Schedule]:
  """Model via the registry (or `model_fn`), `nnx.Optimizer(wrt=nnx.Param)`, replicated."""
  model_fn = model_fn or default_model_fn
  base = jax.random.PRNGKey(config.seed)
  model = model_fn(config, num_classes, nnx.Rngs(jax.random.fold_in(base, 1)))
  tx, lr_fn = create_optimizer(config, steps_per_epoch)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  model.eval()
  model_def_eval = nnx.graphdef(model)
  model.train()
  model_def_train, model_state = nnx.split(model)
  opt_def, opt_state = nnx.split(optimizer)
  rep = sharding.replicated(mesh)
  state = TrainState(
      model_def_train=model_def_train,
      model_def_eval=model_def_eval,
      opt_def=opt_def,
      model_state=jax.device_put(model_state, rep),
      opt_state=jax.device_put(opt_state, rep),
      rng=jax.device_put(base, rep),
      step=0,
  )
  return state, lr_fn


# ------------------------------------------------------------------------------ steps
def make_train_step(
    state: TrainState,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    lr_fn: optax.Schedule,
    loss_fn: LossFn | None = None,
    donate: bool = True,
) -> Callable:
  """Jitted `(model_state, opt_state, batch, rng, step) -> (model_state, opt_state, metrics)`.

  `batch` holds global arrays sharded on "data"; `metrics` are replicated scalars: `loss`, the
  loss terms, `grad_norm`, `lr`.
  """
  loss_fn = loss_fn or default_loss_fn
  model_def, opt_def = state.model_def_train, state.opt_def

  def step_fn(model_state, opt_state, batch, rng, step):
    model = nnx.merge(model_def, model_state)
    optimizer = nnx.merge(opt_def, opt_state)
    key = jax.random.fold_in(rng, step)

    def loss_of(m):
      outputs = m(batch["frames"])
      loss, terms = loss_fn(outputs, batch, config, rng=key)
      return loss, terms

    (loss, terms), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics = {"loss": loss, **terms}
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["lr"] = lr_fn(step)
    return nnx.state(model), nnx.state(optimizer), metrics

  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return jax.jit(
      step_fn,
      in_shardings=(rep, rep, dat, rep, rep),
      out_shardings=(rep, rep, rep),
      donate_argnums=(0, 1) if donate else (),
  )


def train_step(state: TrainState, step_fn: Callable, batch: Mapping[str, jax.Array]) -> dict:
  """Runs one jitted step on `state` in place; returns the (device) metrics."""
  state.model_state, state.opt_state, metrics = step_fn(
      state.model_state, state.opt_state, dict(batch), state.rng,
      jnp.asarray(state.step, jnp.int32),
  )
  state.step += 1
  return metrics


def make_embed_fn(state: TrainState, mesh: Mesh, flip: bool) -> Callable:
  """Jitted `(model_state, frames (B, L, H, W, 3)) -> embedding (B, D)`, eval-mode model.

  With `flip`, the embedding is the mean of the clip's and its horizontal mirror's. The
  embedding is float32 whatever the model's compute dtype (`config.model.dtype`).
  """
  model_def = state.model_def_eval

  def embed(model_state, frames):
    model = nnx.merge(model_def, model_state)
    emb = model(frames)["embedding"].astype(jnp.float32)
    if flip:
      emb = 0.5 * (emb + model(jnp.flip(frames, axis=3))["embedding"].astype(jnp.float32))
    return emb

  return jax.jit(
      embed,
      in_shardings=(sharding.replicated(mesh), sharding.data_sharded(mesh)),
      out_shardings=sharding.data_sharded(mesh),
  )


# ------------------------------------------------------------------------------ whole tracklets
EVAL_SAMPLINGS = ("rrs", "all_frames", "whole")


def supports_whole_tracklet(model: nnx.Module) -> bool:
  """True for models with a one-pass whole-tracklet embedding (`chunk_summary`, STA)."""
  return all(callable(getattr(model, name, None))
             for name in ("chunk_summary", "embed_summary")) and hasattr(model, "eval_chunk")


def check_whole_tracklet(config: ml_collections.ConfigDict, model: nnx.Module) -> None:
  """Raises a ValueError naming the model when it has no whole-tracklet embedding."""
  if not supports_whole_tracklet(model):
    raise ValueError(
        f"config.eval.sampling='whole' needs a model with a whole-tracklet embedding (STA); "
        f"config.model.name={config.model.name!r} ({type(model).__name__}) has none: use "
        f"'all_frames' or 'rrs'")


@dataclasses.dataclass(frozen=True)
class WholeTrackletFns:
  """Jitted pieces of `config.eval.sampling = "whole"` (see `make_whole_tracklet_fns`).

  `summarize(model_state, frames (B, chunk, H, W, 3), mask (B, chunk)) -> tuple of
  StripeSummary (B, K, C)` (one per view: the frames, then their mirror when flipping);
  `embed(model_state, summary (rows, K, C)) -> (rows, D)`. `chunk` frames per row, `rows` rows
  per global batch.
  """

  summarize: Callable
  embed: Callable
  chunk: int
  rows: int


def whole_tracklet_rows(config: ml_collections.ConfigDict, chunk: int, num_devices: int) -> int:
  """Chunks per global eval batch: as many frames as a clip batch (eval_batch_size x seq_len),
  rounded down to a multiple of the devices (at least one chunk per device)."""
  frames = int(config.data.eval_batch_size) * int(config.data.seq_len)
  return max(1, frames // chunk // num_devices) * num_devices


def make_whole_tracklet_fns(
    state: TrainState, config: ml_collections.ConfigDict, mesh: Mesh
) -> WholeTrackletFns:
  """Compiled-once functions of the whole-tracklet evaluation; checks the model supports it.

  The chunk size is the model's `eval_chunk` (STA: `config.model.sta.eval_chunk`).
  """
  model = state.model()
  check_whole_tracklet(config, model)
  chunk = int(model.eval_chunk)
  if chunk < 1:
    raise ValueError(f"config.model.{config.model.name}.eval_chunk = {chunk}: expected >= 1")
  model_def, flip = state.model_def_eval, bool(config.eval.flip)

  def summarize(model_state, frames, mask):
    m = nnx.merge(model_def, model_state)
    out = (m.chunk_summary(frames, mask),)
    if flip:
      out += (m.chunk_summary(jnp.flip(frames, axis=3), mask),)
    return out

  def embed(model_state, summary):
    return nnx.merge(model_def, model_state).embed_summary(summary)

  rep, dat = sharding.replicated(mesh), sharding.data_sharded(mesh)
  return WholeTrackletFns(
      summarize=jax.jit(summarize, in_shardings=(rep, dat, dat), out_shardings=dat),
      embed=jax.jit(embed, in_shardings=(rep, rep), out_shardings=rep),
      chunk=chunk,
      rows=whole_tracklet_rows(config, chunk, mesh.size),
  )


def _global_rows(x: Any) -> np.ndarray:
  """A host-local or global batch array -> NumPy rows of the global batch (process order)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  if isinstance(x, jax.Array) and x.is_fully_addressable:
    return np.asarray(x)
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def whole_tracklet_features(
    state: TrainState,
    fns: WholeTrackletFns,
    tracklets: Sequence[Any],
    config: ml_collections.ConfigDict,
    mesh: Mesh,
) -> np.ndarray:
  """One attention pass over all frames of each tracklet -> (T, D) float32.

  Every tracklet is cut into consecutive chunks of `fns.chunk` frames (the last one padded and
  its padding masked); each chunk is reduced on device to a `StripeSummary` of fixed size; the
  chunks of a tracklet are merged on the host in time order and, once all are in, the
  tracklet is embedded in fixed-size batches. Host memory: O(chunks in flight + T x D), whatever
  the tracklet lengths. With `config.eval.flip` the embedding is the mean of both views'.
  """
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  from stmn_jax.models import sta  # pylint: disable=g-import-not-at-top

  chunk, num = fns.chunk, len(tracklets)
  sub = config.copy_and_resolve_references()
  sub.data.seq_len = chunk
  sub.data.eval_batch_size = fns.rows
  batches = pipeline.eval_iterator(tracklets, sub, sampling="all_frames", clips="consecutive")
  plan = batches.plan
  # consecutive clips repeat the last frame: a position is real iff it continues the run
  frame_mask = (plan.frames == plan.frames[:, :1] + np.arange(chunk)) & plan.mask[:, None]
  local_mask = frame_mask[plan.host_rows(jax.process_index())].reshape(
      plan.num_batches, plan.local_batch, chunk)
  expected = np.bincount(plan.tracklet[plan.mask], minlength=num)
  seen = np.zeros(num, np.int64)
  open_: dict[int, tuple] = {}
  done: list[tuple[int, tuple]] = []
  feats = np.zeros((num, 0), np.float32)
  head_rows = fns.rows

  def flush(final: bool) -> None:
    nonlocal feats
    while len(done) >= head_rows or (final and done):
      part, rest = done[:head_rows], done[head_rows:]
      done[:] = rest
      idx = np.asarray([t for t, _ in part])
      embs = []
      for view in range(len(part[0][1])):
        stacked = [np.stack([s[view][f] for _, s in part]) for f in range(4)]
        pad = head_rows - len(part)
        stacked = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in stacked]
        out = fns.embed(state.model_state, sta.StripeSummary(*stacked))
        embs.append(np.asarray(out.addressable_data(0))[:len(part)])
      emb = np.mean(embs, axis=0).astype(np.float32)
      if feats.shape[1] == 0:
        feats = np.zeros((num, emb.shape[1]), np.float32)
      feats[idx] = emb

  for i, batch in enumerate(batches):
    g = sharding.global_batch({"frames": batch["frames"], "mask": local_mask[i]}, mesh)
    views = jax.tree.map(_global_rows, fns.summarize(state.model_state, g["frames"], g["mask"]))
    index = _global_rows(np.asarray(batch["tracklet_index"]))
    valid = _global_rows(np.asarray(batch["mask"]).astype(bool))
    for r in np.flatnonzero(valid):
      t = int(index[r])
      row = tuple(sta.StripeSummary(*(np.asarray(a[r]) for a in v)) for v in views)
      if t in open_:
        row = tuple(sta.merge_summaries(a, b, xp=np) for a, b in zip(open_[t], row))
      seen[t] += 1
      if seen[t] == expected[t]:
        open_.pop(t, None)
        done.append((t, row))
      else:
        open_[t] = row
    flush(final=False)
  flush(final=True)
  missing = np.flatnonzero(seen != expected)
  if open_ or missing.size or (num and feats.shape[1] == 0):
    raise RuntimeError(
        f"whole-tracklet evaluation: tracklets {missing[:5].tolist()} got {seen[missing[:5]]} "
        f"of {expected[missing[:5]]} chunks")
  return feats


# ------------------------------------------------------------------------------ evaluation
def evaluate_tracklets(
    state: TrainState,
    query: Sequence[Any],
    gallery: Sequence[Any],
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    embed_fn: Callable | None = None,
) -> dict:
  """Embeds query + gallery tracklets (each distinct tracklet once) and ranks them.

  `config.eval.sampling`: "rrs" / "all_frames" average clip embeddings (`embed_fn` from
  `make_embed_fn`); "whole" runs one attention pass over every frame of a tracklet
  (`whole_tracklet_features`; `embed_fn` is then a `WholeTrackletFns`, models with
  `chunk_summary` only). Returns `evaluation.evaluate(...)`'s dict (CMC ranks, mAP, ...).
  """
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
  from data_pipelines import tracklets as tracklets_lib  # pylint: disable=g-import-not-at-top
  from stmn_jax import evaluation  # pylint: disable=g-import-not-at-top

  check_eval_sampling(config)
  unique: dict[Any, int] = {}
  for t in list(query) + list(gallery):
    unique.setdefault(t, len(unique))
  tracklets = list(unique)
  if config.eval.sampling == "whole":
    fns = embed_fn if isinstance(embed_fn, WholeTrackletFns) else make_whole_tracklet_fns(
        state, config, mesh)
    feats = whole_tracklet_features(state, fns, tracklets, config, mesh)
  else:
    embed_fn = embed_fn or make_embed_fn(state, mesh, config.eval.flip)
    batches = pipeline.eval_iterator(
        tracklets, config, sampling=config.eval.sampling, clips=config.eval.clips
    )

    def global_embed(frames):  # host-local frames -> global (B, D); extract_features gathers
      frames = sharding.global_batch({"frames": frames}, mesh)["frames"]
      return embed_fn(state.model_state, frames)

    feats = np.asarray(evaluation.extract_features(global_embed, batches, len(tracklets)))
  q_idx = np.asarray([unique[t] for t in query])
  g_idx = np.asarray([unique[t] for t in gallery])
  q, g = tracklets_lib.arrays(query), tracklets_lib.arrays(gallery)
  e = config.eval
  return evaluation.evaluate(
      feats[q_idx], feats[g_idx], q["pid"], g["pid"], q["camid"], g["camid"],
      distance=e.distance, rerank=e.rerank, ap=e.ap, max_rank=e.max_rank,
  )


# ------------------------------------------------------------------------------ helpers
def num_steps_per_epoch(config: ml_collections.ConfigDict, num_train_ids: int) -> int:
  """`config.optim.steps_per_epoch`, or (when -1) the pipeline's one-pass-over-ids count."""
  if config.optim.steps_per_epoch > 0:
    return int(config.optim.steps_per_epoch)
  if config.optim.steps_per_epoch != -1:
    raise ValueError(
        f"config.optim.steps_per_epoch = {config.optim.steps_per_epoch}: expected > 0 or -1"
    )
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top

  return max(1, int(pipeline.steps_per_epoch(num_train_ids, config)))


def check_eval_sampling(config: ml_collections.ConfigDict) -> None:
  if config.eval.sampling not in EVAL_SAMPLINGS:
    raise ValueError(
        f"config.eval.sampling = {config.eval.sampling!r}: expected one of {EVAL_SAMPLINGS}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Training fields checked before any work starts."""
  check_eval_sampling(config)
  t = config.train
  if t.select_on not in ("val", "test"):
    raise ValueError(f"config.train.select_on = {t.select_on!r}: expected 'val' or 'test'")
  for name in ("log_every_steps", "checkpoint_every_steps", "eval_every_epochs"):
    if t[name] < 1:
      raise ValueError(f"config.train.{name} = {t[name]}: expected >= 1")
  if config.optim.num_epochs < 1:
    raise ValueError(f"config.optim.num_epochs = {config.optim.num_epochs}: expected >= 1")
  if config.eval.checkpoint not in ("best", "latest"):
    raise ValueError(
        f"config.eval.checkpoint = {config.eval.checkpoint!r}: expected 'best' or 'latest'"
    )


def load_data(config: ml_collections.ConfigDict, split=None):
  """(train_split, selection_split or None, test split, selection label).

  `split` defaults to `data_pipelines.split_from_config(config)` (native files or TFDS). Validation ids are held out
  of the training ids when `config.dataset.num_val_ids > 0`.
  """
  import data_pipelines  # pylint: disable=g-import-not-at-top
  from data_pipelines import tracklets as tracklets_lib  # pylint: disable=g-import-not-at-top

  if split is None:
    split = data_pipelines.split_from_config(config)
  train_split, val_split = split, None
  if config.dataset.num_val_ids > 0:
    train_split, val_split = tracklets_lib.holdout_validation(
        split, config.dataset.num_val_ids, config.dataset.num_val_queries, config.seed
    )
  if config.train.select_on == "test":
    return train_split, split, split, "test"
  return train_split, val_split, split, "val"


def _fetch_and_check(pending: list[tuple[int, Any]]) -> list[tuple[int, dict]]:
  """Device metrics -> floats; raises FloatingPointError at the first non-finite step."""
  out = []
  for step, metrics in jax.device_get(pending):
    metrics = {k: float(v) for k, v in metrics.items()}
    bad = [k for k in ("loss", "grad_norm") if k in metrics and not np.isfinite(metrics[k])]
    if bad:
      raise FloatingPointError(
          f"non-finite {', '.join(bad)} at step {step}: "
          + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
      )
    out.append((step, metrics))
  pending.clear()
  return out


def _scalars(prefix: str, results: Mapping[str, Any]) -> dict[str, float]:
  return {
      f"{prefix}_{k}": float(v) for k, v in results.items()
      if isinstance(v, (int, float, np.floating, np.integer)) or np.ndim(v) == 0
  }


def _json_ready(x):
  if isinstance(x, dict):
    return {str(k): _json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_ready(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x


def format_results(results: Mapping[str, Any]) -> str:
  from stmn_jax import evaluation  # pylint: disable=g-import-not-at-top

  return evaluation.format_table(results)


def write_results(workdir: str, summary: Mapping[str, Any]) -> str:
  path = os.path.join(workdir, "results.json")
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump(_json_ready(summary), f, indent=2, sort_keys=True)
  return path


# ------------------------------------------------------------------------------ main loop
def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    model_fn: ModelFn | None = None,
    loss_fn: LossFn | None = None,
    mesh: Mesh | None = None,
    split=None,
    max_steps: int | None = None,
) -> tuple[TrainState, dict]:
  """Trains (resuming from the newest checkpoint), evaluates, writes `results.json`.

  `model_fn` / `loss_fn` / `split` replace the registry model, `losses.total_loss` and
  `get_split(config.dataset)` (tests, notebooks). `max_steps` stops after that many completed
  steps as a killed run would: no extra checkpoint, no final evaluation. Returns the state and a
  summary dict (what results.json holds).
  """
  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top

  check_config(config)
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_config(config, mesh)
  os.makedirs(workdir, exist_ok=True)
  train_split, sel_split, test_split, sel_label = load_data(config, split)
  num_classes = len({t.pid for t in train_split.train})
  spe = num_steps_per_epoch(config, num_classes)
  total_steps = config.optim.num_epochs * spe
  eval_every = config.train.eval_every_epochs * spe
  batch_size = config.data.num_ids_per_batch * config.data.num_tracklets_per_id
  logging.info(
      "train: %d ids, %d tracklets; %d steps/epoch x %d epochs = %d steps; batch %d on %d "
      "devices; selection on %s", num_classes, len(train_split.train), spe,
      config.optim.num_epochs, total_steps, batch_size, mesh.size,
      sel_label if sel_split is not None else "nothing (no validation ids)",
  )

  state, lr_fn = create_train_state(config, num_classes, spe, mesh, model_fn)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state.load_checkpoint_tree(ckpt.restore(state.checkpoint_tree(), "latest"))
    logging.info("resumed from %s at step %d", ckpt.latest_dir, state.step)
  start_step = state.step
  step_fn = make_train_step(state, config, mesh, lr_fn, loss_fn)
  if config.eval.sampling == "whole":  # fails here, before training, for a model without it
    embed_fn = make_whole_tracklet_fns(state, config, mesh)
  else:
    embed_fn = make_embed_fn(state, mesh, config.eval.flip)

  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0
  )
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
  report = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_steps=config.train.log_every_steps,
      every_secs=None,
  )
  hooks = [report] if jax.process_index() == 0 else []
  summary: dict[str, Any] = {
      "selection": sel_label if sel_split is not None else None,
      "num_classes": num_classes, "steps_per_epoch": spe, "total_steps": total_steps,
  }
  last_train: dict = {}
  history: list[dict] = []
  loss_history: list[tuple[int, float]] = []
  stop_at = total_steps if max_steps is None else min(total_steps, max_steps)

  def evaluate_on(split, label):
    with report.timed("eval"):
      res = evaluate_tracklets(state, split.query, split.gallery, config, mesh, embed_fn)
    writer.write_scalars(state.step, _scalars(label, res))
    logging.info("eval on %s at step %d:\n%s", label, state.step, format_results(res))
    return res

  pending: list = []
  t0, clips_seen = time.time(), 0
  try:
    with metric_writers.ensure_flushes(writer):
      if start_step < stop_at:
        train_iter = pipeline.train_iterator(
            train_split.train, config, start_step=start_step,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        batches = sharding.prefetch_to_mesh(train_iter, mesh, config.data.prefetch)
        logging.info("compiling the train step (first step is slow)...")
        for step in range(start_step, stop_at):
          batch = next(batches)
          metrics = train_step(state, step_fn, batch)
          pending.append((step, metrics))
          clips_seen += batch_size
          for h in hooks:
            h(state.step)
          done = state.step
          is_log = done % config.train.log_every_steps == 0 or done == stop_at
          is_eval = sel_split is not None and (done % eval_every == 0 or done == total_steps)
          is_ckpt = done % config.train.checkpoint_every_steps == 0 or done == total_steps
          if is_log or is_eval or is_ckpt:
            fetched = _fetch_and_check(pending)
            last_train = fetched[-1][1]
            if is_log:
              loss_history.append((done, last_train["loss"]))
              writer.write_scalars(done, _scalars("train", last_train))
              now = time.time()
              rate = clips_seen / max(now - t0, 1e-9)  # since the last log line
              t0, clips_seen = now, 0
              logging.info(
                  "step %d/%d epoch %.2f %s clips/s %.2f", done, total_steps, done / spe,
                  " ".join(f"{k} {v:.4g}" for k, v in sorted(last_train.items())), rate,
              )
          if is_ckpt:
            with report.timed("checkpoint"):
              ckpt.save(done, state.checkpoint_tree())
          if is_eval:
            res = evaluate_on(sel_split, sel_label)
            history.append({"step": done, sel_label: res})
            if ckpt.maybe_save_best(done, state.checkpoint_tree(), res):
              logging.info("new best %s mAP %.4f at step %d", sel_label, res["mAP"], done)
      ckpt.wait()
      summary["step"] = state.step
      summary["train"] = last_train
      summary["history"] = history
      summary["loss_history"] = loss_history
      if state.step < total_steps:
        summary["stopped_early"] = True
        return state, summary
      # Final test evaluation: the best checkpoint by the selection metric, else the last.
      best = ckpt.best_metrics()
      if best is not None and sel_split is not None:
        final_tree = state.checkpoint_tree()
        best_state = dataclasses.replace(state)
        best_state.load_checkpoint_tree(ckpt.restore(final_tree, "best"))
        summary["test_checkpoint"] = f"best by {sel_label} mAP (step {ckpt.best_step()})"
        eval_state = best_state
      else:
        summary["test_checkpoint"] = f"final (step {state.step})"
        eval_state = state
      with report.timed("eval"):
        res = evaluate_tracklets(eval_state, test_split.query, test_split.gallery, config, mesh,
                                 embed_fn)
      writer.write_scalars(state.step, _scalars("test", res))
      summary["test"] = res
      if sel_label == "test":
        summary["note"] = "model selected on the test set (optimistic, official-code habit)"
      table = format_results(res)
      print(f"\nTest results ({summary['test_checkpoint']}):\n{table}", flush=True)
      path = write_results(workdir, summary)
      logging.info("results written to %s", path)
  finally:
    ckpt.wait()
    ckpt.close()
  return state, summary


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + "."))
    elif isinstance(v, (int, float, str, bool)):
      out[key] = v
    else:
      out[key] = str(v)
  return out
