"""The Grain input pipeline (chatrex_jax/data/pipeline.py) on real ArrayRecord engine shards of
synthetic scenes with a tiny real tokenizer and tiny image sizes: determinism, exact resume,
labels only on answers + end-of-turn, <objK> -> ground-truth box after mixing/shuffling, static
shapes, per-process sharding, mixture weights, clear errors for bad records."""
import collections
import io
import json

import numpy as np
import pytest

pytest.importorskip("array_record")
pytest.importorskip("grain")

from chatrex_jax.data import pipeline, schema, tasks  # noqa: E402
from chatrex_jax.data.tiny_tokenizer import DEFAULT_TEXTS, build_tiny_tokenizer  # noqa: E402
from chatrex_jax.inference import processor as proc  # noqa: E402
from chatrex_jax.protocol import image as image_protocol  # noqa: E402
from chatrex_jax.protocol import templates  # noqa: E402
from chatrex_jax.protocol import tokens as C  # noqa: E402
from data_engine import synthetic  # noqa: E402
from tests.builders import (  # noqa: E402
  parse_groups,
  scene_record,
  write_engine_dataset,  # noqa: E402
)

CLIP, AUX, NI, T, M, B = 28, 64, 4, 320, 12, 4




@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  texts = list(DEFAULT_TEXTS) + [synthetic.caption(synthetic.make_scene(0, i)) for i in range(20)]
  build_tiny_tokenizer(d, texts, family="qwen", vocab_size=600)
  return str(d)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  a = [scene_record(i, image_size=48, proposals=i % 3 == 0) for i in range(12)]
  a[4] = scene_record(4, image_size=48, width=36)  # a portrait image
  b = [scene_record(100 + i, image_size=40, seed=1) for i in range(6)]
  return {"a": write_engine_dataset(str(root / "a"), a, 5, name="a"),
          "b": write_engine_dataset(str(root / "b"), b, 4, name="b"),
          "recs_a": a, "recs_b": b}


def tiny_config(tok_dir, sources, **over):
  cfg = pipeline.default_data_config()
  cfg.sources = sources
  cfg.tokenizer_dir = tok_dir
  cfg.clip_image_size, cfg.aux_image_size, cfg.num_image_tokens = CLIP, AUX, NI
  cfg.seq_len, cfg.max_objects, cfg.batch_size = T, M, B
  cfg.truncate = False  # a too-long sample must fail the test, not be cut silently
  cfg.proposals.max_extra = 4
  cfg.num_threads = 1
  cfg.seed = 3
  for k, v in over.items():
    setattr(cfg, k, v)
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_static_shapes_and_dtypes(tok_dir, data_dirs):
  cfg = tiny_config(tok_dir, [{"path": data_dirs["a"], "weight": 1.0}])
  it = pipeline.make_iterator(cfg, process_index=0, process_count=1)
  spec = {"pixel_values": ((B, CLIP, CLIP, 3), np.float32),
          "pixel_values_aux": ((B, AUX, AUX, 3), np.float32),
          "boxes": ((B, M, 4), np.float32), "box_mask": ((B, M), np.bool_),
          **{k: ((B, T), np.int32) for k in ("token_ids", "source", "source_index",
                                             "attention_mask", "position_ids", "labels")},
          **{k: ((B,), np.int32) for k in pipeline.META_KEYS}}
  tasks_seen = set()
  for batch in take(it, 4):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == spec
    assert np.all(batch["box_mask"].sum(1) == batch["num_boxes"])
    assert np.all(batch["boxes"][~batch["box_mask"]] == 0)
    # the merge plan: one image of NI tokens, one object slot per valid box
    assert np.all((batch["source"] == 1).sum(1) == NI)
    assert np.all((batch["source"] == 2).sum(1) == batch["num_boxes"])
    tasks_seen |= set(batch["task_id"].tolist())
  assert len(tasks_seen) >= 3
  # exactly the model's batch layout: every key of `example_batch`, same shape and dtype
  from types import SimpleNamespace

  from chatrex_jax.models import chatrex
  model_cfg = SimpleNamespace(clip=SimpleNamespace(image_size=CLIP), aux_image_size=AUX)
  ref = chatrex.example_batch(model_cfg, B, T, M)
  assert set(ref) == set(pipeline.MODEL_KEYS)
  inputs = pipeline.model_inputs(batch)
  assert {k: (v.shape, np.dtype(v.dtype)) for k, v in ref.items()} == \
      {k: (v.shape, v.dtype) for k, v in inputs.items()}


