"""ONNX export: a jaxpr of the inference function written as an ONNX graph with the `onnx` package.

Why our own small converter rather than jax2onnx (the README's "ONNX export" explains it with the
measurements): jax2onnx >= 0.13 requires `orbax-checkpoint<0.11.37` (we pin 0.12.8); 0.12.5, the
newest that fits our pins, pulls equinox, dm-pix, huggingface-hub and netron, prints plugin
import errors under jax 0.10, and its patched `jnp.full` fails on a symbolic batch (the baseline
model). tf2onnx cannot read our SavedModel (it holds an `XlaCallModule` of StableHLO). The four
models need about 35 jaxpr primitives, all with static shapes at a fixed batch, so a table of
one small function per primitive is enough, and it depends only on `onnx`.

The graph (opset `OPSET`):
- the inference function (normalisation, model, flip average) is traced once for ONE clip
  (`jax.make_jaxpr`, the CPU kernels of `models.kernels("fast")`, so the jaxpr does not depend on
  the host's backend); every value computed from the parameters alone is folded to a constant;
- an ONNX `Scan` over the first axis of `frames` runs that one-clip graph once per clip, so the
  batch dimension of the file is free (`frames` uint8 `(batch, L, H, W, 3)` -> `embedding`
  float32 `(batch, D)`). In eval mode a clip's embedding does not depend on the others (the test
  checks a batch against the JAX model), and clips run one after another.

A primitive without a rule raises `NotImplementedError` naming it (add a rule in `_RULES`).
`gather` is written for in-bounds indices (the clip / fill of out-of-bounds starts is not
reproduced: our models gather at `argmax` positions).
"""

from __future__ import annotations

import hashlib

import string
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from etils import epath
from jax.extend import core as jcore
from onnx import TensorProto, helper, numpy_helper

from stmn_jax.models import cpu_kernels

OPSET = 18
INPUT_NAME = "frames"
OUTPUT_NAME = "embedding"
# Folding a parameter-only value to a constant is skipped when it would store more than this
# many elements beyond its inputs (a broadcast of a scalar to an activation shape, say).
_FOLD_LIMIT = 1 << 16

_DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
    np.dtype(np.float16): TensorProto.FLOAT16, np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64, np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8, np.dtype(np.bool_): TensorProto.BOOL,
}


def onnx_dtype(dtype: Any) -> int:
  dtype = np.dtype(dtype)
  if dtype not in _DTYPES:
    raise NotImplementedError(
        f"ONNX export: dtype {dtype} is not supported (a bfloat16 model exports with "
        "--config.model.dtype=float32: the parameters are float32 either way)")
  return _DTYPES[dtype]


# ------------------------------------------------------------------------------ graph builder
class GraphBuilder:
  """Nodes, constants and unique names of one ONNX graph under construction."""

  def __init__(self, prefix: str):
    self.prefix = prefix
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._count = 0
    self._consts: dict[tuple, str] = {}

  def name(self, hint: str = "v") -> str:
    self._count += 1
    return f"{self.prefix}{hint}_{self._count}"

  def const(self, value: Any, dtype: Any = None) -> str:
    """A constant tensor (initializer) -> its name; equal constants are stored once (the flip
    average traces the model twice, so every folded parameter value appears twice)."""
    array = np.ascontiguousarray(np.asarray(value, dtype))
    if array.dtype == np.float64 and dtype is None:
      array = array.astype(np.float32)
    key = (array.dtype.str, array.shape, hashlib.sha256(array).digest())  # no weight copy
    if key not in self._consts:
      self._consts[key] = self.name("c")
      self.initializers.append(numpy_helper.from_array(array, self._consts[key]))
    return self._consts[key]

  def ints(self, values: Sequence[int]) -> str:
    return self.const(np.asarray(list(values), np.int64))

  def op(self, op_type: str, inputs: Sequence[str], **attrs) -> str:
    """One node with one output -> the output's name."""
    out = self.name(op_type.lower())
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
    return out


# ------------------------------------------------------------------------------ jaxpr -> nodes
def _is_literal(atom: Any) -> bool:
  return isinstance(atom, jcore.Literal)


