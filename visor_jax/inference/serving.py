"""Load a trained VISOR model and answer questions about images: the simple Python API + CLI.

    from visor_jax.inference import serving
    assistant = serving.load("/tmp/visor_universal")    # any run `runs.load_run` reads
    [a] = assistant.answer([PIL.Image.open("x.png")], ["What is the 4-digit code?"])
    a.text, a.sa_layers, a.llm_flops, a.total_flops

    python -m visor_jax.inference.serving --model=/tmp/visor_universal --image=x.png \
        --question="What is the 4-digit code?" [--sa_layers=1,4 | --threshold=0.7]

WHY one module: serving must reproduce training exactly or the model answers a prompt it never
saw. So the model, tokenizer and image processor come from `runs.load_run` (for an Orbax run:
the resolved model and tokenizer saved in its checkpoint, and the image processor the training
pipeline used), and the prompt is rendered by the training code's own
`conversations.render_chatml` with the run's system prompt.

Budget of a request (`Assistant.answer`):
  sa_layers=[1, 4]       fixed: exactly these layers self-attend ([] = CA-only)
  sa_layers="all"        every LLM layer self-attends (the original LLaVA-OV computation)
  sa_layers="maximal"    every SA candidate self-attends (the maximal VISOR configuration)
  sa_layers=None         the router picks per sample (cost knob `threshold`) when the model
                         has one; otherwise "maximal".
FLOPs in an `Answer` are the analytic *prefill* FLOPs (`flops.forward_flops`) of that sample at
its real (unpadded) crop / visual / prompt-token counts under the budget it actually ran; the
decode steps are not included (each costs about one text token's share of the prefill).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from visor_jax import budgets as budgets_lib
from visor_jax import flops, runs
from visor_jax.data import conversations, inputs
from visor_jax.data.tokenizer import IM_END, IM_START, IMAGE_TOKEN
from visor_jax.inference.generate import Generator

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = conversations.DEFAULT_SYSTEM_PROMPT
# Padded batch shapes are rounded up to these multiples, so a stream of requests of varying
# sizes reuses a handful of compiled programs instead of compiling one per request.
PAD_TEXT, PAD_VISUAL, PAD_CROPS = 64, 64, 4


@dataclasses.dataclass(frozen=True)
class Answer:
  text: str
  sa_layers: list[int]     # the layers that self-attended for this sample
  llm_flops: float         # prefill FLOPs of the LLM (flops.forward_flops 'llm')
  total_flops: float       # prefill FLOPs including the vision tower and projector
  num_visual: int          # visual tokens of the image (AnyRes packed)
  num_crops: int           # crops through the vision tower (base view + grid)
  num_text: int = 0        # prompt text tokens
  num_generated: int = 0   # generated tokens, the stop token included

  @property
  def budget(self) -> str:
    """'SA{1,4}' / 'CA-only'."""
    return budgets_lib.label(self.sa_layers)


def _round_up(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


class Assistant:
  """A loaded run ready to answer: its model, tokenizer, image processor, system prompt and a
  `Generator` (which keeps its compiled prefill/decode programs across calls)."""

  def __init__(self, run: runs.Run):
    if run.params is None:
      raise ValueError(f"{run.path}: the run's weights are not loaded (use runs.load_run).")
    if run.tokenizer.image_token_id != run.cfg.image_token_id:
      raise ValueError(f"tokenizer's {IMAGE_TOKEN} id {run.tokenizer.image_token_id} differs "
                       f"from the model's image_token_id {run.cfg.image_token_id}.")
    self.run = run
    self.model, self.cfg, self.tokenizer = run.build_model(), run.cfg, run.tokenizer
    self.spec, self.system_prompt = run.image_spec, run.system_prompt
    self.generator = Generator(self.model)
    self._reduced_generator = None  # built on the first `answer(reduction=...)`
    self.stop_ids = [i for i in (run.tokenizer.im_end_id, run.tokenizer.eos_id) if i is not None]

  @property
  def run_config(self) -> ml_collections.ConfigDict | None:
    """The training run's config (None for a transformers or exported directory)."""
    return self.run.config

  @property
  def has_router(self) -> bool:
    return self.cfg.router.enabled

  # ------------------------------------------------------------------------------ prompt

  def prompt_ids(self, question: str, system_prompt: str | None = None) -> list[int]:
    """ChatML ids exactly as training renders a record: system turn, user turn
    `<image>\\nquestion`, then the open `<|im_start|>assistant\\n` header."""
    if IMAGE_TOKEN in question or IM_START in question or IM_END in question:
      raise ValueError(f"question contains a reserved token ({IMAGE_TOKEN}, {IM_START} or "
                       f"{IM_END}): {question!r}")
    system = self.system_prompt if system_prompt is None else system_prompt
    text, _ = conversations.render_chatml([("user", f"{IMAGE_TOKEN}\n{question.strip()}")],
                                          system)
    return self.tokenizer.encode(text + f"{IM_START}assistant\n")

  # ------------------------------------------------------------------------------ budget

  def budget_rows(self, sa_layers, threshold: float | None, batch: int) -> np.ndarray | None:
    """bool[B, L] for a fixed budget, or None when the router decides (see module doc)."""
    if sa_layers is None and self.has_router:
      return None
    if threshold is not None:
      raise ValueError("threshold is the router's cost knob: it needs sa_layers=None and a "
                       "model with a router" + ("." if self.has_router else
                                                " (this model has none)."))
    layers = budgets_lib.resolve_one(self.cfg, "maximal" if sa_layers is None else sa_layers,
                                     "sa_layers")
    return budgets_lib.mask(self.cfg, layers, batch)

  # ------------------------------------------------------------------------------ answer

  def answer(self, images: Sequence[Any], questions: Sequence[str], *,
             sa_layers: Sequence[int] | str | None = None, threshold: float | None = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             system_prompt: str | None = None, seed: int = 0,
             pad_to: int | None = None, reduction=None) -> list[Answer]:
    """One answer per (image, question), generated as one batch (samples are grouped by
    budget inside `Generator`, so a cheap sample never pays for an expensive neighbour).
    `system_prompt=None` uses the training run's; '' means no system turn. `pad_to` pads the
    batch with copies of its first sample (answers dropped), so a short last batch of an
    evaluation reuses the full batches' compiled programs instead of compiling new ones.
    `reduction` (a `models.token_reduction.Reduction`): see `_answer_reduced`."""
    if len(images) != len(questions):
      raise ValueError(f"{len(images)} images but {len(questions)} questions.")
    if not questions:
      return []
    samples = [inputs.build_sample(self.prompt_ids(q, system_prompt), [img], self.cfg,
                                   self.spec) for img, q in zip(images, questions)]
    if reduction is not None:
      return self._answer_reduced(samples, reduction, sa_layers=sa_layers, threshold=threshold,
                                  max_new_tokens=max_new_tokens, temperature=temperature,
                                  pad_to=pad_to)
    n = len(samples)
    padded = samples + samples[:1] * max(0, (pad_to or 0) - n)
    budget = self.budget_rows(sa_layers, threshold, len(padded))
    gen = self.generator.generate(
        self._collate(padded), budget=budget, threshold=threshold,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        stop_ids=self.stop_ids, seed=seed)
    return [self._answer(s, gen.tokens[i], gen.budget[i], int(gen.num_tokens[i]))
            for i, s in enumerate(samples)]

  def _answer_reduced(self, samples: Sequence[inputs.Sample], reduction, *, sa_layers,
                      threshold, max_new_tokens: int, temperature: float,
                      pad_to: int | None) -> list[Answer]:
    """Answers under a token reduction: greedy, without a KV cache (`inference.reduced`), the
    peers on the all-SA base (`sa_layers` None or "all"), VISOR-TR at a fixed budget
    (`sa_layers`; None → "maximal"; no router). FLOPs: `flops.reduced_forward_flops` at the
    sample's own kept visual-token counts."""
    from visor_jax.inference.reduced import ReducedGenerator
    if temperature != 0.0 or threshold is not None:
      raise ValueError("reduction: greedy answers at a fixed budget only (temperature 0, no "
                       "threshold).")
    if reduction.method == "visor_tr":
      layers = budgets_lib.resolve_one(self.cfg, "maximal" if sa_layers is None else sa_layers,
                                       "sa_layers")
    elif sa_layers is None or sa_layers == "all":
      layers = list(range(self.cfg.num_layers))
    else:
      raise ValueError(f"{reduction.label} runs on the all-SA base: sa_layers must be None or "
                       f"'all', got {sa_layers!r}.")
    padded = list(samples) + list(samples[:1]) * max(0, (pad_to or 0) - len(samples))
    batch = self._collate(padded, extra_text=max_new_tokens)  # room for the answer
    budget = (budgets_lib.mask(self.cfg, layers, len(padded))
              if reduction.method == "visor_tr" else None)
    if self._reduced_generator is None:
      self._reduced_generator = ReducedGenerator(self.model)
    gen = self._reduced_generator.generate(batch, reduction, budget,
                                           max_new_tokens=max_new_tokens,
                                           stop_ids=self.stop_ids)
    answers = []
    for i, s in enumerate(samples):
      ids = [int(t) for t in gen.tokens[i] if t >= 0 and t not in self.stop_ids]
      f = flops.reduced_forward_flops(self.cfg, num_crops=len(s.pixels),
                                      num_visual=s.num_visual_tokens, num_text=len(s.tokens),
                                      reduction=reduction, kept=gen.kept[i], sa_layers=layers)
      answers.append(Answer(text=self.tokenizer.decode(ids).strip(), sa_layers=layers,
                            llm_flops=float(f["llm"]), total_flops=float(f["total"]),
                            num_visual=s.num_visual_tokens, num_crops=len(s.pixels),
                            num_text=len(s.tokens), num_generated=int(gen.num_tokens[i])))
    return answers

  def _collate(self, samples: Sequence[inputs.Sample], extra_text: int = 0
               ) -> dict[str, np.ndarray]:
    """Pads to bucketed sizes (crops never beyond the model's maximum: padding crops still
    run through the vision tower); `extra_text` leaves room for tokens appended later."""
    text = max(len(s.tokens) for s in samples) + extra_text
    visual = max(s.num_visual_tokens for s in samples)
    crops = max(len(s.pixels) for s in samples)
    crops = max(crops, min(_round_up(crops, PAD_CROPS), self.cfg.max_num_crops_per_image))
    return inputs.collate(samples, text_len=_round_up(text, PAD_TEXT),
                          num_visual=_round_up(visual, PAD_VISUAL), num_crops=crops)

  def _answer(self, sample: inputs.Sample, tokens: np.ndarray, budget_row: np.ndarray,
              num_generated: int) -> Answer:
    ids = [int(t) for t in tokens if t >= 0 and t not in self.stop_ids]
    layers = budgets_lib.layers_of(budget_row)
    f = flops.forward_flops(self.cfg, num_crops=len(sample.pixels),
                            num_visual=sample.num_visual_tokens, num_text=len(sample.tokens),
                            sa_layers=layers)
    return Answer(text=self.tokenizer.decode(ids).strip(), sa_layers=layers,
                  llm_flops=float(f["llm"]), total_flops=float(f["total"]),
                  num_visual=sample.num_visual_tokens, num_crops=len(sample.pixels),
                  num_text=len(sample.tokens), num_generated=num_generated)