def test_deterministic_for_a_seed(tok_dir, data_dirs):
  srcs = [{"path": data_dirs["a"], "weight": 1.0}]
  x = take(pipeline.make_iterator(tiny_config(tok_dir, srcs), process_index=0, process_count=1), 3)
  y = take(pipeline.make_iterator(tiny_config(tok_dir, srcs, num_threads=2),
                                  process_index=0, process_count=1), 3)
  assert_batches_equal(x, y)
  z = take(pipeline.make_iterator(tiny_config(tok_dir, srcs, seed=4), process_index=0,
                                  process_count=1), 3)
  assert not all(np.array_equal(a["token_ids"], b["token_ids"]) for a, b in zip(x, z))


def test_checkpoint_state_round_trip(tok_dir, data_dirs):
  srcs = [{"path": data_dirs["a"], "weight": 1.0}, {"path": data_dirs["b"], "weight": 1.0}]
  cfg = tiny_config(tok_dir, srcs)
  it = pipeline.make_iterator(cfg, process_index=0, process_count=1)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able, as Orbax/Grain store it
  expected = take(it, 2)
  fresh = pipeline.make_iterator(cfg, process_index=0, process_count=1)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), expected)
  # past the end of an epoch of source b (6 records): epochs advance, order stays exact
  assert max(b["epoch"].max() for b in expected) >= 1
  # a state from a differently configured pipeline is refused
  other = pipeline.make_iterator(tiny_config(tok_dir, srcs, seed=9), process_index=0,
                                 process_count=1)
  with pytest.raises(ValueError, match="another config"):
    other.set_state(state)


@pytest.fixture(scope="module")
def llama_tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok_llama")
  build_tiny_tokenizer(d, list(DEFAULT_TEXTS), family="llama", vocab_size=500)
  return str(d)


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_labels_only_on_answers_and_end_of_turn(family, tok_dir, llama_tok_dir, data_dirs):
  """Decoding the labelled ids gives exactly the assistant answers + end-of-turn (qwen_chat:
  `<|im_end|>`; vicuna_v1: " " + answer + `</s>`), for single- and multi-turn samples."""
  from transformers import AutoTokenizer
  directory = tok_dir if family == "qwen" else llama_tok_dir
  tok = AutoTokenizer.from_pretrained(directory)
  cfg = tiny_config(directory, [{"path": data_dirs["a"], "weight": 1.0}], seq_len=512)
  builder = pipeline.ExampleBuilder(cfg, pipeline.open_sources(cfg))
  template = builder.template
  assert template.name == {"qwen": "qwen_chat", "llama": "vicuna_v1"}[family]
  eot = C.QWEN_IM_END if family == "qwen" else tok.eos_token
  n_multi = 0
  for i, rec in enumerate(data_dirs["recs_a"][:8]):
    for task in tasks.applicable_tasks(rec):
      out, sample = _build_task(builder, rec, task, i)
      labels = out["labels"]
      lab = labels[labels != C.IGNORE_INDEX]
      want = "".join(template.response_prefix + a + eot for _, a in sample.turns)
      assert tok.decode(lab.tolist(), skip_special_tokens=False) == want
      # labelled positions are text positions whose token is the label (teacher forcing)
      pos = labels != C.IGNORE_INDEX
      assert np.all(out["source"][pos] == C.SOURCE_TEXT)
      np.testing.assert_array_equal(out["token_ids"][pos], labels[pos])
      # the prompt (everything before the first answer) decodes to the chat template
      first = int(np.flatnonzero(pos)[0])
      text_before = out["token_ids"][:first][out["source"][:first] == C.SOURCE_TEXT]
      prompt = tok.decode(text_before.tolist(), skip_special_tokens=False)
      chunk = templates.conversation_chunks(template, sample.turns)[0][0]
      assert prompt == (tok.bos_token or "") + chunk.replace("<image>", "").replace("<objfeat>", "")
      n_multi += len(sample.turns) > 1
  assert n_multi > 0


def _build_task(builder, rec, task, seed):
  """builder.build with a forced task (patches the weights)."""
  cfg = builder.cfg
  old = dict(cfg.tasks.weights)
  cfg.tasks.weights = {t: float(t == task) for t in tasks.TASK_NAMES}
  try:
    out, sample = builder.build(rec, np.random.default_rng(seed), return_sample=True)
  finally:
    cfg.tasks.weights = old
  assert sample.task == task
  return out, sample


