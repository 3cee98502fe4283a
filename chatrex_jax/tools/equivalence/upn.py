"""Golden runners for UPN: msdeform_attn, upn_tiny, upn_filter, upn_wrapper_e2e.

Each rebuilds the component from meta.json, loads weights.safetensors through
`chatrex_jax.convert.upn` (the converter users run on real checkpoints) and returns the
fixture's outputs under the fixture's names.
"""
from __future__ import annotations

import numpy as np

from chatrex_jax.tools.equivalence.registry import Fixture, RunResult, register

PROMPTS = ("fine_grained_prompt", "coarse_grained_prompt")
DECODE_KEYS = ("pred_logits", "pred_boxes", "enc_class_logits", "enc_topk_indices",
               "enc_topk_boxes_unsigmoid", "enc_topk_init_proposals_sigmoid", "dec_hs",
               "dec_references")


@register("msdeform_attn")
def run_msdeform_attn(fx: Fixture) -> RunResult:
  import jax.numpy as jnp

  from chatrex_jax.convert import mapping
  from chatrex_jax.convert.upn import msdeform_attn_rules
  from chatrex_jax.models.upn.deformable import MSDeformAttn
  c = fx.config
  params = mapping.to_flax(fx.weights(), msdeform_attn_rules(), what="msdeform_attn")
  x = fx.inputs
  shapes = tuple(map(tuple, x["input_spatial_shapes"].tolist()))
  starts = np.cumsum([0] + [h * w for h, w in shapes[:-1]])
  if not np.array_equal(starts, x["input_level_start_index"]):
    raise ValueError("input_level_start_index is not the prefix sum of the spatial shapes")
  mask = jnp.asarray(x["input_padding_mask"].astype(bool))
  out = {}

  def run(ref, m, use4d=False, aux=False):
    mod = MSDeformAttn(c["d_model"], c["n_levels"], c["n_heads"], c["n_points"], use_4d_normalizer=use4d)
    return mod.apply({"params": params}, x["query"], x[ref], x["input_flatten"], shapes, m, return_aux=aux)

  for dim in ("2d", "4d"):
    y, aux = run(f"reference_points_{dim}", mask, c.get("use_4D_normalizer", False), aux=True)
    out[f"output_{dim}"] = y
    out[f"sampling_locations_{dim}"] = aux["sampling_locations"]
    out[f"attention_weights_{dim}"] = aux["attention_weights"]
  out["output_2d_nomask"] = run("reference_points_2d", None)
  out["output_4d_use_4D_normalizer"] = run("reference_points_4d", mask, True)
  return RunResult({k: np.asarray(v) for k, v in out.items()})


def _load_upn(fx: Fixture):
  from chatrex_jax.convert import upn as convert_upn
  from chatrex_jax.models.upn.upn import UPN, UPNConfig
  config = UPNConfig.from_official(fx.config["model"])
  params, report = convert_upn.to_flax(fx.weights(), config, strict=False)
  notes = [f"checkpoint: {report}"] if report.unexpected else []
  return UPN(config), params, notes


def _post(prefix: str, dec: dict, sizes_hw) -> dict[str, np.ndarray]:
  from chatrex_jax.inference.upn import postprocess
  res = postprocess(dec["pred_boxes"], dec["pred_logits"], sizes_hw)
  return {f"{prefix}_post_xyxy_boxes_sorted": res.boxes,
          f"{prefix}_post_scores_sorted": res.scores[..., None]}


