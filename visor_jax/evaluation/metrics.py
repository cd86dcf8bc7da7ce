"""Per-sample answer scoring for the VQA-style benchmarks VISOR reports (pure Python, no jax).

WHY a module of its own: the paper's numbers are dataset averages of *benchmark-specific*
scores; a harness that scored every dataset by exact match would under-report VQAv2/TextVQA
(soft 10-annotator accuracy), DocVQA/InfoVQA (ANLS) and ChartQA (relaxed numeric accuracy), and
the easy-vs-hard comparison between budgets would be skewed. Each metric maps
(prediction, references) -> a float in [0, 1]; `score` dispatches on the metric name.

Metrics:
  vqa_accuracy      VQAv2's `vqaEval.py` (GT-Vision-Lab/VQA master): its answer normalisation
                    (tables below, copied verbatim) and min(#humans / 3, 1) averaged over the
                    leave-one-out subsets of the references. See `vqa_accuracy` for <10 refs.
  anls              DocVQA/InfoVQA: max over references of 1 - NLD when NLD < 0.5, else 0.
  relaxed_accuracy  ChartQA: numbers within 5% relative error, otherwise case-insensitive
                    string equality.
  exact_match       lowercase, whitespace-collapsed, trailing periods dropped, then equality.
  multiple_choice   the option letter read from the prediction ("B", "(B)", "B.", "The answer
                    is B", or the option's text) against the reference letter or text.
"""
from __future__ import annotations

import re
import string
from typing import Callable, Sequence

# ---------------------------------------------------------------------------------------------
# The official VQAv2 normalisation tables (vqaEval.py, GT-Vision-Lab/VQA master), verbatim.
# Keys with capitals ("Im", "Id've") never match (text is lowercased first): kept as published.

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Official regex, bug included: "(?!<=\d)" is a negative *lookahead* for the text "<=digit",
# not a lookbehind, so every period not followed by a digit goes ("yes." -> "yes", "3.5" stays).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
         "`", ",", "?", "!")
# vqaEval.py calls `periodStrip.sub("", text, re.UNICODE)`: the flag lands in `count`, so at
# most re.UNICODE (= 32) periods are removed. Reproduced, harmless on real answers.
_PERIOD_COUNT = int(re.UNICODE)


