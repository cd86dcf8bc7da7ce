"""Serving and the evaluation entry point on a tiny trained-looking model.

The model is a random tiny VISOR model with a router (feasible [[], [4], [1, 4]]) saved as an
Orbax training workdir exactly the way the trainer saves one, so `serving.load` goes through the
real restore path. Params are drawn with numpy on `nnx.eval_shape` shapes (an eager nnx init of
the tiny model takes ~10 s on CPU). One Assistant is shared by the tests so its compiled
prefill/decode programs are reused.
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
from absl import flags
from flax import nnx

import hf_fixtures
from visor_jax import budgets, checkpoints, config_lib
from visor_jax.evaluation import main as eval_main
from visor_jax.inference import serving
from visor_jax.training import config as train_config
from visor_jax.data import inputs, synthetic
from visor_jax.models.llava_onevision import LlavaOnevision

FEASIBLE = [[], [4], [1, 4]]
SYNTH = dict(seed=0, sizes=dict(train=4, validation=6, test=6), min_side=256, max_side=320)
NEW = 3  # generated tokens: the tests check plumbing, not language


def random_params(cfg, seed=0):
  """Params of the right shapes, O(1) activations: norms' scales near 1, else N(0, 1/fan_in)."""
  rng = np.random.default_rng(seed)
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(0))), nnx.Param))

  def draw(path, s):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if "scale" in name:
      return 1.0 + 0.1 * rng.standard_normal(s.shape).astype(np.float32)
    fan_in = s.shape[-2] if len(s.shape) >= 2 else 1
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def save_workdir(workdir, config, params, model=None, tokenizer=None, image_spec=None):
  """What train.py leaves behind: checkpoints/<step>/{state, config, model, tokenizer,
  image_processor} (without `image_spec`: as a checkpoint from before runs kept it)."""
  ckpt = checkpoints.Checkpointer(str(workdir), save_every=1, keep=1, async_save=False)
  state = {"params": jax.tree.map(jnp.asarray, params), "opt_state": {}, "step": jnp.array(1)}
  tokenizer = tokenizer or hf_fixtures.tiny_tokenizer()
  processor = None if image_spec is None else image_spec.to_hf_dict()
  ckpt.save(1, state, None, config, model or config.model, tokenizer.files,
            image_processor=processor, force=True)
  ckpt.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("serving")
  config = train_config.default("tiny")
  config.model.router.feasible = FEASIBLE
  config.data.synthetic_dir = str(root / "synthetic")
  config.data.synthetic_seed = SYNTH["seed"]
  config.data.synthetic_sizes = SYNTH["sizes"]
  config.data.synthetic_min_side = SYNTH["min_side"]
  config.data.synthetic_max_side = SYNTH["max_side"]
  cfg = config_lib.model_config(config.model)
  params = random_params(cfg)
  save_workdir(root / "workdir", config, params)
  synthetic.build(config.data.synthetic_dir, **SYNTH)
  assistant = serving.load(str(root / "workdir"))
  return dict(root=root, workdir=str(root / "workdir"), params=params, assistant=assistant)


def images():
  """Sized like the synthetic images (3x3 crop grid), so every test shares compiled shapes."""
  return [hf_fixtures.random_image(256, 300, seed=0), PIL.Image.fromarray(
      hf_fixtures.random_image(300, 256, seed=1))]


QUESTIONS = ["What colour is the small square?", "What is the 4-digit code?"]


# ------------------------------------------------------------------------------------ serving


def test_checkpoint_without_image_processor_uses_the_default(run):
  """Checkpoints written before runs kept their image processor still load: they were
  trained with the geometry's default, so that is what they get."""
  a = run["assistant"]
  assert a.spec == inputs.processor_spec(a.cfg)


def test_loaded_params_equal_saved(run):
  a = run["assistant"]
  loaded = nnx.to_pure_dict(nnx.state(a.model, nnx.Param))
  flat_l = jax.tree_util.tree_leaves_with_path(loaded)
  flat_s = dict(jax.tree_util.tree_leaves_with_path(run["params"]))
  assert len(flat_l) == len(flat_s)
  for path, value in flat_l:
    np.testing.assert_array_equal(np.asarray(value), flat_s[path])
  assert a.has_router and [list(b) for b in a.cfg.router.feasible] == FEASIBLE
  assert a.run_config.data.synthetic_min_side == SYNTH["min_side"]
  assert a.run.kind == "orbax" and a.run.step == 1 and a.run.workdir == run["workdir"]


