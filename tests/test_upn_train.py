"""UPN training (issue 9): task loss, data pipeline, training on synthetic scenes, proposal export.

Fast tests share one compiled loss+gradient of a reduced tiny UPN (d_model 32, Swin depth 1
per stage, 1 encoder + 2 decoder layers, 32 px canvas). The slow test trains the d32 tiny UPN
through `Trainer` on synthetic scenes and checks recall and the two prompts' granularities:

    pytest -m slow tests/test_upn_train.py
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from chatrex_jax.configs import load_config
from chatrex_jax.data import records as records_lib
from chatrex_jax.data import schema, upn_data
from chatrex_jax.eval.recall import proposal_recall
from chatrex_jax.ops.boxes import cxcywh_to_xyxy
from chatrex_jax.train.upn_losses import upn_criterion
from chatrex_jax.train.upn_task import UPNTask, forward_both
from data_engine import synthetic
from tests.builders import scene_record, write_engine_dataset

CONFIG = "upn_train_tiny"


def small_config(data_dir, side=32, batch=4, targets=8, granularity="both"):
  cfg = load_config(CONFIG + ":d32")
  cfg.model.enc_layers = 1
  cfg.model.swin.depths = (1, 1, 1, 1)
  cfg.data.sources = [{"path": data_dir, "granularity": granularity}]
  cfg.data.max_size, cfg.data.scales = side, [side - 8, side]
  cfg.data.batch_size, cfg.data.max_targets = batch, targets
  cfg.data.num_threads, cfg.data.prefetch_buffer_size = 1, 1
  cfg.mesh.fsdp = 1
  return cfg


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
  d = tmp_path_factory.mktemp("upn_scenes")
  return write_engine_dataset(str(d), [scene_record(i, image_size=32) for i in range(6)], 4)


@pytest.fixture(scope="module")
def fast(scenes):
  """Reduced tiny UPN, its params, one batch from the pipeline and one compiled loss+grad."""
  cfg = small_config(scenes)
  task = UPNTask(cfg)
  params = jax.jit(lambda r: __import__("flax").linen.unbox(task.init_params(r)))(jax.random.key(0))
  batch = next(upn_data.make_upn_iterator(cfg.data, process_index=0, process_count=1))
  batch = {k: batch[k] for k in ("images", "mask", "boxes", "box_mask", "prompt_id")}

  def fn(p, b):
    loss_sum, denom, metrics = task.loss(p, b, jax.random.key(0))
    return loss_sum, (denom, metrics)
  grad = jax.jit(jax.value_and_grad(fn, has_aux=True))
  return dict(cfg=cfg, task=task, params=params, batch=batch, grad=grad)


# ------------------------------------------------------------------------------- task / loss


def test_task_loss_equals_criterion(fast):
  task, params, batch = fast["task"], fast["params"], fast["batch"]
  assert set(np.asarray(batch["prompt_id"]).tolist()) == {0, 1}   # both prompts in the batch
  (loss_sum, (denom, metrics)), _ = fast["grad"](params, batch)
  outs = jax.jit(lambda p, x, m: task.model.apply({"params": p}, x, m, method=forward_both))(
      params, batch["images"], batch["mask"])
  outs = jax.tree.map(np.asarray, outs)
  # each example's outputs from its own prompt, picked by hand
  pid = np.asarray(batch["prompt_id"])
  pick = lambda key, axis: np.stack([outs[("fine", "coarse")[p]][key].take(i, axis)
                                     for i, p in enumerate(pid)], axis)
  all_logits, all_boxes = pick("all_logits", 1), pick("all_boxes", 1)
  outputs = {"pred_logits": all_logits[-1], "pred_boxes": all_boxes[-1],
             "aux_outputs": [{"pred_logits": all_logits[0], "pred_boxes": all_boxes[0]}],
             "interm_outputs": {"pred_logits": pick("interm_logits", 0),
                                "pred_boxes": pick("interm_boxes", 0)}}
  targets = {"boxes": batch["boxes"], "mask": batch["box_mask"]}
  want, losses = upn_criterion(outputs, targets, config=task.loss_config)
  n = float(np.sum(batch["box_mask"]))
  assert n > 0 and float(denom) == n
  np.testing.assert_allclose(float(loss_sum) / float(denom), float(want), rtol=2e-5)
  np.testing.assert_allclose(float(metrics["loss_giou"]), float(losses["loss_giou"]), rtol=2e-5)
  assert "loss_ce_interm" in losses and "loss_ce_0" in losses


def test_gradients_finite_without_targets(fast):
  params, batch = fast["params"], dict(fast["batch"])
  mask = np.asarray(batch["box_mask"]).copy()
  mask[0] = False                         # one image without targets
  for m in (mask, np.zeros_like(mask)):   # ... and a batch without any
    b = dict(batch, box_mask=m)
    (loss_sum, (denom, _)), grads = fast["grad"](params, b)
    assert float(denom) == float(m.sum())
    assert np.isfinite(float(loss_sum)) and float(loss_sum) > 0
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0


def test_loss_decreases_substantially(fast):
  """Overfit one batch with Adam: the UPN loss falls to well under half."""
  params, batch = fast["params"], fast["batch"]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-3))
  opt = tx.init(params)
  update = jax.jit(lambda g, o, p: tx.update(g, o, p))
  losses = []
  for _ in range(30):
    (loss_sum, (denom, _)), grads = fast["grad"](params, batch)
    losses.append(float(loss_sum) / max(float(denom), 1.0))
    upd, opt = update(grads, opt, params)
    params = optax.apply_updates(params, upd)
  assert np.isfinite(losses).all()
  assert min(losses[-5:]) < 0.5 * losses[0], losses


def test_group_lrs_and_patterns(fast):
  task = fast["task"]
  assert task.group_lrs() == {"backbone/*": fast["cfg"].optim.lr_backbone}
  assert task.trainable_patterns() == ("*",)
  abstract = task.abstract_params()
  assert "backbone" in abstract and "fine_grained_prompt" in abstract


def test_abstract_batch_is_what_the_data_yields(fast):
  """The batch AOT compiles for (`TrainTask.abstract_batch`) is the pipeline's, key by key."""
  task = fast["task"]
  batch = next(task.make_data(process_index=0, process_count=1))
  assert {k: (x.shape, np.dtype(x.dtype)) for k, x in task.abstract_batch().items()} == \
      {k: (v.shape, v.dtype) for k, v in batch.items()}


