"""Stage 3: spaCy phrase extraction on a curated set of captions (data_engine/phrases.py)."""
import pytest

pytest.importorskip("spacy")

from data_engine import phrases as phrases_lib  # noqa: E402

# caption -> expected [(phrase, category)], in order. Rules: descriptive phrases of >= 3
# words are kept as they are (determiners stripped); shorter chunks keep their category
# name (head lemma + compounds); abstract nouns, pronouns and determiners are dropped.
CURATED = [
    ("A large red circle with a white dot, a small blue square and a green triangle on a plain "
     "background.",
     [("large red circle", "circle"), ("dot", "dot"), ("small blue square", "square"),
      ("triangle", "triangle")]),
    ("A man in a red shirt is riding a brown horse next to a wooden fence.",
     [("man", "man"), ("shirt", "shirt"), ("horse", "horse"), ("fence", "fence")]),
    ("This image shows two dogs playing with a frisbee in the park.",
     [("dog", "dog"), ("frisbee", "frisbee"), ("park", "park")]),
    ("It is a close-up view of a traffic light and a stop sign.",
     [("traffic light", "traffic light"), ("stop sign", "stop sign")]),
    ("The photo shows a woman holding her black umbrella while she crosses the busy city street.",
     [("woman", "woman"), ("umbrella", "umbrella"), ("busy city street", "city street")]),
    ("There are three small yellow rubber ducks in the bathtub, and they float on the water.",
     [("three small yellow rubber ducks", "rubber duck"), ("bathtub", "bathtub"),
      ("water", "water")]),
    ("In the background, a tall white lighthouse stands on the rocky coast under a cloudy sky.",
     [("tall white lighthouse", "lighthouse"), ("coast", "coast"), ("sky", "sky")]),
    ("Something is on the table. Everything looks nice.", [("table", "table")]),
    ("A cat sleeps on a sofa. The cat is orange.", [("cat", "cat"), ("sofa", "sofa")]),
    ("The scene shows a view of the image.", []),
]


@pytest.fixture(scope="module")
def extractor():
  return phrases_lib.PhraseExtractor()


def test_curated_captions(extractor):
  got = extractor.extract([c for c, _ in CURATED])
  for (caption, want), plist in zip(CURATED, got):
    assert [(p.text, p.category) for p in plist] == want, caption


def test_spans_point_into_the_text(extractor):
  caption = "A cat sleeps on a sofa. The cat is orange."
  (cat, sofa) = extractor(caption)
  assert [caption[s:e] for s, e in cat.spans] == ["cat", "cat"]  # both mentions, deduped
  assert [caption[s:e] for s, e in sofa.spans] == ["sofa"]
  (_, dot, *_) = extractor(CURATED[0][0])
  assert [CURATED[0][0][s:e] for s, e in dot.spans] == ["white dot"]  # determiner stripped


def test_rules_are_configurable():
  cfg = phrases_lib.PhraseConfig(min_descriptive_words=2,
                                 abstract_nouns=phrases_lib.DEFAULT_ABSTRACT_NOUNS + ("sky",))
  ex = phrases_lib.PhraseExtractor(cfg)
  texts = [p.text for p in ex("A man in a red shirt stands under a cloudy sky.")]
  assert texts == ["man", "red shirt"]
  keep_image = phrases_lib.PhraseExtractor(phrases_lib.PhraseConfig(abstract_nouns=()))
  assert [p.text for p in keep_image("A view of a dog.")] == ["view", "dog"]


def test_default_model_name_loads_the_published_pipeline():
  nlp = phrases_lib.load_spacy("en_core_web_sm")
  assert "parser" in nlp.pipe_names and "ner" not in nlp.pipe_names
  with pytest.raises(OSError, match="spacy download"):
    phrases_lib.load_spacy("no_such_pipeline_xyz")


def test_synthetic_captions_parse_into_every_object(extractor):
  """The synthetic scenes' vocabulary is chosen so spaCy finds each object (e.g. "small
  purple square with ..." was mis-tagged and "orange"/"cyan" parse as nouns, so pink is
  the fifth colour)."""
  from data_engine import synthetic
  scenes = [synthetic.make_scene(7, i) for i in range(150)]
  got = extractor.extract([synthetic.caption(s) for s in scenes])
  for scene, plist in zip(scenes, got):
    texts = {p.text for p in plist}
    want = {synthetic.object_phrase(o) for o in scene["objects"]}
    if any(o["part"] for o in scene["objects"]):
      want.add(synthetic.PART)
    assert texts == want, synthetic.caption(scene)