def test_prompt_is_the_training_chatml(run):
  a = run["assistant"]
  text = a.tokenizer.decode(a.prompt_ids("Q?"), skip_special_tokens=False)
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n")
  with pytest.raises(ValueError, match="reserved"):
    a.prompt_ids("<image> twice")


def test_fixed_budgets_and_flops(run):
  a = run["assistant"]
  by_budget = {}
  for layers in FEASIBLE:
    answers = a.answer(images(), QUESTIONS, sa_layers=layers, max_new_tokens=NEW)
    assert [x.sa_layers for x in answers] == [layers, layers]
    assert all(isinstance(x.text, str) and 1 <= x.num_generated <= NEW for x in answers)
    by_budget[tuple(layers)] = answers
  for i in range(2):  # more SA layers → more FLOPs; the vision part is the same
    llm = [by_budget[tuple(b)][i].llm_flops for b in FEASIBLE]
    assert llm[0] < llm[1] < llm[2]
    vision = {by_budget[tuple(b)][i].total_flops - by_budget[tuple(b)][i].llm_flops
              for b in FEASIBLE}
    assert len(vision) == 1
  first = by_budget[()][0]
  assert first.num_crops > 1 and first.num_visual > 0 and first.budget == "CA-only"


def test_router_picks_a_feasible_budget(run):
  a = run["assistant"]
  answers = a.answer(images(), QUESTIONS, max_new_tokens=NEW)
  assert all(x.sa_layers in FEASIBLE for x in answers)
  cheap = a.answer(images(), QUESTIONS, threshold=1e-6, max_new_tokens=NEW)
  assert all(x.sa_layers == [] for x in cheap)  # P(label <= 0) >= ~0: the cheapest budget
  with pytest.raises(ValueError, match="threshold"):
    a.answer(images(), QUESTIONS, sa_layers=[4], threshold=0.5)


def test_cli_flags(run, monkeypatch):
  monkeypatch.setattr(serving, "load", lambda *a, **k: run["assistant"])  # reuse compilations
  path = run["root"] / "img.png"
  PIL.Image.fromarray(hf_fixtures.random_image(256, 300)).save(path)
  fv = flags.FlagValues()
  serving.define_flags(fv)
  fv(["serving", f"--model={run['workdir']}", f"--image={path}", "--question=What?",
      "--sa_layers=1,4", f"--max_new_tokens={NEW}"])
  report = serving.cli(fv)
  assert "budget: SA{1,4} (fixed" in report and "prefill FLOPs" in report
  fv(["serving", f"--model={run['workdir']}", f"--image={path}", "--question=What?",
      "--sa_layers=3"])
  with pytest.raises(ValueError, match=r"sa_layers: layer\(s\) \[3\].*CA layers"):
    serving.cli(fv)  # a CA layer is not an SA candidate: refused before anything compiles


@pytest.mark.slow  # ~20 s: torch model + the eager nnx init inside hf_import.load_hf_model
def test_load_transformers_dir(tmp_path):
  m = config_lib.model_config(train_config.default("tiny").model)
  hf = hf_fixtures.build_hf_model(train_config.default("tiny").model)
  directory = hf_fixtures.save_hf_dir(hf, tmp_path / "hf", hf_fixtures.tiny_tokenizer(),
                                      image_mean=(0.4, 0.5, 0.6))
  a = serving.load(directory)
  assert a.cfg.text == m.text and not a.has_router
  assert a.spec.image_mean == (0.4, 0.5, 0.6)  # from preprocessor_config.json
  [x] = a.answer(images()[:1], QUESTIONS[:1], max_new_tokens=NEW)
  assert x.sa_layers == list(a.cfg.visor.sa_candidates)  # no router: the maximal budget
  assert a.budget_rows("all", None, 1).all()  # every layer: the original LLaVA-OV

  # A run initialised from that directory: its *experiment* config says 'small', but the
  # checkpoint holds the resolved model and the tokenizer, so it loads with the directory gone.
  config = train_config.default("small")
  config.init_from = directory
  params = nnx.to_pure_dict(nnx.state(a.model, nnx.Param))
  save_workdir(tmp_path / "run", config, params, model=a.run.model, tokenizer=a.tokenizer,
               image_spec=a.spec)
  shutil.rmtree(directory)
  b = serving.load(str(tmp_path / "run"))
  assert b.cfg.text == a.cfg.text and b.tokenizer.vocab_size == a.tokenizer.vocab_size
  assert b.tokenizer.files == a.tokenizer.files  # every tokenizer file travelled
  assert b.spec == a.spec  # and the source's image processor (mean 0.4, 0.5, 0.6)
  np.testing.assert_array_equal(np.asarray(b.model.embed[...]), np.asarray(a.model.embed[...]))


