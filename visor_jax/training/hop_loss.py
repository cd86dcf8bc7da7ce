"""The hop loss: an auxiliary training signal that teaches the first self-attention layers to
copy each page cell's upper and left neighbours into the cell's own visual token.

WHY (docs/pages_dataset.md, "The relation curriculum"): "What digit is below the blue
circle?" needs two steps, a positional hop among visual tokens (the answer cell's token
learns "a marker is above me") and a content lookup from the text (find that token, read its
digit). The lookup has no gradient until the hop exists and the hop none until the lookup
does, and in every arrangement tried the relation families stayed at chance for thousands of
steps. Supervising the hop directly breaks the loop: with this loss and the sparse-page
curriculum the all-SA model answered "below" questions on full pages at 1.00 (n = 48) after
~2,000 steps; the same curriculum without it was still at 0.25 on pages with four digits.

A linear head (`model.visor.hop_head`: two D x D maps, training only, never exported) reads
each cell's visual hidden state after layers [0, K) and predicts the input embeddings of its
upper and left neighbours (cosine loss, targets stop-gradient). Self-attention is causal by
position, so those are exactly the neighbours a token can see: the cell above comes grid + 1
tokens earlier (AnyRes ends each row with a newline token), the cell left one token earlier.
Parameter-free variants did not work (scratch runs, same curriculum, "below" accuracy on pages
with four white digits): the update of the cell's token regressed onto the neighbours'
embeddings 0.17, onto the upper one's centred embedding 0.33, against 0.96 with the head.
Samples whose budget runs no SA layer in [0, K) are left out: their visual tokens are never
updated (CA reads them as they are), which is what makes the interaction family need SA.

The token layout is the `pages` geometry's (one base token, then each row's `grid` cells and
a newline: `pages.visual_token`), so the loss is for pages data only (`spec` refuses it
elsewhere).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from visor_jax.models.llava_onevision import INPUT_KEYS, validate_inputs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Spec:
  weight: float   # added to the token loss
  layers: int     # K: the hop is read from the visual stream after layers [0, K)
  grid: int       # page cells per side (the token layout)


def spec(config) -> Spec | None:
  """The hop loss a training config asks for (`config.hop_loss`), or None (weight 0)."""
  h = config.get("hop_loss")
  if h is None or not h.weight:
    return None
  if config.data.source != "pages":
    raise ValueError("hop_loss: the loss reads the pages token layout; data.source is "
                     f"{config.data.source!r}, expected 'pages' (or hop_loss.weight=0).")
  if config.get("visor_tr_keep", 1.0) != 1.0:
    raise ValueError("hop_loss and visor_tr_keep do not combine: pooled visual tokens no "
                     "longer follow the page layout.")
  return Spec(float(h.weight), int(h.layers), int(config.data.pages_grid))


def neighbour_table(grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(cell tokens int[C], their upper / left neighbours' tokens int[C, 2], which exist
  bool[C, 2]) for a `grid` x `grid` page; C = grid²."""
  r, c = np.divmod(np.arange(grid * grid), grid)
  cells = 1 + r * (grid + 1) + c
  neighbours = np.stack([cells - (grid + 1), cells - 1], axis=1)
  exists = np.stack([r > 0, c > 0], axis=1)
  return cells, np.where(exists, neighbours, 0), exists


def hop_cosine(vis_embed: Array, vis_out: Array, head: Array, use: Array, grid: int) -> Array:
  """Mean over the used samples' cells and their existing neighbours of
  1 - cos(head_k(cell's hidden state), neighbour k's input embedding), k = upper, left.

  vis_embed float[B, N, D]: the packed visual tokens (the targets, stop-gradient); vis_out
  float[B, N, D]: the visual stream leaving layer K-1; head float[2, D, D]; use bool[B].
  """
  cells, neighbours, exists = neighbour_table(grid)
  pred = jnp.einsum("bcd,kde->bcke", vis_out[:, cells].astype(jnp.float32),
                    head.astype(jnp.float32))                                   # [B, C, 2, D]
  target = jax.lax.stop_gradient(vis_embed[:, neighbours].astype(jnp.float32))  # [B, C, 2, D]
  # Norms stay differentiable at zero (0 x NaN would poison a masked sample's gradient).
  norm = lambda x: jnp.sqrt(jnp.sum(x * x, axis=-1) + 1e-12)
  cos = jnp.sum(pred * target, axis=-1) / (norm(pred) * norm(target))
  weight = use[:, None, None] & jnp.asarray(exists)[None]
  return jnp.sum((1 - cos) * weight) / jnp.maximum(jnp.sum(weight), 1)


def forward(model, inputs, budget: Array, layers: int, grid: int) -> tuple[Array, Array]:
  """(logits float32[B, T, V], hop loss) at a fixed `budget`: the model's own forward, with
  the visual stream after layers [0, `layers`) read on the way (`VisorDecoder.run_budget`)."""
  head = model.decoder.hop_head
  if head is None:
    raise ValueError("hop_loss: the model has no hop head; set model.visor.hop_head=True in "
                     "the run that creates the model (later runs inherit it).")
  inputs = {k: inputs[k] for k in INPUT_KEYS}
  validate_inputs(model.cfg, inputs, budget)
  text, vis_embed = model.streams(inputs)
  hidden, vis = model.decoder.run_budget(
      text, vis_embed, inputs["text_pos"], inputs["vis_pos"], inputs["text_valid"],
      inputs["vis_valid"], budget, visual_after=layers)
  use = jnp.any(budget[:, :layers], axis=-1)
  return model.logits(hidden), hop_cosine(vis_embed, vis, head[...], use, grid)
