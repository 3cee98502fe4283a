"""Task sampling (chatrex_jax/data/tasks.py): answers in the ChatRex grammar whose <objK> tags
point at the right input boxes after proposal mixing and shuffling; official prompt variants;
determinism; clear errors."""
import re

import numpy as np
import pytest

from chatrex_jax.data import tasks
from chatrex_jax.ops import boxes as box_ops
from chatrex_jax.protocol import grammar, prompts
from tests.builders import parse_groups, scene_record


def region_by_id(rec):
  return {r["id"]: r for r in rec["regions"]}


def check_indices(sample: tasks.TaskSample, rec: dict):
  """Every <objK> of the answers is an input box equal to a region box of the right region."""
  regions = region_by_id(rec)
  answers = " ".join(a for _, a in sample.turns)
  groups = parse_groups(answers)
  assert len(groups) == len(sample.answer_regions)
  for (_, idx), rids in zip(groups, sample.answer_regions):
    assert idx == sorted(idx)
    assert sorted(idx) == sorted(int(np.flatnonzero(sample.box_region == r)[0]) for r in rids)
    for k, r in zip(idx, rids):
      np.testing.assert_array_equal(sample.boxes[k], np.asarray(regions[r]["box"]))
  return groups


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_each_task_grammar_and_indices(task):
  for i in range(6):
    rec = scene_record(i, proposals=i % 2 == 1)
    rng = np.random.default_rng(i)
    s = tasks.sample_task(rec, rng, None, max_objects=20, task=task)
    assert s.task == task
    assert s.boxes.shape == (len(s.box_region), 4) and len(s.boxes) <= 20
    # all ground-truth regions are given, each exactly once
    assert sorted(s.box_region[s.box_region >= 0].tolist()) == [r["id"] for r in rec["regions"]]
    user0 = s.turns[0][0]
    assert user0.startswith("<image>\n" + prompts.object_string(len(s.boxes)) + "\n")
    groups = check_indices(s, rec)
    regions = region_by_id(rec)
    if task == "grounding":
      q = user0.split("\n", 2)[2]
      assert any(q == t.replace("[OBJ]", "; ".join(g for g, _ in groups)) for t in prompts.GROUNDING)
      field = {"category": "category", "phrase": "phrase", "referring": "referring"}[s.kind]
      for (name, _), rids in zip(groups, s.answer_regions):
        # every region with that name and nothing else
        assert sorted(rids) == sorted(r["id"] for r in rec["regions"] if r[field] == name)
      assert s.turns[0][1] == "\n".join(grammar.grounded(g, i) for g, i in groups)
    elif task == "region":
      (text, idx), = groups
      field = tasks.REGION_GRANULARITIES[s.kind][1]
      assert text == regions[s.answer_regions[0][0]][field]
      q = user0.split("\n", 2)[2]
      variants = prompts.templates("region_caption", tasks.REGION_GRANULARITIES[s.kind][0])
      assert any(q == t.replace("[OBJ]", f"<obj{idx[0]}>") for t in variants)
      assert s.turns[0][1] == f"<ground>{text}</ground><objects><obj{idx[0]}></objects>"
    elif task == "grounded_caption":
      stripped = re.sub(r"</?ground>|<objects>(<obj\d+>)*</objects>", "", s.turns[0][1])
      assert stripped == rec["caption"]
      assert groups and all(regions[r]["phrase"].lower() == g.lower()
                            for (g, _), rids in zip(groups, s.answer_regions) for r in rids)
    else:
      assert len(s.turns) == 2
      assert all(u.split("\n")[-1].startswith(prompts.GROUNDED_CONVERSATION_PREFIX) for u, _ in s.turns)
      assert "<image>" not in s.turns[1][0]
      assert [g for g, _ in groups] == [regions[r[0]]["phrase"] for r in s.answer_regions]


