"""Export to PyTorch: Orbax checkpoint → safetensors directory → PyTorch VISOR (and back).

A random tiny VISOR model (CA, positional conv, router, all with non-trivial weights) is saved
the way the trainer saves it, exported with the CLI and loaded by `torch_model`; JAX and
PyTorch must agree on logits (all-SA, CA-only, mixed per-sample budgets), router decisions and
greedy tokens. A plain model round-trips through transformers itself.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import hf_fixtures
from model_fixtures import prompt_ids as _prompt_ids
from visor_jax import budgets, checkpoints, config_lib, export, runs
from visor_jax.inference import generate
from visor_jax.training import config as train_config
from visor_jax.convert import hf_import, safetensors_io, tiny_checkpoint, torch_export
from visor_jax.convert import torch_decode, torch_model
from visor_jax.convert.torch_model import VisorForConditionalGeneration
from visor_jax.data import inputs as inputs_lib
from visor_jax.data import preprocess
from visor_jax.models.llava_onevision import LlavaOnevision
from visor_jax import model_configs

TOL = 1e-4
# bf16 keeps 8 significant bits: storing the weights rounds each by up to 2^-9 (0.2%) relative.
# Through the 2 + 6 random layers that moves these logits (std ~1, range ~7) by 0.04 at most
# (measured; mean 0.006); computing in bf16 as well adds activation rounding (measured 0.05).
# The bounds leave 2.5x / 5x headroom and stay far below what a wrong or transposed tensor
# does (whole units).
BF16_TOL = 0.1            # bf16 weights, float32 compute
BF16_COMPUTE_TOL = 0.25   # bf16 weights and compute
FEASIBLE = [[], [4], [1, 4]]
# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN/STD): a source processor that is
# not LLaVA-OV's 0.5, so an export that forgets the source's settings shows.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
THRESHOLDS = [0.05, 0.3, 0.6, 0.9, 0.999]
STEP = 3


def _randomize(model, seed=0):
  """Every parameter at a scale that keeps activations O(1) (the default init's std 0.02
  makes logits nearly flat, so a 1e-4 comparison would pass vacuously), CA and conv included."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, value in hf_import.flat_params(model).items():
    shape = value.shape
    leaf = path.split(".")[-1]
    if leaf == "kernel":
      new = rng.normal(0, 1 / math.sqrt(shape[-2]), shape)
    elif leaf == "depthwise":
      new = rng.normal(0, 1 / math.sqrt(shape[-2]), shape)
    elif leaf == "scale":
      new = 1 + 0.2 * rng.normal(size=shape)
    elif leaf == "gate":
      new = rng.normal(0, 0.5, shape)
    elif len(shape) >= 2:  # embed, pos_embed
      new = rng.normal(0, 1 / math.sqrt(shape[-1]), shape)
    else:  # biases, image_newline
      new = 0.2 * rng.normal(size=shape)
    flat[path] = jnp.asarray(new, value.dtype)
  hf_import.set_params(model, flat)


def _samples(tok, cfg):
  return [
      inputs_lib.build_sample(_prompt_ids(tok, "What colour is the small square?"),
                              [hf_fixtures.random_image(40, 70, 1)], cfg),
      inputs_lib.build_sample(_prompt_ids(tok, "Read the code."),
                              [hf_fixtures.random_image(84, 84, 2)], cfg),
      inputs_lib.build_sample(_prompt_ids(tok, "How many shapes are there? Answer."),
                              [hf_fixtures.random_image(20, 60, 3)], cfg),
      # text only: CA reads nothing (all visual tokens are padding), the conv sees zeros
      inputs_lib.build_sample(tok.encode("<|im_start|>user\nThe quick brown fox<|im_end|>\n"
                                         "<|im_start|>assistant\n"), [], cfg),
  ]