def test_answer_indices_point_at_ground_truth_boxes(tok_dir, data_dirs):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tok_dir)
  srcs = [{"path": data_dirs["a"], "weight": 1.0}, {"path": data_dirs["b"], "weight": 1.0}]
  cfg = tiny_config(tok_dir, srcs)
  recs = [data_dirs["recs_a"], data_dirs["recs_b"]]
  checked = collections.Counter()
  for batch in take(pipeline.make_iterator(cfg, process_index=0, process_count=1), 6):
    for b in range(B):
      rec = recs[batch["source_id"][b]][batch["record_index"][b]]
      lab = batch["labels"][b]
      answer = tok.decode(lab[lab != C.IGNORE_INDEX].tolist(), skip_special_tokens=False)
      n = int(batch["num_boxes"][b])
      # the ground-truth boxes in the aux frame, computed independently of the pipeline
      gt = image_protocol.transform_boxes([r["box"] for r in rec["regions"]], (rec["width"], rec["height"]), AUX)
      given = batch["boxes"][b, :n]
      is_gt = [bool(np.any(np.all(given[k] == gt, -1))) for k in range(n)]
      assert sum(is_gt) == len(rec["regions"])  # every region given once
      for phrase, idx in parse_groups(answer):
        assert idx and all(k < n for k in idx)
        for k in idx:
          match = np.flatnonzero(np.all(given[k] == gt, -1))
          assert len(match) == 1, (phrase, k)
          r = rec["regions"][int(match[0])]
          task = tasks.TASK_NAMES[batch["task_id"][b]]
          if task in ("grounding", "grounded_caption", "conversation"):
            assert phrase.lower() in {r["category"], r["phrase"], r["referring"]}, (phrase, r)
          else:
            assert phrase in {r["category"], r["phrase"], r["referring"], r["description"]}
        checked[tasks.TASK_NAMES[batch["task_id"][b]]] += 1
  assert len(checked) >= 3, checked


def test_per_process_sharding_disjoint_and_covering(tok_dir, data_dirs):
  srcs = [{"path": data_dirs["a"], "weight": 1.0}]
  cfg = tiny_config(tok_dir, srcs, num_epochs=1)
  full = pipeline.build_dataset(cfg, process_index=0, process_count=1, batched=False)
  assert len(full) == 12
  seen = []
  for p in range(3):
    ds = pipeline.build_dataset(cfg, process_index=p, process_count=3, batched=False)
    seen.append([int(ds[i]["record_index"]) for i in range(len(ds))])
  flat = sorted(sum(seen, []))
  assert flat == list(range(12))  # disjoint and covering
  # and each process's example equals the single-process example at that global position
  ex = pipeline.build_dataset(cfg, process_index=1, process_count=3, batched=False)[2]
  for k in ex:
    np.testing.assert_array_equal(ex[k], full[1 + 2 * 3][k])
  # global batch k = the union of every process's batch k
  cfg2 = tiny_config(tok_dir, srcs)
  glob = next(pipeline.make_iterator(cfg2, process_index=0, process_count=1))["record_index"]
  parts = [next(pipeline.make_iterator(cfg2, process_index=p, process_count=2))["record_index"]
           for p in range(2)]
  assert sorted(np.concatenate(parts).tolist()) == sorted(glob.tolist())
  with pytest.raises(ValueError, match="divisible"):
    pipeline.build_dataset(cfg2, process_index=0, process_count=3)


def test_mixture_weights(tok_dir, data_dirs):
  srcs = [{"path": data_dirs["a"], "weight": 3.0}, {"path": data_dirs["b"], "weight": 1.0}]
  cfg = tiny_config(tok_dir, srcs)
  refs = pipeline.reference_dataset(cfg, [12, 6], [3.0, 1.0])
  refs = [refs[i] for i in range(400)]
  ids = np.asarray([r.source_id for r in refs])
  assert abs(ids.mean() - 0.25) < 0.03
  # per source, each epoch is a permutation of the records
  refs_b = [r for r in refs if r.source_id == 1][:18]
  for e in range(3):
    assert [r.epoch for r in refs_b[6 * e:6 * e + 6]] == [e] * 6
    assert sorted(r.index for r in refs_b[6 * e:6 * e + 6]) == list(range(6))
  # a new permutation each epoch
  assert [r.index for r in refs_b[:6]] != [r.index for r in refs_b[6:12]]
  # and the full pipeline follows the references
  ds = pipeline.build_dataset(cfg, process_index=0, process_count=1, batched=False)
  got = [(int(ds[i]["source_id"]), int(ds[i]["record_index"])) for i in range(0, 24, 3)]
  assert got == [(refs[i].source_id, refs[i].index) for i in range(0, 24, 3)]