# ------------------------------------------------------------------------------------ eval_main


def test_eval_pareto_on_synthetic(run, tmp_path):
  out = tmp_path / "pareto"
  lines = []
  summary = eval_main.run(run["assistant"], str(out), budgets="[];[1,4]", router=True,
                          batch_size=2, max_new_tokens=NEW, print_fn=lines.append)
  labels = [r["label"] for r in summary["runs"]]
  assert labels == ["CA-only", "SA{1,4}", "router"]
  assert all(r["n_scored"] == SYNTH["sizes"]["test"] for r in summary["runs"])
  assert (out / "pareto.png").stat().st_size > 0
  result = json.loads((out / "results_router.json").read_text())
  assert all(s["sa_layers"] in FEASIBLE for s in result["samples"])
  table = "\n".join(lines)
  assert "easy" in table and "hard" in table and "router budgets:" in table
  assert set(summary["runs"][0]["per_group"]) == {"easy", "hard"}  # the items' families


def test_eval_questions_with_bad_lines(run, tmp_path):
  PIL.Image.fromarray(hf_fixtures.random_image(256, 300)).save(tmp_path / "a.png")
  good = {"image": "a.png", "question": "What colour?", "answers": ["red"],
          "metric": "exact_match", "tags": ["easy"]}
  lines = [json.dumps({**good, "id": "g1"}),
           json.dumps({**good, "id": "g2", "metric": "multiple_choice", "answers": ["B"],
                       "choices": ["red", "blue"]}),
           "{not json", json.dumps({**good, "id": "m1", "image": "missing.png"})]
  qfile = tmp_path / "q.jsonl"
  qfile.write_text("\n".join(lines) + "\n")
  out = tmp_path / "q"
  summary = eval_main.run(run["assistant"], str(out), questions=[str(qfile)], budgets="[4]",
                          batch_size=2, max_new_tokens=NEW, print_fn=lambda *_: None)
  [r] = summary["runs"]
  assert r["n_scored"] == 2 and r["skipped"]["invalid_json"] == 1
  assert r["skipped"]["missing_image"] == 1
  assert (out / "results_SA_4.json").exists() and (out / "pareto.png").exists()


def test_eval_search_writes_feasible(run, tmp_path):
  out = tmp_path / "search"
  eval_main.run(run["assistant"], str(out), mode="search", batch_size=2,
                max_new_tokens=NEW, print_fn=lambda *_: None)
  feasible = budgets.read_feasible(out / "feasible.json")
  cands = set(run["assistant"].cfg.visor.sa_candidates)
  assert feasible and all(set(b) <= cands for b in feasible)
  table = json.loads((out / "feasible.json").read_text())["table"]
  assert len(table) == 4  # [], [1], [4], [1, 4]
  cost = {tuple(r["sa_layers"]): r["llm_flops"] for r in table}
  assert [cost[tuple(b)] for b in feasible] == sorted(cost[tuple(b)] for b in feasible)
  summary = json.loads((out / "summary.json").read_text())
  assert all(r["n_scored"] == SYNTH["sizes"]["validation"] for r in summary["runs"])


def test_eval_flags_map_to_run_kwargs(run):
  fv = flags.FlagValues()
  eval_main.define_flags(fv)
  fv(["eval_main", f"--model={run['workdir']}", "--out=/tmp/x", "--mode=search",
      "--synthetic_sizes=train=4,validation=6,test=6", "--budgets=[];[4]",
      "--exhaustive_sizes=0,1"])
  kw = eval_main.kwargs_from_flags(fv)
  assert kw["mode"] == "search" and kw["exhaustive_sizes"] == (0, 1)
  assert kw["synthetic_overrides"]["sizes"] == SYNTH["sizes"]
  assert eval_main.fixed_budgets(run["assistant"].run, kw["budgets"]) == [[], [4]]
  assert eval_main.fixed_budgets(run["assistant"].run, None) == FEASIBLE
  # The synthetic parameters default to the run's own.
  assert eval_main.synthetic_params(run["assistant"].run) == SYNTH