def test_deterministic_and_variants():
  rec = scene_record(3)
  a = tasks.sample_task(rec, np.random.default_rng(7), None, max_objects=30)
  b = tasks.sample_task(rec, np.random.default_rng(7), None, max_objects=30)
  assert a.turns == b.turns and np.array_equal(a.boxes, b.boxes)
  # over many draws: several paraphrases, every task, shuffled box order
  seen_q, seen_t, orders = set(), set(), set()
  for seed in range(150):
    s = tasks.sample_task(rec, np.random.default_rng(seed), None, max_objects=30)
    seen_q.add(s.turns[0][0].split("\n", 2)[2])
    seen_t.add(s.task)
    orders.add(tuple(s.box_region[s.box_region >= 0].tolist()))
  assert seen_t == set(tasks.TASK_NAMES)
  assert len(seen_q) > 40 and len(orders) > 20
  first = tasks.sample_task(rec, np.random.default_rng(0), {"prompt_variants": "first",
                                                            "weights": {"grounding": 1.0}})
  q = first.turns[0][0].split("\n", 2)[2]
  assert q.startswith("Please detect ")
  assert q.endswith(" in this image. Answer the question with object indexes.")


def test_query_and_region_counts_have_a_floor():
  """grounding_min_queries / region_min_regions raise the draw's lower bound (capped by what
  the record holds); without them the draw starts at 1, as it always did."""
  rec = scene_record(3)
  phrases = len({r["phrase"] for r in rec["regions"]})
  assert phrases >= 4
  def counts(config, task, seeds=range(40)):
    out = []
    for seed in seeds:
      s = tasks.sample_task(rec, np.random.default_rng(seed), config, max_objects=30, task=task)
      out.append(s.turns[0][1].count("<ground>"))
    return out
  dense = {"grounding_kinds": {"phrase": 1.0}, "grounding_min_queries": 4,
           "grounding_max_queries": 8, "region_min_regions": 3, "region_max_regions": 5,
           "region_granularities": {"category": 1.0}}
  grounding = counts(dense, "grounding")
  assert min(grounding) == 4 and max(grounding) == min(8, phrases)
  region = counts(dense, "region")
  assert min(region) == 3 and max(region) == min(5, len(rec["regions"]))
  sparse = counts({"grounding_kinds": {"phrase": 1.0}, "grounding_max_queries": 8}, "grounding")
  assert min(sparse) == 1
  # a floor above what the record holds is capped, not an error
  capped = counts(dict(dense, grounding_min_queries=50, grounding_max_queries=50), "grounding")
  assert set(capped) == {phrases}


def test_repeated_queries_are_answered_in_question_order():
  """grounding_repeat_queries draws queries with replacement: more queries than phrases, each
  answered on its own line in the order the question names them, with the same `<objK>` tags
  whenever a phrase comes back (so no line is completed by elimination)."""
  rec = scene_record(3)
  phrases = len({r["phrase"] for r in rec["regions"]})
  config = {"grounding_kinds": {"phrase": 1.0}, "grounding_min_queries": phrases + 2,
            "grounding_max_queries": phrases + 2, "grounding_repeat_queries": True}
  repeats = 0
  for seed in range(20):
    s = tasks.sample_task(rec, np.random.default_rng(seed), config, max_objects=30, task="grounding")
    lines = re.findall(r"<ground>(.*?)</ground><objects>(.*?)</objects>", s.turns[0][1])
    assert len(lines) == phrases + 2
    assert prompts.join_objects([p for p, _ in lines]) in s.turns[0][0]   # the question's order
    tags = {}
    for phrase, objs in lines:
      assert tags.setdefault(phrase, objs) == objs
      regions = {int(r["id"]) for r in rec["regions"] if r["phrase"] == phrase}
      assert {int(s.box_region[int(k)]) for k in re.findall(r"<obj(\d+)>", objs)} == regions
    repeats += len(lines) - len(tags)
  assert repeats >= 2 * 20   # pigeonhole: at least two repeats per question


def test_negatives_and_proposals():
  rec = scene_record(2)
  gt = np.asarray([r["box"] for r in rec["regions"]])
  cfg = {"min_extra": 10, "max_extra": 10, "dedup_iou": 0.6}
  boxes, region = tasks.build_input_boxes(rec, np.random.default_rng(0), [], 40, cfg)
  neg = boxes[region < 0]
  assert len(neg) == 10
  assert box_ops.pairwise_iou(neg, gt, dtype=np.float64).max() < 0.6
  assert np.all(neg[:, :2] >= 0) and np.all(neg[:, 2] <= rec["width"]) and np.all(neg[:, 3] <= rec["height"])
  # stored proposals are used (and duplicates of GT boxes removed); no synthetic ones then
  recp = scene_record(2, proposals=True)
  boxes, region = tasks.build_input_boxes(recp, np.random.default_rng(0), [], 40,
                                          {"min_extra": 20, "max_extra": 20})
  props = np.asarray(recp["proposals"]["boxes"])
  neg = boxes[region < 0]
  assert len(neg) <= 8 and all(any(np.array_equal(n, p) for p in props) for n in neg)
  assert box_ops.pairwise_iou(neg, gt, dtype=np.float64).max() < 0.7
  # capacity: never more than max_objects; required regions always kept
  n_regions = len(rec["regions"])
  boxes, region = tasks.build_input_boxes(rec, np.random.default_rng(1), [n_regions - 1], 2, cfg)
  assert len(boxes) == 2 and n_regions - 1 in region.tolist()