class _Env:
  """Jaxpr variables -> either a NumPy constant (known at export) or an ONNX value name."""

  def __init__(self):
    self.values: dict[Any, Any] = {}

  def read(self, atom: Any) -> Any:
    if _is_literal(atom):
      return np.asarray(atom.val, atom.aval.dtype)
    return self.values[atom]

  def write(self, var: Any, value: Any) -> None:
    self.values[var] = value


def _name(g: GraphBuilder, value: Any, dtype: Any = None) -> str:
  """An ONNX name for a value that may still be a NumPy constant."""
  return g.const(value, dtype) if isinstance(value, np.ndarray) else value


# Primitives that call their body once: inlined. A primitive that loops over its body (scan,
# while, cond) also keeps a jaxpr in its params but is not a call: it needs a rule of its own.
_CALLS = frozenset({
    "pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
    "custom_vjp_call", "custom_vjp_call_jaxpr"})


def _inner(eqn: Any) -> jcore.ClosedJaxpr | None:
  """The body of a call primitive (`_CALLS`: jit, custom_jvp_call, ...), else None."""
  if eqn.primitive.name not in _CALLS:
    return None
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    body = eqn.params.get(key)
    if isinstance(body, jcore.ClosedJaxpr):
      return body
    if isinstance(body, jcore.Jaxpr):
      return jcore.ClosedJaxpr(body, ())
  return None


def _fold(eqn: Any, args: list[np.ndarray]) -> list[np.ndarray] | None:
  """Evaluates an equation whose inputs are all constants; None when the result is too big."""
  size_in = sum(a.size for a in args)
  size_out = sum(int(np.prod(v.aval.shape)) for v in eqn.outvars)
  if size_out > size_in + _FOLD_LIMIT:
    return None
  with jax.default_device(jax.devices("cpu")[0]):
    outs = eqn.primitive.bind(*[jnp.asarray(a) for a in args], **eqn.params)
  outs = outs if eqn.primitive.multiple_results else [outs]
  return [np.asarray(jax.device_get(o)) for o in outs]


def convert_jaxpr(g: GraphBuilder, closed: jcore.ClosedJaxpr, inputs: Sequence[Any]) -> list[Any]:
  """Appends the nodes of `closed` applied to `inputs` (names or NumPy constants) to `g`;
  returns its outputs (names or constants)."""
  env = _Env()
  for var, const in zip(closed.jaxpr.constvars, closed.consts):
    env.write(var, np.asarray(jax.device_get(const)))
  for var, value in zip(closed.jaxpr.invars, inputs):
    env.write(var, value)
  for eqn in closed.jaxpr.eqns:
    args = [env.read(a) for a in eqn.invars]
    body = _inner(eqn)
    if body is not None:
      outs = convert_jaxpr(g, body, args)
    else:
      outs = None
      if all(isinstance(a, np.ndarray) for a in args):
        outs = _fold(eqn, args)
      if outs is None:
        name = eqn.primitive.name
        if name not in _RULES:
          raise NotImplementedError(
              f"ONNX export: no rule for the jax primitive {name!r} (stmn_jax/onnx_export.py "
              f"_RULES); equation: {eqn}")
        names = [_name(g, a) for a in args]
        outs = _RULES[name](g, names, eqn)
        outs = outs if isinstance(outs, list) else [outs]
    for var, value in zip(eqn.outvars, outs):
      env.write(var, value)
  return [env.read(v) for v in closed.jaxpr.outvars]


# ------------------------------------------------------------------------------ rules
Rule = Callable[[GraphBuilder, list, Any], Any]


def _out_aval(eqn: Any, i: int = 0):
  return eqn.outvars[i].aval


def _elementwise(op_type: str) -> Rule:
  return lambda g, x, eqn: g.op(op_type, x)


def _convert(g, x, eqn):
  return g.op("Cast", x, to=onnx_dtype(eqn.params["new_dtype"]))


def _integer_pow(g, x, eqn):
  y = eqn.params["y"]
  if y == 2:
    return g.op("Mul", [x[0], x[0]])
  return g.op("Pow", [x[0], g.const(np.asarray(y, eqn.invars[0].aval.dtype))])


def _rsqrt(g, x, eqn):
  return g.op("Reciprocal", [g.op("Sqrt", x)])


