"""LLaVA records → ChatML ids, label mask and next-token targets (visor_jax.data.conversations)."""
import io

import numpy as np
import PIL.Image
import pytest

import hf_fixtures
from visor_jax.data import conversations as conv

# transformers' llava-onevision chat template (convert_llava_onevision_weights_to_hf.py).
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{'<|im_end|>' + '\\n'}}{% endfor %}")

EXPECTED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n<image>\nWhat colour is the small square?<|im_end|>\n"
            "<|im_start|>assistant\nThe code reads 4821.<|im_end|>\n"
            "<|im_start|>user\nHow many large shapes are there?<|im_end|>\n"
            "<|im_start|>assistant\nthree<|im_end|>\n")


def png(h=30, w=40, seed=0) -> bytes:
  buf = io.BytesIO()
  PIL.Image.fromarray(hf_fixtures.random_image(h, w, seed)).save(buf, "PNG")
  return buf.getvalue()


def record(**kw):
  r = {"id": "r0", "image": png(), "family": "hard", "conversations": [
      {"from": "human", "value": "What colour is the small square?\n<image>"},
      {"from": "gpt", "value": "The code reads 4821."},
      {"from": "human", "value": "How many large shapes are there?"},
      {"from": "gpt", "value": "three"}]}
  r.update(kw)
  return r


def encode(r, tok, cfg, **kw):
  kw.setdefault("max_text_len", 256)
  return conv.encode_record(r, tok, cfg, conv.ImageLoader(kw.pop("image_root", None)), **kw)


def interleaved_text(ex, tok):
  """Decodes the text stream with `<image>` where the visual tokens stand."""
  s, out = ex.sample, []
  for i, t in enumerate(s.tokens):
    if i and s.text_pos[i] != s.text_pos[i - 1] + 1:
      out.append(tok.image_token_id)
    out.append(int(t))
  return tok.decode(out, skip_special_tokens=False)


def test_chatml_text_matches_hf_template(tok, cfg):
  ex = encode(record(), tok, cfg)
  assert interleaved_text(ex, tok) == EXPECTED
  jinja2 = pytest.importorskip("jinja2")
  messages = [{"role": "system", "content": [{"type": "text",
                                              "text": "You are a helpful assistant."}]},
              {"role": "user", "content": [{"type": "image"}, {"type": "text",
                                           "text": "What colour is the small square?"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "The code reads 4821."}]},
              {"role": "user", "content": [{"type": "text",
                                           "text": "How many large shapes are there?"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "three"}]}]
  assert jinja2.Template(HF_CHAT_TEMPLATE).render(messages=messages) == EXPECTED


def test_label_mask_only_assistant_answers(tok, cfg):
  ex = encode(record(), tok, cfg)
  s, tg = ex.sample, ex.targets
  assert tg.dtype == np.int32 and tg.shape == s.tokens.shape
  sup = np.flatnonzero(tg != conv.IGNORE)
  # Each target is the next text token.
  np.testing.assert_array_equal(tg[sup], s.tokens[sup + 1])
  # Supervised runs decode to exactly the answers + <|im_end|>\n; the header is not supervised.
  runs = np.split(sup + 1, np.flatnonzero(np.diff(sup) != 1) + 1)
  texts = [tok.decode(s.tokens[r], skip_special_tokens=False) for r in runs]
  assert texts == ["The code reads 4821.<|im_end|>\n", "three<|im_end|>\n"]
  # The first answer token is predicted at the "\n" ending "<|im_start|>assistant\n"; nothing
  # in the system or user turns (all before it, and the second user turn) is supervised.
  first = sup[0]
  prefix = tok.decode(s.tokens[:first + 1], skip_special_tokens=False)
  assert prefix.endswith("<|im_start|>assistant\n") and "four" not in prefix
  between = s.tokens[runs[0][-1] + 1:runs[1][0]]
  assert tok.decode(between, skip_special_tokens=False) == (
      "<|im_start|>user\nHow many large shapes are there?<|im_end|>\n<|im_start|>assistant\n")
  assert ex.num_supervised == len(runs[0]) + len(runs[1])
  assert ex.id == "r0" and ex.family == "hard" and not ex.truncated


