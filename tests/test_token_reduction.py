"""Token reduction inside the same model (models/token_reduction.py): exact no-ops at keep=1,
masking = dropping = gathering, each method keeps what it promised and ranks what it says, FLOPs
agree with XLA, and the serving / evaluation wiring answers like the cached generator."""
import numpy as np
import jax
import PIL.Image
import pytest
from flax import nnx

import hf_fixtures
import model_fixtures
from model_fixtures import perturb_new_parts, prompt_ids
from visor_jax import budgets, config_lib, flops, model_configs, runs
from visor_jax.data import inputs as inputs_lib
from visor_jax.evaluation import harness
from visor_jax.evaluation import main as eval_main
from visor_jax.inference import serving
from visor_jax.models import token_reduction as tr
from visor_jax.models.llava_onevision import LlavaOnevision
from visor_jax.models.nn import rope

PEERS = ("fastv", "pyramiddrop", "visionzip")
_FORWARDS = {}  # (Reduction, gather) → jitted forward, shared by the tests (one compile each)


def _init(cfg, seed=0):
  """A random tiny model, initialised under jit (an eager init is ~10x slower)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LlavaOnevision(cfg, rngs=nnx.Rngs(seed))))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.state(LlavaOnevision(cfg, rngs=nnx.Rngs(seed))))())


@pytest.fixture(scope="module")
def setup():
  cfg = config_lib.model_config(model_configs.tiny())
  model = _init(cfg)
  plain = nnx.state(nnx.clone(model))
  perturb_new_parts(model)  # CA and the positional conv non-zero, as after training
  tok = hf_fixtures.tiny_tokenizer()
  samples = [
      inputs_lib.build_sample(prompt_ids(tok), [hf_fixtures.random_image(40, 70, 1)], cfg),
      inputs_lib.build_sample(prompt_ids(tok, "Read the code."),
                              [hf_fixtures.random_image(84, 84, 2)], cfg),
      inputs_lib.build_sample(prompt_ids(tok, "How many shapes?"),
                              [hf_fixtures.random_image(20, 60, 3)], cfg),
  ]
  batch = inputs_lib.collate(samples)
  graphdef = nnx.graphdef(model)
  base = jax.jit(lambda st, x, b: nnx.merge(graphdef, st)(x, b))
  mixed = np.concatenate([budgets.all_sa(cfg), budgets.ca_only(cfg), budgets.mask(cfg, [1, 4])])
  states = {"zero-init": plain, "perturbed": nnx.state(model)}
  assert not np.allclose(*(np.asarray(s.decoder.pos_conv.pointwise[...]) for s in states.values()))
  return dict(cfg=cfg, model=model, tok=tok, samples=samples, batch=batch, states=states,
              base=base, mixed=mixed)


def _forward(model, reduction, gather=True, capacity=None):
  key = (reduction, gather, capacity)
  if key not in _FORWARDS:
    _FORWARDS[key] = tr.jit_forward(model, reduction, gather=gather, capacity=capacity)
  return _FORWARDS[key]


def _budget(setup, method):
  return setup["mixed"] if method == "visor_tr" else None


def _reference_budget(setup, method):
  return setup["mixed"] if method == "visor_tr" else budgets.all_sa(setup["cfg"], 3)


def _pooled_count(cfg, sample, factor):
  """VISOR-TR's promise, counted independently from the AnyRes layout: base-view rows of
  `grid` tokens, then grid rows each ending in a newline; ceil(row / factor) pooled tokens per
  row plus the newline."""
  base, width = cfg.vision.num_patches, cfg.vision.grid
  count, row = (base // width) * -(-width // factor), 0
  for newline in sample.vis_newline[base:]:
    if newline:
      count, row = count + -(-row // factor) + 1, 0
    else:
      row += 1
  assert row == 0
  return count


# ------------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("method", tr.METHODS)
def test_keep_one_is_an_exact_noop(setup, method):
  """keep=1: the peers equal the all-SA model, VISOR-TR equals VISOR at per-sample budgets,
  with the new parts at zero init and perturbed."""
  fwd = _forward(setup["model"], tr.Reduction(method, 1.0))
  valid = setup["batch"]["vis_valid"]
  for name, state in setup["states"].items():
    out = fwd(state, setup["batch"], _budget(setup, method), None)
    ref = np.asarray(setup["base"](state, setup["batch"], _reference_budget(setup, method)))
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_array_equal(np.asarray(out.kept),
                                  np.repeat(valid.sum(1)[:, None], setup["cfg"].num_layers, 1))
    np.testing.assert_array_equal(np.asarray(out.survived), valid)


@pytest.mark.parametrize("method", PEERS + ("visor_tr",))
def test_gathered_equals_masked_and_keeps_the_promise(setup, method):
  cfg, batch, state = setup["cfg"], setup["batch"], setup["states"]["perturbed"]
  r = tr.Reduction(method, 0.5)
  capacity = None
  if method == "visor_tr":  # traced inputs cannot size VISOR-TR's gather: the host does
    capacity = tr.visor_tr_capacity(cfg, batch, r)
    assert capacity < batch["vis_valid"].shape[1]
  gathered = _forward(setup["model"], r, capacity=capacity)(state, batch, _budget(setup, method),
                                                            None)
  masked = _forward(setup["model"], r, gather=False)(state, batch, _budget(setup, method), None)
  np.testing.assert_allclose(np.asarray(gathered.logits), np.asarray(masked.logits), atol=1e-5,
                             rtol=0)
  np.testing.assert_array_equal(np.asarray(gathered.kept), np.asarray(masked.kept))
  np.testing.assert_array_equal(np.asarray(gathered.survived), np.asarray(masked.survived))
  ref = np.asarray(setup["base"](state, batch, _reference_budget(setup, method)))
  assert np.abs(np.asarray(gathered.logits) - ref).max() > 1e-3  # it did reduce something

  kept, survived = np.asarray(gathered.kept), np.asarray(gathered.survived)
  for i, s in enumerate(setup["samples"]):
    n = s.num_visual_tokens
    if method == "visor_tr":
      promise = [_pooled_count(cfg, s, 2)] * cfg.num_layers
      np.testing.assert_array_equal(tr.pooled_count(cfg, s.vis_newline, s.vis_pos, r), promise[0])
    else:
      promise = tr.kept_counts(cfg, r, n)
    assert kept[i].tolist() == promise, (i, kept[i], promise)
    assert not survived[i, n:].any()
    if method in ("fastv", "pyramiddrop"):   # survivors: exactly the tokens still attended
      assert survived[i].sum() == kept[i, -1]
    if method == "visionzip":                # dominant tokens survive; the rest is merged
      ctx = tr.contextual_count(kept[i, 0], n, r.contextual)
      assert ctx >= 1 and survived[i].sum() == kept[i, 0] - ctx
  if method == "fastv":
    assert kept[:, :2].tolist() == [[s.num_visual_tokens] * 2 for s in setup["samples"]]


def _last_token_top(setup, layer_index, keep):
  """The reference ranking, in numpy: attention of the last prompt token over the hidden states
  entering `layer_index` (all-SA base), softmax over all keys, mean over heads; top-keep."""
  model, batch, cfg = setup["model"], setup["batch"], setup["cfg"]
  dec, t = model.decoder, cfg.text
  text, vis = model.streams(batch)
  vis = dec.pos_conv(vis, batch["vis_valid"])
  args = (batch["text_pos"], batch["vis_pos"], batch["text_valid"], batch["vis_valid"])
  text, vis = dec.run_layers(text, vis, *args, budgets.all_sa(cfg, 3), 0, layer_index,
                             unroll=True)
  x = np.concatenate([np.asarray(vis), np.asarray(text)], axis=1).astype(np.float64)
  lay, l = dec.layers, layer_index
  p = lambda v: np.asarray(v[...][l], np.float64)
  h = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + t.rms_norm_eps) * p(lay.input_norm.scale)
  pos = np.concatenate([batch["vis_pos"], batch["text_pos"]], axis=1)
  valid = np.concatenate([batch["vis_valid"], batch["text_valid"]], axis=1)
  nh, kh, hd = t.num_heads, t.num_kv_heads, t.head_dim
  b, s = pos.shape
  q = (h @ p(lay.attn.q_proj.kernel) + p(lay.attn.q_proj.bias)).reshape(b, s, nh, hd)
  k = (h @ p(lay.attn.k_proj.kernel) + p(lay.attn.k_proj.bias)).reshape(b, s, kh, hd)
  q = np.asarray(rope(q.astype(np.float32), pos, t.rope_theta), np.float64)
  k = np.asarray(rope(k.astype(np.float32), pos, t.rope_theta), np.float64)
  n = batch["vis_valid"].shape[1]
  out = np.zeros_like(batch["vis_valid"])
  for i in range(b):
    last = n + int(np.flatnonzero(batch["text_valid"][i])[-1])
    w = np.zeros(s)
    for head in range(nh):
      logits = k[i, :, head // (nh // kh)] @ q[i, last, head] / np.sqrt(hd)
      logits = np.where((pos[i] <= pos[i, last]) & valid[i], logits, -np.inf)
      e = np.exp(logits - logits.max())
      w += e / e.sum() / nh
    n_valid = int(batch["vis_valid"][i].sum())
    top = np.argsort(-w[:n_valid], kind="stable")[:tr.keep_count(n_valid, keep)]
    out[i, top] = True
  return out


def test_fastv_and_pyramiddrop_keep_what_the_last_token_attended_most(setup):
  """FastV (K=2) ranks by layer 1's attention over its input; PyramidDrop with one boundary at
  layer 1 ranks by layer 1's norm/q/k over the same input: both keep the same, reference set."""
  state = setup["states"]["perturbed"]
  want = _last_token_top(setup, 1, 0.5)
  fastv = _forward(setup["model"], tr.Reduction("fastv", 0.5))(state, setup["batch"], None, None)
  pdrop = _forward(setup["model"], tr.Reduction("pyramiddrop", 0.5, stages=(1,)))(
      state, setup["batch"], None, None)
  np.testing.assert_array_equal(np.asarray(fastv.survived), want)
  np.testing.assert_array_equal(np.asarray(pdrop.survived), want)