# ------------------------------------------------------------------------------- data


def _one_square_scene(size=48):
  scene = {"seed": 0, "index": 0, "image_size": size,
           "objects": [{"id": 0, "shape": "square", "color": "red", "size": "large",
                        "box": [9, 14, 29, 30], "part": None}]}
  return synthetic.render(scene), np.asarray([[9, 14, 29, 30]], np.float32)


def _content_box(example):
  """xyxy extent of the non-background pixels in the valid region (canvas pixels)."""
  h, w = example["size_hw"]
  img = example["images"][:h, :w] * upn_data.STD + upn_data.MEAN
  red = (img[..., 0] > 0.6) & (img[..., 1] < 0.5)          # the red square, after interpolation
  ys, xs = np.nonzero(red)
  return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


@pytest.mark.parametrize("flip,crop_prob", [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)])
def test_augment_box_matches_content(flip, crop_prob):
  img, boxes = _one_square_scene()
  cfg = upn_data.default_upn_data_config()
  cfg.max_size, cfg.scales, cfg.max_targets = 80, [40, 56, 72], 4
  cfg.flip_prob, cfg.crop_prob, cfg.crop_min_frac = flip, crop_prob, 0.9
  checked = 0
  for seed in range(6):
    a_img, a_boxes = upn_data.augment(img, boxes, np.random.default_rng(seed), cfg)
    ex = upn_data.to_canvas(a_img, a_boxes, cfg.max_size, cfg.max_targets)
    assert ex["images"].shape == (80, 80, 3) and ex["mask"].shape == (80, 80)
    assert ex["boxes"].shape == (4, 4) and ex["box_mask"].shape == (4,)
    h, w = ex["size_hw"]
    assert not ex["mask"][:h, :w].any() and ex["mask"].sum() == 80 * 80 - h * w
    assert (ex["images"][h:] == 0).all() and (ex["images"][:, w:] == 0).all()
    if not ex["box_mask"][0]:
      continue
    box = np.asarray(cxcywh_to_xyxy(ex["boxes"][0])) * np.asarray([w, h, w, h])
    content = _content_box(ex)
    np.testing.assert_allclose(box, content, atol=1.0)   # bilinear edge blur < 1 px
    if flip == 1.0 and crop_prob == 0.0:    # mirrored: the square is now on the right half
      assert box[0] > w - box[2]
    checked += 1
  assert checked >= 4