def vqa_process_punctuation(text: str) -> str:
  """`processPunctuation`: a mark next to a space, or any mark in text with a digit,digit
  pattern, is deleted; otherwise it becomes a space ("hello,world" -> "hello world",
  "1,000" -> "1000"). Then periods not followed by a digit are deleted."""
  out = text
  for p in PUNCT:
    if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def vqa_process_digit_article(text: str) -> str:
  """`processDigitArticle`: lowercase, number words -> digits, drop articles, contractions."""
  words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_normalize(answer: str) -> str:
  """The full answer normalisation vqaEval.py applies to a prediction."""
  text = answer.replace("\n", " ").replace("\t", " ").strip()
  return vqa_process_digit_article(vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
  """VQAv2 accuracy.

  >= 10 references (the VQAv2/TextVQA/VizWiz case): official leave-one-out, the mean over
  each reference left out of min(#matches among the others / 3, 1); 2 of 10 humans -> 0.6.
  Fewer references: min(#matches / 3, 1), no averaging (leave-one-out of a single reference
  would always give 0). Note a lone reference therefore scores at most 1/3: single-answer
  datasets should use `exact_match`.

  Deviation, on purpose: references get the same full normalisation as the prediction
  (vqaEval.py only strips their punctuation, and only when annotators disagree, because the
  official annotation files are already normalised; on those files this is a no-op, and on
  hand-written files it makes "a dog" match "dog" in both directions).
  """
  if not references:
    raise ValueError("vqa_accuracy: no reference answers.")
  pred = vqa_normalize(prediction)
  refs = [vqa_normalize(r) for r in references]
  matches = [r == pred for r in refs]
  if len(refs) < 10:
    return min(1.0, sum(matches) / 3.0)
  total = sum(matches)
  loo = [min(1.0, (total - int(m)) / 3.0) for m in matches]
  return sum(loo) / len(loo)


# ---------------------------------------------------------------------------------------------
# ANLS.

def levenshtein(a: str, b: str) -> int:
  """Edit distance (insert/delete/substitute, unit costs), two-row dynamic programme."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def _anls_norm(text: str) -> str:
  """Lowercase, strip, collapse inner whitespace (as the DocVQA evaluation does)."""
  return " ".join(text.strip().lower().split())


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
  """Max over references of 1 - NLD if NLD < threshold else 0 (NLD = edit distance / longer
  length; two empty strings have NLD 0)."""
  if not references:
    raise ValueError("anls: no reference answers.")
  pred, best = _anls_norm(prediction), 0.0
  for ref in references:
    ref = _anls_norm(ref)
    longest = max(len(pred), len(ref))
    nld = levenshtein(pred, ref) / longest if longest else 0.0
    best = max(best, 1.0 - nld if nld < threshold else 0.0)
  return best


# ---------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA).

def _to_number(text: str) -> float | None:
  """'1,234.5' -> 1234.5, '12%' -> 12.0 (the percent sign is dropped, not divided out: ChartQA
  labels read "12" where the chart prints 12%; pix2struct's /100 would make "12%" != "12"),
  anything else -> None."""
  t = text.strip().replace(",", "")
  if t.endswith("%"):
    t = t[:-1].strip()
  try:
    value = float(t)
  except ValueError:
    return None
  return value if value == value and abs(value) != float("inf") else None  # no nan/inf


def relaxed_accuracy(prediction: str, references: Sequence[str],
                     tolerance: float = 0.05) -> float:
  """1 if some reference is a number the prediction is within `tolerance` relative error of
  (|p - r| <= tol * |r|; r = 0 needs p = 0), or equals as case-insensitive text; else 0."""
  if not references:
    raise ValueError("relaxed_accuracy: no reference answers.")
  pred_text = prediction.strip().rstrip(".").strip()
  pred_num = _to_number(pred_text)
  for ref in references:
    ref_num = _to_number(ref)
    if pred_num is not None and ref_num is not None:
      if abs(pred_num - ref_num) <= tolerance * abs(ref_num):
        return 1.0
    elif pred_text.lower() == ref.strip().lower():
      return 1.0
  return 0.0


# ---------------------------------------------------------------------------------------------
# Exact match and multiple choice.

def normalize_exact(text: str) -> str:
  """Lowercase, collapse whitespace, drop trailing periods: "Red." == "red"."""
  return " ".join(text.lower().split()).rstrip(".").strip()


def exact_match(prediction: str, references: Sequence[str]) -> float:
  if not references:
    raise ValueError("exact_match: no reference answers.")
  pred = normalize_exact(prediction)
  return float(any(pred == normalize_exact(r) for r in references))


LETTERS = string.ascii_uppercase
_LEADING_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)]|\s|$)")
_ANSWER_IS = re.compile(r"(?i:answer)(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])")
_LONE_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")
_CHOICE_PREFIX = re.compile(r"^\(?([A-Z])\)?[.:)]\s*")


def option_texts(choices: Sequence[str]) -> list[str]:
  """Choice strings without a leading "A. " / "(B) " label (the label is their position)."""
  out = []
  for i, c in enumerate(choices):
    m = _CHOICE_PREFIX.match(c.strip())
    out.append(c.strip()[m.end():] if m and m.group(1) == LETTERS[i] else c.strip())
  return out


def _letter_of_text(text: str, choices: Sequence[str] | None) -> str | None:
  if not choices:
    return None
  norm = normalize_exact(text)
  hits = [LETTERS[i] for i, c in enumerate(option_texts(choices)) if normalize_exact(c) == norm]
  return hits[0] if len(hits) == 1 else None


def extract_choice(prediction: str, choices: Sequence[str] | None = None) -> str | None:
  """The option letter a free-form answer names, or None.

  Tried in order: the option's text; the bare letter ("B", "(B)", "B.", also "b"); "answer
  is B" / "Answer: (B)"; a leading letter ("B) cat", "B. cat"); else a single distinct
  standalone capital letter anywhere, ignoring the words "A" and "I" (before a lowercase
  word). Letters are limited to the options when `choices` is given.
  """
  text = prediction.strip()
  valid = LETTERS[:len(choices)] if choices else LETTERS
  by_text = _letter_of_text(text, choices)
  if by_text:
    return by_text
  if len(text.rstrip(".)").lstrip("(")) == 1 and text.rstrip(".)").lstrip("(").upper() in valid:
    return text.rstrip(".)").lstrip("(").upper()
  m = _ANSWER_IS.search(text)
  if m and m.group(1) in valid:
    return m.group(1)
  m = _LEADING_LETTER.match(text)
  if m and m.group(1) in valid and not re.match(r"^[AI]\s+[a-z]", text):
    return m.group(1)
  found = {m.group(1) for m in _LONE_LETTER.finditer(text)
           if m.group(1) in valid and not re.match(r"[AI]\s+[a-z]", text[m.start():])}
  return found.pop() if len(found) == 1 else None


def multiple_choice(prediction: str, references: Sequence[str],
                    choices: Sequence[str] | None = None) -> float:
  """1 if the prediction names the reference option (by letter or by text), else 0.

  A reference is a letter ("B", "(B)") or, with `choices`, an option's text. Without a letter
  on either side, falls back to `exact_match` of the texts.
  """
  if not references:
    raise ValueError("multiple_choice: no reference answers.")
  pred = extract_choice(prediction, choices)
  for ref in references:
    r = ref.strip().rstrip(".)").lstrip("(").strip()
    want = r.upper() if len(r) == 1 and r.upper() in LETTERS else _letter_of_text(ref, choices)
    if want is None:
      if exact_match(prediction, [ref]):
        return 1.0
    elif pred == want:
      return 1.0
  return 0.0


# ---------------------------------------------------------------------------------------------
# Dispatch.

METRICS: dict[str, Callable[..., float]] = {
    "vqa_accuracy": vqa_accuracy,
    "anls": anls,
    "relaxed_accuracy": relaxed_accuracy,
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
}


def score(metric_name: str, prediction: str, references: Sequence[str] | str, *,
          choices: Sequence[str] | None = None) -> float:
  """Score one prediction; `choices` is only used by multiple_choice."""
  if metric_name not in METRICS:
    raise ValueError(f"unknown metric {metric_name!r}; expected one of {sorted(METRICS)}.")
  refs = [references] if isinstance(references, str) else [str(r) for r in references]
  if metric_name == "multiple_choice":
    return multiple_choice(prediction, refs, choices)
  return METRICS[metric_name](prediction, refs)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
  """The 95% Wilson score interval of a proportion (successes / n): sound near 0 and 1 and for
  small n, where the normal approximation is not; (nan, nan) for n = 0. Scores in [0, 1] that
  are not 0/1 (VQA accuracy, ANLS) are summed as fractional successes."""
  if n <= 0:
    return float("nan"), float("nan")
  p = successes / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)

