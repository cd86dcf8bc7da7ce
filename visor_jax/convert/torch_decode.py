"""KV-cache generation for the exported PyTorch VISOR model (`torch_model.py`).

The prompt runs once (prefill), through the same transformers decoder layers and the same
per-layer paths as `VisorForConditionalGeneration.run_layers`, and keeps per layer what later
tokens read:
  text_k, text_v   every text token's keys/values, from the path its sample took at that
                   layer (SA or text-only: a sample's budget is fixed for the whole
                   generation, so one path per sample and layer)
  vis_k, vis_v     the visual tokens' keys/values, for layers where some sample ran SA (a new
                   token attends over [V; T] there)
  ca_k, ca_v       cross-attention keys/values of the visual stream, for CA layers where some
                   sample took the text path (computed once per image)
Each decode step then runs one token per sample through every layer against those caches.
Appended text never changes the visual stream (visual tokens precede it), so nothing
visual is recomputed. A batch mixing budgets runs both paths per layer where they differ and
keeps each sample's own, as `run_layers` does.

The layers are transformers' own: a small object in the place of transformers' cache
(`_Keys`) hands each attention call its past keys/values and records the new ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from visor_jax.convert.torch_model import additive, choose, last_valid_index

Tensor = torch.Tensor


class _Keys:
  """Stands in for a transformers `Cache` in one attention call: returns [past; new] keys and
  values and keeps the new ones (`new`)."""

  def __init__(self, past_k: Tensor | None = None, past_v: Tensor | None = None):
    self.past_k, self.past_v, self.new = past_k, past_v, None

  def update(self, k: Tensor, v: Tensor, layer_idx: int, *args, **kwargs):
    self.new = (k, v)
    if self.past_k is None:
      return k, v
    return torch.cat([self.past_k, k], dim=2), torch.cat([self.past_v, v], dim=2)


@dataclasses.dataclass
class LayerCache:
  text_k: Tensor                  # float[B, K, T, H]
  text_v: Tensor
  vis_k: Tensor | None = None     # float[B, K, N, H]: some sample ran SA here
  vis_v: Tensor | None = None
  ca_k: Tensor | None = None      # float[B, K, N, H]: a CA layer some sample read through
  ca_v: Tensor | None = None


@dataclasses.dataclass
class Cache:
  layers: list[LayerCache]
  budget: Tensor                  # bool[B, L]
  text_valid: Tensor              # bool[B, T]: cached text keys that are real tokens
  vis_valid: Tensor               # bool[B, N]
  next_pos: Tensor                # long[B]: the position of the next token

  def nbytes(self) -> int:
    return sum(t.numel() * t.element_size() for lc in self.layers
               for t in dataclasses.astuple(lc) if t is not None)


def _pick(on: Tensor, a: Tensor, b: Tensor) -> Tensor:
  """Per sample (bool[B]): a where on, else b."""
  return torch.where(on.view(-1, *([1] * (a.dim() - 1))), a, b)


def _layer(model, l: int):
  return model.llava.model.language_model.layers[l]


def _prefill_layers(model, t, v, s, budget, start, stop, caches):
  """`run_layers` over [start, stop) that also fills `caches` (appended in layer order)."""
  for l in range(start, stop):
    bits = budget[:, l]
    all_on, any_on = bool(bits.all()), bool(bits.any())
    lc = LayerCache(None, None)
    if not all_on:  # the text path (CA first at CA layers)
      t_in = t
      if str(l) in model.visor.cross_attn:
        ca = model.visor.cross_attn[str(l)]
        lc.ca_k, lc.ca_v = ca.kv(v)
        t_in = t + ca.attend(t, lc.ca_k, lc.ca_v, s.ca_mask)
      keys = _Keys()
      t_text = _layer(model, l)(t_in, attention_mask=s.text_mask,
                                position_embeddings=s.text_rope, position_ids=s.text_pos,
                                cache=keys)
      lc.text_k, lc.text_v = keys.new
    if any_on:  # the SA path over [V; T]
      keys, n = _Keys(), v.shape[1]
      out = _layer(model, l)(torch.cat([v, t], dim=1), attention_mask=s.all_mask,
                             position_embeddings=s.all_rope,
                             position_ids=torch.cat([s.vis_pos, s.text_pos], dim=1), cache=keys)
      k, val = keys.new
      lc.vis_k, lc.vis_v = k[:, :, :n], val[:, :, :n]
      t_sa, v_sa, k_sa, val_sa = out[:, n:], out[:, :n], k[:, :, n:], val[:, :, n:]
      if all_on:
        t, v, lc.text_k, lc.text_v = t_sa, v_sa, k_sa, val_sa
      else:
        t, v = _pick(bits, t_sa, t_text), _pick(bits, v_sa, v)
        lc.text_k, lc.text_v = _pick(bits, k_sa, lc.text_k), _pick(bits, val_sa, lc.text_v)
    else:
      t = t_text
    caches.append(lc)
  return t, v


@torch.no_grad()
def prefill(model, x: dict[str, Tensor], budget: Tensor | None, v: Tensor,
            threshold: Any = None) -> tuple[Tensor, Cache]:
  """The prompt once: (final-normed hidden state of each sample's last text token float[B, D],
  the cache). `budget` None: the router picks it mid-prefill, as `hidden_states` does."""
  lm = model.llava.model.language_model
  t = lm.embed_tokens(x["tokens"])
  s = model._streams(x, t)
  b, num_layers = t.shape[0], model.num_layers
  caches: list[LayerCache] = []
  if budget is None:
    if model.visor.router is None:
      raise ValueError("budget=None needs a router (the export has no visor.router); pass a "
                       "bool[B, L] budget.")
    first = min(model.layout.sa_candidates)
    none = torch.zeros(b, num_layers, dtype=torch.bool, device=t.device)
    t, v = _prefill_layers(model, t, v, s, none, 0, first, caches)
    routing = t[torch.arange(b, device=t.device), last_valid_index(x["text_valid"])]
    k = choose(model.visor.router(routing),
               model.layout.threshold if threshold is None else threshold)
    budget = model.visor.table[k]
    t, _ = _prefill_layers(model, t, v, s, budget, first, num_layers, caches)
  else:
    t, _ = _prefill_layers(model, t, v, s, budget, 0, num_layers, caches)
  last = last_valid_index(x["text_valid"])
  hidden = lm.norm(t)[torch.arange(b, device=t.device), last]
  positions = torch.cat([torch.where(x["vis_valid"], x["vis_pos"], -1),
                         torch.where(x["text_valid"], x["text_pos"], -1)], dim=1)
  return hidden, Cache(caches, budget, x["text_valid"], x["vis_valid"],
                       positions.max(dim=1).values + 1)


@torch.no_grad()
def decode_step(model, cache: Cache, token: Tensor) -> Tensor:
  """One token per sample (long[B]) at `cache.next_pos` through every layer; extends the
  cache in place; returns the final-normed hidden state float[B, D]."""
  lm = model.llava.model.language_model
  h = lm.embed_tokens(token[:, None])
  pos = cache.next_pos[:, None]
  rope = lm.rotary_emb(h, pos)
  ones = torch.ones_like(cache.text_valid[:, :1])
  text_valid = torch.cat([cache.text_valid, ones], dim=1)
  # The new token comes after everything: it sees every valid key (and, through CA, every
  # valid visual token).
  text_mask = additive(text_valid[:, None, None, :], h.dtype)
  all_mask = additive(torch.cat([cache.vis_valid, text_valid], dim=1)[:, None, None, :], h.dtype)
  ca_mask = cache.vis_valid[:, None, None, :]
  for l, lc in enumerate(cache.layers):
    bits = cache.budget[:, l]
    if lc.vis_k is None or not bool(bits.all()):  # some sample takes the text path
      h_in = h if lc.ca_k is None else h + model.visor.cross_attn[str(l)].attend(
          h, lc.ca_k, lc.ca_v, ca_mask)
      keys = _Keys(lc.text_k, lc.text_v)
      h_text = _layer(model, l)(h_in, attention_mask=text_mask, position_embeddings=rope,
                                position_ids=pos, cache=keys)
      new_text = keys.new
    if lc.vis_k is not None:  # some sample runs SA
      keys = _Keys(torch.cat([lc.vis_k, lc.text_k], dim=2), torch.cat([lc.vis_v, lc.text_v], 2))
      h_sa = _layer(model, l)(h, attention_mask=all_mask, position_embeddings=rope,
                              position_ids=pos, cache=keys)
      if bool(bits.all()):
        h, new = h_sa, keys.new
      else:
        h = _pick(bits, h_sa, h_text)
        new = tuple(_pick(bits, a, b) for a, b in zip(keys.new, new_text))
    else:
      h, new = h_text, new_text
    lc.text_k = torch.cat([lc.text_k, new[0]], dim=2)
    lc.text_v = torch.cat([lc.text_v, new[1]], dim=2)
  cache.text_valid = text_valid
  cache.next_pos = cache.next_pos + 1
  return lm.norm(h)[:, 0]