def test_portrait_image_and_stored_proposals(tok_dir, data_dirs):
  cfg = tiny_config(tok_dir, [{"path": data_dirs["a"], "weight": 1.0}])
  builder = pipeline.ExampleBuilder(cfg, pipeline.open_sources(cfg))
  rec = data_dirs["recs_a"][4]
  assert (rec["width"], rec["height"]) == (36, 48)
  out, sample = builder.build(rec, np.random.default_rng(0), return_sample=True)
  from PIL import Image
  ref = proc.ChatRexProcessor(aux_size=AUX, clip_size=CLIP).preprocess_image(
      Image.open(io.BytesIO(rec["image"])), sample.boxes)
  np.testing.assert_array_equal(out["pixel_values_aux"], ref.pixel_values_aux)
  np.testing.assert_array_equal(out["pixel_values"], ref.pixel_values)
  np.testing.assert_array_equal(out["boxes"][:len(sample.boxes)], ref.boxes)
  rec = data_dirs["recs_a"][3]  # has stored proposals
  props = np.asarray(rec["proposals"]["boxes"])
  for seed in range(5):
    _, sample = builder.build(rec, np.random.default_rng(seed), return_sample=True)
    neg = sample.boxes[sample.box_region < 0]
    assert all(np.any(np.all(n == props, -1)) for n in neg)


def test_bad_records_name_key_and_field(tok_dir, tmp_path):
  good = scene_record(0, image_size=48)
  bad_box = dict(good, regions=[dict(good["regions"][0], box=[10.0, 10.0, 5.0, 20.0])]
                 + good["regions"][1:])
  bad_img = dict(good, image=b"not an image")
  wrong_size = dict(good, width=47)
  recs = [schema.encode(good), schema.encode(bad_box, check=False),
          schema.encode(bad_img, check=False), schema.encode(wrong_size, check=False),
          b"garbage bytes"]
  d = write_engine_dataset(str(tmp_path / "bad"), recs, 10)
  cfg = tiny_config(tok_dir, [{"path": d, "weight": 1.0}])
  src = pipeline.RecordSource(d)
  builder = pipeline.ExampleBuilder(cfg, pipeline.open_sources(cfg))
  rng = np.random.default_rng(0)
  builder.build(src[0], rng)
  key = good["key"]
  with pytest.raises(pipeline.RecordError, match=rf"record {key}.*regions\[0\]\.box"):
    builder.build(src[1], rng)
  with pytest.raises(pipeline.RecordError, match=rf"record {key}.*field image"):
    builder.build(src[2], rng)
  cfg.validate_records = False  # the image itself disagrees with width/height
  with pytest.raises(pipeline.RecordError, match=rf"record {key}.*width/height.*47x48"):
    pipeline.ExampleBuilder(cfg, pipeline.open_sources(cfg)).build(src[3], rng)
  with pytest.raises(pipeline.RecordError, match=r"index 4.*cannot decode"):
    src[4]
  # a sample longer than seq_len with truncate=False names the record and seq_len
  short = tiny_config(tok_dir, [{"path": d, "weight": 1.0}], seq_len=NI + 10)
  with pytest.raises(pipeline.RecordError, match=rf"record {key}.*seq_len"):
    pipeline.ExampleBuilder(short, pipeline.open_sources(short)).build(src[0], rng)
  # through the whole pipeline the error names the source and index too
  it = pipeline.make_iterator(tiny_config(tok_dir, [{"path": d, "weight": 1.0}], batch_size=5),
                              process_index=0, process_count=1)
  with pytest.raises(pipeline.RecordError, match=r"source 'bad' \(#0\) index \d"):
    next(it)


def test_grain_orbax_checkpoint_handler_and_in_memory_sources(tok_dir, data_dirs, tmp_path):
  """The iterator is a grain.DatasetIterator: Grain's Orbax handler saves/restores it; sources
  may also be given directly (any random-access sequence of record dicts)."""
  from etils import epath
  import grain
  srcs = [("a", data_dirs["recs_a"], 1.0), ("b", data_dirs["recs_b"], 1.0)]
  cfg = tiny_config(tok_dir, [{"path": "unused-a", "weight": 1.0}, {"path": "unused-b", "weight": 1.0}])
  it = pipeline.make_iterator(cfg, sources=srcs, process_index=0, process_count=1)
  take(it, 2)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=it)
  expected = take(it, 2)
  fresh = pipeline.make_iterator(cfg, sources=srcs, process_index=0, process_count=1)
  handler.restore(epath.Path(tmp_path), item=fresh)
  assert_batches_equal(take(fresh, 2), expected)
  # the in-memory sources give the same stream as the same records read from ArrayRecord
  disk = pipeline.make_iterator(tiny_config(tok_dir, [{"path": data_dirs["a"], "weight": 1.0},
                                                      {"path": data_dirs["b"], "weight": 1.0}]),
                                process_index=0, process_count=1)
  assert_batches_equal(take(disk, 4)[2:], expected)
  for i in (it, fresh, disk):
    i.close()


