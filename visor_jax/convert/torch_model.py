"""VISOR on LLaVA-OneVision in PyTorch, loaded from a directory written by `visor_jax.export`.

The same function as `visor_jax.models.llava_onevision.LlavaOnevision` (tested to 1e-4 in
float32), for users who serve with PyTorch. It imports no JAX (nothing in its import chain
does; tested), and it reuses transformers' modules instead of rewriting them: the whole
`LlavaOnevisionForConditionalGeneration` (SigLIP tower, projector, `image_newline`, Qwen2
decoder layers, norm, rotary embedding, lm_head) is loaded by its own `from_pretrained`; only
VISOR's new parts (cross-attention, positional conv, router) are defined here.

What differs from transformers' forward is how the decoder layers are *called*: two streams,
visual V and text T, each token keeping its position in the original interleaved sequence;
each layer runs per sample as SA (`[V; T]` through the original layer, V refined), CA (`T + CA(T,
V)` then the layer over T) or text-only, with explicit rotary (cos, sin) and an explicit 4-D
mask built from positions (causality by position, as in `models/visor.py`).

Inputs: the dict `visor_jax.data.inputs.collate` builds (numpy or torch):
  tokens int[B, T], text_pos int[B, T], text_valid bool[B, T],
  pixels float[B, P, S, S, C] (NHWC, as collate writes it) or float[B, P, C, S, S] (NCHW),
  vis_src int[B, N, 4], vis_weight float[B, N, 4], vis_newline bool[B, N], vis_pos int[B, N],
  vis_valid bool[B, N];
and a budget bool[B, L] (layer l runs SA for sample b) or None to let the router choose.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, eager_attention_forward

Tensor = torch.Tensor
INPUT_KEYS = ("tokens", "text_pos", "text_valid", "pixels", "vis_src", "vis_weight",
              "vis_newline", "vis_pos", "vis_valid")
_LONG = ("tokens", "text_pos", "vis_src", "vis_pos")
_BOOL = ("text_valid", "vis_newline", "vis_valid")


@dataclasses.dataclass(frozen=True)
class VisorLayout:
  """config.json's `"visor"` entry: which layers have which new parts, and the router."""
  ca_layers: tuple[int, ...] = ()
  sa_candidates: tuple[int, ...] = ()
  ca_gate: str = "zero_out"
  pos_conv: bool = False
  pos_conv_kernel: int = 7
  feasible: tuple[tuple[int, ...], ...] = ()  # the router's budgets, cheapest first
  router_hidden: int = 256
  threshold: float = 0.5

  @classmethod
  def from_json(cls, visor: Mapping[str, Any] | None) -> "VisorLayout":
    """None (a plain transformers directory) → the all-SA baseline with no new parts."""
    if not visor:
      return cls()
    router = visor.get("router") or {}
    return cls(ca_layers=tuple(visor.get("ca_layers") or ()),
               sa_candidates=tuple(visor.get("sa_candidates") or ()),
               ca_gate=visor.get("ca_gate", "zero_out"), pos_conv=bool(visor.get("pos_conv")),
               pos_conv_kernel=int(visor.get("pos_conv_kernel", 7)),
               feasible=tuple(tuple(b) for b in router.get("feasible") or ()),
               router_hidden=int(router.get("hidden", 256)),
               threshold=float(router.get("threshold", 0.5)))


def causal_mask(q_pos: Tensor, k_pos: Tensor, k_valid: Tensor) -> Tensor:
  """bool[B, 1, T, S]: a query at position p sees valid keys at positions <= p."""
  return (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & k_valid[:, None, None, :]


def additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
  """bool mask → the additive float mask transformers' eager and sdpa attention take."""
  return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
      ~mask, torch.finfo(dtype).min)