def test_bad_settings_are_refused(setup):
  cfg, model, batch = setup["cfg"], setup["model"], setup["batch"]
  with pytest.raises(ValueError, match="all-SA base"):
    tr.reduced_forward(model, batch, tr.Reduction("fastv", 0.5), budgets.ca_only(cfg, 3))
  with pytest.raises(ValueError, match="needs|budget"):
    tr.reduced_forward(model, batch, tr.Reduction("visor_tr", 0.5))
  with pytest.raises(ValueError, match="K="):
    tr.reduced_forward(model, batch, tr.Reduction("fastv", 0.5, layer=cfg.num_layers))
  for bad in (dict(method="topk"), dict(method="fastv", keep=0), dict(method="fastv", keep=1.5),
              dict(method="visor_tr", keep=0.4)):
    with pytest.raises(ValueError):
      tr.Reduction(**bad)


# ------------------------------------------------------------------------------- pure pieces

def test_counts_labels_and_parsing():
  assert [tr.keep_count(n, 0.1) for n in (0, 1, 9, 10, 30, 7371)] == [0, 1, 1, 1, 3, 738]
  assert tr.keep_count(7371, 0.5) == 3686 and tr.keep_count(7, 0.25) == 2
  assert tr.keep_count(100, 0.3) == 30  # float32 ceil(0.3 * 100) is 31
  n = np.arange(0, 8000, 7)
  for keep in (0.1, 0.15, 0.25, 0.3, 1 / 3, 0.5, 0.6, 0.75, 1.0):
    np.testing.assert_array_equal(np.asarray(tr._keep_count(n, keep)),
                                  [tr.keep_count(int(i), keep) for i in n])
  assert tr.Reduction("pyramiddrop", 0.5).stage_layers(24) == (6, 12, 18)
  assert tr.Reduction("pyramiddrop", 0.5).stage_layers(6) == (2, 3, 5)
  assert tr.contextual_count(64, 400, tr.VISIONZIP_CONTEXTUAL) == 10
  assert tr.contextual_count(10, 10, 0.2) == 0 and tr.contextual_count(1, 5, 0.2) == 0
  assert [r.label for r in tr.parse("fastv:0.5, pyramiddrop:0.5,visionzip:0.25,visor_tr:0.5")] \
      == ["FastV 50%", "PyramidDrop 50%", "VisionZip-style 25%", "VISOR-TR 50%"]
  with pytest.raises(ValueError, match="--reduction"):
    tr.parse("fastv:2")