def _run_export_cli(**flag_values):
  """`python -m visor_jax.export --k=v ...`, in process (flags set, then restored)."""
  saved = {k: getattr(export.FLAGS, k) for k in flag_values}
  for k, v in flag_values.items():
    setattr(export.FLAGS, k, v)
  try:
    export.main(["export"])
  finally:
    for k, v in saved.items():
      setattr(export.FLAGS, k, v)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """Tiny models: torch's thread pool only fights JAX's for the 2 cores (10x slower)."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny VISOR run's checkpoint (saved like the trainer saves it), exported by the CLI."""
  config = train_config.default("tiny")
  config.model.router.feasible = FEASIBLE
  cfg = config_lib.model_config(config.model)
  model = LlavaOnevision(cfg, rngs=nnx.Rngs(0))
  _randomize(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  state = {"params": params, "opt_state": optax.adam(1e-3).init(params),
           "step": jnp.asarray(STEP, jnp.int32)}
  workdir = tmp_path_factory.mktemp("run")
  tok = hf_fixtures.tiny_tokenizer()
  ckpt = checkpoints.Checkpointer(str(workdir), save_every=1, keep=1, async_save=False)
  ckpt.save(STEP, state, None, config, config.model, tok.files, force=True)  # as train.py
  ckpt.close()
  out = str(tmp_path_factory.mktemp("export"))
  _run_export_cli(checkpoint=str(workdir), out=out, max_shard_size="400KB")
  graphdef, jstate = nnx.split(model)
  forward = jax.jit(lambda s, x, b: nnx.merge(graphdef, s)(x, b))
  routed = jax.jit(lambda s, x, t: nnx.merge(graphdef, s).routed(x, t))
  torch_model = VisorForConditionalGeneration.from_pretrained(out)
  samples = _samples(tok, cfg)
  return dict(cfg=cfg, model=model, state=jstate, forward=forward, routed=routed, out=out,
              workdir=str(workdir), torch_model=torch_model, tok=tok, samples=samples,
              batch=inputs_lib.collate(samples))


def _budget(cfg, kind, batch=4):
  if kind == "all_sa":
    return budgets.all_sa(cfg, batch)
  if kind == "ca_only":
    return budgets.ca_only(cfg, batch)
  return np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg), budgets.mask(cfg, [1, 4]),
                         budgets.mask(cfg, [4])])


def test_export_directory_layout(run):
  out = run["out"]
  names = sorted(os.listdir(out))
  assert safetensors_io.INDEX_FILE in names  # 400KB shards: the sharded path is exercised
  for name in ("config.json", "preprocessor_config.json", "tokenizer.json"):
    assert name in names
  hf = json.load(open(os.path.join(out, "config.json")))
  assert hf["visor"]["ca_layers"] == [0, 3] and hf["visor"]["sa_candidates"] == [1, 4]
  assert hf["visor"]["router"]["feasible"] == FEASIBLE
  keys = set(safetensors_io.SafetensorsReader(out).keys())
  assert {"visor.cross_attn.3.o_proj.weight", "visor.pos_conv.depthwise.weight",
          "visor.router.fc2.bias", "language_model.model.layers.5.mlp.up_proj.weight"} <= keys
  assert safetensors_io.SafetensorsReader(out).shape("visor.pos_conv.depthwise.weight") == (64, 1, 7)
  # the image processor training used, readable by transformers and by our preprocessing
  assert preprocess.ImageProcessorSpec.from_hf_dir(out) == inputs_lib.processor_spec(run["cfg"])
  transformers.LlavaOnevisionImageProcessorPil.from_pretrained(out)


def test_export_keeps_the_source_image_processor(tmp_path):
  """A transformers checkpoint whose processor normalises with CLIP's mean/std, exported:
  the export preprocesses as the source did, for our reader and for transformers'."""
  src = tiny_checkpoint.build(str(tmp_path / "hf"), image_mean=CLIP_MEAN, image_std=CLIP_STD)
  source_spec = preprocess.ImageProcessorSpec.from_hf_dir(src)
  assert source_spec.image_mean == CLIP_MEAN and source_spec.image_std == CLIP_STD
  out = str(tmp_path / "export")
  export.export(src, out)
  assert preprocess.ImageProcessorSpec.from_hf_dir(out) == source_spec
  assert runs.describe_run(out).image_spec == source_spec
  proc = transformers.AutoImageProcessor.from_pretrained(out)  # the PIL one: no torchvision
  assert tuple(proc.image_mean) == CLIP_MEAN and tuple(proc.image_std) == CLIP_STD
  assert proc.size == {"height": 28, "width": 28} and proc.resample == source_spec.resample
  assert [tuple(p) for p in proc.image_grid_pinpoints] == list(source_spec.grid_pinpoints)


@pytest.mark.parametrize("kind", ["all_sa", "ca_only", "mixed"])
def test_torch_logits_equal_jax(run, kind):
  budget = _budget(run["cfg"], kind)
  ref = np.asarray(run["forward"](run["state"], run["batch"], budget))
  ours = run["torch_model"](run["batch"], budget).numpy()
  valid = run["batch"]["text_valid"]
  assert ref[valid].std() > 0.5, "logits too flat for the comparison to mean anything"
  np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)
  if kind == "mixed":  # NCHW pixels are accepted too
    nchw = dict(run["batch"], pixels=run["batch"]["pixels"].transpose(0, 1, 4, 2, 3))
    np.testing.assert_array_equal(run["torch_model"](nchw, budget).numpy(), ours)


