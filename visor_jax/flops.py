"""Forward-pass FLOPs per budget: an analytic count, an XLA cross-check, and a CLI table.

Why: VISOR's claim is a compute saving, and the method note insists on reporting the LLM's
saving *and* the end-to-end one (the SigLIP tower is ~70% of LLaVA-OV 0.5B's prefill at
2304²). The counts here are exactly what the compiled prefill computes:

  * every matmul costs 2·m·k·n;
  * attention is dense over its whole masked score matrix (`jax.nn.dot_product_attention`
    computes all T×S scores, masked or not): QKᵀ and AV cost 2·T·S·N·H each;
  * elementwise work (norms, softmax, RoPE, GELU/SiLU, masks) is not counted; XLA, which
    counts it, reports 1-1.5% more on the width-256 model of tests/test_flops.py, and less
    at LLaVA-OV widths;
  * the depthwise positional conv counts its 2·k MACs per element (it is a convolution).

Breakdown (`forward_flops`), per sample:

  vision     patch embedding + the tower's layers up to the feature layer, × crops
  projector  Linear-GELU-Linear on every crop's patches + the AnyRes bilinear packing
  llm_text   the text-only block (attention + MLP over the T text tokens) of every layer whose
             SA bit is off, CA layers included (their host block is text-only)
  llm_sa     the full layer over [V; T] of every layer whose SA bit is on
  llm_ca     the cross-attention module of every CA layer whose SA bit is off (a CA layer
             whose bit is on runs SA instead: models/visor.py)
  pos_conv   the conditional positional conv over V (VISOR models only)
  lm_head    logits for all T text positions
  llm        llm_text + llm_sa + llm_ca + pos_conv + lm_head   (lm_head included: it is part
             of the prefill the LLM runs; it is 0.2% of LLaVA-OV 0.5B's LLM at 2304²)
  total      llm + vision + projector

Not counted: the router (an MLP on one token per sample, under a MFLOP), the embedding
lookup and the AnyRes gather (no arithmetic).

Run: python -m visor_jax.flops --config=configs/llava_ov_0_5b.py [--image_size=2304x2304]
     [--text_len=64]
"""
from __future__ import annotations

import dataclasses
from typing import Sequence


from visor_jax import budgets
from visor_jax.config_lib import ModelConfig, TextConfig, VisionConfig
from visor_jax.data import anyres

TABLE_SA_COUNTS = (0, 1, 2, 4, 8)


# ---------------------------------------------------------------------------------------------
# Token counts.

def image_tokens(cfg: ModelConfig, image_hw: tuple[int, int]) -> tuple[int, int]:
  """(crops, visual tokens) our AnyRes packing gives one image of size (height, width).

  E.g. 2304×2304 at LLaVA-OV geometry: 37 crops (base + 6×6), 7,371 tokens (down-sampled to
  ~9 crops' worth, plus row newlines).
  """
  v = cfg.vision
  crops = anyres.num_crops(image_hw, crop_size=v.image_size,
                           grid_pinpoints=cfg.image_grid_pinpoints)
  plan = anyres.pack_plan(image_hw, crop_size=v.image_size, patch_size=v.patch_size,
                          grid_pinpoints=cfg.image_grid_pinpoints,
                          vision_aspect_ratio=cfg.vision_aspect_ratio)
  return crops, plan.num_tokens


# ---------------------------------------------------------------------------------------------
# Per-module counts.

def _mm(m: float, k: float, n: float) -> float:
  """One [m, k] @ [k, n] matmul."""
  return 2.0 * m * k * n


def vision_depth(cfg: ModelConfig) -> int:
  """Tower layers actually run: up to the deepest requested feature layer (siglip.py)."""
  total = cfg.vision.num_layers + 1
  return max(i % total for i in cfg.feature_layers)


def siglip_layer_flops(v: VisionConfig) -> float:
  """One pre-LN encoder layer on one crop of P patches."""
  p, d, f = v.num_patches, v.hidden_size, v.intermediate_size
  return 4 * _mm(p, d, d) + 2 * _mm(p, p, d) + _mm(p, d, f) + _mm(p, f, d)