def test_answer_token_survival():
  mask = np.array([True, False, True])
  assert tr.answer_token_survival(mask, 0) and not tr.answer_token_survival(mask, 1)
  assert tr.answer_token_survival([4, 9, 2], 9) and not tr.answer_token_survival([4, 9], 3)
  batch = np.array([[True, False], [False, True]])
  np.testing.assert_array_equal(tr.answer_token_survival(batch, np.array([0, 0])), [True, False])
  assert tr.answer_token_survival(batch, np.array([1, 1])).mean() == 0.5  # a survival rate
  for bad in ((mask, 3), (mask, -1), (mask, 0.5), ([1, 2], -1), (batch, 0)):
    with pytest.raises(ValueError):
      tr.answer_token_survival(*bad)


# ------------------------------------------------------------------------------- FLOPs

@pytest.fixture(scope="module")
def reduced():
  """tests/test_flops.py's matmul-dominated config (`model_fixtures.xla_check_config`)."""
  return model_fixtures.xla_check_config()


CASES = [(method, keep) for method in PEERS + ("visor_tr",) for keep in (0.5, 0.25)]


@pytest.fixture(scope="module")
def xla_counts(reduced):
  """(analytic dict, XLA flops) per (method, keep); VISOR-TR at budget [1, 4]."""
  cfg, shape = reduced
  out = {}
  for method, keep in CASES:
    r = tr.Reduction(method, keep)
    sa = [1, 4] if method == "visor_tr" else None
    kept = [tr.keep_count(shape["num_visual"], keep)] * cfg.num_layers if sa else None
    out[method, keep] = (flops.reduced_forward_flops(cfg, reduction=r, kept=kept, sa_layers=sa,
                                                     **shape),
                         flops.xla_reduced_forward_flops(cfg, reduction=r, sa_layers=sa, **shape))
  return out


