"""README.md's recipes, chained end to end at tiny scale, from the README's own text.

The commands are parsed out of README.md's code blocks (so a README that drifts from the code
breaks this test), then only scaled: the tiny model, 2 steps of batch 2, a tiny transformers
checkpoint (`convert.tiny_checkpoint`, the README's command) for the LLaVA-OV weights, and a
small LLaVA-format JSON dataset in tmp_path for /data. Every README flag is kept; the flags
the test adds are the scale ones in `SCALE` (devices, router epochs, new tokens), a question
file for the universal run's end-of-run table, and `--questions` where the README says a JSON
run needs it instead of the synthetic split. The chain:

  tiny_checkpoint → the loading snippet → stage 1 → stage 2 → universal (the real recipe)
  → budget search → router → evaluation with the router → serving CLI → serving snippet
  → export (router, then universal in bf16) → the PyTorch snippet

Entry points run in process (as the other tests call them), parsing each command line with
the entry point's own flag definitions.
"""
import json
import os
import re
import shlex

import numpy as np
import PIL.Image
import pytest
from absl import flags

from visor_jax import budgets, runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")

# Flags the test adds (per entry point) to keep the chain fast; none of them is in the
# README's commands, so nothing the README says is overridden.
SCALE = {
    "visor_jax.main": ["--config.mesh.num_devices=2", "--config.log_every=1"],
    "router": ["--config.router_train.num_samples=4", "--config.router_train.epochs=2",
               "--config.router_train.batch_size=4", "--config.router_train.hidden=16"],
    "visor_jax.evaluation.main": ["--batch_size=4", "--max_new_tokens=2"],
    "visor_jax.inference.serving": ["--max_new_tokens=2"],
}
# The `:variant` of the recipe's config files: the model and the run length, scaled.
VARIANT = {"model": "tiny", "steps": "2", "batch": "2"}
COLOURS = ("red", "green", "blue", "white")


# ------------------------------------------------------------------------------ README parsing

def _section(title: str) -> str:
  """The text of README's `## <title>...` section (up to the next `## `)."""
  text = open(README, encoding="utf-8").read()
  m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
  assert m, f"README.md has no section '## {title}'"
  return m.group(1)


def _blocks(section: str, lang: str) -> list[str]:
  return re.findall(rf"^```{lang}\n(.*?)^```", section, re.M | re.S)


def _commands(block: str) -> list[tuple[str, list[str]]]:
  """`python -m <module> <args>` lines of a bash block (continuations joined, comments
  dropped) → [(module, args)]."""
  out = []
  for line in block.replace("\\\n", " ").splitlines():
    words = shlex.split(line, comments=True)
    if words:
      assert words[:2] == ["python", "-m"], line
      out.append((words[2], words[3:]))
  return out


def _replace_paths(text: str, paths: dict[str, str]) -> str:
  """README paths → tmp_path ones, in one pass (a replacement is never rewritten again), the
  longest match first (/tmp/visor_universal_pt before /tmp/visor_universal)."""
  pattern = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
  return re.sub(pattern, lambda m: paths[m.group(0)], text)


def _substitute(args: list[str], paths: dict[str, str]) -> list[str]:
  """README paths → tmp_path ones; `:variant` values → VARIANT."""
  out = []
  for a in args:
    a = _replace_paths(a, paths)
    if a.startswith("--config=") and ":" in a:
      path, variant = a.split(":", 1)
      items = dict(kv.split("=", 1) for kv in variant.split(","))
      items.update({k: v for k, v in VARIANT.items() if k in items})
      a = path + ":" + ",".join(f"{k}={v}" for k, v in items.items())
    out.append(a)
  return out


def _snippet(section: str, must_contain: str, paths: dict[str, str]) -> str:
  [code] = [b for b in _blocks(section, "python") if must_contain in b]
  return _replace_paths(code, paths)


# ------------------------------------------------------------------------------ entry points

def _main_config(args: list[str]):
  """`python -m visor_jax.main ARGS` parsed by the entry point's own flags → (config,
  workdir)."""
  from visor_jax import main
  argv = ["visor_jax.main", *args]
  fv = flags.FlagValues()
  main.define_flags(fv, argv)
  fv(argv)
  return fv.config, fv.workdir


def _eval_main(args: list[str]) -> dict:
  from visor_jax.evaluation import main as eval_main
  fv = flags.FlagValues()
  eval_main.define_flags(fv)
  fv(["evaluation.main", *args])
  printed = []
  summary = eval_main.run(**eval_main.kwargs_from_flags(fv), print_fn=printed.append)
  return summary, "\n".join(printed)


def _serving(args: list[str]) -> str:
  from visor_jax.inference import serving
  fv = flags.FlagValues()
  serving.define_flags(fv)
  fv(["serving", *args])
  return serving.cli(fv)