def test_max_objects_cap_keeps_answer_complete():
  rec = scene_record(5)
  for seed in range(20):
    s = tasks.sample_task(rec, np.random.default_rng(seed), None, max_objects=3, task="grounding")
    assert len(s.boxes) <= 3
    check_indices(s, rec)


def test_errors_name_field():
  rec = scene_record(1)
  bad = dict(rec, conversations=[{"role": "assistant", "text": "x", "groundings": []},
                                 {"role": "user", "text": "y", "groundings": []}])
  with pytest.raises(tasks.FieldError, match=r"conversations\[0\]"):
    tasks.sample_task(bad, np.random.default_rng(0), None, task="conversation")
  bad = dict(rec, regions=[dict(rec["regions"][0], phrase="a <objfeat> b")] + rec["regions"][1:])
  with pytest.raises(tasks.FieldError, match=r"regions\[0\]\.phrase.*placeholder"):
    tasks.sample_task(bad, np.random.default_rng(0), {"weights": {"grounding": 1.0},
                                                       "grounding_kinds": {"phrase": 1.0}})
  with pytest.raises(ValueError, match="max_objects"):
    tasks.sample_task(rec, np.random.default_rng(0), None, max_objects=101)


def test_no_regions_falls_back_to_plain_caption():
  rec = dict(scene_record(1), regions=[], conversations=[])
  s = tasks.sample_task(rec, np.random.default_rng(0), None)
  assert (s.task, s.kind) == ("grounded_caption", "plain") and s.turns[0][1] == rec["caption"]


@pytest.mark.parametrize("max_objects", [20, 3])
def test_follow_up_turns_share_the_boxes(max_objects):
  """`turns` > 1: follow-up grounding / region questions about the same boxes, without the
  image and object prefix; every answer points at the right boxes, and a grounding answer
  names every region of that name among the boxes (also when max_objects cut the scene)."""
  config = {"weights": {"grounding": 1.0, "region": 1.0}, "turns": 5, "grounding_max_queries": 2,
            "region_max_regions": 2}
  kinds = set()
  for seed in range(12):
    rec = scene_record(seed % 6)
    s = tasks.sample_task(rec, np.random.default_rng(seed), config, max_objects=max_objects)
    assert len(s.turns) == 5
    assert s.turns[0][0].startswith("<image>\n" + prompts.object_string(len(s.boxes)) + "\n")
    for user, _ in s.turns[1:]:
      assert "<image>" not in user and "<objfeat>" not in user and "\n" not in user
      kinds.add("region" if "<obj" in user else "grounding")
    check_indices(s, rec)
    shown = [r for r in rec["regions"] if r["id"] in set(s.box_region.tolist())]
    answer_regions = iter(s.answer_regions)
    for turn, (user, answer) in enumerate(s.turns):
      for name, _ in parse_groups(answer):
        rids = next(answer_regions)
        if turn and "<obj" not in user:  # grounding: every region of that name among the boxes
          assert any(sorted(rids) == sorted(r["id"] for r in shown if r[f] == name)
                     for f in ("category", "phrase", "referring"))
  assert kinds == {"region", "grounding"}


def test_follow_up_turns_only_for_perception_tasks_with_weight():
  rec = scene_record(2)
  captions_only = {"weights": {"grounded_caption": 1.0}, "turns": 3}
  s = tasks.sample_task(rec, np.random.default_rng(0), captions_only, max_objects=20)
  assert s.task == "grounded_caption" and len(s.turns) == 1
  with pytest.raises(ValueError, match="turns=0"):
    tasks.sample_task(rec, np.random.default_rng(0), {"turns": 0}, max_objects=20)