class CrossAttention(nn.Module):
  """Text queries read visual keys/values: own RMSNorms and projections, no RoPE.

  A text token reads only visual tokens placed before it in the original sequence; one with
  none before it gets exactly zero. Output scaled by tanh(gate) when ca_gate='tanh'.
  """

  def __init__(self, cfg, gate: str):
    super().__init__()
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    self.q_norm = Qwen2RMSNorm(d, eps=cfg.rms_norm_eps)
    self.kv_norm = Qwen2RMSNorm(d, eps=cfg.rms_norm_eps)
    self.q_proj = nn.Linear(d, n * h, bias=True)
    self.k_proj = nn.Linear(d, k * h, bias=True)
    self.v_proj = nn.Linear(d, k * h, bias=True)
    self.o_proj = nn.Linear(n * h, d, bias=False)
    self.gate = nn.Parameter(torch.zeros(())) if gate == "tanh" else None
    self.head_dim, self.scaling = h, h ** -0.5
    self.num_key_value_groups = n // k  # read by transformers' eager_attention_forward

  def forward(self, t: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """t: float[B, T, D], v: float[B, N, D], mask: bool[B, 1, T, N] → update float[B, T, D]."""
    return self.attend(t, *self.kv(v), mask)

  def kv(self, v: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of the visual tokens float[B, N, D] → 2 x float[B, K, N, H] (a
    generation computes them once per image: `torch_decode`)."""
    b, n_v, _ = v.shape
    kv_in = self.kv_norm(v)
    kv_heads = self.k_proj.out_features // self.head_dim
    k = self.k_proj(kv_in).view(b, n_v, kv_heads, self.head_dim).transpose(1, 2)
    val = self.v_proj(kv_in).view(b, n_v, kv_heads, self.head_dim).transpose(1, 2)
    return k, val

  def attend(self, t: Tensor, k: Tensor, val: Tensor, mask: Tensor) -> Tensor:
    """t: float[B, T, D] reads keys/values from `kv` → update float[B, T, D]."""
    b, n_t, _ = t.shape
    q = self.q_proj(self.q_norm(t)).view(b, n_t, -1, self.head_dim).transpose(1, 2)
    a, _ = eager_attention_forward(self, q, k, val, additive(mask, q.dtype), self.scaling)
    a = a * mask.any(-1)[:, 0, :, None, None].to(a.dtype)       # [B, T, N_heads, H]
    out = self.o_proj(a.reshape(b, n_t, -1))
    return out if self.gate is None else torch.tanh(self.gate).to(out.dtype) * out


class PositionalConv(nn.Module):
  """V + pointwise(depthwise_k(V)): a residual depthwise-separable 1D conv over visual tokens,
  'same' zero padding, invalid (padding) tokens zeroed first so they act as zeros."""

  def __init__(self, dim: int, kernel: int):
    super().__init__()
    self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
    self.pointwise = nn.Conv1d(dim, dim, 1)

  def forward(self, v: Tensor, valid: Tensor) -> Tensor:
    """v: float[B, N, D], valid: bool[B, N] → float[B, N, D]."""
    if v.shape[1] == 0:  # a text-only batch (torch's conv rejects empty inputs)
      return v
    v = v * valid[..., None].to(v.dtype)
    return v + self.pointwise(self.depthwise(v.transpose(1, 2))).transpose(1, 2)


class Router(nn.Module):
  """RMSNorm → Linear → GELU(erf) → Linear over the routing token; always float32."""

  def __init__(self, dim: int, hidden: int, num_budgets: int, eps: float):
    super().__init__()
    self.norm = Qwen2RMSNorm(dim, eps=eps)
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, num_budgets)

  def forward(self, h: Tensor) -> Tensor:
    """h: float[B, D] → logits float32[B, K]."""
    return self.fc2(F.gelu(self.fc1(self.norm(h.float()))))


def choose(logits: Tensor, threshold: float | Tensor) -> Tensor:
  """long[B]: the cheapest k with P(label <= k) >= threshold (as `models/router.choose`)."""
  cdf = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)
  threshold = torch.as_tensor(threshold, dtype=torch.float32, device=logits.device)
  reached = cdf >= threshold[..., None] - 1e-6
  return torch.argmax(reached.to(torch.int8), dim=-1)  # first True; cdf[-1] = 1 always


class VisorParts(nn.Module):
  """VISOR's new modules; their state_dict names are the exported `visor.*` names."""

  def __init__(self, text_cfg, layout: VisorLayout, num_layers: int):
    super().__init__()
    self.cross_attn = nn.ModuleDict({str(l): CrossAttention(text_cfg, layout.ca_gate)
                                     for l in layout.ca_layers})
    self.pos_conv = (PositionalConv(text_cfg.hidden_size, layout.pos_conv_kernel)
                     if layout.pos_conv else None)
    self.router = (Router(text_cfg.hidden_size, layout.router_hidden, len(layout.feasible),
                          text_cfg.rms_norm_eps) if layout.feasible else None)
    table = torch.zeros(len(layout.feasible), num_layers, dtype=torch.bool)
    for k, layers in enumerate(layout.feasible):
      table[k, list(layers)] = True
    self.register_buffer("table", table, persistent=False)  # bool[K, L], cheapest first


@contextlib.contextmanager
def _transformers_quiet():
  """from_pretrained logs a load report listing the visor.* tensors as 'unexpected'; the
  report's real problems are raised by `_check_loading_info` instead."""
  level = transformers.logging.get_verbosity()
  transformers.logging.set_verbosity_error()
  try:
    yield
  finally:
    transformers.logging.set_verbosity(level)


def _check_loading_info(directory: str, info: Mapping[str, Any]) -> None:
  missing = sorted(info.get("missing_keys") or ())
  if missing:
    raise ValueError(f"{directory}: tensor(s) missing from the export: {missing}.")
  mismatched = sorted(info.get("mismatched_keys") or ())
  if mismatched:
    key, got, want = mismatched[0]
    raise ValueError(f"{directory}: tensor {key!r} has shape {tuple(got)}, the model expects "
                     f"{tuple(want)} (config.json and weights disagree?).")


def _read_visor_tensors(directory: str, parts: VisorParts) -> None:
  """Loads `visor.*` into `parts`; a missing tensor or a shape mismatch names the tensor."""
  import safetensors
  expected = parts.state_dict()
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  found = {}
  for name in files:
    with safetensors.safe_open(os.path.join(directory, name), framework="pt") as f:
      for key in f.keys():
        if key.startswith("visor.") and key[len("visor."):] in expected:
          found[key[len("visor."):]] = f.get_tensor(key)
  for key, want in expected.items():
    if key not in found:
      raise ValueError(f"{directory}: tensor 'visor.{key}' is missing from the export.")
    if tuple(found[key].shape) != tuple(want.shape):
      raise ValueError(f"{directory}: tensor 'visor.{key}' has shape {tuple(found[key].shape)}, "
                       f"the model expects {tuple(want.shape)}.")
  parts.load_state_dict(found, strict=True)


@dataclasses.dataclass
class _Streams:
  """Per-forward constants: positions, validity, masks and rotary tables of both streams."""
  text_pos: Tensor
  vis_pos: Tensor
  text_valid: Tensor
  vis_valid: Tensor
  text_mask: Tensor      # additive float[B, 1, T, T]
  all_mask: Tensor       # additive float[B, 1, N+T, N+T], keys/queries ordered [V; T]
  ca_mask: Tensor        # bool[B, 1, T, N]: visual tokens strictly before each text token
  text_rope: tuple[Tensor, Tensor]
  all_rope: tuple[Tensor, Tensor]


class VisorForConditionalGeneration(nn.Module):
  """LLaVA-OV (transformers) + VISOR's new parts; forward, router and greedy generation."""

  def __init__(self, llava: transformers.LlavaOnevisionForConditionalGeneration,
               layout: VisorLayout):
    super().__init__()
    self.llava, self.layout, self.config = llava, layout, llava.config
    text_cfg = llava.config.text_config
    self.num_layers = text_cfg.num_hidden_layers
    self.visor = VisorParts(text_cfg, layout, self.num_layers)

  @classmethod
  def from_pretrained(cls, directory: str, dtype: torch.dtype = torch.float32,
                      attn_implementation: str = "sdpa") -> "VisorForConditionalGeneration":
    """Loads an exported directory (a plain transformers LLaVA-OV directory works too).

    `attn_implementation`: 'sdpa' or 'eager' (both take the explicit 4-D float mask used here).
    """
    with open(os.path.join(directory, "config.json")) as f:
      layout = VisorLayout.from_json(json.load(f).get("visor"))
    with _transformers_quiet():
      llava, info = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(
          directory, dtype=dtype, attn_implementation=attn_implementation,
          output_loading_info=True, ignore_mismatched_sizes=True)
    _check_loading_info(directory, info)
    model = cls(llava, layout)
    model.visor.to(dtype)
    _read_visor_tensors(directory, model.visor)
    if model.visor.router is not None:
      model.visor.router.float()
    return model.eval()

  @property
  def dtype(self) -> torch.dtype:
    return self.llava.lm_head.weight.dtype

  # ------------------------------------------------------------------------------ inputs

  def prepare_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
    """numpy/torch inputs → torch tensors (pixels NCHW [B, P, C, S, S]); errors name the input."""
    missing = [k for k in INPUT_KEYS if k not in inputs]
    if missing:
      raise ValueError(f"model inputs are missing {missing}.")
    device = self.llava.lm_head.weight.device
    out = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v, device=device)
           for k, v in inputs.items() if k in INPUT_KEYS}
    for k in _LONG:
      out[k] = out[k].long()
    for k in _BOOL:
      out[k] = out[k].bool()
    out["vis_weight"] = out["vis_weight"].to(self.dtype)
    out["pixels"] = self._nchw(out["pixels"]).to(self.dtype)
    if out["tokens"].dim() != 2:
      raise ValueError(f"tokens: expected int[B, T], got shape {tuple(out['tokens'].shape)}.")
    b, t = out["tokens"].shape
    n = out["vis_src"].shape[1]
    expected = {"text_pos": (b, t), "text_valid": (b, t), "vis_src": (b, n, 4),
                "vis_weight": (b, n, 4), "vis_newline": (b, n), "vis_pos": (b, n),
                "vis_valid": (b, n)}
    for key, shape in expected.items():
      if tuple(out[key].shape) != shape:
        raise ValueError(f"{key}: expected shape {shape}, got {tuple(out[key].shape)}.")
    return out

  def _nchw(self, px: Tensor) -> Tensor:
    v = self.config.vision_config
    s, c = v.image_size, v.num_channels
    if px.dim() == 5 and tuple(px.shape[2:]) == (s, s, c):
      return px.permute(0, 1, 4, 2, 3)
    if px.dim() == 5 and tuple(px.shape[2:]) == (c, s, s):
      return px
    raise ValueError(f"pixels: expected float[B, P, {s}, {s}, {c}] (NHWC) or "
                     f"[B, P, {c}, {s}, {s}] (NCHW) normalised crops, got {tuple(px.shape)}.")

  def _budget(self, budget: Any, batch: int) -> Tensor:
    budget = torch.as_tensor(np.asarray(budget) if not isinstance(budget, Tensor) else budget)
    if tuple(budget.shape) != (batch, self.num_layers) or budget.dtype != torch.bool:
      raise ValueError(f"budget: expected bool[batch={batch}, layers={self.num_layers}], got "
                       f"{budget.dtype} {tuple(budget.shape)}.")
    return budget.to(self.llava.lm_head.weight.device)

  # ------------------------------------------------------------------------------ vision

  def visual_tokens(self, x: Mapping[str, Tensor]) -> Tensor:
    """Crops → packed visual tokens float[B, N, D] in LLaVA-OV's order (AnyRes as a gather)."""
    m = self.llava.model
    px = x["pixels"]
    b, p = px.shape[:2]
    hidden = m.vision_tower(pixel_values=px.flatten(0, 1), output_hidden_states=True).hidden_states
    layers = self.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    feats = m.multi_modal_projector(torch.cat([hidden[i] for i in layers], dim=-1))
    feats = feats.reshape(b, -1, feats.shape[-1])                      # [B, P*patches, D]
    taps = feats[torch.arange(b, device=px.device)[:, None, None], x["vis_src"]]  # [B, N, 4, D]
    packed = torch.einsum("bnk,bnkd->bnd", x["vis_weight"].to(feats.dtype), taps)
    newline = m.image_newline.to(feats.dtype)
    return torch.where(x["vis_newline"][..., None], newline, packed)

  # ------------------------------------------------------------------------------ decoder

  def _streams(self, x: Mapping[str, Tensor], like: Tensor) -> _Streams:
    rope = self.llava.model.language_model.rotary_emb
    all_pos = torch.cat([x["vis_pos"], x["text_pos"]], dim=1)
    all_valid = torch.cat([x["vis_valid"], x["text_valid"]], dim=1)
    dt = like.dtype
    return _Streams(
        text_pos=x["text_pos"], vis_pos=x["vis_pos"], text_valid=x["text_valid"],
        vis_valid=x["vis_valid"],
        text_mask=additive(causal_mask(x["text_pos"], x["text_pos"], x["text_valid"]), dt),
        all_mask=additive(causal_mask(all_pos, all_pos, all_valid), dt),
        ca_mask=((x["vis_pos"][:, None, None, :] < x["text_pos"][:, None, :, None])
                 & x["vis_valid"][:, None, None, :]),
        text_rope=rope(like, x["text_pos"]), all_rope=rope(like, all_pos))

  def _text_path(self, l: int, t: Tensor, v: Tensor, s: _Streams) -> Tensor:
    """Text-only layer (with cross-attention first when l is a CA layer); V unchanged."""
    if str(l) in self.visor.cross_attn:
      t = t + self.visor.cross_attn[str(l)](t, v, s.ca_mask)
    layer = self.llava.model.language_model.layers[l]
    return layer(t, attention_mask=s.text_mask, position_embeddings=s.text_rope,
                 position_ids=s.text_pos)

  def _sa_path(self, l: int, t: Tensor, v: Tensor, s: _Streams) -> tuple[Tensor, Tensor]:
    """The original layer over [V; T] with the original causal mask: refines V."""
    layer = self.llava.model.language_model.layers[l]
    out = layer(torch.cat([v, t], dim=1), attention_mask=s.all_mask,
                position_embeddings=s.all_rope,
                position_ids=torch.cat([s.vis_pos, s.text_pos], dim=1))
    n = v.shape[1]
    return out[:, n:], out[:, :n]

  def run_layers(self, t: Tensor, v: Tensor, s: _Streams, budget: Tensor, start: int,
                 stop: int) -> tuple[Tensor, Tensor]:
    """Layers [start, stop): per layer, nobody / everybody / some samples run SA (the same
    three cases `models/visor.py` switches between; off paths are skipped, not masked)."""
    for l in range(start, stop):
      bits = budget[:, l]
      if bool(bits.all()):
        t, v = self._sa_path(l, t, v, s)
      elif not bool(bits.any()):
        t = self._text_path(l, t, v, s)
      else:
        t_text = self._text_path(l, t, v, s)
        t_sa, v_sa = self._sa_path(l, t, v, s)
        on = bits[:, None, None]
        t, v = torch.where(on, t_sa, t_text), torch.where(on, v_sa, v)
    return t, v

  def visual_stream(self, x: Mapping[str, Tensor]) -> Tensor:
    """V entering layer 0: packed visual tokens plus the positional conv."""
    v = self.visual_tokens(x).to(self.dtype)
    if self.visor.pos_conv is not None:
      v = self.visor.pos_conv(v, x["vis_valid"])
    return v

  def hidden_states(self, x: Mapping[str, Tensor], budget: Tensor | None,
                    threshold: float | Tensor | None = None, v: Tensor | None = None):
    """(final-normed text hidden states float[B, T, D], budget used bool[B, L], router
    logits float32[B, K] or None). `budget` None: the router picks it mid-prefill. `v`: the
    visual stream if already computed (generation reuses it: appended text cannot change it)."""
    lm = self.llava.model.language_model
    t = lm.embed_tokens(x["tokens"])
    v = self.visual_stream(x) if v is None else v
    s = self._streams(x, t)
    b = t.shape[0]
    if budget is not None:
      t, _ = self.run_layers(t, v, s, budget, 0, self.num_layers)
      return lm.norm(t), budget, None
    if self.visor.router is None:
      raise ValueError("budget=None needs a router (the export has no visor.router); pass a "
                       "bool[B, L] budget.")
    first = min(self.layout.sa_candidates)  # no feasible budget turns on a layer before it
    none = torch.zeros(b, self.num_layers, dtype=torch.bool, device=t.device)
    t, v = self.run_layers(t, v, s, none, 0, first)
    routing_token = t[torch.arange(b, device=t.device), last_valid_index(x["text_valid"])]
    router_logits = self.visor.router(routing_token)
    k = choose(router_logits, self.layout.threshold if threshold is None else threshold)
    budget = self.visor.table[k]
    t, _ = self.run_layers(t, v, s, budget, first, self.num_layers)
    return lm.norm(t), budget, router_logits

  def logits(self, hidden: Tensor) -> Tensor:
    return self.llava.lm_head(hidden).float()

  @torch.no_grad()
  def forward(self, inputs: Mapping[str, Any], budget: Any) -> Tensor:
    """Next-token logits float32[B, T, V] for the text tokens at a given budget bool[B, L]."""
    x = self.prepare_inputs(inputs)
    hidden, _, _ = self.hidden_states(x, self._budget(budget, x["tokens"].shape[0]))
    return self.logits(hidden)

  @torch.no_grad()
  def routed(self, inputs: Mapping[str, Any], threshold: float | Tensor | None = None
             ) -> dict[str, Tensor]:
    """The router picks each sample's budget: {'logits', 'budget', 'router_logits'}."""
    x = self.prepare_inputs(inputs)
    hidden, budget, router_logits = self.hidden_states(x, None, threshold)
    return {"logits": self.logits(hidden), "budget": budget, "router_logits": router_logits}

  # ------------------------------------------------------------------------------ generation

  @torch.no_grad()
  def generate(self, inputs: Mapping[str, Any], max_new_tokens: int, budget: Any = None,
               threshold: float | None = None, eos_token_id: int | None = None,
               use_cache: bool = True) -> Tensor:
    """Greedy decoding → long[B, max_new_tokens] (after a sample's EOS: EOS repeated).

    With `use_cache` (the default) the prompt runs once and each new token runs through the
    layers against a KV cache (`torch_decode.py`: text keys/values per layer, visual ones
    where SA ran, CA keys/values once per image). Without it, each step re-runs the decoder
    with the new token appended to the text stream: exactly the prefill function, kept as
    the reference the cache is tested against. New tokens take positions after the sample's
    last one; the vision tower runs once. With `budget=None` the router chooses each sample's
    budget once, on the prompt, and decoding keeps it (the method: "decoding uses the same
    layer sets").
    """
    from visor_jax.convert import torch_decode
    x = self.prepare_inputs(inputs)
    b = x["tokens"].shape[0]
    v = self.visual_stream(x)
    budget = None if budget is None else self._budget(budget, b)
    if use_cache:
      last_hidden, cache = torch_decode.prefill(self, x, budget, v, threshold)
    elif budget is None:
      hidden, budget, _ = self.hidden_states(x, None, threshold, v)
    else:
      hidden, _, _ = self.hidden_states(x, budget, v=v)
    out = []
    done = torch.zeros(b, dtype=torch.bool, device=v.device)
    for step in range(max_new_tokens):
      if not use_cache:
        last_hidden = hidden[torch.arange(b, device=hidden.device),
                             last_valid_index(x["text_valid"])]
      nxt = self.logits(last_hidden).argmax(-1)
      if eos_token_id is not None:
        nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
        done = done | (nxt == eos_token_id)
      out.append(nxt)
      if step + 1 == max_new_tokens or bool(done.all()):
        break
      if use_cache:
        last_hidden = torch_decode.decode_step(self, cache, nxt)
      else:
        x = append_token(x, nxt)
        hidden, _, _ = self.hidden_states(x, budget, v=v)
    tokens = torch.stack(out, dim=1)
    if tokens.shape[1] < max_new_tokens:  # everyone stopped early
      pad = torch.full((b, max_new_tokens - tokens.shape[1]), eos_token_id, dtype=tokens.dtype,
                       device=tokens.device)
      tokens = torch.cat([tokens, pad], dim=1)
    return tokens


def last_valid_index(text_valid: Tensor) -> Tensor:
  """long[B]: index of each sample's last valid text token (the routing token)."""
  t = text_valid.shape[1]
  return t - 1 - torch.argmax(text_valid.flip(1).to(torch.int8), dim=1)


def append_token(x: Mapping[str, Tensor], token: Tensor) -> dict[str, Tensor]:
  """Appends one text token per sample at position (its last position + 1).

  Padding text tokens may share that position; they are invalid keys, so they do not matter.
  """
  last = torch.cat([torch.where(x["vis_valid"], x["vis_pos"], -1),
                    torch.where(x["text_valid"], x["text_pos"], -1)], dim=1).max(dim=1).values
  out = dict(x)
  out["tokens"] = torch.cat([x["tokens"], token[:, None].to(x["tokens"].dtype)], dim=1)
  out["text_pos"] = torch.cat([x["text_pos"], (last + 1)[:, None]], dim=1)
  out["text_valid"] = torch.cat([x["text_valid"], torch.ones_like(x["text_valid"][:, :1])], dim=1)
  return out