def _export(args: list[str]) -> None:
  """`python -m visor_jax.export ARGS`: its flags live on absl's global FLAGS (module
  level); set them through their own parsers, run main(), restore."""
  from visor_jax import export
  parsed = [a[2:].split("=", 1) for a in args]
  saved = {k: export.FLAGS[k].value for k, _ in parsed}
  try:
    for k, v in parsed:
      export.FLAGS[k].parse(v)
    export.main(["export"])
  finally:
    for k, v in saved.items():
      export.FLAGS[k].value = v


# ------------------------------------------------------------------------------ data

def _write_data(root) -> dict[str, str]:
  """A LLaVA-format JSONL training file (images under images/, paths relative to it, as
  /data/images holds them) and a question file beside the images."""
  images = root / "images"
  images.mkdir(parents=True)
  records, questions = [], []
  for i in range(8):
    colour = COLOURS[i % len(COLOURS)]
    # Sizes vary so AnyRes packs 1x1 to 2x2 crops of the tiny model's 28 px.
    h, w = (30, 40) if i % 2 else (56, 50)
    PIL.Image.new("RGB", (w, h), colour).save(images / f"{i}.png")
    records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the image?"},
        {"from": "gpt", "value": colour}]})
    if i < 4:
      questions.append({"id": f"q{i}", "image": f"{i}.png", "question": "What colour is the "
                        "image?", "answers": [colour], "metric": "exact_match",
                        "tags": ["colour"]})
  train = root / "train.jsonl"
  train.write_text("".join(json.dumps(r) + "\n" for r in records))
  qfile = images / "questions.jsonl"  # the file's directory is the image root
  qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
  return {"train": str(train), "images": str(images), "questions": str(qfile),
          "photo": str(images / "0.png")}


def _step_dirs(workdir: str) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


# ------------------------------------------------------------------------------ the chain

@pytest.mark.slow
def test_readme_recipes_chain_at_tiny_scale(tmp_path, monkeypatch):
  import torch
  monkeypatch.chdir(ROOT)                  # --config=configs/... is relative, as in the README
  threads = torch.get_num_threads()
  torch.set_num_threads(1)                 # tiny models: torch's pool only fights JAX's
  try:
    _chain(tmp_path)
  finally:
    torch.set_num_threads(threads)


