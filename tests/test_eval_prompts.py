"""Chunked detection prompts for large category lists: budget, coverage, merge."""
import pytest

from chatrex_jax.eval import prompts as P
from chatrex_jax.protocol.grammar import parse_grounded


def _lvis_like(n=1203):
  words = ["aerosol_can", "air_conditioner", "bow_(weapon)", "bow_(decorative_ribbons)", "cat",
           "alarm_clock", "zucchini"]
  return {i + 1: f"{words[i % len(words)]}_{i}" for i in range(n)}


def test_chunks_respect_char_budget_and_cover_each_category_once():
  cats = _lvis_like()
  chunks = P.chunk_categories(cats, max_chars=600)
  assert len(chunks) > 10
  assert all(len(c.question) <= 600 for c in chunks)
  keys = [k for c in chunks for k in c.categories]
  assert keys == list(cats)  # every id exactly once, order kept
  # Greedy packing: adding the next chunk's first name would overflow the budget.
  for a, b in zip(chunks, chunks[1:]):
    assert len(P.detect_question(a.names + b.names[:1])) > 600
  assert chunks[0].question.startswith("Please detect aerosol can 0; air conditioner 1; bow (weapon) 2")
  assert chunks[0].question.endswith(" in this image. Answer the question with object indexes.")


def test_token_budget(tmp_path):
  from chatrex_jax.data.tiny_tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer(tmp_path / "tok")
  cats = [f"category {i}" for i in range(150)]
  chunks = P.chunk_categories(cats, max_tokens=120, tokenizer=tok)
  assert len(chunks) > 1
  assert all(len(tok.encode(c.question, add_special_tokens=False)) <= 120 for c in chunks)
  assert [k for c in chunks for k in c.categories] == cats


def test_bad_inputs():
  with pytest.raises(ValueError, match="share the name"):
    P.chunk_categories(["Cat", "cat "], max_chars=500)
  with pytest.raises(ValueError, match="separator"):
    P.chunk_categories(["a; b"], max_chars=500)
  with pytest.raises(ValueError, match="alone exceeds"):
    P.chunk_categories(["x" * 600], max_chars=500)
  with pytest.raises(ValueError, match="max_chars"):
    P.chunk_categories(["a"])


def test_merge_back_per_category():
  cats = {1: "traffic_light", 2: "cat", 3: "dog", 4: "bow_(weapon)"}
  chunks = P.chunk_categories(cats, max_chars=90)
  assert len(chunks) >= 2
  # Answers per chunk, as the model would write them (display names, any case).
  answers = []
  for c in chunks:
    parts = []
    for k in c.categories:
      if k == 1:
        parts.append("<ground>Traffic Light</ground><objects><obj0><obj3></objects>")
      if k == 3:
        parts.append("<ground>dog</ground><objects><obj1></objects>")
      if k == 4:
        parts.append("<ground>bow (weapon)</ground><objects><obj2></objects>")
    parts.append("<ground>unicorn</ground><objects><obj4></objects>")
    answers.append(parse_grounded("\n".join(parts), num_boxes=10, repeated="keep"))
  merged = P.merge_answers(chunks, answers)
  assert merged.per_category == {1: [0, 3], 2: [], 3: [1], 4: [2]}
  assert [u[1] for u in merged.unmatched] == ["unicorn"] * len(chunks)
  # A phrase naming a category of *another* chunk is not credited.
  other = [[("dog", [5])] if 3 not in c.categories else [] for c in chunks]
  assert P.merge_answers(chunks, other).per_category[3] == []
  # Repeated phrases are united without duplicates.
  rep = [[("cat", [1, 2]), ("cat", [2, 7])] if 2 in c.categories else [] for c in chunks]
  assert P.merge_answers(chunks, rep).per_category[2] == [1, 2, 7]
  with pytest.raises(ValueError, match="chunks but"):
    P.merge_answers(chunks, answers[:1])
