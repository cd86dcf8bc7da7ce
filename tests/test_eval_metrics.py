"""Hand-computed cases for every metric, with the official VQAv2 normalisation corner cases."""
import pytest

from visor_jax.evaluation import metrics as m


# ----------------------------------------------------------------------------- VQA normalisation

@pytest.mark.parametrize("raw, norm", [
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"),    # articles, lowercase
    ("yes.", "yes"), ("Yes!", "yes"),                                # trailing punctuation
    ("3.5", "3.5"), ("5.", "5"),                                     # period before a digit stays
    ("hello,world", "hello world"),                                  # no space: mark -> space
    ("hello, world", "hello world"),                                 # next to a space: deleted
    ("1,000", "1000"),                                               # digit,digit: deleted
    ("two", "2"), ("ten", "10"), ("none", "0"), ("two dogs", "2 dogs"),
    ("dont", "don't"), ("isnt", "isn't"), ("don't", "don't"),       # contractions
    ("Im", "im"),                  # the table's capitalised keys never match (lowercased first)
    ("  line\nbreak\t", "line break"), ("red-white", "red white"), ("(b)", "b"),
])
def test_vqa_normalize(raw, norm):
  assert m.vqa_normalize(raw) == norm


def test_official_tables_verbatim():
  assert len(m.CONTRACTIONS) == 120 and m.CONTRACTIONS["somebody'd"] == "somebodyd"
  assert m.MANUAL_MAP == {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                          "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                          "nine": "9", "ten": "10"}
  assert m.ARTICLES == ("a", "an", "the")
  assert "'" not in m.PUNCT and ":" not in m.PUNCT and "." not in m.PUNCT and len(m.PUNCT) == 21
  assert m.PERIOD_STRIP.pattern == r"(?!<=\d)(\.)(?!\d)"
  assert m.COMMA_STRIP.pattern == r"(\d)(\,)(\d)"


def test_vqa_ten_references_leave_one_out():
  ten = lambda k, ans: [ans] * k + ["other"] * (10 - k)
  # k humans agree: k left-outs see k-1 matches, 10-k see k; each min(./3, 1), averaged.
  assert m.vqa_accuracy("cat", ten(0, "cat")) == 0.0
  assert m.vqa_accuracy("cat", ten(1, "cat")) == pytest.approx(0.3)         # 9/10 · 1/3
  assert m.vqa_accuracy("cat", ten(2, "cat")) == pytest.approx(0.6)         # (2/3 + 16/3)/10
  assert m.vqa_accuracy("cat", ten(3, "cat")) == pytest.approx(0.9)         # (3·2/3 + 7)/10
  assert m.vqa_accuracy("cat", ten(4, "cat")) == pytest.approx(1.0)
  assert m.vqa_accuracy("Two.", ten(2, "2")) == pytest.approx(0.6)          # normalised pred
  assert m.vqa_accuracy("a cat", ten(10, "the cat")) == pytest.approx(1.0)  # refs normalised too


def test_vqa_fewer_references():
  assert m.vqa_accuracy("dog", ["a dog"]) == pytest.approx(1 / 3)
  assert m.vqa_accuracy("dog", ["dog", "Dog", "dog."]) == 1.0
  assert m.vqa_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx(2 / 3)
  assert m.vqa_accuracy("cow", ["dog", "dog"]) == 0.0
  with pytest.raises(ValueError):
    m.vqa_accuracy("x", [])


# ----------------------------------------------------------------------------- ANLS

def test_levenshtein():
  assert m.levenshtein("kitten", "sitting") == 3
  assert m.levenshtein("", "abc") == 3 and m.levenshtein("abc", "") == 3
  assert m.levenshtein("flaw", "lawn") == 2 and m.levenshtein("same", "same") == 0


def test_anls():
  assert m.anls("hello", ["helo"]) == pytest.approx(0.8)          # 1 edit / 5
  assert m.anls(" HeLLo ", ["hello"]) == 1.0                      # case, whitespace
  assert m.anls("ab", ["ac"]) == 0.0                              # NLD 0.5 is not < 0.5
  assert m.anls("abc", ["abd"]) == pytest.approx(2 / 3)           # NLD 1/3
  assert m.anls("hello", ["world", "hellp"]) == pytest.approx(0.8)  # max over references
  assert m.anls("", [""]) == 1.0 and m.anls("", ["x"]) == 0.0
  assert m.anls("new  york", ["New York"]) == 1.0                 # inner whitespace collapsed


# ----------------------------------------------------------------------------- relaxed accuracy

@pytest.mark.parametrize("pred, ref, want", [
    ("104.9", "100", 1.0), ("95.1", "100", 1.0), ("105", "100", 1.0),    # 5% inclusive
    ("106", "100", 0.0), ("94", "100", 0.0),
    ("12%", "12.3", 1.0), ("12.3", "12%", 1.0), ("15%", "12", 0.0),
    ("1,234", "1234", 1.0), ("1,234.", "1200", 1.0),
    ("0", "0", 1.0), ("0.01", "0", 0.0),
    ("Yes", "yes", 1.0), ("Brazil", "brazil ", 1.0), ("Brazil", "Chile", 0.0),
    ("12 apples", "12", 0.0),
])
def test_relaxed_accuracy(pred, ref, want):
  assert m.relaxed_accuracy(pred, [ref]) == want


# ----------------------------------------------------------------------------- exact match / MC

def test_exact_match():
  assert m.exact_match("Red.", ["red"]) == 1.0
  assert m.exact_match("  light   blue ", ["Light blue"]) == 1.0
  assert m.exact_match("red", ["blue", "RED"]) == 1.0
  assert m.exact_match("reddish", ["red"]) == 0.0


@pytest.mark.parametrize("pred", ["B", "(B)", "B.", "B)", "b", "The answer is B",
                                  "The answer is B.", "Answer: (B)", "B. cat", "(B) cat",
                                  "cat", "Cat.", "I think it is B",
                                  "(C) is wrong, the answer is B"])
def test_multiple_choice_extraction(pred):
  choices = ["dog", "cat", "cow"]
  assert m.extract_choice(pred, choices) == "B"
  assert m.multiple_choice(pred, ["B"], choices) == 1.0
  assert m.multiple_choice(pred, ["cat"], choices) == 1.0       # reference given as text
  assert m.multiple_choice(pred, ["(B)"], choices) == 1.0
  assert m.multiple_choice(pred, ["A"], choices) == 0.0


def test_multiple_choice_no_false_letters():
  choices = ["dog", "cat", "cow"]
  assert m.extract_choice("A cat", choices) is None           # the article "A" is no option
  assert m.extract_choice("The answer is a dog", choices) is None
  assert m.extract_choice("D", choices) is None               # not an option
  assert m.extract_choice("either B or C", choices) is None   # ambiguous
  assert m.extract_choice("horse", choices) is None
  assert m.extract_choice("A", choices) == "A"
  assert m.option_texts(["A. dog", "(B) cat", "cow"]) == ["dog", "cat", "cow"]
  assert m.multiple_choice("cat", ["B"], ["A. dog", "B. cat"]) == 1.0
  assert m.multiple_choice("D", ["D"]) == 1.0                 # no choices: any letter
  assert m.multiple_choice("yes", ["Yes"]) == 1.0             # no letters: exact match


# ----------------------------------------------------------------------------- dispatcher

def test_score_dispatch():
  assert m.score("vqa_accuracy", "two", ["2"] * 10) == 1.0
  assert m.score("anls", "helo", "hello") == pytest.approx(0.8)   # a bare string reference
  assert m.score("relaxed_accuracy", "104", ["100"]) == 1.0
  assert m.score("exact_match", "Red.", ["red"]) == 1.0
  assert m.score("multiple_choice", "(C)", ["C"], choices=["x", "y", "z"]) == 1.0
  assert set(m.METRICS) == {"vqa_accuracy", "anls", "relaxed_accuracy", "exact_match",
                            "multiple_choice"}
  with pytest.raises(ValueError, match="unknown metric"):
    m.score("bleu", "a", ["a"])


def test_wilson_interval_known_values():
  # Reference values from the closed form (Wilson 1927), z = 1.96.
  lo, hi = m.wilson_interval(50, 100)
  assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
  lo, hi = m.wilson_interval(0, 20)      # never below 0, and not degenerate at p = 0
  assert lo == 0.0 and abs(hi - 0.1611) < 1e-3
  lo, hi = m.wilson_interval(20, 20)
  assert hi == 1.0 and abs(lo - 0.8389) < 1e-3
  assert all(x != x for x in m.wilson_interval(0, 0))
