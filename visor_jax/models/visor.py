"""VISOR: the LLM layer stack whose visual work is switched, per layer and per sample, by data.

For each layer l (method note, "VISOR layers"):

    if budget[b, l]:   [V; T] = layer_l([V; T])          # SA: the original layer, full causal
    elif l in CA:      T = layer_l(T + CrossAttn_l(T, V)) # CA: text reads vision, V unchanged
    else:              T = layer_l(T)                     # text-only, V unchanged

The budget is a bool[B, L] *array*: one compiled program serves every budget. Inside a
`lax.scan` over layers, a `lax.switch` picks per layer between "nobody in the batch runs SA"
(text path only), "everybody runs SA" (SA path only) and "mixed" (both, then a per-sample
select). So an off bit really skips the visual work instead of computing and masking it, and
per-sample budgets give each sample exactly what it would get alone.

V and T are kept as two streams in any array order; causality comes from the original position
ids (`nn.Mask`), so "every layer SA" with the new parts at their zero init is exactly
LLaVA-OV. The layer itself (SA, or CA + text, or text) is `visor_layer.visor_layer`, which
prefill and decode run too.
"""
from __future__ import annotations

import functools
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from visor_jax import sharding
from visor_jax.config_lib import ModelConfig, TextConfig
from visor_jax.models.nn import Dense, Mask, RMSNorm, attention
from visor_jax.models.qwen2 import Qwen2Attention, Qwen2Layer
from visor_jax.models.router import Router, choose, last_prompt_index
from visor_jax.models.visor_layer import Streams, visor_layer

Array = jax.Array
M = TypeVar("M", bound=nnx.Module)


class CrossAttention(nnx.Module):
  """Text queries read visual keys/values. Own pre-norms and projections, no RoPE.

  Starts as an exact no-op: either the output projection is zero ('zero_out') or the output is
  scaled by tanh(gate) with gate = 0 ('tanh'). A text token reads only visual tokens placed
  before it in the original sequence (the original model's causality).
  """

  def __init__(self, cfg: TextConfig, gate: str, *, rngs: nnx.Rngs, dtype, param_dtype):
    d = cfg.hidden_size
    self.q_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
    self.kv_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype)
    zero_out = gate == "zero_out"
    self.attn = Qwen2Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                               use_rope=False,
                               o_init=nnx.initializers.zeros_init() if zero_out else None)
    self.gate = None if zero_out else nnx.Param(jnp.zeros((), param_dtype), out_sharding=())

  def __call__(self, t: Array, v: Array, t_pos: Array, v_pos: Array, v_valid: Array,
               impl: str | None = None) -> Array:
    """t: float[B, T, D], v: float[B, N, D] → the residual update float[B, T, D]."""
    return self.read(t, *self.visual_kv(v, v_pos), t_pos, v_pos, v_valid, impl)

  def visual_kv(self, v: Array, v_pos: Array) -> tuple[Array, Array]:
    """Keys/values of the visual tokens: computed once per image, cacheable for decoding."""
    return self.attn.project_kv(self.kv_norm(v), v_pos)

  def read(self, t: Array, k: Array, val: Array, t_pos: Array, v_pos: Array, v_valid: Array,
           impl: str | None = None) -> Array:
    """Text queries against precomputed visual keys/values → float[B, T, D]."""
    # Visual tokens strictly before the text token: positions are integers, so
    # v_pos < t_pos ⟺ v_pos <= t_pos - 1, a causal Mask (never materialised by 'blockwise').
    mask = Mask(v_valid, t_pos - 1, v_pos, causal=True)
    a = attention(self.attn.project_q(self.q_norm(t), t_pos), k, val, mask, implementation=impl)
    # A text token before the image has no key to read: give it exactly nothing.
    a = a * mask.has_key()[:, :, None, None].astype(a.dtype)
    out = self.attn.output(a)
    return out if self.gate is None else jnp.tanh(self.gate[...]).astype(out.dtype) * out