def _select_n(g, x, eqn):
  if len(x) != 3:
    raise NotImplementedError("ONNX export: select_n with more than two cases")
  pred = x[0]
  if eqn.invars[0].aval.dtype != np.bool_:
    pred = g.op("Cast", [pred], to=TensorProto.BOOL)
  return g.op("Where", [pred, x[2], x[1]])  # select_n(p, false_case, true_case)


def _reshape(g, x, eqn):
  return g.op("Reshape", [x[0], g.ints(_out_aval(eqn).shape)])


def _broadcast_in_dim(g, x, eqn):
  shape = tuple(eqn.params["shape"])
  dims = eqn.params["broadcast_dimensions"]
  in_shape = eqn.invars[0].aval.shape
  expanded = [1] * len(shape)
  for src, dst in enumerate(dims):
    expanded[dst] = in_shape[src]
  y = g.op("Reshape", [x[0], g.ints(expanded)])
  return g.op("Expand", [y, g.ints(shape)])


def _squeeze(g, x, eqn):
  if not eqn.params["dimensions"]:  # ONNX Squeeze without axes would drop every 1
    return g.op("Identity", x)
  return g.op("Squeeze", [x[0], g.ints(eqn.params["dimensions"])])


def _expand_dims(g, x, eqn):
  return g.op("Reshape", [x[0], g.ints(_out_aval(eqn).shape)])


def _transpose(g, x, eqn):
  return g.op("Transpose", x, perm=list(eqn.params["permutation"]))


def _reduce(op_type: str) -> Rule:
  def rule(g, x, eqn):
    if not eqn.params["axes"]:  # ONNX reduces every axis when given none
      return g.op("Identity", x)
    return g.op(op_type, [x[0], g.ints(eqn.params["axes"])], keepdims=0)

  return rule


def _argmax(g, x, eqn):
  (axis,) = eqn.params["axes"]
  y = g.op("ArgMax", x, axis=int(axis), keepdims=0, select_last_index=0)
  return g.op("Cast", [y], to=onnx_dtype(eqn.params["index_dtype"]))


def _slice(g, x, eqn):
  start = eqn.params["start_indices"]
  limit = eqn.params["limit_indices"]
  strides = eqn.params["strides"] or (1,) * len(start)
  axes = list(range(len(start)))
  return g.op("Slice", [x[0], g.ints(start), g.ints(limit), g.ints(axes), g.ints(strides)])


def _rev(g, x, eqn):
  dims = list(eqn.params["dimensions"])
  n = len(dims)
  return g.op("Slice", [x[0], g.ints([-1] * n), g.ints([np.iinfo(np.int64).min] * n),
                        g.ints(dims), g.ints([-1] * n)])


def _pad(g, x, eqn):
  config = eqn.params["padding_config"]
  if any(int(i) != 0 for _, _, i in config):
    raise NotImplementedError("ONNX export: pad with interior padding")
  if any(int(lo) < 0 or int(hi) < 0 for lo, hi, _ in config):
    raise NotImplementedError("ONNX export: pad with negative padding")
  pads = [int(lo) for lo, _, _ in config] + [int(hi) for _, hi, _ in config]
  return g.op("Pad", [x[0], g.ints(pads), x[1]], mode="constant")


def _concatenate(g, x, eqn):
  return g.op("Concat", x, axis=int(eqn.params["dimension"]))


def _split(g, x, eqn):
  outs = [g.name("split") for _ in eqn.outvars]
  g.nodes.append(helper.make_node("Split", [x[0], g.ints(eqn.params["sizes"])], outs,
                                  axis=int(eqn.params["axis"])))
  return outs