@pytest.mark.parametrize("method, keep", CASES)
def test_reduced_flops_match_xla(xla_counts, method, keep):
  analytic, xla = xla_counts[method, keep]
  assert abs(xla / analytic["total"] - 1) < 0.05, (analytic["total"], xla)
  vision = analytic["vision"] + analytic["projector"]  # same program, same count: test_flops
  assert abs((xla - vision) / analytic["llm"] - 1) < 0.05, (analytic["llm"], xla - vision)
  print(f"{method} keep {keep}: XLA / analytic total {xla / analytic['total']:.4f}, "
        f"LLM {(xla - vision) / analytic['llm']:.4f}")


def test_reduced_flops_scale_with_keep_like_xla(xla_counts):
  """What the reduction saves between two keep ratios is what XLA sees it save."""
  for method in PEERS + ("visor_tr",):
    (a1, x1), (a2, x2) = xla_counts[method, 0.5], xla_counts[method, 0.25]
    assert a1["llm"] > a2["llm"] and x1 > x2
    assert abs((x1 - x2) / (a1["total"] - a2["total"]) - 1) < 0.05, method


def test_reduced_flops_reduce_to_forward_flops(reduced):
  cfg, shape = reduced
  all_sa = flops.forward_flops(cfg, sa_layers=range(cfg.num_layers), **shape)
  none = flops.reduced_forward_flops(cfg, reduction=tr.Reduction(), **shape)
  assert none["ranking"] == 0 and none["total"] == pytest.approx(all_sa["total"])
  n = shape["num_visual"]
  visor = flops.reduced_forward_flops(cfg, reduction=tr.Reduction("visor_tr", 1.0),
                                      kept=[n] * cfg.num_layers, sa_layers=[1, 4], **shape)
  assert visor["total"] == pytest.approx(flops.forward_flops(cfg, sa_layers=[1, 4],
                                                             **shape)["total"])
  for method in PEERS:  # keep=1 runs the ranking (a no-op selection): its cost only
    f = flops.reduced_forward_flops(cfg, reduction=tr.Reduction(method, 1.0), **shape)
    assert 0 < f["ranking"] < 0.03 * f["llm"]
    assert f["llm"] - f["ranking"] == pytest.approx(all_sa["llm"])
  with pytest.raises(ValueError, match="all-SA base"):
    flops.reduced_forward_flops(cfg, reduction=tr.Reduction("fastv", 0.5), sa_layers=[1], **shape)
  with pytest.raises(ValueError, match="row layout"):
    flops.reduced_forward_flops(cfg, reduction=tr.Reduction("visor_tr", 0.5), **shape)