class PositionalConv(nnx.Module):
  """Conditional positional embedding: V + pointwise(depthwise_k(V)), pointwise zero-init.

  A 1D depthwise-separable convolution (kernel k, 'same' zero padding) over the packed visual
  token sequence. Invalid (padding) tokens are zeroed first so they act as the zero padding.
  """

  def __init__(self, dim: int, kernel: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    init = nnx.initializers.normal(1.0 / kernel)
    self.depthwise = nnx.Param(init(rngs.params(), (kernel, dim), param_dtype),
                               out_sharding=(None, "embed"))
    self.depthwise_bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",))
    self.pointwise = nnx.Param(jnp.zeros((dim, dim), param_dtype),
                               out_sharding=("embed", "embed_out"))
    self.pointwise_bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("embed",))
    self.kernel, self.dtype = kernel, dtype

  def __call__(self, v: Array, valid: Array) -> Array:
    """v: float[B, N, D], valid: bool[B, N] → float[B, N, D]."""
    v = v * valid[..., None].astype(v.dtype)
    half, n = self.kernel // 2, v.shape[1]
    padded = jnp.pad(v, ((0, 0), (half, half), (0, 0)))
    w = self.depthwise[...].astype(self.dtype)
    dw = sum(padded[:, i:i + n] * w[i] for i in range(self.kernel))
    dw = dw + self.depthwise_bias[...].astype(self.dtype)
    pw = jnp.dot(dw, self.pointwise[...].astype(self.dtype))
    return v + pw + self.pointwise_bias[...].astype(self.dtype)


def _stack(n: int, make):
  """n independently initialised copies of a module, parameters stacked on a 'layers' axis."""
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=n,
            transform_metadata={nnx.PARTITION_NAME: "layers"})
  def build(rngs):
    return make(rngs)
  return build