@pytest.mark.slow
def test_router_decisions_equal_jax(run):
  seen = set()
  for threshold in THRESHOLDS:
    ref = run["routed"](run["state"], run["batch"], threshold)
    ours = run["torch_model"].routed(run["batch"], threshold)
    np.testing.assert_array_equal(ours["budget"].numpy(), np.asarray(ref["budget"]))
    np.testing.assert_allclose(ours["router_logits"].numpy(), np.asarray(ref["router_logits"]),
                               atol=TOL, rtol=0)
    valid = run["batch"]["text_valid"]
    np.testing.assert_allclose(ours["logits"].numpy()[valid], np.asarray(ref["logits"])[valid],
                               atol=TOL, rtol=0)
    seen |= {tuple(row) for row in np.asarray(ref["budget"])}
  assert len(seen) >= 2, "router weights too flat: every threshold picked the same budget"


@pytest.mark.slow
def test_greedy_generation_equals_jax(run):
  """JAX's `generate.Generator` (prefill + KV-cache decode) vs PyTorch's re-forward loop.

  One budget for the whole batch keeps JAX at one prefill + one decode compilation (it groups
  samples by budget); per-sample budgets are covered by the logits tests, and the router path
  is checked to be "route once on the prompt, then decode at that budget"."""
  steps = 5
  budget = budgets.mask(run["cfg"], [1, 4], len(run["samples"]))
  ref = generate.Generator(run["model"]).generate(run["batch"], budget=budget,
                                                  max_new_tokens=steps).tokens
  ours = run["torch_model"].generate(run["batch"], steps, budget=budget).numpy()
  np.testing.assert_array_equal(ours, ref)
  routed = run["torch_model"].routed(run["batch"], 0.6)["budget"]
  np.testing.assert_array_equal(
      run["torch_model"].generate(run["batch"], steps, threshold=0.6).numpy(),
      run["torch_model"].generate(run["batch"], steps, budget=routed).numpy())


@pytest.mark.parametrize("kind", ["mixed", "routed", "ca_only"])
def test_cached_generation_equals_rerunning_the_decoder(run, kind):
  """The KV cache (torch_decode.py) against re-running the whole decoder per token: same
  tokens, and the same final hidden state at every step (to float32 rounding)."""
  model, cfg, n = run["torch_model"], run["cfg"], len(run["samples"])
  assert n == 4
  budget = {"mixed": np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg),
                                     budgets.mask(cfg, [1, 4]), budgets.mask(cfg, [4])]),
            "routed": None, "ca_only": budgets.ca_only(cfg, n)}[kind]
  kw = dict(budget=budget, threshold=0.6)
  cached = model.generate(run["batch"], 6, **kw).numpy()
  np.testing.assert_array_equal(cached, model.generate(run["batch"], 6, use_cache=False,
                                                       **kw).numpy())
  # Hidden states step by step: the cached step's against the re-run's last token.
  with torch.no_grad():
    x = model.prepare_inputs(run["batch"])
    v = model.visual_stream(x)
    hidden, cache = torch_decode.prefill(model, x, None if budget is None else
                                         model._budget(budget, n), v, 0.6)
    for step in range(3):
      full, _, _ = model.hidden_states(x, cache.budget, v=v)
      last = full[torch.arange(n), torch_model.last_valid_index(x["text_valid"])]
      np.testing.assert_allclose(hidden.numpy(), last.numpy(), atol=1e-5, rtol=0)
      token = torch.as_tensor(cached[:, step])
      hidden = torch_decode.decode_step(model, cache, token)
      x = torch_model.append_token(x, token)


def test_load_exported_round_trip_is_bitwise(run):
  model, cfg = torch_export.load_exported(run["out"])
  assert cfg == run["cfg"]
  a, b = hf_import.flat_params(run["model"]), hf_import.flat_params(model)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)
    assert np.asarray(b[k]).dtype == np.float32


def test_bf16_export_stays_close(run, tmp_path):
  export.export(run["workdir"], str(tmp_path), dtype="bfloat16")
  reader = safetensors_io.SafetensorsReader(str(tmp_path))
  assert all(str(reader.get(k).dtype) == "bfloat16" for k in reader.keys())
  budget = _budget(run["cfg"], "mixed")
  ref = np.asarray(run["forward"](run["state"], run["batch"], budget))
  valid = run["batch"]["text_valid"]
  for dtype, tol in ((torch.float32, BF16_TOL), (torch.bfloat16, BF16_COMPUTE_TOL)):
    model = VisorForConditionalGeneration.from_pretrained(str(tmp_path), dtype=dtype)
    err = np.abs(model(run["batch"], budget).numpy()[valid] - ref[valid])
    assert 0 < err.max() <= tol, (dtype, err.max())
  # and it loads back into JAX (upcast to the float32 params)
  back, _ = torch_export.load_exported(str(tmp_path))
  w = np.asarray(hf_import.flat_params(back)["decoder.cross.attn.o_proj.kernel"])
  assert w.dtype == np.float32