def _chain(tmp_path):
  data = _write_data(tmp_path / "data")
  bucket = tmp_path / "bucket"
  tiny = str(tmp_path / "tiny_llava_ov")
  paths = {
      "$BUCKET": str(bucket),
      "/models/llava-onevision-qwen2-0.5b-ov-hf": tiny,
      "/tmp/tiny_llava_ov": tiny,
      "/data/stage1_5.jsonl": data["train"], "/data/si.jsonl": data["train"],
      "/data/images": data["images"],
      "/data/questions.jsonl": data["questions"],
      # The router section starts from the recipe's universal run.
      "/tmp/visor_universal": str(bucket / "universal"),
      "/tmp/visor_universal_pt": str(tmp_path / "visor_universal_pt"),
      "/tmp/visor_": str(tmp_path / "visor_"),  # search, router, eval, exports
      "photo.png": data["photo"],
  }

  # ---------------------------------------------------------------- Loading a transformers ckpt
  from visor_jax.convert import tiny_checkpoint
  loading = _section("Loading a transformers checkpoint")
  [(module, args)] = _commands(_blocks(loading, "bash")[0])
  assert module == "visor_jax.convert.tiny_checkpoint"
  tiny_checkpoint.main(_substitute(args, paths))
  env = {}
  exec(_snippet(loading, "runs.load_run", paths), env)
  assert env["run"].kind == "transformers"
  assert env["logits"].shape == (1, len(env["ids"]) - 1, env["cfg"].text.vocab_size)

  # ---------------------------------------------------------------- stage 1 → stage 2 → universal
  from visor_jax import main
  recipe = _commands(_blocks(_section("The real recipe"), "bash")[0])
  assert [m for m, _ in recipe] == ["visor_jax.main"] * 3
  workdirs = []
  for stage, (_, args) in zip(("stage1", "stage2", "universal"), recipe):
    extra = list(SCALE["visor_jax.main"])
    if stage == "universal":  # the end-of-run table of a JSON run reads a question file
      extra += [f"--config.data.eval_questions={data['questions']}", "--config.eval_items=4",
                "--config.eval_max_new_tokens=2"]
    config, workdir = _main_config(_substitute(args, paths) + extra)
    assert workdir == str(bucket / stage) and config.model.text.hidden_size == 64  # tiny
    assert config.data.source == "json" and config.data.json_path == data["train"]
    # The stage configs choose their learning rates from init_from: the README must give it
    # where get_config sees it (a later --config.init_from would leave the from-scratch rates).
    if stage == "stage1":
      assert config.init_from == tiny and config.optim.lr == 1e-4
    elif stage == "stage2":
      assert config.init_from == workdirs[0] and config.optim.lr == 1e-5
      assert dict(config.optim.lr_mult) == dict(vision=0.2, new=10.0, llm=1.0)
    else:
      assert config.init_from == workdirs[1]
    result = main.run(config, workdir)
    assert int(result.state["step"]) == 2 and _step_dirs(workdir)[-1] == 2
    workdirs.append(workdir)
  # Stage 1 trained only the new parts: LLaVA-OV's weights are the checkpoint's, bit for bit.
  from flax import traverse_util
  a, b = (traverse_util.flatten_dict(runs.load_run(d).params, sep=".")
          for d in (workdirs[0], tiny))
  for k in b:
    if not k.startswith(("decoder.cross.", "decoder.pos_conv.")):
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert not np.array_equal(a["decoder.cross.attn.o_proj.kernel"],
                            b["decoder.cross.attn.o_proj.kernel"])  # new parts moved
  with open(os.path.join(workdirs[2], "eval", "summary.json")) as f:
    table = json.load(f)
  assert table["runs"] and all(r["n_scored"] == 4 for r in table["runs"])

  # ---------------------------------------------------------------- budgets, router, evaluation
  router_section = _section("From a universal run to the router")
  search, router, evaluate, serve = _commands(_blocks(router_section, "bash")[0])
  # A JSON run has no synthetic split: the README says to pass its question file instead.
  json_note = "--questions=/data/questions.jsonl"
  assert json_note in router_section
  swap = lambda args: [json_note if a == "--synthetic_split=validation" else a for a in args]

  assert search[0] == "visor_jax.evaluation.main" and "--mode=search" in search[1]
  summary, printed = _eval_main(_substitute(swap(search[1]), paths)
                                + SCALE["visor_jax.evaluation.main"])
  feasible_path = str(tmp_path / "visor_search" / "feasible.json")
  feasible = budgets.read_feasible(feasible_path)
  assert feasible and len(summary["runs"]) == 4  # every subset of the tiny model's {1, 4}
  assert "feasible budgets (cheapest first)" in printed

  assert router[0] == "visor_jax.main"
  config, workdir = _main_config(_substitute(router[1], paths) + SCALE["router"])
  stats = main.run(config, workdir)
  assert stats["samples"] == 4
  routed = runs.load_run(workdir)
  assert routed.cfg.router.enabled
  assert [list(b) for b in routed.cfg.router.feasible] == [list(b) for b in feasible]

  assert evaluate[0] == "visor_jax.evaluation.main" and "--router" in evaluate[1]
  summary, printed = _eval_main(_substitute(evaluate[1] + [json_note], paths)
                                + SCALE["visor_jax.evaluation.main"])
  kinds = [r["kind"] for r in summary["runs"]]
  assert kinds == ["fixed"] * len(feasible) + ["router"]
  assert all(r["n_scored"] == 4 for r in summary["runs"])
  assert "router budgets:" in printed
  out = tmp_path / "visor_eval"
  assert (out / "results_router.json").exists() and (out / "pareto.png").exists()

  assert serve[0] == "visor_jax.inference.serving"
  report = _serving(_substitute(serve[1], paths) + SCALE["visor_jax.inference.serving"])
  assert re.search(r"^budget: .*\(router;", report, re.M), report

  env = {}
  exec(_snippet(router_section, "serving.load", paths), env)
  assert env["a"].sa_layers in [list(b) for b in feasible]

  # ---------------------------------------------------------------- export to PyTorch
  from visor_jax.convert import safetensors_io, torch_export
  export_section = _section("Export to PyTorch")
  exports = _commands(_blocks(export_section, "bash")[0])
  assert [m for m, _ in exports] == ["visor_jax.export"] * 2
  for _, args in exports:
    _export(_substitute(args, paths))
  universal_pt = str(tmp_path / "visor_universal_pt")
  reader = safetensors_io.SafetensorsReader(universal_pt)
  assert {str(reader.get(k).dtype) for k in reader.keys()} == {"bfloat16"}
  _, cfg = torch_export.load_exported(universal_pt)  # and loads back
  assert cfg.text.hidden_size == 64 and not cfg.router.enabled
  env = {}
  exec(_snippet(export_section, "VisorForConditionalGeneration", paths), env)
  assert env["routed"]["budget"].shape[0] == 1 and env["tokens"].shape[0] == 1
  chosen = [i for i, on in enumerate(env["routed"]["budget"][0].tolist()) if on]
  assert chosen in [list(b) for b in feasible]  # the router's choice, in PyTorch
