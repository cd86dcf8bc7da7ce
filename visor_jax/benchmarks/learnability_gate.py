"""The learnability gate: can the `pages` model, from scratch, find one visual token by its
content? Everything VISOR shows on the pages dataset rests on it (docs/pages_dataset.md).

    python -m visor_jax.benchmarks.learnability_gate [--steps=300] [--grids=4,6] [--lr=1e-3]
        [--warmup=100] [--digits=1]

The easiest content lookup there is: a page of G x G empty 14 px cells (one visual token each)
with one coloured digit somewhere, and the question "What is the <colour> digit?". Trained on
the all-SA base (every layer self-attends: LLaVA-OV itself) with the trainer's own step, then:

  tf_exact       teacher-forced exact match on 256 fresh pages [95% Wilson interval]; chance 0.10
  image effect   how much the answer logits move when the batch's images are swapped between
                 samples (max |delta logit|, mean over samples): ~0 means the answer ignores
                 the image
  probe          a ridge probe reading the digit from the packed visual token of its cell,
                 held-out accuracy: are the visual tokens readable at all?
  on cell        attention of the last prompt token on the digit's cell, best layer and head,
                 against uniform 1/N

A model that passes reads the digit (tf_exact near 1) with a large image effect; a failure with
a readable probe means the LLM never learned to select the token.

`--warmup=K` first trains K steps on 1 x 1 pages (the digit is the only cell, always the same
visual token): the LLM learns to *read* a digit from a visual token where no selection is
needed, and with that readout in place the selection on G x G pages follows within ~100 steps
(without it, it never did here). `--digits=k` puts k digits of distinct colours on the page
(the question asks one), so the lookup must match the colour, not just find the ink.
"""
from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from PIL import Image

from visor_jax import budgets, config_lib, model_configs
from visor_jax.data import conversations, inputs, pages
from visor_jax.data.tokenizer import build_tiny_tokenizer
from visor_jax.evaluation.metrics import wilson_interval
from visor_jax.models.llava_onevision import INPUT_KEYS, LlavaOnevision
from visor_jax.training import config as train_config
from visor_jax.training import optim, steps

flags.DEFINE_integer("steps", 300, "Training steps per grid.")
flags.DEFINE_string("grids", "4,6", "Page sizes (cells per side).")
flags.DEFINE_float("lr", 1e-3, "Peak learning rate (the trainer's schedule).")
flags.DEFINE_integer("batch", 16, "Batch size.")
flags.DEFINE_integer("warmup", 0, "Steps on 1 x 1 pages first (learn to read a visual token).")
flags.DEFINE_integer("digits", 1, "Digits of distinct colours per page (the question asks one).")
FLAGS = flags.FLAGS
TEXT = 32


def page(rng, grid: int, digits: int = 1):
  """(PNG bytes, colour, digit, cell) of the asked digit: `digits` digits of distinct colours
  in distinct cells of an empty black page."""
  digits = min(digits, grid * grid)
  cells = [divmod(int(i), grid) for i in rng.choice(grid * grid, size=digits, replace=False)]
  colours = [str(c) for c in rng.choice(list(pages.COLOURS), size=digits, replace=False)]
  values = [str(v) for v in rng.integers(10, size=digits)]
  img = np.full((grid * pages.CELL, grid * pages.CELL, 3), pages.PAGE_COLOURS["black"], np.uint8)
  for (r, c), colour, digit in zip(cells, colours, values):
    img[r * pages.CELL:(r + 1) * pages.CELL, c * pages.CELL:(c + 1) * pages.CELL][
        pages.GLYPHS[digit]] = pages.COLOURS[colour]
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  k = int(rng.integers(digits))
  return buf.getvalue(), colours[k], values[k], cells[k]