def test_crop_clips_and_drops_boxes():
  img = Image.new("RGB", (40, 30))
  boxes = np.asarray([[0, 0, 10, 10], [5, 5, 35, 25], [30, 20, 40, 30]], np.float32)
  out, b = upn_data.crop(img, boxes, (8, 4, 20, 20))
  assert out.size == (20, 20)
  np.testing.assert_allclose(b, [[0, 0, 2, 6], [0, 1, 20, 20]])   # the third box is dropped


def test_engine_both_gives_two_examples(scenes):
  recs = list(records_lib.iter_records(scenes))
  src = upn_data.EngineUPNSource(recs, "both")
  assert len(src) == 2 * len(recs)
  for i, r in enumerate(recs):
    coarse, fine = src[2 * i], src[2 * i + 1]
    assert coarse.prompt_id == upn_data.PROMPT_IDS["coarse"] and fine.prompt_id == upn_data.PROMPT_IDS["fine"]
    np.testing.assert_array_equal(coarse.boxes, [g["box"] for g in r["regions"] if g["granularity"] == "coarse"])
    np.testing.assert_array_equal(fine.boxes.reshape(-1, 4), np.asarray(
        [g["box"] for g in r["regions"] if g["granularity"] == "fine"], np.float32).reshape(-1, 4))
  with pytest.raises(ValueError, match="granularity"):
    upn_data.EngineUPNSource(recs, "parts")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
  d = tmp_path_factory.mktemp("coco")
  images, anns = [], []
  for i in range(4):
    scene = synthetic.make_scene(3, i, image_size=32)
    synthetic.render(scene).save(d / f"{i}.png")
    images.append({"id": 10 + i, "file_name": f"{i}.png", "width": 32, "height": 32})
    for o in scene["objects"]:
      x1, y1, x2, y2 = o["box"]
      anns.append({"id": len(anns), "image_id": 10 + i, "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "iscrowd": 0, "category_id": 1})
  anns.append({"id": 999, "image_id": 10, "bbox": [0, 0, 5, 5], "iscrowd": 1, "category_id": 1})
  (d / "ann.json").write_text(json.dumps({"images": images, "annotations": anns}))
  return str(d)


def test_coco_source(coco):
  src = upn_data.CocoUPNSource(os.path.join(coco, "ann.json"), coco, "coarse")
  assert len(src) == 4
  item = src[1]
  want, _ = synthetic.scene_arrays(synthetic.make_scene(3, 1, image_size=32), include_parts=False)
  np.testing.assert_allclose(item.boxes, want)
  assert item.prompt_id == upn_data.PROMPT_IDS["coarse"] and item.image.size == (32, 32)
  assert len(src[0].boxes) == len(synthetic.make_scene(3, 0, image_size=32)["objects"])  # crowd skipped
  with pytest.raises(ValueError, match="granularity"):
    upn_data.CocoUPNSource(os.path.join(coco, "ann.json"), coco, "both")


def _mixed_config(scenes, coco):
  cfg = upn_data.default_upn_data_config()
  cfg.sources = [{"path": scenes, "granularity": "both", "weight": 3.0},
                 {"path": os.path.join(coco, "ann.json"), "format": "coco", "images_dir": coco,
                  "granularity": "coarse", "weight": 1.0}]
  cfg.max_size, cfg.scales, cfg.max_targets, cfg.batch_size = 32, [24, 32], 8, 4
  cfg.num_threads, cfg.prefetch_buffer_size, cfg.seed = 1, 1, 7
  return cfg


def test_pipeline_shapes_mixing_determinism_and_resume(scenes, coco):
  cfg = _mixed_config(scenes, coco)
  it = upn_data.make_upn_iterator(cfg, process_index=0, process_count=1)
  batches = [next(it) for _ in range(2)]
  state = it.get_state()
  json.dumps(state)                                     # JSON-able
  after = [next(it) for _ in range(2)]
  b = batches[0]
  assert b["images"].shape == (4, 32, 32, 3) and b["images"].dtype == np.float32
  assert b["mask"].shape == (4, 32, 32) and b["mask"].dtype == bool
  assert b["boxes"].shape == (4, 8, 4) and b["box_mask"].shape == (4, 8)
  assert b["prompt_id"].shape == (4,) and b["prompt_id"].dtype == np.int32
  for k in ("boxes",):
    valid = np.concatenate([x[k][x["box_mask"]] for x in batches + after])
    assert (valid[:, 2:] > 0).all() and (valid >= 0).all() and (valid <= 1.0 + 1e-6).all()
  # deterministic: a fresh iterator gives the same stream; set_state resumes exactly
  again = upn_data.make_upn_iterator(cfg, process_index=0, process_count=1)
  for want in batches + after:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  resumed = upn_data.make_upn_iterator(cfg, process_index=0, process_count=1)
  resumed.set_state(state)
  for want in after:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # mixing by weight (3:1) over the reference stream
  refs = upn_data.build_upn_dataset(cfg, process_index=0, process_count=1, batched=False)
  ids = [int(refs[i]["source_id"]) for i in range(40)]
  assert 0.6 <= ids.count(0) / 40 <= 0.9 and ids.count(1) > 0
  # a different seed gives another stream; its state is rejected here
  other = _mixed_config(scenes, coco)
  other.seed = 8
  with pytest.raises(ValueError, match="fingerprint"):
    upn_data.make_upn_iterator(other, process_index=0, process_count=1).set_state(state)


# ------------------------------------------------------------------------------- export


def test_proposal_export_validates(scenes, fast, tmp_path):
  from chatrex_jax.inference import upn_export
  task = fast["task"]
  predict = upn_export.predictor_fn(fast["params"], task.model_config, size=32, max_size=32,
                                    min_score=0.0, nms_iou=0.8)
  out = str(tmp_path / "exported")
  stats = upn_export.export_proposals(scenes, out, predict, prompt="fine", batch_size=3,
                                      provenance="test")
  src = list(records_lib.iter_records(scenes))
  got = [schema.decode(buf, check=True) for p in records_lib.shard_paths(out)
         for buf in records_lib.read_shard(p)]
  assert stats["records"] == len(src) == len(got)
  for a, b in zip(src, got):
    schema.validate(b)
    assert b["key"] == a["key"] and b["regions"] == a["regions"] and b["image"] == a["image"]
    prop = b["proposals"]
    assert prop["provenance"] == "upn:fine@test" and len(prop["boxes"]) == len(prop["scores"]) > 0
    assert prop["scores"] == sorted(prop["scores"], reverse=True)
    bx = np.asarray(prop["boxes"])
    assert (bx >= 0).all() and (bx[:, [0, 2]] <= b["width"]).all() and (bx[:, [1, 3]] <= b["height"]).all()
  manifest = records_lib.read_manifest(out)
  assert manifest["proposals"]["prompt"] == "fine"
  with pytest.raises(ValueError, match="differ"):
    upn_export.export_proposals(scenes, scenes, predict)


def test_batch_bucket_pads_without_changing_results(scenes, fast):
  """Padding a short batch (one compilation for all batch sizes) leaves every image's result equal."""
  from chatrex_jax.inference import upn_export
  images = [upn_export._open(r["image"]) for r in list(records_lib.iter_records(scenes))[:3]]
  kw = dict(size=32, max_size=32, min_score=0.0, nms_iou=0.8)
  plain = upn_export.predictor_fn(fast["params"], fast["task"].model_config, **kw)
  bucketed = upn_export.predictor_fn(fast["params"], fast["task"].model_config, batch_bucket=4, **kw)
  for prompt in ("fine", "coarse"):
    want, got = plain(images, prompt), bucketed(images, prompt)
    assert len(got) == len(want) == 3
    for a, b in zip(want, got):
      np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-4)
      np.testing.assert_allclose(b.scores, a.scores, atol=1e-6)


# ------------------------------------------------------------------------------- training (slow)


def _recall(task, params, cfg, prompt, targets_of, top_k):
  """Recall@0.5 of the prompt's top_k proposals against targets_of(record) on the records."""
  src = upn_data.open_upn_sources(cfg.data)[0][1]
  recs = src.records
  builder = upn_data.UPNExampleBuilder(cfg.data, [], train=False)
  gts, props = [], []
  fwd = jax.jit(lambda p, x, m: task.model.apply({"params": p}, x, m, method=forward_both))
  for i in range(len(recs)):
    item = upn_data.Item(src[2 * i].image, np.asarray(targets_of(recs[i]), np.float32).reshape(-1, 4), 0, "")
    ex = builder.build(item, np.random.default_rng(0))
    out = fwd(params, ex["images"][None], ex["mask"][None])[prompt]
    h, w = ex["size_hw"]
    order = np.argsort(-np.asarray(out["pred_logits"][0, :, 0]))[:top_k]
    props.append(np.asarray(cxcywh_to_xyxy(out["pred_boxes"][0]))[order] * [w, h, w, h])
    gts.append(np.asarray(cxcywh_to_xyxy(ex["boxes"][ex["box_mask"]])) * [w, h, w, h])
  return proposal_recall(gts, props, 0.5).pooled


@pytest.mark.slow
def test_trainer_reaches_recall_and_prompts_learn_granularity(tmp_path):
  import time

  from chatrex_jax.train.optimizer import merge
  from chatrex_jax.train.trainer import Trainer
  data = write_engine_dataset(str(tmp_path / "data"),
                              [scene_record(i, image_size=64) for i in range(8)], 4)
  cfg = load_config(CONFIG + ":d32")
  cfg.data.sources = [{"path": data, "granularity": "both"}]
  cfg.data.max_size, cfg.data.scales, cfg.data.crop_prob = 64, [64], 0.0
  cfg.optim.total_steps = 300
  cfg.train.checkpoint_every = 300
  cfg.mesh.fsdp = 1
  task = UPNTask(cfg)
  t0 = time.time()
  trainer = Trainer(cfg, task, tmp_path / "work", devices=jax.devices()[:1])
  result = trainer.train(progress=False)
  elapsed = time.time() - t0
  params = merge(trainer.state.trainable, trainer.state.frozen)
  coarse = lambda r: [g["box"] for g in r["regions"] if g["granularity"] == "coarse"]
  fine = lambda r: [g["box"] for g in r["regions"] if g["granularity"] == "fine"]
  rc = _recall(task, params, cfg, "coarse", coarse, 10)
  rf = _recall(task, params, cfg, "fine", fine, 10)
  rc_by_fine = _recall(task, params, cfg, "fine", coarse, 5)
  rf_by_coarse = _recall(task, params, cfg, "coarse", fine, 5)
  rc5 = _recall(task, params, cfg, "coarse", coarse, 5)
  rf5 = _recall(task, params, cfg, "fine", fine, 5)
  print(json.dumps({"train_s": round(elapsed, 1), "steps": result.step,
                    "loss_first": result.history[0]["loss"], "loss_last": result.history[-1]["loss"],
                    "coarse_recall@10": rc, "fine_recall@10": rf, "coarse_recall@5": rc5,
                    "fine_recall@5": rf5, "coarse_targets_by_fine_prompt@5": rc_by_fine,
                    "fine_targets_by_coarse_prompt@5": rf_by_coarse}))
  assert rc >= 0.9
  assert rc5 > rc_by_fine and rf5 > rf_by_coarse