def test_savings_at_0_5b():
  """LLaVA-OV 0.5B at 2304² (7371 visual, 64 text tokens): the LLM saving of each peer."""
  cfg = config_lib.model_config(model_configs.llava_ov_0_5b())
  shape = dict(num_crops=37, num_visual=7371, num_text=64)
  base = flops.llava_ov_flops(cfg, **shape)["llm"]
  saving = {m: base / flops.reduced_forward_flops(cfg, reduction=tr.Reduction(m, 0.5),
                                                  **shape)["llm"] for m in PEERS}
  # Above 2x: at 7.4k tokens the attention scores (quadratic in the tokens) are a large share.
  assert 2.0 < saving["fastv"] < 2.5         # layers 0-1 keep everything
  assert 2.2 < saving["pyramiddrop"] < 2.7   # 1, 1/2, 1/4, 1/8 of the tokens over 4 stages
  assert 2.4 < saving["visionzip"] < 2.8     # every layer at half
  assert saving["fastv"] < saving["pyramiddrop"] < saving["visionzip"]
  quarter = flops.reduced_forward_flops(cfg, reduction=tr.Reduction("visionzip", 0.25), **shape)
  assert 5 < base / quarter["llm"] < 7       # the method note's table: VisionZip 5.7x
  for m in PEERS:
    f = flops.reduced_forward_flops(cfg, reduction=tr.Reduction(m, 0.5), **shape)
    assert f["ranking"] < 0.01 * f["llm"], m
  print({m: round(s, 2) for m, s in saving.items()})


# ------------------------------------------------------------------------------- wiring

@pytest.fixture(scope="module")
def assistant(setup):
  cfg, tok = setup["cfg"], setup["tok"]
  params = nnx.to_pure_dict(nnx.state(setup["model"], nnx.Param))
  run = runs.Run(kind="export", path="<memory>", step=None, config=None,
                 model=model_configs.tiny(), cfg=cfg, tokenizer=tok,
                 image_spec=inputs_lib.processor_spec(cfg), system_prompt=None, params=params)
  return serving.Assistant(run)


IMAGES = [hf_fixtures.random_image(40, 70, 1), hf_fixtures.random_image(84, 84, 2)]
QUESTIONS = ["What colour is the small square?", "Read the code."]


def test_serving_reduction_answers_like_the_cached_generator(assistant):
  """Keep=1: the uncached reduced greedy loop gives the KV-cached generator's answers; below
  1 the answers cost less, by the FLOPs of the kept counts."""
  cfg = assistant.cfg
  cached = assistant.answer(IMAGES, QUESTIONS, sa_layers="all", max_new_tokens=4)
  same = assistant.answer(IMAGES, QUESTIONS, reduction=tr.Reduction("fastv", 1.0),
                          max_new_tokens=4)
  assert [(a.text, a.num_generated) for a in same] == [(a.text, a.num_generated) for a in cached]
  assert all(a.num_generated == 4 for a in same)  # no early stop: 4 steps compared
  half = assistant.answer(IMAGES, QUESTIONS, reduction=tr.Reduction("fastv", 0.5),
                          max_new_tokens=4)
  tr_half = assistant.answer(IMAGES, QUESTIONS, reduction=tr.Reduction("visor_tr", 0.5),
                             sa_layers=[1, 4], max_new_tokens=4)
  for c, h, v in zip(cached, half, tr_half):
    assert h.llm_flops < c.llm_flops and h.total_flops - h.llm_flops == pytest.approx(
        c.total_flops - c.llm_flops)
    plain = flops.forward_flops(cfg, num_crops=v.num_crops, num_visual=v.num_visual,
                                num_text=v.num_text, sa_layers=[1, 4])
    assert v.sa_layers == [1, 4] and v.llm_flops < plain["llm"]
  with pytest.raises(ValueError, match="all-SA base"):
    assistant.answer(IMAGES, QUESTIONS, reduction=tr.Reduction("fastv", 0.5), sa_layers=[1])
  with pytest.raises(ValueError, match="greedy"):
    assistant.answer(IMAGES, QUESTIONS, reduction=tr.Reduction("fastv", 0.5), temperature=1.0)