def vision_flops_per_crop(cfg: ModelConfig) -> float:
  v = cfg.vision
  patch_embed = _mm(v.num_patches, v.patch_size ** 2 * v.num_channels, v.hidden_size)
  return patch_embed + vision_depth(cfg) * siglip_layer_flops(v)


def projector_flops(cfg: ModelConfig, num_crops: int, num_visual: int) -> float:
  """Projector on every crop's patches, then the 4-tap bilinear packing (an einsum)."""
  d_feat = cfg.vision.hidden_size * len(cfg.feature_layers)
  d = cfg.text.hidden_size
  rows = num_crops * cfg.vision.num_patches
  return _mm(rows, d_feat, d) + _mm(rows, d, d) + _mm(num_visual, anyres.NUM_TAPS, d)


def qwen2_layer_flops(t: TextConfig, num_tokens: int) -> float:
  """One decoder layer self-attending over `num_tokens` tokens (dense S×S scores)."""
  s, d = num_tokens, t.hidden_size
  q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
  proj = _mm(s, d, q) + 2 * _mm(s, d, kv) + _mm(s, q, d)
  scores = 2 * _mm(s, s, q)                      # QKᵀ and AV, every query head
  mlp = 3 * _mm(s, d, t.intermediate_size)
  return proj + scores + mlp


def cross_attention_flops(t: TextConfig, num_text: int, num_visual: int) -> float:
  """CA module: text queries, visual keys/values, dense T×N scores: O(N_t·N_v·d)."""
  d = t.hidden_size
  q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
  return (_mm(num_text, d, q) + 2 * _mm(num_visual, d, kv)
          + 2 * _mm(num_text, num_visual, q) + _mm(num_text, q, d))


def pos_conv_flops(cfg: ModelConfig, num_visual: int) -> float:
  """Depthwise conv (2·k per element) + pointwise d×d matmul over the visual tokens."""
  if not cfg.visor.pos_conv:
    return 0.0
  d = cfg.text.hidden_size
  return 2.0 * cfg.visor.pos_conv_kernel * num_visual * d + _mm(num_visual, d, d)


# ---------------------------------------------------------------------------------------------
# The whole forward.

def forward_flops(cfg: ModelConfig, *, num_crops: int, num_visual: int, num_text: int,
                  sa_layers: Sequence[int]) -> dict[str, float]:
  """Prefill FLOPs of one sample under the budget "these layers run SA" (see module doc)."""
  t = cfg.text
  sa = {int(i) for i in sa_layers}
  if any(not 0 <= i < t.num_layers for i in sa):
    raise ValueError(f"sa_layers: {sorted(sa)} has layers outside [0, {t.num_layers}).")
  n_text_only = t.num_layers - len(sa)
  n_ca = sum(1 for i in cfg.visor.ca_layers if i not in sa)
  out = dict(
      vision=num_crops * vision_flops_per_crop(cfg),
      projector=projector_flops(cfg, num_crops, num_visual),
      llm_text=n_text_only * qwen2_layer_flops(t, num_text),
      llm_sa=len(sa) * qwen2_layer_flops(t, num_visual + num_text),
      llm_ca=n_ca * cross_attention_flops(t, num_text, num_visual),
      pos_conv=pos_conv_flops(cfg, num_visual),
      lm_head=_mm(num_text, t.hidden_size, t.vocab_size),
  )
  out["llm"] = sum(out[k] for k in ("llm_text", "llm_sa", "llm_ca", "pos_conv", "lm_head"))
  out["total"] = out["llm"] + out["vision"] + out["projector"]
  return out


def llava_ov_config(cfg: ModelConfig) -> ModelConfig:
  """The original LLaVA-OV: no CA modules, no positional conv (the baseline of every ratio)."""
  visor = dataclasses.replace(cfg.visor, ca_layers=(), sa_candidates=(), pos_conv=False)
  return dataclasses.replace(cfg, visor=visor)


def llava_ov_flops(cfg: ModelConfig, *, num_crops: int, num_visual: int,
                   num_text: int) -> dict[str, float]:
  """LLaVA-OV's own prefill: every layer self-attends over [V; T]."""
  return forward_flops(llava_ov_config(cfg), num_crops=num_crops, num_visual=num_visual,
                       num_text=num_text, sa_layers=range(cfg.num_layers))