def _broken_copy(src, dst, drop=None, reshape=None):
  reader = safetensors_io.SafetensorsReader(src)
  tensors = {k: np.array(reader.get(k)) for k in reader.keys() if k != drop}
  if reshape:
    tensors[reshape] = np.zeros((3, 3), np.float32)
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  safetensors_io.save_file(tensors, os.path.join(dst, "model.safetensors"), {"format": "pt"})
  return str(dst)


@pytest.mark.parametrize("name", ["visor.cross_attn.3.k_proj.weight",
                                  "language_model.model.layers.2.mlp.up_proj.weight",
                                  "visor.router.fc1.bias"])
def test_missing_or_misshapen_tensor_is_named(run, tmp_path, name):
  short = name.replace("language_model.model.", "")
  missing = _broken_copy(run["out"], tmp_path / "missing", drop=name)
  with pytest.raises(ValueError, match=short):
    VisorForConditionalGeneration.from_pretrained(missing)
  with pytest.raises(ValueError, match=short):
    torch_export.load_exported(missing)
  misshapen = _broken_copy(run["out"], tmp_path / "misshapen", reshape=name)
  with pytest.raises(ValueError, match=short):
    VisorForConditionalGeneration.from_pretrained(misshapen)
  with pytest.raises(ValueError, match=short):
    torch_export.load_exported(misshapen)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_plain_model_round_trips_through_transformers(tmp_path, tied):
  """transformers → visor_jax (all-SA baseline) → export → transformers: same logits, and
  exactly the tensor names transformers' own save_pretrained writes (tied: no lm_head)."""
  geometry = model_configs.tiny()
  geometry.text.tie_word_embeddings = tied
  hf_model = hf_fixtures.build_hf_model(geometry)
  tok = hf_fixtures.tiny_tokenizer()
  src = hf_fixtures.save_hf_dir(hf_model, tmp_path / "hf", tok)
  plain = dict(visor=dict(ca_layers=[], sa_candidates=[], pos_conv=False))
  model, cfg = hf_import.load_hf_model(src, model_overrides=plain)
  assert not torch_export.has_visor_parts(cfg)
  out = str(tmp_path / "export")
  torch_export.export_params(hf_import.flat_params(model), cfg, out, tokenizer_dir=src)
  assert (set(safetensors_io.SafetensorsReader(out).keys())
          == set(safetensors_io.SafetensorsReader(src).keys()))
  reloaded = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(out).eval()

  image = hf_fixtures.random_image(40, 70, 4)
  ids = _prompt_ids(tok, "What colour is the small square?")
  sample = inputs_lib.build_sample(ids, [image], cfg)
  expanded = [t for i in ids for t in ([i] * sample.num_visual_tokens
                                       if i == tok.image_token_id else [i])]
  proc = hf_fixtures.hf_processor(hf_model)(images=[image], return_tensors="pt")
  kw = dict(input_ids=torch.tensor([expanded]), pixel_values=proc["pixel_values"],
            image_sizes=proc["image_sizes"])
  with torch.no_grad():
    ref = hf_model(**kw).logits[0].numpy()
    np.testing.assert_allclose(reloaded(**kw).logits[0].numpy(), ref, atol=TOL, rtol=0)
  # Our PyTorch model on the same directory is LLaVA-OV too (all-SA, no new parts).
  ours = VisorForConditionalGeneration.from_pretrained(out)(
      inputs_lib.collate([sample]), budgets.all_sa(cfg)).numpy()[0]
  np.testing.assert_allclose(ours, ref[sample.text_pos], atol=TOL, rtol=0)


def test_torch_side_runs_without_jax(run):
  """Loading and running an export imports no JAX: torch_model, the numpy-only data modules
  and `torch_export.exported_model_config` (the geometry `build_sample` needs)."""
  code = f"""
import sys
import numpy as np
from visor_jax import config_lib
from visor_jax.convert import torch_export
from visor_jax.convert.torch_model import VisorForConditionalGeneration
from visor_jax.data import inputs, preprocess
from visor_jax.data.tokenizer import Tokenizer
out = {run["out"]!r}
cfg = config_lib.model_config(torch_export.exported_model_config(out))
tok = Tokenizer.from_dir(out)
ids = tok.encode("<|im_start|>user\\n<image>\\nRead the code.<|im_end|>\\n<|im_start|>assistant\\n")
image = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
batch = inputs.collate([inputs.build_sample(ids, [image], cfg,
                                            preprocess.ImageProcessorSpec.from_hf_dir(out))])
model = VisorForConditionalGeneration.from_pretrained(out)
assert model(batch, np.ones((1, cfg.num_layers), bool)).shape == (1, len(ids) - 1, 320)
model.generate(batch, 2, threshold=0.5)
bad = [m for m in ("jax", "flax", "jaxlib", "orbax") if m in sys.modules]
assert not bad, bad
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"})
  assert result.returncode == 0, result.stderr[-3000:]
