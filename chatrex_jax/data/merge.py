"""The embedding-merge plan, host side: `prepare_inputs_labels_for_multimodal` in static shapes.

`merge_plan` computes with numpy, for each sample and each position of the merged
(right-padded, length-T) sequence, where its embedding comes from (text token / image patch k /
object j / padding), plus labels, attention mask, position ids and the scatter positions of the
image and object tokens. The model applies it inside `jit` (`models.merge.merge_embeddings`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from chatrex_jax.protocol import image as I
from chatrex_jax.protocol import tokens as C
from chatrex_jax.protocol.tokens import SOURCE_IMAGE, SOURCE_OBJECT, SOURCE_PAD, SOURCE_TEXT


def merged_length(input_ids, num_image_tokens: int = I.NUM_IMAGE_TOKENS) -> int:
  """Length of the merged sequence: L - n_images + n_images * num_image_tokens."""
  ids = np.asarray(input_ids)
  n_img = int((ids == C.IMAGE_TOKEN_INDEX).sum())
  return int(ids.shape[0]) + n_img * (num_image_tokens - 1)


def merge_plan(input_ids: Sequence[Sequence[int]], *, labels: Sequence[Sequence[int]] | None = None,
               attention_mask: Sequence[Sequence[int]] | None = None,
               seq_len: int | None = None, num_objects: Sequence[int] | None = None,
               max_objects: int = C.MAX_NUM_OBJECTS, num_image_tokens: int = I.NUM_IMAGE_TOKENS,
               pad_token_id: int = C.DEFAULT_PAD_TOKEN_INDEX, truncate: bool = False
               ) -> dict[str, np.ndarray]:
  """The static-shape plan of `prepare_inputs_labels_for_multimodal` for a batch.

  Args:
    input_ids: B id sequences (any length) with at most one -200 (`<image>`) and any number of
      -300 (`<objfeat>`); the j-th -300 of a sample takes that sample's j-th object feature.
    labels: optional B label sequences aligned with input_ids (default all IGNORE_INDEX).
    attention_mask: optional B masks; tokens with mask 0 are dropped first (official).
    seq_len: T, the static merged length (default: the longest merged sample).
    num_objects: boxes per sample; more -300 placeholders than boxes is an error.
    max_objects: M, width of `object_positions` (the model's padded box count).
    num_image_tokens: NI, tokens per image (576 for the released model).
    truncate: a merged sample longer than T is cut to T (as the official
      `tokenizer_model_max_length` truncation) instead of raising.

  Returns numpy arrays (int32 unless noted), right-padded:
    token_ids [B, T]: vocabulary id on text positions, pad_token_id elsewhere.
    source [B, T]: SOURCE_TEXT 0 / SOURCE_IMAGE 1 / SOURCE_OBJECT 2 / SOURCE_PAD -1.
    source_index [B, T]: image patch k or object j for those positions, else 0.
    labels [B, T]: text labels; IGNORE_INDEX on image, object and padding positions.
    attention_mask [B, T]: 1 on the first lengths[b] positions.
    position_ids [B, T]: 0..lengths[b]-1, then 0.
    image_positions [B, NI]: merged position of image token k, -1 if absent (no image / cut).
    object_positions [B, M]: merged position of object j, -1 if absent.
    lengths [B].
  """
  b = len(input_ids)
  if b == 0:
    raise ValueError("empty batch")
  rows = []
  for i in range(b):
    ids = np.asarray(input_ids[i], np.int64).reshape(-1)
    lab = (np.full(ids.shape, C.IGNORE_INDEX, np.int64) if labels is None
           else np.asarray(labels[i], np.int64).reshape(-1))
    if lab.shape != ids.shape:
      raise ValueError(f"sample {i}: labels length {lab.shape[0]} != input_ids length {ids.shape[0]}")
    if attention_mask is not None:
      keep = np.asarray(attention_mask[i]).reshape(-1).astype(bool)
      if keep.shape != ids.shape:
        raise ValueError(f"sample {i}: attention_mask length != input_ids length")
      ids, lab = ids[keep], lab[keep]
    is_img = ids == C.IMAGE_TOKEN_INDEX
    is_obj = ids == C.OBJECT_TOKEN_INDEX
    if is_img.sum() > 1:
      raise ValueError(f"sample {i}: {int(is_img.sum())} <image> placeholders; one is supported")
    bad = (ids < 0) & ~is_img & ~is_obj
    if bad.any():
      raise ValueError(f"sample {i}: negative ids {sorted(set(ids[bad].tolist()))} that are not "
                       "placeholders")
    n_obj = int(is_obj.sum())
    limit = max_objects if num_objects is None else min(int(num_objects[i]), max_objects)
    if n_obj > limit:
      raise ValueError(f"sample {i}: {n_obj} <objfeat> placeholders but only {limit} objects "
                       f"(num_objects={None if num_objects is None else num_objects[i]}, "
                       f"max_objects={max_objects})")
    rep = np.where(is_img, num_image_tokens, 1)
    start = np.concatenate([[0], np.cumsum(rep)[:-1]])
    n = int(rep.sum())
    src = np.repeat(np.where(is_img, SOURCE_IMAGE, np.where(is_obj, SOURCE_OBJECT, SOURCE_TEXT)),
                    rep)
    # index within its source: image patch k, or the running object count.
    obj_rank = np.cumsum(is_obj) - 1
    sidx = np.repeat(np.where(is_obj, obj_rank, 0), rep)
    if is_img.any():
      p = int(start[is_img][0])
      sidx[p:p + num_image_tokens] = np.arange(num_image_tokens)
    tok = np.repeat(np.where(is_img | is_obj, pad_token_id, ids), rep)
    lbl = np.repeat(np.where(is_img | is_obj, C.IGNORE_INDEX, lab), rep)
    rows.append((n, src, sidx, tok, lbl))
  t = seq_len if seq_len is not None else max(r[0] for r in rows)
  out = {
      "token_ids": np.full((b, t), pad_token_id, np.int32),
      "source": np.full((b, t), SOURCE_PAD, np.int32),
      "source_index": np.zeros((b, t), np.int32),
      "labels": np.full((b, t), C.IGNORE_INDEX, np.int32),
      "attention_mask": np.zeros((b, t), np.int32),
      "position_ids": np.zeros((b, t), np.int32),
      "image_positions": np.full((b, num_image_tokens), -1, np.int32),
      "object_positions": np.full((b, max_objects), -1, np.int32),
      "lengths": np.zeros((b,), np.int32),
  }
  for i, (n, src, sidx, tok, lbl) in enumerate(rows):
    if n > t:
      if not truncate:
        raise ValueError(f"sample {i}: merged length {n} > seq_len {t} (pass truncate=True to cut "
                         "it as the official tokenizer_model_max_length does)")
      n = t
    out["token_ids"][i, :n] = tok[:n]
    out["source"][i, :n] = src[:n]
    out["source_index"][i, :n] = sidx[:n]
    out["labels"][i, :n] = lbl[:n]
    out["attention_mask"][i, :n] = 1
    out["position_ids"][i, :n] = np.arange(n)
    out["lengths"][i] = n
    pos = np.arange(n)
    img = src[:n] == SOURCE_IMAGE
    out["image_positions"][i, sidx[:n][img]] = pos[img]
    obj = src[:n] == SOURCE_OBJECT
    out["object_positions"][i, sidx[:n][obj]] = pos[obj]
  return out
