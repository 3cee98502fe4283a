"""Builders the test modules share (no test module imports another): synthetic engine records
and datasets, random HF reference LLMs with their Flax conversion, random parameter trees."""
from __future__ import annotations

import json
import os
import re
import socket

import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.convert import llm as llm_convert
from chatrex_jax.data import schema
from chatrex_jax.models.llm import CausalLM, LLMConfig
from data_engine import synthetic

GROUP_RE = re.compile(r"<ground>(.*?)</ground><objects>((?:<obj\d+>)*)</objects>")


def free_port() -> int:
  """A TCP port on the loopback interface that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def scene_record(index: int, image_size: int = 64, seed: int = 0, proposals: bool = False,
                 conversation: bool = True, width: int | None = None) -> dict:
  """An engine record (schema v1) for synthetic scene `index`: every object (and its dot part)
  is a region; the caption, descriptions and referring expressions come from the scene's
  ground truth. width < image_size crops the scene to a portrait image (tests expand2square)."""
  scene = synthetic.make_scene(seed, index, image_size=image_size)
  img_w = width or image_size
  regions = []
  for o in scene["objects"]:
    items = [(o["box"], o["shape"], synthetic.object_phrase(o), synthetic.describe(scene, o["id"]),
              synthetic.referring_expression(scene, o["id"]), "coarse")]
    if o["part"] is not None:
      items.append((o["part"]["box"], synthetic.PART, f"{synthetic.PART_COLOR} {synthetic.PART}",
                    synthetic.describe(scene, o["id"], part=True),
                    synthetic.referring_expression(scene, o["id"], part=True), "fine"))
    for box, cat, phrase, desc, ref, gran in items:
      if box[2] > img_w:
        continue
      regions.append({"id": len(regions), "box": [float(v) for v in box], "category": cat,
                      "phrase": phrase, "description": desc, "referring": ref, "score": 0.9,
                      "verify_score": 0.95, "granularity": gran, "provenance": {"box": "oracle@1"}})
  import io
  img = synthetic.render(scene).crop((0, 0, img_w, image_size))
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  convs = []
  if conversation and regions:
    coarse = [r for r in regions if r["granularity"] == "coarse"]
    text = "I see " + " and ".join(f"the {r['phrase']}" for r in coarse[:2]) + "."
    groundings, pos = [], 0
    for r in coarse[:2]:
      s = text.index(r["phrase"], pos)
      groundings.append({"start": s, "end": s + len(r["phrase"]), "region_ids": [r["id"]]})
      pos = s + len(r["phrase"])
    convs = [{"role": "user", "text": "What do you see?", "groundings": []},
             {"role": "assistant", "text": text, "groundings": groundings},
             {"role": "user", "text": "How many shapes?", "groundings": []},
             {"role": "assistant", "text": f"There are {len(coarse)} shapes.", "groundings": []}]
  rec = {
      "schema_version": schema.SCHEMA_VERSION, "key": schema.make_key("test", f"{seed}/{index}"),
      "source": "test", "item_id": f"{seed}/{index}", "image": buf.getvalue(),
      "image_format": "PNG", "width": img_w, "height": image_size,
      "caption": synthetic.caption(scene) if width is None else "A plain picture of shapes.",
      "caption_provenance": {"backend": "oracle", "version": "1"},
      "regions": regions, "proposals": None, "conversations": convs,
      "extra": {"scene_index": index},
  }
  if proposals:
    rng = np.random.default_rng(index)
    boxes = []
    for _ in range(8):
      x1, y1 = rng.uniform(0, img_w / 2), rng.uniform(0, image_size / 2)
      boxes.append([x1, y1, x1 + rng.uniform(4, img_w / 2), y1 + rng.uniform(4, image_size / 2)])
    boxes += [r["box"] for r in regions]  # UPN finds the objects too: must be de-duplicated
    rec["proposals"] = {"boxes": boxes, "scores": [0.5] * len(boxes), "provenance": "upn@test"}
  schema.validate(rec)
  return rec


def parse_groups(answer: str) -> list[tuple[str, list[int]]]:
  return [(m.group(1), [int(t) for t in re.findall(r"<obj(\d+)>", m.group(2))])
          for m in GROUP_RE.finditer(answer)]


def write_engine_dataset(directory, recs, records_per_shard=5, name="scenes", split="train"):
  """Engine-format output: ArrayRecord shards + manifest.json (what data_engine writes)."""
  from data_engine.writer import write_array_record
  os.makedirs(directory, exist_ok=True)
  n = max(1, -(-len(recs) // records_per_shard))
  shards = []
  for i in range(n):
    part = recs[i * records_per_shard:(i + 1) * records_per_shard]
    fname = schema.shard_filename(name, split, i, n)
    write_array_record(os.path.join(directory, fname),
                       [r if isinstance(r, bytes) else schema.encode(r) for r in part])
    shards.append({"file": fname, "num_records": len(part)})
  manifest = {"name": name, "schema_version": schema.SCHEMA_VERSION,
              "splits": {split: {"num_records": len(recs), "shards": shards}}}
  with open(os.path.join(directory, "manifest.json"), "w") as f:
    json.dump(manifest, f)
  return directory


BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=2048)


def make_hf(family: str, tied: bool, seed: int = 0, **kw):
  """A random HF Qwen2 / LLaMA causal LM of the BASE sizes, weights moved off their init values."""
  import torch
  import transformers
  torch.manual_seed(seed)
  if family == "qwen2":
    cfg = transformers.Qwen2Config(**BASE, rope_theta=1e6, tie_word_embeddings=tied, **kw)
    model = transformers.Qwen2ForCausalLM(cfg)
  else:
    cfg = transformers.LlamaConfig(**dict(BASE, rms_norm_eps=1e-5), rope_theta=1e4,
                                   tie_word_embeddings=tied, **kw)
    model = transformers.LlamaForCausalLM(cfg)
  model.config._attn_implementation = "eager"
  with torch.no_grad():  # away from init values so that wrong wiring cannot hide
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return model, state


def to_flax(model, state, **overrides):
  config = LLMConfig.from_hf(model.config.to_dict(), **overrides)
  jmodel = CausalLM(config)
  expected = jax.eval_shape(jmodel.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  return config, jmodel, llm_convert.to_flax(state, config, expected=expected)


def write_tiny_checkpoint(root):
  """A random tiny ChatRex with a tiny tokenizer, saved in the official layout -> its folder."""
  from flax.core import meta

  from chatrex_jax.convert import chatrex as chatrex_convert
  from chatrex_jax.data.tiny_tokenizer import build_tiny_tokenizer
  from chatrex_jax.models.chatrex import init_params
  from chatrex_jax.models.tiny import tiny_config
  tok = build_tiny_tokenizer(root / "tok")
  config = tiny_config(len(tok))
  params = meta.unbox(init_params(config, jax.random.key(0)))["params"]
  chatrex_convert.save(params, config, root / "model", tokenizer=tok)
  return root / "model"


def random_like(abstract, seed: int):
  """Random fp32 values of an abstract (eval_shape) parameter tree."""
  import flax.linen as nn
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), nn.unbox(abstract))


def assert_same_tree(a, b):
  """Same paths, dtypes, shapes and values in two parameter trees."""
  from chatrex_jax.convert import mapping
  fa, fb = mapping.flatten(a), mapping.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


# ----------------------------------------------------------------------------- MLLM trainer runs

TRAIN_CLIP = ("{'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2, "
              "'num_attention_heads': 4, 'image_size': 28, 'patch_size': 14, 'select_layer': -2}")


def write_train_assets(root):
  """A tiny real tokenizer (root/tok) and 24 engine records of 64 px scenes (root/data)."""
  import pathlib

  from chatrex_jax.data.tiny_tokenizer import DEFAULT_TEXTS, build_tiny_tokenizer
  root = pathlib.Path(root)
  texts = list(DEFAULT_TEXTS) + [synthetic.caption(synthetic.make_scene(0, i)) for i in range(20)]
  build_tiny_tokenizer(root / "tok", texts, family="qwen", vocab_size=600)
  write_engine_dataset(str(root / "data"), [scene_record(i, image_size=64) for i in range(24)], 8)
  return root


def train_overrides(assets, **extra) -> list[str]:
  """`key=value` overrides of chatrex_tiny:stageN for a seconds-long run on `write_train_assets`."""
  base = {"data.sources": f"[{{'path': '{assets / 'data'}', 'weight': 1.0}}]",
          "data.tokenizer_dir": f"'{assets / 'tok'}'", "model.clip": TRAIN_CLIP,
          "model.aux_image_size": "64", "data.seq_len": "192", "data.max_objects": "6",
          "data.batch_size": "8", "data.proposals.max_extra": "3", "optim.total_steps": "8",
          "train.checkpoint_every": "3"}
  base.update({k: str(v) for k, v in extra.items()})
  return [f"{k}={v}" for k, v in base.items()]


def train_cmd(assets, workdir, *flags, stage: str = "stage2", **extra) -> list[str]:
  """`python -m chatrex_jax.train.main` (what `chatrex-jax train` runs) on the tiny config."""
  import sys
  cmd = [sys.executable, "-m", "chatrex_jax.train.main", "--config", f"chatrex_tiny:{stage}",
         "--workdir", str(workdir), *flags]
  return cmd + [f"--config.{o}" for o in train_overrides(assets, **extra)]