# ---------------------------------------------------------------------------------------------
# Loading.

def load(path: str, *, step: int | None = None, model_overrides: dict | None = None
         ) -> Assistant:
  """Any run `runs.load_run` reads (an Orbax run at its latest or given `step`, a
  transformers or an exported directory) → `Assistant`. `model_overrides` updates the model
  ConfigDict (e.g. {'dtype': 'bfloat16'}, {'router': {'threshold': 0.7}}); geometry changes
  will not match the weights."""
  return Assistant(runs.load_run(os.fspath(path), step, model_overrides=model_overrides))


# ---------------------------------------------------------------------------------------------
# CLI.

def define_flags(fv) -> None:
  from absl import flags
  flags.DEFINE_string("model", None, "An Orbax run, a transformers or an exported directory.",
                      flag_values=fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).", flag_values=fv)
  flags.DEFINE_string("image", None, "Image file.", flag_values=fv)
  flags.DEFINE_string("question", None, "The question.", flag_values=fv)
  flags.DEFINE_string("sa_layers", None, "'1,4', '[]' (CA-only), 'all', 'maximal'; unset: the "
                      "router decides (or maximal without one).", flag_values=fv)
  flags.DEFINE_float("threshold", None, "Router cost knob in (0, 1].", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 32, "Generated tokens at most.", flag_values=fv)
  flags.DEFINE_float("temperature", 0.0, "0: greedy.", flag_values=fv)
  flags.DEFINE_float("top_p", 1.0, "Nucleus mass when sampling.", flag_values=fv)