def test_evaluation_adds_reduction_rows(assistant, tmp_path):
  items = [harness.Item(id=str(i), dataset="toy", question=q, answers=("red",),
                        metric="exact_match", image=PIL.Image.fromarray(img))
           for i, (img, q) in enumerate(zip(IMAGES, QUESTIONS))]
  lines = []
  summary = eval_main.evaluate(assistant, items, str(tmp_path), layer_sets=[list(range(6))],
                               batch_size=2, max_new_tokens=4, print_fn=lines.append,
                               reductions=tr.parse("fastv:0.5,visor_tr:0.5"))
  rows = {r["label"]: r for r in summary["runs"]}
  assert set(rows) == {"SA{0,1,2,3,4,5}", "FastV 50%", "VISOR-TR 50%"}
  assert rows["FastV 50%"]["kind"] == "reduction" and rows["FastV 50%"]["n_scored"] == 2
  assert (rows["FastV 50%"]["overall"]["mean_llm_flops"]
          < rows["SA{0,1,2,3,4,5}"]["overall"]["mean_llm_flops"])
  assert (tmp_path / "results_FastV_50.json").exists()
  assert len(summary["feasible"]["table"]) == 1  # reductions are rows, not budgets
  assert "FastV 50%" in lines[-1] and "VISOR-TR 50%" in lines[-1]
  with pytest.raises(ValueError, match="pareto"):
    eval_main.run(assistant, str(tmp_path), mode="search", reduction="fastv:0.5")


def test_visor_tr_is_trainable(setup):
  """The trainer's VISOR-TR path (`training.config.visor_tr_keep`): its loss is the reduced
  forward's, keep = 1 is the plain model's loss, and a train step moves the parameters
  (gradients flow through the pooled tokens into the tower, projector and new parts)."""
  from visor_jax.training import optim, steps
  cfg, model = setup["cfg"], setup["model"]
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  batch = dict(setup["batch"])
  t = batch["tokens"].shape[1]
  batch["targets"] = np.where(batch["text_valid"] & (np.arange(t) >= t - 4),
                              batch["tokens"], -1).astype(np.int32)
  budget = budgets.mask(cfg, [1], 3)
  labels = optim.param_labels(params, [(r".*", "all")])
  trainable, frozen = optim.split(params, labels)
  red = tr.Reduction("visor_tr", 0.5)
  loss = float(jax.jit(steps.make_loss_fn(graphdef, red))(trainable, frozen, batch, budget)[0])
  logits = tr.reduced_forward(model, {k: batch[k] for k in batch if k != "targets"}, red,
                              budget).logits
  want = float(steps.token_loss(logits, batch["targets"])[0])
  assert abs(loss - want) < 1e-5 * max(1.0, abs(want))
  plain = float(jax.jit(steps.make_loss_fn(graphdef))(trainable, frozen, batch, budget)[0])
  one = float(jax.jit(steps.make_loss_fn(graphdef, tr.Reduction("visor_tr", 1.0)))(
      trainable, frozen, batch, budget)[0])
  assert abs(one - plain) < 1e-5 * max(1.0, abs(plain)) and abs(loss - plain) > 1e-4
  import optax
  tx = optax.sgd(1e-2)
  step = jax.jit(steps.make_train_step(graphdef, tx, labels, reduction=red))
  new, m = step(steps.init_state(params, tx, labels), batch, budget)
  assert int(m["finite"]) == 1
  moved = [k for k, (a, b) in enumerate(zip(jax.tree.leaves(params),
                                              jax.tree.leaves(jax.device_get(new["params"]))))
           if not np.array_equal(np.asarray(a), np.asarray(b))]
  assert len(moved) > len(jax.tree.leaves(params)) // 2