@register("upn_tiny")
def run_upn_tiny(fx: Fixture) -> RunResult:
  from chatrex_jax.inference.upn import forward
  model, params, notes = _load_upn(fx)
  outs: dict[str, np.ndarray] = {}
  for case in fx.config.get("cases", ("single", "batch2")):
    images = fx.inputs[f"{case}_images"].transpose(0, 2, 3, 1)
    hw = fx.inputs[f"{case}_image_hw"]
    mask = np.ones(images.shape[:3], bool)
    for b, (h, w) in enumerate(hw):
      mask[b, :h, :w] = False
    res = forward(model, params, images, mask, PROMPTS, full=True)
    for i, f in enumerate(res["backbone_feats"]):
      outs[f"{case}_backbone_feat{i}"] = f.transpose(0, 3, 1, 2)
    for k in ("src_flatten", "lvl_pos_embed_flatten", "valid_ratios", "memory"):
      outs[f"{case}_{k}"] = res[k]
    outs[f"{case}_mask_flatten"] = res["mask_flatten"].astype(np.int64)
    shapes = [tuple(f.shape[1:3]) for f in res["backbone_feats"]]
    shapes.append(((shapes[-1][0] - 1) // 2 + 1, (shapes[-1][1] - 1) // 2 + 1))
    outs[f"{case}_spatial_shapes"] = np.asarray(shapes, np.int64)
    outs[f"{case}_level_start_index"] = np.cumsum([0] + [h * w for h, w in shapes[:-1]]).astype(np.int64)
    for pt in PROMPTS:
      dec = res[pt]
      for k in DECODE_KEYS:
        v = dec[k]
        outs[f"{case}_{pt}_{k}"] = v.astype(np.int64) if k == "enc_topk_indices" else v
      # The official postprocess scales by the sizes construct_input recorded: here the
      # fixture's valid (H, W) of each image.
      outs.update(_post(f"{case}_{pt}", dec, [tuple(x) for x in hw.tolist()]))
  return RunResult(outs, notes=notes)


def _filter_outputs(prefix: str, kept, num_returned: int | None = None) -> dict[str, np.ndarray]:
  n = len(kept) if num_returned is None else num_returned
  kept = kept[:n]
  boxes = [k.boxes.astype(np.int64) for k in kept]
  scores = [k.scores for k in kept]
  return {f"{prefix}_num_images_returned": np.asarray(n, np.int64),
          f"{prefix}_counts": np.asarray([len(b) for b in boxes], np.int64),
          f"{prefix}_kept_boxes": np.concatenate(boxes).reshape(-1, 4) if boxes else np.zeros((0, 4), np.int64),
          f"{prefix}_kept_scores": (np.concatenate(scores) if scores else np.zeros((0,))).astype(np.float32)}


def _official_returned(kept) -> int:
  """How many images the official filter returns: it stops at the first image with no box."""
  for i, k in enumerate(kept):
    if len(k.boxes) == 0:
      return i
  return len(kept)


def _compare_filter(prefix: str, kept, fx: Fixture, exact: set, notes: list) -> dict[str, np.ndarray]:
  """Our outputs for the images the official code returned; the dropped tail becomes a note."""
  n_official = int(fx.outputs[f"{prefix}_num_images_returned"])
  n_ours = _official_returned(kept)
  out = _filter_outputs(prefix, kept, n_ours)
  exact.update(k for k in out)
  if n_official < len(kept):
    dropped = len(kept) - n_official
    notes.append(f"{prefix}: the official filter returned {n_official} of {len(kept)} images (its "
                 f"early-return bug drops image {n_official} with no box >= min_score and the "
                 f"{dropped - 1} after it); ours returns all {len(kept)} (counts "
                 f"{[len(k.boxes) for k in kept]}); the returned images are compared exactly")
  return out


# UPNWrapper.filter's own defaults: only for a fixture whose meta.json has no `filter_args`.
DEFAULT_FILTER_ARGS = {"min_score": 0.3, "nms_value": 0.8}


def filter_args(fx: Fixture) -> tuple[float, float | None]:
  """(min_score, nms_iou) the official filter ran with, from meta.json `filter_args`."""
  args = {**DEFAULT_FILTER_ARGS, **fx.meta.get("filter_args", {})}
  nms = args["nms_value"]
  return float(args["min_score"]), None if nms is None else float(nms)


def _filter(fx: Fixture, result):
  from chatrex_jax.inference.upn import filter_result
  min_score, nms_iou = filter_args(fx)
  return filter_result(result, min_score=min_score, nms_iou=nms_iou)


@register("upn_filter")
def run_upn_filter(fx: Fixture) -> RunResult:
  from chatrex_jax.inference.upn import UPNResult
  outs, exact, notes = {}, set(), []
  cases = sorted({k.split("_")[0] for k in fx.inputs})
  for case in cases:
    res = UPNResult(fx.inputs[f"{case}_boxes"], fx.inputs[f"{case}_scores"][..., 0])
    kept = _filter(fx, res)
    outs.update(_compare_filter(case, kept, fx, exact, notes))
  return RunResult(outs, exact=frozenset(exact), notes=notes)


@register("upn_wrapper_e2e")
def run_upn_wrapper_e2e(fx: Fixture) -> RunResult:
  from chatrex_jax.inference.upn import forward, postprocess, preprocess
  model, params, notes = _load_upn(fx)
  image = fx.inputs["image"]
  x, (h, w) = preprocess(image)
  outs: dict[str, np.ndarray] = {"transformed_image": x.transpose(2, 0, 1),
                                 "image_size_hw": np.asarray([[h, w]], np.int64)}
  res = forward(model, params, x[None], None, PROMPTS, full=True)
  feats = res["backbone_feats"]
  shapes = [tuple(f.shape[1:3]) for f in feats]
  shapes.append(((shapes[-1][0] - 1) // 2 + 1, (shapes[-1][1] - 1) // 2 + 1))
  starts = np.cumsum([0] + [a * b for a, b in shapes[:-1]]).astype(np.int64)
  outs["spatial_shapes"] = np.asarray(shapes, np.int64)
  outs["level_start_index"] = starts
  outs["valid_ratios"] = res["valid_ratios"]
  outs["debug_backbone_feat3"] = feats[3].transpose(0, 3, 1, 2)
  outs["debug_memory_level4"] = res["memory"][:, starts[-1]:]
  exact: set[str] = set()
  for pt in PROMPTS:
    dec = res[pt]
    for k in DECODE_KEYS:
      if k == "enc_topk_init_proposals_sigmoid":
        continue
      v = dec[k]
      outs[f"{pt}_{k}"] = v.astype(np.int64) if k == "enc_topk_indices" else v
    post = postprocess(dec["pred_boxes"], dec["pred_logits"], [(h, w)])
    outs[f"{pt}_post_xyxy_boxes_sorted"] = post.boxes
    outs[f"{pt}_post_scores_sorted"] = post.scores[..., None]
    kept = _filter(fx, post)
    outs.update(_compare_filter(f"{pt}_filter", kept, fx, exact, notes))
  return RunResult(outs, exact=frozenset(exact), notes=notes)
