"""Model geometries as `config.model` ConfigDicts: tiny (tests), LLaVA-OV 0.5B and 7B.

The full-size shapes are those of transformers' `llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf`
configs. VISOR's layer sets default to `None`, meaning "spread uniformly": cross-attention on
every third layer from layer 0, self-attention candidates every third layer from layer 1
(L/3 of each, disjoint; see `config_lib.model_config`).
"""
import ml_collections

# (height, width) resolutions AnyRes may tile an image into: 1..6 crops per side.
def pinpoints(crop: int, max_side: int = 6) -> list[list[int]]:
  return [[crop * i, crop * j] for i in range(1, max_side + 1) for j in range(1, max_side + 1)]


def _visor(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      ca_layers=None, ca_every=3, ca_offset=0,
      sa_candidates=None, sa_every=3, sa_offset=1,
      ca_gate="zero_out", ca_init="copy_self_attn", pos_conv=True, pos_conv_kernel=7,
      hop_head=False))   # training/hop_loss.py's head (training only, never exported)
  c.update(overrides)
  return c


def _model(vision: dict, text: dict, **kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      vision={"layer_norm_eps": 1e-6, **vision},
      text={"head_dim": None, "rms_norm_eps": 1e-6, "rope_theta": 1e6, **text},
      visor=_visor(),
      router=dict(feasible=None, hidden=256, threshold=0.5),
      feature_layer=-1, feature_select_strategy="full", projector_bias=True,
      image_token_id=151646, image_grid_pinpoints=pinpoints(384),
      vision_aspect_ratio="anyres_max_9",
      dtype="float32", param_dtype="float32", remat=False,
      # None = 'xla'; a typed placeholder so --config.model.attention_impl=blockwise overrides it
      attention_impl=ml_collections.config_dict.placeholder(str)))
  c.update(kw)
  return c


def llava_ov_0_5b() -> ml_collections.ConfigDict:
  return _model(
      vision=dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                  num_layers=26, num_heads=16),
      text=dict(vocab_size=152000, hidden_size=896, intermediate_size=4864, num_layers=24,
                num_heads=14, num_kv_heads=2, tie_word_embeddings=True))


def llava_ov_7b() -> ml_collections.ConfigDict:
  return _model(
      vision=dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                  num_layers=26, num_heads=16),
      text=dict(vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_layers=28,
                num_heads=28, num_kv_heads=4, tie_word_embeddings=False))


def tiny() -> ml_collections.ConfigDict:
  """A few-hundred-kilo-parameter model with every structural feature of the real one.

  Crops are 28 px of 14 px patches (2x2 tokens per crop), AnyRes up to 3x3 crops and
  `anyres_max_4`, so multi-crop packing, unpadding and bilinear down-sampling all occur on
  small images. Six LLM layers: CA on {0, 3}, SA candidates {1, 4}.
  """
  return _model(
      vision=dict(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=2),
      text=dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=6,
                num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
      image_token_id=300, image_grid_pinpoints=pinpoints(28, 3),
      vision_aspect_ratio="anyres_max_4")


def small() -> ml_collections.ConfigDict:
  """The embedded CPU default: trains from scratch on the synthetic dataset in minutes.

  56 px crops of 14 px patches (4x4 tokens per crop), AnyRes up to 3x3 crops, `anyres_max_4`
  (at most ~90 visual tokens); a 6-layer, 128-wide LLM with CA on {0, 3} and SA candidates
  {1, 4}; vocabulary sized for the synthetic tokenizer (300 BPE ids + 4 special tokens).
  """
  return _model(
      vision=dict(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=2),
      text=dict(vocab_size=320, hidden_size=128, intermediate_size=256, num_layers=6,
                num_heads=4, num_kv_heads=2, tie_word_embeddings=True, rope_theta=1e4),
      image_token_id=300, image_grid_pinpoints=pinpoints(56, 3),
      vision_aspect_ratio="anyres_max_4")


def pages() -> ml_collections.ConfigDict:
  """`small` re-shaped for the pages dataset (`data/pages.py`): one visual token per 14 px cell.

  Crop = patch = 14 px, so the tower sees one patch per crop and every visual token is one
  cell's local feature; AnyRes up to 8x8 crops with `anyres_max_64`, so a 112x112 page packs
  as a pure gather (no down-sampling): 1 base + 64 cell + 8 newline = 73 visual tokens, and
  vertically adjacent cells are 9 apart. The LLM is `small`'s (CA {0, 3}, SA candidates
  {1, 4}): 3 x #CA = 6 < 9, so vertical relations are out of reach of the positional conv
  chained through the CA layers and need an SA layer.
  """
  c = small()
  c.text.vocab_size, c.image_token_id = 400, 392  # 392 learned ids: every word one token
  c.vision.image_size = 14
  c.vision.patch_size = 14
  c.image_grid_pinpoints = pinpoints(14, 8)
  c.vision_aspect_ratio = "anyres_max_64"
  return c


MODELS = {"tiny": tiny, "small": small, "pages": pages, "llava_ov_0_5b": llava_ov_0_5b,
          "llava_ov_7b": llava_ov_7b}


def get(name: str) -> ml_collections.ConfigDict:
  if name not in MODELS:
    raise ValueError(f"model={name!r} is not one of {sorted(MODELS)}.")
  return MODELS[name]()