@pytest.mark.slow
def test_multiprocessing_workers_resume(tok_dir, data_dirs):
  """num_workers > 0 (Grain mp_prefetch): the same stream as in-process, exact resume.
  Run with `pytest -m slow tests/test_data_pipeline.py` (~20 s: spawns worker processes)."""
  srcs = [{"path": data_dirs["a"], "weight": 1.0}]
  base = take(pipeline.make_iterator(tiny_config(tok_dir, srcs), process_index=0,
                                     process_count=1), 5)
  cfg = tiny_config(tok_dir, srcs, num_workers=2)
  it = pipeline.make_iterator(cfg, process_index=0, process_count=1)
  assert_batches_equal(take(it, 3), base[:3])
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  fresh = pipeline.make_iterator(cfg, process_index=0, process_count=1)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), base[3:])
  fresh.close()


@pytest.mark.slow
def test_tiny_model_consumes_batches_without_recompiling(tok_dir, data_dirs):
  """Pipeline batches feed `ChatRex` + `lm_loss` under one jit (static shapes: no recompile
  between batches); the labelled-token count equals the loss's count. Slow only because it
  compiles the tiny model (~25 s idle, ~2 min on a loaded 2-core box): `pytest -m slow`."""
  import jax
  import jax.numpy as jnp
  from transformers import AutoTokenizer

  from chatrex_jax.models import chatrex
  from chatrex_jax.models.tiny import tiny_config as tiny_model
  model_cfg = tiny_model(len(AutoTokenizer.from_pretrained(tok_dir)), hidden=32, layers=1)
  cfg = tiny_config(tok_dir, [{"path": data_dirs["a"], "weight": 1.0}], batch_size=2)
  pipeline.set_model_sizes(cfg, model_cfg)
  assert (cfg.clip_image_size, cfg.aux_image_size, cfg.num_image_tokens) == (56, 128, 16)
  it = pipeline.make_iterator(cfg, process_index=0, process_count=1)
  model = chatrex.ChatRex(model_cfg)
  params = chatrex.init_params(model_cfg, jax.random.PRNGKey(0), 2, cfg.seq_len, cfg.max_objects)
  traces = []

  @jax.jit
  def loss(params, batch):
    traces.append(1)
    logits = model.apply(params, pipeline.model_inputs(batch))["logits"]
    return chatrex.lm_loss(logits, batch["labels"])

  for batch in take(it, 2):
    value, count = loss(params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert np.isfinite(float(value)) and float(value) > 0
    assert int(count) == int((batch["labels"][:, 1:] != C.IGNORE_INDEX).sum()) > 0
  assert len(traces) == 1


def test_follow_up_turns_that_do_not_fit_are_dropped_whole(tok_dir, data_dirs):
  """tasks.turns > 1 with a seq_len that holds only some of them: the example keeps whole turns
  (labels = exactly the kept answers + end-of-turn), never an answer cut in the middle."""
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(tok_dir)
  cfg = tiny_config(tok_dir, [{"path": data_dirs["a"], "weight": 1.0}], seq_len=200)
  cfg.tasks.weights = {"grounding": 1.0, "region": 1.0}
  cfg.tasks.turns = 12
  builder = pipeline.ExampleBuilder(cfg, pipeline.open_sources(cfg))
  kept = []
  for i, rec in enumerate(data_dirs["recs_a"][:6]):
    out, sample = builder.build(rec, np.random.default_rng(i), return_sample=True)
    kept.append(len(sample.turns))
    labels = out["labels"][out["labels"] != C.IGNORE_INDEX]
    want = "".join(builder.template.response_prefix + a + C.QWEN_IM_END for _, a in sample.turns)
    assert tok.decode(labels.tolist(), skip_special_tokens=False) == want
    assert len(sample.answer_regions) == sum(len(parse_groups(a)) for _, a in sample.turns)
    assert int(out["attention_mask"].sum()) <= 200
  assert 1 < min(kept) and max(kept) < 12