def batch(rng, grid: int, n: int, cfg, tok, digits: int = 1) -> tuple[dict, list]:
  examples, cells = [], []
  for _ in range(n):
    png, colour, digit, cell = page(rng, grid, digits)
    record = {"image": png, "conversations": [
        {"from": "human", "value": f"<image>\nWhat is the {colour} digit?"},
        {"from": "gpt", "value": digit}]}
    examples.append(conversations.encode_record(record, tok, cfg, max_text_len=TEXT,
                                                system_prompt=""))
    cells.append(cell)
  b = inputs.collate([e.sample for e in examples], text_len=TEXT,
                     num_visual=1 + grid * (grid + 1), num_crops=1 + grid * grid)
  b["targets"] = np.full((n, TEXT), -1, np.int32)
  for i, e in enumerate(examples):
    b["targets"][i, :len(e.targets)] = e.targets
  return b, cells


def attention_on_cell(model, x, cells, grid: int) -> float:
  """Best (layer, head) mean attention of the last prompt token on the digit's cell."""
  cfg, dec = model.cfg, model.decoder
  text, vis = model.streams(x)
  vis = dec.pos_conv(vis, x["vis_valid"]) if dec.pos_conv is not None else vis
  h = jnp.concatenate([vis, text], 1)
  pos = jnp.concatenate([x["vis_pos"], x["text_pos"]], 1)
  valid = jnp.concatenate([x["vis_valid"], x["text_valid"]], 1)
  mask = (pos[:, None, :, None] >= pos[:, None, None, :]) & valid[:, None, None, :]
  rows = np.arange(len(cells))
  last = vis.shape[1] + np.asarray(x["text_valid"]).sum(1) - 1
  cell_idx = np.asarray([pages.visual_token(grid, c) for c in cells])
  graphdef, state = nnx.split(dec.layers)
  best = 0.0
  for layer_i in range(cfg.num_layers):
    layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer_i: a[i], state))
    hn = layer.input_norm(h)
    q = layer.attn.project_q(hn, pos)
    k, _ = layer.attn.project_kv(hn, pos)
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(q.shape[-1])
    p = np.asarray(jax.nn.softmax(jnp.where(mask, s, -1e30), -1))
    on_cell = p[rows, :, last, cell_idx]            # [B, heads]
    best = max(best, float(on_cell.mean(0).max()))
    h = layer(h, pos, mask)
  return best


def probe(model, rng, grid: int, cfg, tok, batches: int = 16) -> float:
  """Held-out ridge-probe accuracy of the digit from its cell's packed visual token."""
  feats, labels = [], []
  graphdef, state = nnx.split(model)
  streams = jax.jit(lambda st, x: nnx.merge(graphdef, st).streams(x)[1])
  for _ in range(batches):
    b, cells = batch(rng, grid, 32, cfg, tok)
    vis = streams(state, {k: jnp.asarray(b[k]) for k in INPUT_KEYS})
    vis = np.asarray(vis)
    for i, c in enumerate(cells):
      feats.append(vis[i, pages.visual_token(grid, c)])
    labels += [int(t[t >= 0][0]) for t in b["targets"]]  # the digit's token id
  x = np.c_[np.asarray(feats), np.ones(len(feats))]
  classes = sorted(set(labels))
  y = np.eye(len(classes))[[classes.index(v) for v in labels]]
  half = len(x) // 2
  w = np.linalg.solve(x[:half].T @ x[:half] + 1e-2 * np.eye(x.shape[1]), x[:half].T @ y[:half])
  return float((np.argmax(x[half:] @ w, 1) == np.argmax(y[half:], 1)).mean())