def cli(fv) -> str:
  """Runs one question from parsed flags; returns the printed report."""
  from visor_jax.data.conversations import ImageLoader
  for name in ("model", "image", "question"):
    if not fv[name].value:
      raise ValueError(f"--{name} is required.")
  assistant = load(fv.model, step=fv.step)
  image = ImageLoader()(fv.image)
  [a] = assistant.answer([image], [fv.question], sa_layers=budgets_lib.parse(fv.sa_layers),
                         threshold=fv.threshold, max_new_tokens=fv.max_new_tokens,
                         temperature=fv.temperature, top_p=fv.top_p)
  how = "router" if fv.sa_layers is None and assistant.has_router else "fixed"
  return "\n".join([
      f"answer: {a.text}",
      f"budget: {a.budget} ({how}; {len(a.sa_layers)} of {assistant.cfg.num_layers} layers "
      f"self-attend)",
      f"tokens: {a.num_crops} crops, {a.num_visual} visual, {a.num_text} prompt, "
      f"{a.num_generated} generated",
      f"prefill FLOPs: LLM {a.llm_flops / 1e9:.4g} G, total {a.total_flops / 1e9:.4g} G"])


def main(argv) -> None:
  import sys
  from absl import flags
  del argv
  logging.getLogger().setLevel(logging.WARNING)   # libraries (orbax): warnings only
  try:
    print(cli(flags.FLAGS), flush=True)
  except (ValueError, FileNotFoundError, conversations.BadSample) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  from absl import app, flags as _flags
  define_flags(_flags.FLAGS)
  app.run(main)
