"""transformers `LlavaOnevisionConfig` (config.json) ↔ our `config.model` ConfigDict.

Only the architecture travels; VISOR's layer sets are ours and come from the experiment config
(they are kept under a `visor` key when we export).
"""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from visor_jax import model_configs, paths


def _require(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(msg)


def _rope_theta(text: dict) -> float:
  params = text.get("rope_parameters") or {}
  rope_type = params.get("rope_type", (text.get("rope_scaling") or {}).get("rope_type", "default"))
  _require(rope_type == "default",
           f"config.json text_config rope_type={rope_type!r}: only default RoPE is supported.")
  return float(params.get("rope_theta", text.get("rope_theta", 10000.0)))


def from_hf_dict(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """config.json contents → `config.model` (VISOR layer sets at their defaults)."""
  _require(hf.get("model_type") == "llava_onevision",
           f"config.json model_type={hf.get('model_type')!r}: expected 'llava_onevision'.")
  v, t = hf["vision_config"], hf["text_config"]
  _require(v.get("model_type", "siglip_vision_model") == "siglip_vision_model",
           f"config.json vision_config.model_type={v.get('model_type')!r}: expected SigLIP.")
  _require(v.get("hidden_act", "gelu_pytorch_tanh") == "gelu_pytorch_tanh",
           f"config.json vision_config.hidden_act={v.get('hidden_act')!r} is not supported.")
  _require(t.get("model_type", "qwen2") == "qwen2",
           f"config.json text_config.model_type={t.get('model_type')!r}: expected qwen2.")
  _require(t.get("hidden_act", "silu") == "silu",
           f"config.json text_config.hidden_act={t.get('hidden_act')!r} is not supported.")
  _require(not t.get("use_sliding_window", False),
           "config.json text_config.use_sliding_window=true is not supported.")
  _require(hf.get("projector_hidden_act", "gelu") == "gelu",
           f"config.json projector_hidden_act={hf.get('projector_hidden_act')!r}: expected gelu.")
  m = model_configs.llava_ov_0_5b()
  m.vision.update(dict(
      image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
      intermediate_size=v["intermediate_size"], num_layers=v["num_hidden_layers"],
      num_heads=v["num_attention_heads"], layer_norm_eps=v.get("layer_norm_eps", 1e-6)))
  m.text.update(dict(
      vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
      intermediate_size=t["intermediate_size"], num_layers=t["num_hidden_layers"],
      num_heads=t["num_attention_heads"],
      num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
      head_dim=t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"],
      rms_norm_eps=t.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(t),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings") or t.get("tie_word_embeddings"))))
  fl = hf.get("vision_feature_layer", -1)
  m.feature_layer = fl if isinstance(fl, int) else tuple(fl)
  m.feature_select_strategy = hf.get("vision_feature_select_strategy", "full")
  m.projector_bias = hf.get("multimodal_projector_bias", True)
  m.image_token_id = hf.get("image_token_index", hf.get("image_token_id", 151646))
  if hf.get("image_grid_pinpoints"):
    m.image_grid_pinpoints = [list(p) for p in hf["image_grid_pinpoints"]]
  m.vision_aspect_ratio = hf.get("vision_aspect_ratio", "anyres_max_9")
  if "visor" in hf:  # written by our exporter: the VISOR layout and the router
    visor = dict(hf["visor"])
    router = visor.pop("router", None)
    m.visor.update(visor)
    if router:
      m.router.update(router)
  return m


def is_visor_export(directory: str) -> bool:
  """True for a directory written by `visor_jax.export` (its VISOR tensors must be loaded
  from `visor.*`, not initialised as for a plain LLaVA-OV checkpoint)."""
  path = paths.join(directory, "config.json")
  if not paths.exists(path):
    return False
  return "visor" in json.loads(paths.read_text(path))


def read_hf_config(directory: str) -> ml_collections.ConfigDict:
  path = paths.join(directory, "config.json")
  if not paths.exists(path):
    raise FileNotFoundError(f"{directory}: no config.json (not a transformers model directory).")
  return from_hf_dict(json.loads(paths.read_text(path)))


def to_hf_dict(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.model` → a config.json dict that transformers' LlavaOnevisionConfig accepts."""
  v, t = m.vision, m.text
  head_dim = t.head_dim or t.hidden_size // t.num_heads
  fl = m.feature_layer if isinstance(m.feature_layer, int) else list(m.feature_layer)
  return {
      "architectures": ["LlavaOnevisionForConditionalGeneration"],
      "model_type": "llava_onevision",
      "vision_config": {
          "model_type": "siglip_vision_model", "image_size": v.image_size,
          "patch_size": v.patch_size, "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
          "num_attention_heads": v.num_heads, "layer_norm_eps": v.layer_norm_eps,
          "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False},
      "text_config": {
          "model_type": "qwen2", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
          "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
          "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads,
          "head_dim": head_dim, "rms_norm_eps": t.rms_norm_eps,
          "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
          "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": "silu",
          "use_sliding_window": False},
      "tie_word_embeddings": t.tie_word_embeddings,
      "image_token_index": m.image_token_id,
      "image_grid_pinpoints": [list(p) for p in m.image_grid_pinpoints],
      "vision_aspect_ratio": m.vision_aspect_ratio,
      "vision_feature_layer": fl,
      "vision_feature_select_strategy": "full",
      "multimodal_projector_bias": m.projector_bias,
      "projector_hidden_act": "gelu",
  }