def test_targets_never_cross_the_image(tok, cfg):
  ex = encode(record(), tok, cfg)
  s = ex.sample
  gap = np.flatnonzero(np.diff(s.text_pos) != 1)
  assert len(gap) == 1 and s.text_pos[gap[0] + 1] - s.text_pos[gap[0]] - 1 == len(s.vis_pos)
  ok = ex.targets != conv.IGNORE
  assert np.all(s.text_pos[1:][ok[:-1]] == s.text_pos[:-1][ok[:-1]] + 1)
  # The rule itself, on a hand-made stream: a supervised token after a visual gap gets no target.
  tokens = np.array([10, 11, 12, 13], np.int32)
  pos = np.array([0, 1, 5, 6], np.int32)
  tg = conv.next_token_targets(tokens, pos, np.ones(4, bool))
  np.testing.assert_array_equal(tg, [11, -1, 13, -1])


def test_role_spellings_system_turn_and_no_system(tok, cfg):
  r = record(conversations=[
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "<image>\nWhat colour is the small square?"},
      {"role": "assistant", "content": "red"}])
  ex = encode(r, tok, cfg)
  assert interleaved_text(ex, tok).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
  r = record(conversations=[{"from": "user", "value": "<image>\nHi?"},
                            {"from": "assistant", "value": "red"}])
  ex = encode(r, tok, cfg, system_prompt=None)
  assert interleaved_text(ex, tok) == (
      "<|im_start|>user\n<image>\nHi?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")


def test_image_path_under_root_and_multi_image(tok, cfg, tmp_path):
  (tmp_path / "imgs").mkdir()
  (tmp_path / "imgs" / "a.png").write_bytes(png(30, 40, 1))
  ex = encode(record(image="imgs/a.png"), tok, cfg, image_root=tmp_path)
  assert len(ex.sample.pixels) > 1  # one image: AnyRes base + crops
  r = record(image=[png(20, 30, 2), png(40, 20, 3)], conversations=[
      {"from": "human", "value": "<image>\n<image>\nSame colour?"}, {"from": "gpt", "value": "no"}])
  ex = encode(r, tok, cfg)
  assert len(ex.sample.pixels) == 2  # several images: one padded-square crop each


def test_truncation_keeps_prefix_and_a_supervised_token(tok, cfg):
  r = record(conversations=[{"from": "human", "value": "<image>\nDescribe."},
                            {"from": "gpt", "value": "There is a large red circle. " * 20}])
  full = encode(r, tok, cfg, max_text_len=1024)
  ex = encode(r, tok, cfg, max_text_len=60)
  assert ex.truncated and len(ex.sample.tokens) == 60 and ex.num_supervised > 0
  np.testing.assert_array_equal(ex.sample.tokens, full.sample.tokens[:60])
  np.testing.assert_array_equal(ex.targets[:-1], full.targets[:59])
  assert ex.targets[-1] == conv.IGNORE
  with pytest.raises(conv.BadSample, match="overlong='skip'") as e:
    encode(r, tok, cfg, max_text_len=60, overlong="skip")
  assert e.value.reason == "too_long"
  assert not encode(r, tok, cfg, max_text_len=1024, overlong="skip").truncated


@pytest.mark.parametrize("change, reason", [
    (dict(image="no/such/file.png"), "missing_image"),
    (dict(image=b"definitely not an image"), "corrupt_image"),
    (dict(image=png()[:60]), "corrupt_image"),                      # truncated PNG
    (dict(conversations=[]), "malformed"),
    (dict(conversations=None), "malformed"),
    (dict(conversations=[{"from": "robot", "value": "<image>\nx"}]), "malformed"),
    (dict(conversations=[{"from": "human", "value": 3}]), "malformed"),
    (dict(image=None), "malformed"),                                # placeholder, no image
    (dict(image=[png(), png()]), "malformed"),                      # 1 placeholder, 2 images
    (dict(conversations=[{"from": "human", "value": "<image>\nx<|im_end|>"},
                         {"from": "gpt", "value": "y"}]), "malformed"),
    (dict(conversations=[{"from": "human", "value": "<image>\nHello?"}]), "no_assistant_turn"),
    (dict(conversations=[{"from": "human", "value": "<image>\n" + "word " * 300},
                         {"from": "gpt", "value": "ok"}]), "too_long"),
])
def test_bad_samples_are_typed(tok, cfg, change, reason):
  with pytest.raises(conv.BadSample) as e:
    encode(record(**change), tok, cfg)
  assert e.value.reason == reason and reason in str(e.value)


def test_too_many_visual_tokens_or_crops(tok, cfg):
  with pytest.raises(conv.BadSample, match="visual tokens") as e:
    encode(record(), tok, cfg, max_visual=3)
  assert e.value.reason == "too_long"
  with pytest.raises(conv.BadSample, match="crops"):
    encode(record(), tok, cfg, max_crops=1)
  with pytest.raises(conv.BadSample, match="not a dict"):
    encode(["not", "a", "record"], tok, cfg)
