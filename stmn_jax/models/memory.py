"""STMN's external key-value memories (Eom et al., ICCV 2021), Flax NNX.

`SpatialMemory` holds M (key, value) pairs in feature space; every spatial query addresses it,
and the softly read value is normalised by a BatchNorm and subtracted from the frame's value
features (the "distractor" part is removed). `TemporalMemory` encodes the sequence of pooled
temporal queries with an LSTM, addresses N keys with the last output, and mixes N stored
attention vectors over the L frames into frame weights.

Paper vs the official code (cvlab-yonsei/STMN), chosen by arguments:
- `similarity="cosine"` (paper, default): cosine between a query and each key.
  `similarity="code"`: the official code normalises the key *matrix* along the slot axis
  (every feature dimension has unit norm over the M slots), not each key; the logits are then
  scaled by about sqrt(D / M) compared with a cosine.
- `layout="per_location"` (paper, default): one query per spatial location (a D-vector).
  `layout="nchw_flat"`: the official HEAD reshapes the channels-first map (D, h, w) row by row
  into (h*w, D) rows, so each "query" mixes D/(h*w) channels over all positions; the read-out,
  its BatchNorm and the subtraction use the same scrambled rows, mapped back afterwards.

The parameters are called `mem_keys` / `mem_values` (not `keys` / `values`, which would be
shadowed by the dict methods of an `nnx.State`).

Mixed precision (`dtype=bfloat16`): the addressing of both memories (the L2 normalisation of
queries and keys, their products and the softmax) is computed in float32, whatever the compute
dtype: a bfloat16 unit vector has ~3 significant digits, so bfloat16 cosines and their
gradients are off by far more than the rest of the head (the LSTM and the temporal keys got
40-60% gradient errors). The probabilities are float32. The read-outs are float32 weighted sums
(cheap: over M or N slots, and over the L frames) cast to the compute dtype afterwards: the
spatial read-out before its BatchNorm and the subtraction from the value map; the temporal
memory's frame-weighted sum of the features, whose backward pass, <dL/dseq, f_l> per frame,
then keeps the small differences between frames that the frame-weight softmax depends on (in
bfloat16 they were rounded away). With float32 compute every cast is a no-op.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from stmn_jax.models import batch_norm

SIMILARITIES = ("cosine", "code")
LAYOUTS = ("per_location", "nchw_flat")

# PyTorch BatchNorm momentum 0.1 == Flax momentum 0.9; eps as PyTorch.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along `axis` (as torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def memory_logits(queries: jax.Array, keys: jax.Array, similarity: str) -> jax.Array:
  """Addressing logits, float32. queries (Q, D), keys (M, D) any float dtype -> (Q, M).

  "cosine": cos(q, k_m). "code": l2norm(q) . (k / ||k||_over slots)_m (official code).
  Both inputs are cast to float32 before the normalisation (see the module docstring).
  """
  q = l2_normalize(queries.astype(jnp.float32), axis=-1)
  keys = keys.astype(jnp.float32)
  if similarity == "cosine":
    k = l2_normalize(keys, axis=-1)
  elif similarity == "code":
    k = l2_normalize(keys, axis=0)
  else:
    raise ValueError(f"memory_similarity: expected one of {SIMILARITIES}, got {similarity!r}")
  return q @ k.T


def to_query_rows(x: jax.Array, layout: str) -> jax.Array:
  """(N, h, w, D) -> (N, h*w, D) memory rows in the chosen layout."""
  n, h, w, d = x.shape
  if layout == "per_location":
    return x.reshape(n, h * w, d)
  if layout == "nchw_flat":
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(n, h * w, d)
  raise ValueError(f"smem_layout: expected one of {LAYOUTS}, got {layout!r}")


def from_query_rows(rows: jax.Array, h: int, w: int, layout: str) -> jax.Array:
  """Inverse of `to_query_rows`: (N, h*w, D) -> (N, h, w, D)."""
  n, _, d = rows.shape
  if layout == "per_location":
    return rows.reshape(n, h, w, d)
  if layout == "nchw_flat":
    return jnp.transpose(rows.reshape(n, d, h, w), (0, 2, 3, 1))
  raise ValueError(f"smem_layout: expected one of {LAYOUTS}, got {layout!r}")


class SpatialMemory(nnx.Module):
  """Spatial memory: `mem_keys`, `mem_values` `nnx.Param` (M, D) ~ N(0, 1); BN on the read-out.

  The read-out BatchNorm starts with scale 0 and bias 0 (both trainable), so at
  initialisation the refined features equal the input value features. Its statistics are taken
  over all B*L*h*w rows of the batch, or per group of tracklets with ghost BN (`groups`);
  `bn_running_var` / `bn_running_stats` as `models/batch_norm.py` (config.model fields).
  """

  def __init__(
      self,
      dim: int,
      slots: int,
      *,
      layout: str = "per_location",
      similarity: str = "cosine",
      dtype: Any = jnp.float32,
      bn_running_var: str = "biased",
      bn_running_stats: str = "mean_of_groups",
      rngs: nnx.Rngs,
  ):
    if layout not in LAYOUTS:
      raise ValueError(f"smem_layout: expected one of {LAYOUTS}, got {layout!r}")
    if similarity not in SIMILARITIES:
      raise ValueError(f"memory_similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    if slots < 1:
      raise ValueError(f"spatial_slots: expected a positive number of memory slots, got {slots}")
    self.dim, self.slots, self.layout, self.similarity, self.dtype = (
        dim, slots, layout, similarity, dtype)
    self.mem_keys = nnx.Param(jax.random.normal(rngs.params(), (slots, dim), jnp.float32))
    self.mem_values = nnx.Param(jax.random.normal(rngs.params(), (slots, dim), jnp.float32))
    self.bn = batch_norm.head_batch_norm(
        dim, running_var=bn_running_var, running_stats=bn_running_stats, momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON, scale_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros,
        dtype=dtype, rngs=rngs)

  def address(self, queries: jax.Array) -> jax.Array:
    """Matching probabilities. queries (..., D) -> (..., M) float32, softmax over M.

    Normalisation, logits and softmax in float32 whatever the compute dtype.
    """
    lead = queries.shape[:-1]
    logits = memory_logits(queries.reshape(-1, self.dim), self.mem_keys[...], self.similarity)
    return jax.nn.softmax(logits, axis=-1).reshape(*lead, self.slots)

  def __call__(self, query_map: jax.Array, value_map: jax.Array,
               groups: batch_norm.Groups | None = None) -> tuple[jax.Array, jax.Array]:
    """query_map, value_map (N, h, w, D) -> refined (N, h, w, D), probs (N, h*w, M).

    refined = value_map - BN(probs @ values), rows laid out as `layout`; probs float32, the
    read-out probs @ values in float32, then BN and subtraction in the compute dtype. `groups`:
    ghost-BN tracklet groups of the N frames (None: the whole batch).
    """
    if query_map.shape != value_map.shape or query_map.shape[-1] != self.dim:
      raise ValueError(
          f"SpatialMemory: query and value maps must both be (N, h, w, {self.dim}); got "
          f"{query_map.shape} and {value_map.shape}")
    _, h, w, _ = query_map.shape
    probs = self.address(to_query_rows(query_map, self.layout))  # (N, h*w, M)
    readout = (probs @ self.mem_values[...]).astype(self.dtype)  # (N, h*w, D)
    readout = self.bn(readout, groups=groups)  # statistics over all N*h*w rows (or per group)
    refined = value_map - from_query_rows(readout, h, w, self.layout).astype(value_map.dtype)
    return refined, probs


def _torch_uniform(scale: float):
  """U(-scale, scale) initialiser (PyTorch's LSTM default with scale = 1/sqrt(hidden))."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


LSTM_BIASES = (1, 2)


class TwoBiasLSTMCell(nnx.OptimizedLSTMCell):
  """`nnx.OptimizedLSTMCell` with PyTorch's two bias vectors: `dense_h.bias` is `bias_hh` and
  `bias_ih` is a second `nnx.Param` (4 * hidden,), drawn after every variable of the parent
  cell, so the kernels and `bias_hh` get the same random numbers as the one-bias cell.

  Gates W_i x + W_h h + b_hh + b_ih: the forward pass is the one-bias cell's with bias
  b_hh + b_ih. What differs is training: each bias is its own parameter with its own Adam
  moments (their sum can move by up to 2 lr per step), and the initial sum of two
  U(-k, k) vectors is triangular on (-2k, 2k), not uniform.
  """

  def __init__(self, in_features: int, hidden_features: int, *, bias_init, rngs: nnx.Rngs,
               **kwargs):
    super().__init__(in_features, hidden_features, bias_init=bias_init, rngs=rngs, **kwargs)
    self.bias_ih = nnx.Param(bias_init(rngs.params(), (4 * hidden_features,), self.param_dtype))

  def __call__(self, carry: tuple[jax.Array, jax.Array], inputs: jax.Array):
    c, h = carry
    y = self.dense_i(inputs) + self.dense_h(h)
    y = y + self.bias_ih[...].astype(y.dtype)
    i, f, g, o = jnp.split(y, indices_or_sections=4, axis=-1)
    i, f, o = self.gate_fn(i), self.gate_fn(f), self.gate_fn(o)
    new_c = f * c + i * self.activation_fn(g)
    new_h = o * self.activation_fn(new_c)
    return (new_c, new_h), new_h


class TemporalMemory(nnx.Module):
  """Temporal memory: LSTM over L pooled queries; `mem_keys` (N, D) ~ N(0, 1), `mem_values`
  (N, L) ~ U[0, 1).

  The LSTM (gates i, f, g, o; zero initial state) is initialised like PyTorch's `nn.LSTM`: every
  weight and bias U(-1/sqrt(D), 1/sqrt(D)). `lstm_biases` (`config.model.lstm_biases`):
  1 (default; the paper writes one bias per gate) is `nnx.OptimizedLSTMCell`'s single bias;
  2 (official: `nn.LSTM` has `bias_ih` and `bias_hh`) is `TwoBiasLSTMCell`, the same forward
  function of their sum, two trainable vectors (see there).
  """

  def __init__(
      self,
      dim: int,
      slots: int,
      seq_len: int,
      *,
      similarity: str = "cosine",
      dtype: Any = jnp.float32,
      lstm_biases: int = 1,
      rngs: nnx.Rngs,
  ):
    if similarity not in SIMILARITIES:
      raise ValueError(f"memory_similarity: expected one of {SIMILARITIES}, got {similarity!r}")
    if slots < 1 or seq_len < 1:
      raise ValueError(
          f"temporal_slots and seq_len must be positive, got {slots} and {seq_len}")
    if lstm_biases not in LSTM_BIASES:
      raise ValueError(f"lstm_biases: expected one of {LSTM_BIASES}, got {lstm_biases!r}")
    self.dim, self.slots, self.seq_len, self.similarity, self.dtype = (
        dim, slots, seq_len, similarity, dtype)
    self.lstm_biases = lstm_biases
    init = _torch_uniform(1.0 / dim ** 0.5)
    cell = nnx.OptimizedLSTMCell if lstm_biases == 1 else TwoBiasLSTMCell
    self.lstm = cell(
        dim, dim, kernel_init=init, recurrent_kernel_init=init, bias_init=init, dtype=dtype,
        rngs=rngs)
    self.mem_keys = nnx.Param(jax.random.normal(rngs.params(), (slots, dim), jnp.float32))
    self.mem_values = nnx.Param(jax.random.uniform(rngs.params(), (slots, seq_len), jnp.float32))

  def encode(self, queries: jax.Array) -> jax.Array:
    """LSTM over time; queries (B, L, D) -> last output (B, D)."""
    b = queries.shape[0]
    zeros = jnp.zeros((b, self.dim), self.dtype)
    carry = (zeros, zeros)
    out = zeros
    for t in range(queries.shape[1]):  # L is small (4-10): unrolled
      carry, out = self.lstm(carry, queries[:, t].astype(self.dtype))
    return out

  def __call__(
      self, queries: jax.Array, features: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """queries (B, L, D) pooled temporal queries, features (B, L, D) refined frame features
    -> sequence feature (B, D), probs (B, N) float32, frame weights (B, L) float32.

    The LSTM runs in the compute dtype; addressing, attention, frame weights and the
    frame-weighted sum in float32; `seq` in the dtype of `features`.
    """
    if queries.ndim != 3 or queries.shape[1:] != (self.seq_len, self.dim):
      raise ValueError(
          f"TemporalMemory: queries must be (B, {self.seq_len}, {self.dim}) (L = "
          f"config.data.seq_len); got {queries.shape}")
    if features.shape[:2] != queries.shape[:2]:
      raise ValueError(
          f"TemporalMemory: features {features.shape} do not match queries {queries.shape}")
    context = self.encode(queries)  # (B, D)
    logits = memory_logits(context, self.mem_keys[...], self.similarity)  # float32
    probs = jax.nn.softmax(logits, axis=-1)  # (B, N)
    attention = probs @ self.mem_values[...]  # (B, L)
    weights = jax.nn.softmax(attention, axis=-1)
    seq = jnp.einsum("bl,bld->bd", weights, features.astype(jnp.float32))
    return seq.astype(features.dtype), probs, weights