def _dot_general(g, x, eqn):
  """Any dot_general as an Einsum: batch dims, then lhs free, then rhs free dims (jax's order)."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  nl, nr = eqn.invars[0].aval.ndim, eqn.invars[1].aval.ndim
  letters = iter(string.ascii_letters)
  lhs = [next(letters) for _ in range(nl)]
  rhs = [None] * nr
  for a, b in zip(lc, rc):
    rhs[b] = lhs[a]
  for a, b in zip(lb, rb):
    rhs[b] = lhs[a]
  rhs = [c or next(letters) for c in rhs]
  out = ([lhs[a] for a in lb] + [c for i, c in enumerate(lhs) if i not in lc and i not in lb]
         + [c for i, c in enumerate(rhs) if i not in rc and i not in rb])
  y = g.op("Einsum", x, equation=f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}")
  if eqn.params.get("preferred_element_type") not in (None, eqn.invars[0].aval.dtype):
    y = g.op("Cast", [y], to=onnx_dtype(_out_aval(eqn).dtype))
  return y


def _conv(g, x, eqn):
  """conv_general_dilated as Conv: transposes to NCHW / OIHW and back."""
  p = eqn.params
  dn = p["dimension_numbers"]
  if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
    raise NotImplementedError("ONNX export: transposed or batch-grouped convolution")
  lhs = g.op("Transpose", [x[0]], perm=list(dn.lhs_spec))
  rhs = g.op("Transpose", [x[1]], perm=list(dn.rhs_spec))
  pads = [int(lo) for lo, _ in p["padding"]] + [int(hi) for _, hi in p["padding"]]
  y = g.op("Conv", [lhs, rhs], strides=list(p["window_strides"]), pads=pads,
           dilations=list(p["rhs_dilation"]), group=int(p["feature_group_count"]))
  # y is (N, C, spatial...) in lhs_spec order of the output's out_spec.
  inverse = np.argsort(dn.out_spec)
  return g.op("Transpose", [y], perm=[int(i) for i in inverse])


def _gather(g, x, eqn):
  """Any gather with in-bounds start indices, as a Gather on the flattened operand.

  The flat index of every output element is affine in the start indices: a constant part
  (offsets within the slice and batching coordinates: the gather of an iota operand at zero
  indices) plus each start index times its operand dimension's stride.
  """
  p = eqn.params
  dn = p["dimension_numbers"]
  operand, indices = eqn.invars[0].aval, eqn.invars[1].aval
  out_shape = _out_aval(eqn).shape
  iota = jnp.arange(int(np.prod(operand.shape)), dtype=jnp.int32).reshape(operand.shape)
  base = np.asarray(jax.lax.gather(
      iota, jnp.zeros(indices.shape, indices.dtype), dn, p["slice_sizes"],
      mode=jax.lax.GatherScatterMode.CLIP))
  strides = np.cumprod((operand.shape[1:] + (1,))[::-1])[::-1]
  batch_axes = [i for i in range(len(out_shape)) if i not in dn.offset_dims]
  # indices (..., K): the leading dims are the output's non-offset dims, in order.
  flat = g.const(base.astype(np.int64))
  idx = g.op("Cast", [x[1]], to=TensorProto.INT64)
  for k, dim in enumerate(dn.start_index_map):
    start = g.op("Gather", [idx, g.const(np.asarray(k, np.int64))], axis=indices.ndim - 1)
    hi = operand.shape[dim] - p["slice_sizes"][dim]
    start = g.op("Clip", [start, g.const(np.asarray(0, np.int64)),
                          g.const(np.asarray(hi, np.int64))])
    shape = [out_shape[i] if i in batch_axes else 1 for i in range(len(out_shape))]
    start = g.op("Reshape", [start, g.ints(shape)])
    term = g.op("Mul", [start, g.const(np.asarray(int(strides[dim]), np.int64))])
    flat = g.op("Add", [flat, term])
  data = g.op("Reshape", [x[0], g.ints([-1])])
  return g.op("Gather", [data, flat], axis=0)


def _iota(g, x, eqn):
  aval = _out_aval(eqn)
  dim = eqn.params["dimension"]
  shape = [1] * aval.ndim
  shape[dim] = aval.shape[dim]
  values = np.arange(aval.shape[dim], dtype=aval.dtype).reshape(shape)
  return g.op("Expand", [g.const(values), g.ints(aval.shape)])


_RULES: dict[str, Rule] = {
    "add": _elementwise("Add"), "sub": _elementwise("Sub"), "mul": _elementwise("Mul"),
    "div": _elementwise("Div"), "max": _elementwise("Max"), "min": _elementwise("Min"),
    "pow": _elementwise("Pow"), "neg": _elementwise("Neg"), "abs": _elementwise("Abs"),
    "exp": _elementwise("Exp"), "log": _elementwise("Log"), "sqrt": _elementwise("Sqrt"),
    "tanh": _elementwise("Tanh"), "logistic": _elementwise("Sigmoid"),
    "erf": _elementwise("Erf"), "sign": _elementwise("Sign"), "floor": _elementwise("Floor"),
    "lt": _elementwise("Less"), "gt": _elementwise("Greater"), "eq": _elementwise("Equal"),
    "le": _elementwise("LessOrEqual"), "ge": _elementwise("GreaterOrEqual"),
    "and": _elementwise("And"), "or": _elementwise("Or"), "not": _elementwise("Not"),
    "stop_gradient": _elementwise("Identity"), "copy": _elementwise("Identity"),
    "copy_p": _elementwise("Identity"),
    "square": lambda g, x, eqn: g.op("Mul", [x[0], x[0]]),
    "rsqrt": _rsqrt, "integer_pow": _integer_pow, "convert_element_type": _convert,
    "select_n": _select_n, "reshape": _reshape, "broadcast_in_dim": _broadcast_in_dim,
    "squeeze": _squeeze, "expand_dims": _expand_dims, "transpose": _transpose,
    "reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"), "argmax": _argmax, "slice": _slice, "rev": _rev,
    "pad": _pad, "concatenate": _concatenate, "split": _split, "dot_general": _dot_general,
    "conv_general_dilated": _conv, "gather": _gather, "iota": _iota,
}


# ------------------------------------------------------------------------------ the model
def clip_jaxpr(fn: Callable[[jax.Array], jax.Array], clip_shape: Sequence[int]) -> jcore.ClosedJaxpr:
  """The jaxpr of `fn` (uint8 frames (1, L, H, W, 3) -> (1, D)) with the CPU rewrites."""
  spec = jax.ShapeDtypeStruct((1,) + tuple(clip_shape), jnp.uint8)
  with cpu_kernels.kernels("fast"):
    return jax.make_jaxpr(fn)(spec)


def build_model(fn: Callable[[jax.Array], jax.Array], clip_shape: Sequence[int],
                name: str = "stmn_jax") -> onnx.ModelProto:
  """`fn`: uint8 frames (1, L, H, W, 3) -> float32 (1, D), parameters closed over.

  -> an ONNX model `frames` uint8 (batch, L, H, W, 3) -> `embedding` float32 (batch, D), batch
  free: a Scan over the clips of the one-clip graph.
  """
  closed = clip_jaxpr(fn, clip_shape)
  (out_aval,) = [v.aval for v in closed.jaxpr.outvars]
  if out_aval.ndim != 2 or out_aval.shape[0] != 1:
    raise ValueError(f"ONNX export: expected an output (1, D), got {out_aval.shape}")
  dim = int(out_aval.shape[1])
  outer = GraphBuilder("")
  body = GraphBuilder("s_")
  clip = "clip"
  x = body.op("Unsqueeze", [clip, body.ints([0])])
  (y,) = convert_jaxpr(body, closed, [x])
  y = _name(body, y)
  y = body.op("Cast", [y], to=TensorProto.FLOAT)
  body.nodes.append(helper.make_node("Squeeze", [y, body.ints([0])], ["clip_embedding"]))
  # The body's constants become outer initializers (a subgraph reads outer-scope names), so
  # the weights are stored once, at the top level of the file.
  outer.initializers.extend(body.initializers)
  body_graph = helper.make_graph(
      body.nodes, "clip",
      [helper.make_tensor_value_info(clip, TensorProto.UINT8, list(clip_shape))],
      [helper.make_tensor_value_info("clip_embedding", TensorProto.FLOAT, [dim])])
  outer.nodes.append(helper.make_node(
      "Scan", [INPUT_NAME], [OUTPUT_NAME], num_scan_inputs=1, body=body_graph))
  graph = helper.make_graph(
      outer.nodes, name,
      [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", *clip_shape])],
      [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", dim])],
      initializer=outer.initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                            producer_name="stmn_jax")
  model.ir_version = 8
  onnx.checker.check_model(model, full_check=True)
  return model


def export_onnx(fn: Callable[[jax.Array], jax.Array], clip_shape: Sequence[int],
                path: Any) -> epath.Path:
  """Builds the model (`build_model`) and writes it at `path` (an `epath.Path`-able path)."""
  model = build_model(fn, clip_shape)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(model.SerializeToString())
  return path