# ---------------------------------------------------------------------------------------------
# XLA cross-check.

def counted_attention(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with the 'xla' attention: the blockwise and splash kernels loop over blocks, and XLA's
  cost analysis counts a loop body once; 'xla' does the same matmuls in one op each."""
  return dataclasses.replace(cfg, attention_impl="xla")


def xla_forward_flops(cfg: ModelConfig, *, num_crops: int, num_visual: int, num_text: int,
                      sa_layers: Sequence[int]) -> float:
  """`cost_analysis()['flops']` of the compiled forward under a STATIC budget.

  Nothing is materialised: parameters come from `nnx.eval_shape` and inputs are
  `ShapeDtypeStruct`s, so this works at any size (compiling costs time, not memory).

  XLA's HloCostAnalysis counts a while loop's body ONCE (checked on jax 0.10.2: a 6-step
  `lax.scan` of a matmul reports one matmul's FLOPs). Hence:
    * the forward runs with `unroll=True` and the budget closed over as a constant:
      `VisorDecoder.run_layers` unrolls the LLM layers in Python and drops the off paths (one
      program per budget);
    * the SigLIP tower is a `lax.scan` we cannot unroll from here, so this function requires a
      depth-1 tower (the per-layer formula is the same at any depth).
  Counted by XLA but not by `forward_flops`: elementwise ops (norms, softmax, masks, RoPE,
  activations), each 1 flop per element.
  """
  import jax
  from flax import nnx

  from visor_jax.models.llava_onevision import LlavaOnevision, abstract_inputs

  if vision_depth(cfg) > 1:
    raise ValueError(f"xla_forward_flops: the vision tower runs {vision_depth(cfg)} layers in a "
                     "lax.scan, whose body XLA's cost analysis counts once; use a config with "
                     "vision.num_layers=1 (or feature_layer=1).")
  cfg = counted_attention(cfg)
  model = nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  budget = budgets.mask(cfg, sa_layers, batch=1)  # a constant of the program, not an argument
  inputs = abstract_inputs(cfg, 1, num_text, num_crops, num_visual)
  forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, budget, unroll=True))
  cost = forward.lower(state, inputs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


# ---------------------------------------------------------------------------------------------
# Token reduction (models/token_reduction.py): every layer at its kept visual-token count.

def reduction_ranking_flops(cfg: ModelConfig, reduction, *, num_visual: int, num_text: int,
                            kept: Sequence[int]) -> float:
  """The ranking's own matmuls (what `token_reduction.reduced_forward` adds to the layers):

    FastV        the ranking token's query in layer K-1 and its scores over that layer's keys
                 (the keys are the layer's own, already counted)
    PyramidDrop  per boundary b: one query, the keys of all S tokens with layer b's k_proj,
                 one row of scores
    VisionZip    layer 0's queries for the T text tokens, keys for all N + T tokens, T×S
                 scores, their mean over the queries; then key similarity to the C contextual
                 targets (N×C×head_dim) and the group sums (C×N×D)
    VISOR-TR     none (pooling is additions: elementwise, not counted)
  Sorting (top-k) is not arithmetic and is not counted.
  """
  from visor_jax.models import token_reduction as tr
  t, method = cfg.text, reduction.method
  d, h = t.hidden_size, t.head_dim
  q, kv = t.num_heads * h, t.num_kv_heads * h
  one_query = lambda s: _mm(1, d, q) + 2.0 * s * q   # projection + one row of QKᵀ
  if method == "fastv":
    return one_query(kept[reduction.layer - 1] + num_text)
  if method == "pyramiddrop":
    return sum(one_query(kept[b - 1] + num_text) + _mm(kept[b - 1] + num_text, d, kv)
               for b in reduction.stage_layers(cfg.num_layers))
  if method == "visionzip":
    s = num_visual + num_text
    c = tr.contextual_count(kept[0], num_visual, reduction.contextual)
    return (_mm(num_text, d, q) + _mm(s, d, kv) + 2.0 * num_text * s * q + _mm(1, num_text, s)
            + _mm(num_visual, h, c) + _mm(c, num_visual, d))
  return 0.0


def reduced_forward_flops(cfg: ModelConfig, *, num_crops: int, num_visual: int, num_text: int,
                          reduction, kept: Sequence[int] | None = None,
                          sa_layers: Sequence[int] | None = None) -> dict[str, float]:
  """Prefill FLOPs of one sample under a token `reduction`: `forward_flops`' keys, each LLM
  layer counted at its kept visual-token count, plus 'ranking' (inside 'llm').

  kept: valid visual tokens per layer (length L), e.g. a row of `reduced_forward`'s `kept`;
  default: what the method promises (`token_reduction.kept_counts`; VISOR-TR needs it given, its
  count depends on the rows). sa_layers: VISOR-TR's budget (default every layer); the peers run
  on the all-SA base. The vision tower, projector and positional conv see all `num_visual`
  tokens (every method reduces after them).
  """
  from visor_jax.models import token_reduction as tr
  t, n_layers = cfg.text, cfg.num_layers
  reduction.check(cfg)
  if reduction.method != "visor_tr" and sa_layers is not None and \
      sorted(int(i) for i in sa_layers) != list(range(n_layers)):
    raise ValueError(f"{reduction.label}: the peers run on the all-SA base; sa_layers must be "
                     "None or every layer.")
  sa = set(range(n_layers)) if sa_layers is None else {int(i) for i in sa_layers}
  if any(not 0 <= i < n_layers for i in sa):
    raise ValueError(f"sa_layers: {sorted(sa)} has layers outside [0, {n_layers}).")
  kept = (tr.kept_counts(cfg, reduction, num_visual) if kept is None
          else [int(k) for k in kept])
  if len(kept) != n_layers:
    raise ValueError(f"kept: {len(kept)} counts for {n_layers} layers.")
  out = dict(
      vision=num_crops * vision_flops_per_crop(cfg),
      projector=projector_flops(cfg, num_crops, num_visual),
      llm_text=sum(qwen2_layer_flops(t, num_text) for l in range(n_layers) if l not in sa),
      llm_sa=sum(qwen2_layer_flops(t, kept[l] + num_text) for l in sorted(sa)),
      llm_ca=sum(cross_attention_flops(t, num_text, kept[l]) for l in cfg.visor.ca_layers
                 if l not in sa),
      pos_conv=pos_conv_flops(cfg, num_visual),
      lm_head=_mm(num_text, t.hidden_size, t.vocab_size),
      ranking=reduction_ranking_flops(cfg, reduction, num_visual=num_visual, num_text=num_text,
                                      kept=kept),
  )
  out["llm"] = sum(out[k] for k in ("llm_text", "llm_sa", "llm_ca", "pos_conv", "lm_head",
                                    "ranking"))
  out["total"] = out["llm"] + out["vision"] + out["projector"]
  return out


def xla_reduced_forward_flops(cfg: ModelConfig, *, num_crops: int, num_visual: int,
                              num_text: int, reduction, sa_layers: Sequence[int] | None = None,
                              capacity: int | None = None) -> float:
  """`cost_analysis()['flops']` of the jitted, gathered reduced forward (one sample, all its
  tokens valid), like `xla_forward_flops` (depth-1 tower; the LLM is unrolled). VISOR-TR runs
  at `sa_layers` (default every layer) with `capacity` visual slots (default
  ceil(keep * num_visual)): compare with `reduced_forward_flops(..., kept=[capacity] * L)`."""
  import jax
  from flax import nnx

  from visor_jax.models import token_reduction as tr
  from visor_jax.models.llava_onevision import LlavaOnevision, abstract_inputs

  if vision_depth(cfg) > 1:
    raise ValueError(f"xla_reduced_forward_flops: the vision tower runs {vision_depth(cfg)} "
                     "layers in a lax.scan (counted once by XLA); use a depth-1 tower.")
  cfg = counted_attention(cfg)
  model = nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  budget = None
  if reduction.method == "visor_tr":
    budget = budgets.mask(cfg, range(cfg.num_layers) if sa_layers is None else sa_layers, 1)
    capacity = capacity or tr.keep_count(num_visual, reduction.keep)
  inputs = abstract_inputs(cfg, 1, num_text, num_crops, num_visual)
  forward = jax.jit(lambda st, x: tr.reduced_forward(
      nnx.merge(graphdef, st), x, reduction, budget, capacity=capacity, unroll=True).logits)
  cost = forward.lower(state, inputs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


# ---------------------------------------------------------------------------------------------
# CLI table.

def saving_table(cfg: ModelConfig, image_hw: tuple[int, int], num_text: int,
                 sa_counts: Sequence[int] = TABLE_SA_COUNTS) -> list[dict]:
  """Rows: LLaVA-OV (every layer SA), then VISOR with k SA layers (`budgets.spread_layers`).

  k larger than the number of candidates is skipped.
  """
  crops, visual = image_tokens(cfg, image_hw)
  shape = dict(num_crops=crops, num_visual=visual, num_text=num_text)
  base = llava_ov_flops(cfg, **shape)
  rows = [dict(name=f"LLaVA-OV (all {cfg.num_layers} SA)", layers=list(range(cfg.num_layers)),
               flops=base)]
  for k in sa_counts:
    if k > len(cfg.visor.sa_candidates):
      continue
    layers = budgets.spread_layers(cfg.visor.sa_candidates, k)
    rows.append(dict(name=f"VISOR {k} SA", layers=layers,
                     flops=forward_flops(cfg, sa_layers=layers, **shape)))
  for row in rows:
    row["llm_saving"] = base["llm"] / row["flops"]["llm"]
    row["total_saving"] = base["total"] / row["flops"]["total"]
  return rows


def _unit(flops: float) -> tuple[str, float]:
  """The largest of T/G/M FLOPs that keeps the number >= 1 (tiny models print readably)."""
  for name, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if flops >= scale:
      return name, scale
  return "", 1.0


def format_table(cfg: ModelConfig, image_hw: tuple[int, int], num_text: int) -> str:
  crops, visual = image_tokens(cfg, image_hw)
  rows = saving_table(cfg, image_hw, num_text)
  base = rows[0]["flops"]
  unit, scale = _unit(base["total"])
  vision = base["vision"] + base["projector"]
  lines = [
      f"Image {image_hw[0]}x{image_hw[1]}: {crops} crops, {visual} visual tokens; "
      f"{num_text} text tokens.",
      f"Vision tower + projector: {vision / scale:.3f} {unit}FLOPs, "
      f"{vision / base['total']:.0%} of LLaVA-OV's prefill. "
      "LLM = text-only + SA + CA layers + positional conv + lm head over the text tokens.",
      "VISOR rows: k SA layers spread over the candidates (budgets.spread_layers); "
      f"candidates {list(cfg.visor.sa_candidates)}, CA layers {list(cfg.visor.ca_layers)}.",
      "",
      f"{'budget':<22} {'SA layers':<26} {'LLM ' + unit + 'FLOPs':>11} "
      f"{'total ' + unit + 'FLOPs':>13} {'LLM saving':>10} {'total saving':>12}",
  ]
  for row in rows:
    layers = ("all" if len(row["layers"]) == cfg.num_layers
              else ",".join(map(str, row["layers"])) or "-")
    f = row["flops"]
    lines.append(f"{row['name']:<22} {layers:<26} {f['llm'] / scale:>11.3f} "
                 f"{f['total'] / scale:>13.3f} {row['llm_saving']:>9.2f}x "
                 f"{row['total_saving']:>11.2f}x")
  return "\n".join(lines)


def parse_image_size(text: str) -> tuple[int, int]:
  """'2304' or '2304x1536' (height x width)."""
  parts = text.lower().split("x")
  if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f"--image_size={text!r}: expected 'S' or 'HxW' in pixels.")
  h, w = int(parts[0]), int(parts[-1])
  if h <= 0 or w <= 0:
    raise ValueError(f"--image_size={text!r}: sides must be positive.")
  return h, w


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags

  from visor_jax import config_lib
  cfg = config_lib.model_config(flags.FLAGS.config.model)
  text_len = flags.FLAGS.text_len
  if text_len <= 0:
    raise ValueError(f"--text_len={text_len} must be positive.")
  print(format_table(cfg, parse_image_size(flags.FLAGS.image_size), text_len))


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file whose get_config() has .model.",
                                  lock_config=True)
  flags.DEFINE_string("image_size", "2304x2304", "Image size 'S' or 'HxW' in pixels.")
  flags.DEFINE_integer("text_len", 64, "Number of text tokens.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main)