class VisorDecoder(nnx.Module):
  """The LLM layer stack plus VISOR's cross-attention and positional conv."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    t, z = cfg.text, cfg.visor
    self.cfg = cfg
    self.layers = _stack(t.num_layers, lambda r: Qwen2Layer(
        t, rngs=r, dtype=dtype, param_dtype=param_dtype,
        attention_impl=cfg.attention_impl))(rngs)
    self.cross = (_stack(len(z.ca_layers), lambda r: CrossAttention(
        t, z.ca_gate, rngs=r, dtype=dtype, param_dtype=param_dtype))(rngs)
                  if z.ca_layers else None)
    self.pos_conv = (PositionalConv(t.hidden_size, z.pos_conv_kernel, rngs=rngs, dtype=dtype,
                                    param_dtype=param_dtype) if z.pos_conv else None)
    self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=param_dtype)
    # Training only (training/hop_loss.py): maps a cell's visual hidden state to predictions
    # of its upper and left neighbours' input embeddings. Not used by any forward.
    self.hop_head = (nnx.Param(nnx.initializers.normal(0.02)(
        rngs.params(), (2, t.hidden_size, t.hidden_size), param_dtype),
        out_sharding=(None, "embed", "embed_out")) if z.hop_head else None)
    self.router = Router(cfg, rngs=rngs, param_dtype=param_dtype) if cfg.router.enabled else None

  def __call__(self, text: Array, vis: Array, text_pos: Array, vis_pos: Array,
               text_valid: Array, vis_valid: Array, budget: Array | None,
               threshold: Array | float | None = None, *, unroll: bool = False
               ) -> tuple[Array, Array, Array | None]:
    """Runs all layers → (final-normed text hidden states float[B, T, D], the budget used
    bool[B, L], router logits float32[B, K] or None).

    text: float[B, T, D]; vis: float[B, N, D]; *_pos: int32; *_valid: bool. `budget`
    bool[B, L] fixes the budget; None lets the router choose it per sample, mid-prefill, at
    cost knob `threshold` (default `cfg.router.threshold`). `unroll`: see `run_layers`.
    """
    args = (text_pos, vis_pos, text_valid, vis_valid)
    if budget is not None:
      return self.run_budget(text, vis, *args, budget, unroll=unroll)[0], budget, None
    if self.pos_conv is not None:
      vis = self.pos_conv(vis, vis_valid)
    n = self.cfg.num_layers
    if self.router is None:
      raise ValueError("budget: None needs a router (model.router.feasible is empty); pass "
                       "a bool[B, L] budget.")
    first = min(self.cfg.visor.sa_candidates)  # no feasible budget turns on a layer before it
    prefix = jnp.zeros((text.shape[0], n), bool)
    text, vis = self.run_layers(text, vis, *args, prefix, 0, first)
    budget, logits = self.route(text, text_valid, threshold)
    text, _ = self.run_layers(text, vis, *args, budget, first, n)
    return self.norm(text), budget, logits

  def run_budget(self, text, vis, text_pos, vis_pos, text_valid, vis_valid, budget, *,
                 unroll: bool = False, visual_after: int | None = None) -> tuple[Array, Array]:
    """A given budget bool[B, L]: positional conv, every layer, final norm → (final-normed
    text hidden states float[B, T, D], the visual stream float[B, N, D] leaving layer
    `visual_after` - 1, or the last layer when None). `vis` enters before the conv. Splitting
    the layer loop at `visual_after` changes nothing computed; the hop loss reads that stream
    (training/hop_loss.py)."""
    if self.pos_conv is not None:
      vis = self.pos_conv(vis, vis_valid)
    args = (text_pos, vis_pos, text_valid, vis_valid)
    n = self.cfg.num_layers
    split = n if visual_after is None else visual_after
    text, vis = self.run_layers(text, vis, *args, budget, 0, split, unroll=unroll)
    if split < n:
      text, _ = self.run_layers(text, vis, *args, budget, split, n, unroll=unroll)
    return self.norm(text), vis

  def route(self, text: Array, text_valid: Array, threshold=None) -> tuple[Array, Array]:
    """Hidden states entering the first SA candidate → (budget bool[B, L], router logits)."""
    routing_token = text[jnp.arange(text.shape[0]), last_prompt_index(text_valid)]
    logits = self.router(routing_token)
    k = choose(logits, self.cfg.router.threshold if threshold is None else threshold)
    return jnp.asarray(self.router.table)[k], logits

  def run_layers(self, text, vis, text_pos, vis_pos, text_valid, vis_valid, budget,
                 start: int, stop: int, *, unroll: bool = False) -> tuple[Array, Array]:
    """Layers [start, stop); returns (text, vis) hidden states.

    The budget is data: with stacked weights (training, checkpoints) one `lax.scan` whose body
    `lax.switch`es on the layer's bits runs every budget with one program. With per-layer
    weights (`serving_layout`) the same body is unrolled in Python, still one program for
    every budget, and no step copies a layer's weights out of a stack. `unroll=True` is the
    explicit exception: the budget must be concrete (numpy), the layers are unrolled and the
    off paths dropped at trace time, a program per budget. Only the FLOPs cross-check uses it
    (XLA's cost analysis counts a loop body once); training and serving never do.
    """
    cfg = self.cfg
    impl = cfg.attention_impl
    ca_slot = np.zeros(cfg.num_layers, np.int32)
    ca_slot[list(cfg.visor.ca_layers)] = np.arange(len(cfg.visor.ca_layers))
    is_ca = np.zeros(cfg.num_layers, bool)
    is_ca[list(cfg.visor.ca_layers)] = True
    streams = Streams(text_pos, vis_pos, text_valid, vis_valid)
    static = unroll
    if unroll:
      try:
        budget = np.asarray(budget, bool)
      except jax.errors.TracerArrayConversionError:
        raise ValueError("run_layers(unroll=True) needs a concrete budget, got a traced one.") \
            from None

    def step(layer, cross, bits, l_is_ca, t, v):
      """One layer for the whole batch: `cross` makes its CA module (None: the model has
      none); `bits` bool[B] its SA bits; `l_is_ca` whether it is a CA layer."""
      t, v = (sharding.constrain_batch(a) for a in (t, v))  # batch-split, not width-split

      def path(sa):  # one VISOR layer (`visor_layer.py`), SA on or off for the whole batch
        return lambda t, v: visor_layer(layer, cross, t, v, streams, sa=sa, ca=l_is_ca,
                                        impl=impl)[:2]

      def mixed(t, v):  # both paths, then each sample takes its own
        t_text, _ = path(False)(t, v)
        t_sa, v_sa = path(True)(t, v)
        on = bits[:, None, None]
        return jnp.where(on, t_sa, t_text), jnp.where(on, v_sa, v)

      branches = [path(False), path(True), mixed]
      if static:
        return branches[1 if bits.all() else 2 if bits.any() else 0](t, v)
      mode = jnp.where(jnp.all(bits), 1, jnp.where(jnp.any(bits), 2, 0))
      t, v = jax.lax.switch(mode, branches, t, v)
      return sharding.constrain_batch(t), sharding.constrain_batch(v)

    if isinstance(self.layers, nnx.List) or static:  # a Python loop over the layers
      if isinstance(self.layers, nnx.List):
        layer_at, cross_at = self.layers.__getitem__, (
            None if self.cross is None else self.cross.__getitem__)
      else:
        layer_at, cross_at = _slicer(self.layers), (
            None if self.cross is None else _slicer(self.cross))
      for l in range(start, stop):
        cross = None if cross_at is None else (lambda m=int(ca_slot[l]): cross_at(m))
        one = functools.partial(step, layer_at(l), cross, budget[:, l], bool(is_ca[l]))
        text, vis = (jax.checkpoint(one) if cfg.remat else one)(text, vis)
      return text, vis

    layer_def, layer_state = nnx.split(self.layers)
    layer_state = jax.tree.map(lambda a: a[start:stop], layer_state)
    if self.cross is not None:
      cross_def, cross_state = nnx.split(self.cross)

    def body(carry, xs):
      layer_state_l, bits, l_is_ca, l_ca_slot = xs
      cross = None if self.cross is None else (
          lambda: nnx.merge(cross_def, jax.tree.map(lambda a: a[l_ca_slot], cross_state)))
      return step(nnx.merge(layer_def, layer_state_l), cross, bits, l_is_ca, *carry), None

    if cfg.remat:
      body = jax.checkpoint(body)
    xs = (layer_state, budget.T[start:stop], jnp.asarray(is_ca[start:stop]),
          jnp.asarray(ca_slot[start:stop]))
    (text, vis), _ = jax.lax.scan(body, (text, vis), xs)
    return text, vis


def _slicer(stacked: nnx.Module):
  """i → the i-th module of a stacked one, sliced from its weights (traced: the FLOPs
  cross-check's unrolled path, never timed; eager: `_unstack`'s copies)."""
  graphdef, state = nnx.split(stacked)
  return lambda i: nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def _unstack(stacked: nnx.Module) -> nnx.List:
  """A stacked module (`_stack`) → nnx.List of one module per layer, each weight its own array
  (a copy, made once), its logical axes without the leading 'layers', its Dense kernels
  stored [out, in] (`Dense.transpose_kernel`)."""
  take = _slicer(stacked)
  modules = [take(i) for i in range(jax.tree.leaves(nnx.state(stacked))[0].shape[0])]
  for module in modules:
    nodes = [node for _, node in nnx.iter_graph(module)]
    for var in (n for n in nodes if isinstance(n, nnx.Variable)):
      axes = var.get_metadata().get("out_sharding")
      if axes and axes[0] == "layers":
        var.set_metadata(out_sharding=tuple(axes[1:]))
    for dense in (n for n in nodes if isinstance(n, Dense)):  # after: it reverses the axes
      dense.transpose_kernel()
  return nnx.List(modules)


def serving_layout(model: M) -> M:
  """A serving copy of `model` (a `LlavaOnevision` or `VisorDecoder`) whose decoder holds one
  module per LLM layer and per CA module instead of stacked weights (MaxText's
  `scan_layers=False`), their Dense kernels stored [out, in]. Every layer loop (forward,
  routing, prefill, decode) then reads each weight in place: over stacked weights XLA copies
  each layer's slice out first, on every call (~5.6 ms a layer at 0.5B widths on this CPU: a
  third of a 65-token text-only layer, noise beside a 1,549-token SA one); and a one-token
  decode step's matrix-vector products stream [out, in] weights at the memory bandwidth. The
  price is a compile time that grows with depth, so training and checkpoints keep the stacked
  [in, out] layout (one scanned body). The copy's other weights are `model`'s own arrays; the
  layer weights are copied once."""
  graphdef, state = nnx.split(model)
  out = nnx.merge(graphdef, state)  # new module objects over the same arrays
  dec = out if isinstance(out, VisorDecoder) else out.decoder
  if not isinstance(dec.layers, nnx.List):
    dec.layers = _unstack(dec.layers)
    if dec.cross is not None:
      dec.cross = _unstack(dec.cross)
  return out