def run(grid: int, num_steps: int, lr: float, batch_size: int, seed: int = 0,
        eval_items: int = 256, probe_batches: int = 16, warmup: int = 0, digits: int = 1
        ) -> dict:
  """Trains `warmup` steps on 1 x 1 pages, then `num_steps` on `grid` pages with `digits`
  digits each (one schedule over both), and measures the gate's columns on fresh pages."""
  cfg = config_lib.model_config(model_configs.pages())
  tok = build_tiny_tokenizer(pages.corpus(), vocab_size=cfg.image_token_id)
  graphdef, state = nnx.split(LlavaOnevision(cfg, rngs=nnx.Rngs(seed)))
  params = nnx.to_pure_dict(state)
  o = train_config.default("pages").optim
  o.lr = lr
  labels = optim.param_labels(params, o.param_groups)
  tx = optim.make_optimizer(o, labels, max(warmup + num_steps, 1))
  step = jax.jit(steps.make_train_step(graphdef, tx, labels))
  eval_step = jax.jit(steps.make_eval_step(graphdef))
  train_state = steps.init_state(params, tx, labels)
  rng = np.random.default_rng(seed)
  budget = budgets.all_sa(cfg, batch_size)
  for i in range(warmup + num_steps):
    b, _ = batch(rng, 1, batch_size, cfg, tok) if i < warmup else \
        batch(rng, grid, batch_size, cfg, tok, digits)
    train_state, _ = step(train_state, b, budget)
  test_rng = np.random.default_rng(seed + 1)
  hits, effects, on_cell = [], [], []
  params = train_state["params"]
  model = nnx.merge(graphdef, params)
  logits = jax.jit(lambda p, x, b: nnx.merge(graphdef, p)(x, b))
  for _ in range(eval_items // batch_size):
    b, cells = batch(test_rng, grid, batch_size, cfg, tok, digits)
    hits += list(np.asarray(eval_step(train_state["params"], b, budget)["tf_exact"]))
    x = {k: jnp.asarray(b[k]) for k in INPUT_KEYS}
    swapped = {**x, "pixels": jnp.roll(x["pixels"], 1, axis=0)}
    first = np.argmax(b["targets"] >= 0, axis=1)
    rows = np.arange(batch_size)
    delta = np.abs(np.asarray(logits(params, x, budget) - logits(params, swapped, budget))
                   )[rows, first]
    effects.append(float(delta.max(-1).mean()))
    if not on_cell:
      on_cell.append(attention_on_cell(model, x, cells, grid))
  lo, hi = wilson_interval(float(np.sum(hits)), len(hits))
  return {"grid": grid, "steps": num_steps, "warmup": warmup, "digits": digits,
          "tf_exact": float(np.mean(hits)), "lo": lo,
          "hi": hi, "n": len(hits), "image_effect": float(np.mean(effects)),
          "probe": probe(model, np.random.default_rng(seed + 2), grid, cfg, tok, probe_batches),
          "on_cell": on_cell[0], "uniform": 1 / (1 + grid * (grid + 1))}


def format_table(rows) -> str:
  head = (f"{'grid':>4} {'digits':>6} {'warmup':>6} {'steps':>6} {'tf_exact [95%]':>20} {'n':>4} {'image effect':>13} "
          f"{'probe':>6} {'on cell':>8} {'uniform':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    lines.append(f"{r['grid']:>4} {r['digits']:>6} {r['warmup']:>6} {r['steps']:>6} {r['tf_exact']:>7.2f} [{r['lo']:.2f}, "
                 f"{r['hi']:.2f}] {r['n']:>4} {r['image_effect']:>13.4f} {r['probe']:>6.2f} "
                 f"{r['on_cell']:>8.3f} {r['uniform']:>8.3f}")
  return "\n".join(lines)


def main(argv):
  del argv
  rows = [run(int(g), FLAGS.steps, FLAGS.lr, FLAGS.batch, warmup=FLAGS.warmup,
              digits=FLAGS.digits) for g in FLAGS.grids.split(",")]
  print(f"learnability gate: 'What is the <colour> digit?', {FLAGS.digits} digit(s) of distinct "
        "colours on an empty page, all-SA base from scratch; chance 0.10")
  print(format_table(rows))


if __name__ == "__main__":
  app.run(main)
