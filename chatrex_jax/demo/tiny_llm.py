"""The demo's pretrained LLM: a tiny LLaMA that learned ChatRex's object lookup from text.

ChatRex answers "Please detect the red circle" with `<objK>`: it finds the object token that
matches the phrase and emits the index tag in front of it, an in-context lookup the released
model inherits from its pretrained LLM. A randomly initialised LLM does not learn it within a
CPU demo's budget, and SmolLM2-135M (`chatrex_jax/configs/demo.py`, `llm.source="gguf"`) is too slow to
fine-tune there (see the README). So the demo starts from this tiny LLM, pretrained once by
this script and shipped with the package (`chatrex_jax/demo/assets/tiny_llm`, ~4 MB).

The corpus is ChatRex conversations in the exact token format: the official prompts and their
paraphrases, the chat template, `<image>\\n<obj0><objfeat><obj1><objfeat>...\\n{question}` and
`<ground>...</ground><objects><objK></objects>` answers, built by the same task sampler as
ChatRex training (`chatrex_jax.data.tasks.sample_task`) from text-only scenes: 2-8 objects,
each a size, a colour and a name drawn from a generic vocabulary. A text corpus has no visual
features, so each `<objfeat>` slot holds the mean embedding of its object's phrase ("large red
circle") plus noise (a bag-of-words stand-in for the object token), proposals that are not
objects hold " background", and the `<image>` slots hold noise. The model learns to find the
slot that matches a phrase, to answer with the `<objK>` before it, and to name what a slot
holds; the demo's visual stages then teach the projectors to write such slots.

  python -m chatrex_jax.demo.tiny_llm --workdir /tmp/tiny_llm --out chatrex_jax/demo/assets/tiny_llm

Settings: chatrex_jax/configs/tiny_llm.py (`--config.key=value` overrides). The run resumes from
--workdir; --out receives a HF LLaMA folder (config.json, model.safetensors, the tokenizer with
a ChatML chat template) and pretraining.json (settings, time, held-out lookup accuracy).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.data import merge, pipeline, tasks
from chatrex_jax.models import merge as model_merge
from chatrex_jax.protocol import prompts, templates, tokenize
from chatrex_jax.protocol import tokens as C
from chatrex_jax.train.task import TrainTask, token_signature

ASSETS = pathlib.Path(__file__).with_name("assets") / "tiny_llm"

COLORS = ("red", "green", "blue", "yellow", "pink", "white", "black", "orange", "purple", "brown",
          "grey", "cyan", "gold", "silver", "navy", "teal")
SIZES = ("small", "large", "tiny", "big", "huge", "little")
NAMES = ("circle", "square", "triangle", "dot", "star", "cup", "dog", "cat", "car", "ball", "box",
         "chair", "table", "lamp", "tree", "bird", "fish", "book", "phone", "clock", "shoe", "hat",
         "bag", "bottle", "kite", "plane", "boat", "train", "bus", "bike", "horse", "cow", "sheep",
         "apple", "banana", "cake", "pizza", "vase", "bowl", "knife", "fork", "spoon", "bed", "sofa",
         "window", "door", "key", "coin", "ring")
BACKGROUND = "background"
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


# ----------------------------------------------------------------------------- text scenes

def _position(box, side: int) -> str:
  cx, cy = (box[0] + box[2]) / 2 / side, (box[1] + box[3]) / 2 / side
  v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
  h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
  return "center" if (v, h) == ("middle", "center") else f"{v} {h}"


def _shortest_unique(objects, i: int) -> str:
  """"the circle" < "the red circle" < "the large circle" < "the large red circle"."""
  o = objects[i]
  for attrs in ((2,), (1, 2), (0, 2), (0, 1, 2)):
    if sum(all(p[a] == o[a] for a in attrs) for p in objects) == 1:
      return "the " + " ".join(o[a] for a in attrs)
  raise AssertionError("objects are unique triples")


def text_scene(rng: np.random.Generator, min_objects: int = 2, max_objects: int = 8,
               side: int = 128) -> dict[str, Any]:
  """A text-only scene in the engine-record fields `tasks.sample_task` reads: unique (size,
  colour, name) objects with a random box each, a caption and per-region texts."""
  n = int(rng.integers(min_objects, max_objects + 1))
  objects: list[tuple[str, str, str]] = []
  while len(objects) < n:
    o = (SIZES[rng.integers(len(SIZES))], COLORS[rng.integers(len(COLORS))], NAMES[rng.integers(len(NAMES))])
    if o not in objects:
      objects.append(o)
  regions = []
  for i, (size, color, name) in enumerate(objects):
    w = float(rng.uniform(0.1, 0.35) * side)
    x, y = rng.uniform(0, side - w, 2)
    box = [float(x), float(y), float(x + w), float(y + w)]
    phrase = f"{size} {color} {name}"
    regions.append(dict(id=i, box=box, category=name, phrase=phrase,
                        referring=_shortest_unique(objects, i),
                        description=f"a {phrase}, in the {_position(box, side)} of the image",
                        granularity="coarse"))
  names = [f"a {r['phrase']}" for r in regions]
  listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
  return dict(key="", width=side, height=side, regions=regions,
              caption=listing[0].upper() + listing[1:] + " on a plain background.")


def corpus_texts(seed: int, scenes: int) -> list[str]:
  """Texts the tokenizer is trained on: every official prompt paraphrase and scene language
  (each word of the scenes is then one token, spaces being tokens of their own)."""
  texts = [t for name in prompts.OFFICIAL_NAMES for t in prompts.official_list(name)]
  texts.append(prompts.GROUNDED_CONVERSATION_PREFIX)
  rng = np.random.default_rng([seed, 1])
  for _ in range(scenes):
    s = text_scene(rng)
    texts.append(s["caption"])
    for r in s["regions"]:
      texts += [f"{r['description']}. {r['referring']}", r["phrase"], r["referring"], r["category"],
                r["description"]]
  return texts


def build_tokenizer(out_dir, cfg):
  """A byte-level BPE trained on `corpus_texts` (ChatML specials, then the 104 ChatRex tokens)
  with a ChatML chat template and no default system turn.

  Spaces are tokens of their own: ChatRex answers put a phrase right after `<ground>` with no
  space ("<ground>shoe</ground>") while questions and object slots have it after one ("Find
  the shoe"); with GPT-2 word tokens the two spellings are unrelated tokens, and the measured
  held-out accuracy of copying or naming a category was 0.00-0.02 after 1500 steps."""
  from chatrex_jax.data.tiny_tokenizer import build_tiny_tokenizer
  tok = build_tiny_tokenizer(out_dir, corpus_texts(cfg.data.seed, cfg.tokenizer.corpus_scenes),
                             family="qwen", vocab_size=cfg.tokenizer.vocab_size,
                             isolate_spaces=True)
  tok.chat_template = CHATML_JINJA
  tok.save_pretrained(out_dir)
  return tokenize.load_tokenizer(out_dir)


# ----------------------------------------------------------------------------- examples

class Examples:
  """One fixed-shape batch of ChatRex conversations with bag-of-words object slots.

  A batch is the merge plan of `merge.merge_plan` (token_ids, source, source_index, labels,
  attention_mask, position_ids [B, T]) plus slot_ids / slot_mask [B, M, W]: the phrase tokens
  of the object behind each `<objfeat>` (`background` for proposals that are not objects).
  """
  PHRASE_TOKENS = 8

  def __init__(self, data_cfg, tokenizer):
    self.cfg = data_cfg
    self.tokenizer = tokenizer
    self.template = templates.detect_template(tokenizer)
    self.background = self._phrase(BACKGROUND)

  def _phrase(self, text: str) -> list[int]:
    """The word tokens of `text` (space tokens left out: a slot is a bag of words)."""
    ids = [i for i in self.tokenizer.encode(text, add_special_tokens=False)
           if self.tokenizer.decode([i]).strip()]
    if len(ids) > self.PHRASE_TOKENS:
      raise ValueError(f"phrase {text!r} has {len(ids)} tokens > {self.PHRASE_TOKENS}")
    return ids

  def sample(self, rng: np.random.Generator, task: str | None = None, task_cfg=None,
             min_objects: int | None = None):
    """(input ids, labels, slot phrases) of one conversation that fits data.seq_len (longer
    ones, a few long captions, are drawn again rather than cut)."""
    d = self.cfg
    for _ in range(100):
      scene = text_scene(rng, min_objects or d.min_objects, d.max_objects_per_scene)
      sample = tasks.sample_task(scene, rng, task_cfg or d.tasks, max_objects=d.max_objects,
                                 proposals=d.proposals, task=task)
      ids, labels, _ = pipeline.fit_turns(sample.turns, self.tokenizer, self.template,
                                          seq_len=d.seq_len, num_image_tokens=d.num_image_tokens)
      if merge.merged_length(ids, d.num_image_tokens) <= d.seq_len:
        break
    else:
      raise ValueError(f"data.seq_len={d.seq_len} is too short for the sampled conversations")
    slots = [self._phrase(scene["regions"][r]["phrase"]) if r >= 0 else self.background
             for r in sample.box_region.tolist()]
    return ids, labels, slots

  def batch(self, rng: np.random.Generator, size: int, task: str | None = None, task_cfg=None,
            min_objects: int | None = None) -> dict:
    d = self.cfg
    rows = [self.sample(rng, task, task_cfg, min_objects) for _ in range(size)]
    plan = merge.merge_plan([r[0] for r in rows], labels=[r[1] for r in rows], seq_len=d.seq_len,
                               num_objects=[len(r[2]) for r in rows], max_objects=d.max_objects,
                               num_image_tokens=d.num_image_tokens)
    slot_ids = np.zeros((size, d.max_objects, self.PHRASE_TOKENS), np.int32)
    slot_mask = np.zeros(slot_ids.shape, bool)
    for b, (_, _, slots) in enumerate(rows):
      for j, phrase in enumerate(slots):
        slot_ids[b, j, :len(phrase)] = phrase
        slot_mask[b, j, :len(phrase)] = True
    keys = ("token_ids", "source", "source_index", "labels", "attention_mask", "position_ids")
    return {**{k: plan[k] for k in keys}, "slot_ids": slot_ids, "slot_mask": slot_mask}


def drill_tasks(data_cfg) -> dict:
  """The task config of the drill batches: `data.tasks` with `data.drill.tasks` over it."""
  merged = dict(data_cfg.tasks)
  merged.update(dict(data_cfg.drill.tasks))
  return merged


class BatchIterator:
  """Deterministic batches: batch n is a pure function of (seed, process, n), so the position
  is the whole state (exact resume). The first `data.drill.steps` batches are all drill rows
  (dense lookups on crowded scenes); after them `data.drill.share` of each batch's rows are
  drill rows (the first ones) and the rest the full task mix."""

  def __init__(self, examples: Examples, seed: int, batch_size: int, process_index: int = 0):
    self.examples, self.seed, self.batch_size = examples, seed, batch_size
    self.process_index, self.position = process_index, 0
    d = examples.cfg
    drill = d.get("drill") or {}
    self.drill_steps = int(drill.get("steps", 0))
    self.drill_rows = int(round(float(drill.get("share", 0.0)) * batch_size))
    self.drill = (drill_tasks(d), int(drill["min_objects"])) if self.drill_steps or self.drill_rows else None

  def __next__(self) -> dict:
    rng = np.random.default_rng([self.seed, self.process_index, self.position])
    drill_rows = self.batch_size if self.position < self.drill_steps else self.drill_rows
    self.position += 1
    if not drill_rows:
      return self.examples.batch(rng, self.batch_size)
    task_cfg, min_objects = self.drill
    drilled = self.examples.batch(rng, drill_rows, task_cfg=task_cfg, min_objects=min_objects)
    if drill_rows == self.batch_size:
      return drilled
    mixed = self.examples.batch(rng, self.batch_size - drill_rows)
    return {k: np.concatenate([drilled[k], mixed[k]]) for k in drilled}

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: Mapping) -> None:
    self.position = int(state["position"])


# ----------------------------------------------------------------------------- model + task

def llm_config(cfg, vocab_size: int):
  from chatrex_jax.models.llm import LLMConfig
  return LLMConfig.from_hf(dict(cfg.model, vocab_size=vocab_size))


def slot_inputs(model, params, batch, rng, slot_noise: float, image_noise: float,
                num_image_tokens: int):
  """inputs_embeds [B, T, D]: text embeddings, bag-of-words object slots and noise image slots
  at the positions of the merge plan."""
  from chatrex_jax.models.llm import CausalLM
  embed = lambda ids: model.apply({"params": params}, ids, method=CausalLM.embed)
  text = embed(batch["token_ids"])
  words = embed(batch["slot_ids"])                                   # [B, M, W, D]
  mask = batch["slot_mask"][..., None].astype(words.dtype)
  slots = (words * mask).sum(2) / jnp.maximum(mask.sum(2), 1.0)
  k_slot, k_image = jax.random.split(rng)
  rms = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(slots), -1, keepdims=True)))
  slots = slots + slot_noise * rms * jax.random.normal(k_slot, slots.shape, slots.dtype)
  table_rms = jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.square(params["embed_tokens"]["embedding"]))))
  b, _, dim = text.shape
  image = image_noise * table_rms * jax.random.normal(k_image, (b, num_image_tokens, dim), text.dtype)
  return model_merge.merge_embeddings(text, image, slots, batch["source"], batch["source_index"])


class TinyLLMTask(TrainTask):
  """The pretraining as a `TrainTask` of the shared trainer (checkpoints, resume, metrics)."""

  def __init__(self, config, tokenizer):
    from chatrex_jax.models.llm import CausalLM
    self.config = config
    self.tokenizer = tokenizer
    self.model_config = llm_config(config, len(tokenizer))
    self.model = CausalLM(self.model_config)
    first = tokenizer.convert_tokens_to_ids(C.OBJECT_TOKENS[0])
    self.object_ids = (first, first + C.MAX_NUM_OBJECTS)

  def abstract_params(self):
    return jax.eval_shape(self.model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]

  def init_params(self, rng):
    return self.model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]

  def trainable_patterns(self):
    return ("*",)

  def forward(self, params, batch, rng, compute_logits=True):
    d = self.config.data
    x = slot_inputs(self.model, params, batch, rng, d.slot_noise, d.image_noise, d.num_image_tokens)
    return self.model.apply({"params": params}, inputs_embeds=x, positions=batch["position_ids"],
                            key_valid=batch["attention_mask"].astype(bool),
                            compute_logits=compute_logits)

  def logits(self, params, batch, rng):
    return self.forward(params, batch, rng)["logits"]

  def loss(self, params, batch, rng):
    from chatrex_jax.models.llm import CausalLM
    from chatrex_jax.train.mllm_task import next_token_metrics
    hidden = self.forward(params, batch, rng, compute_logits=False)["hidden"][:, :-1]
    targets = batch["labels"][:, 1:]
    valid = targets != C.IGNORE_INDEX
    targets = jnp.where(valid, targets, 0)
    total, hits = self.model.apply({"params": params}, hidden, targets, valid,
                                   method=CausalLM.token_loss)
    return next_token_metrics(total, hits, targets, valid, self.object_ids)

  def make_data(self, process_index: int, process_count: int):
    d = self.config.data
    if d.batch_size % process_count:
      raise ValueError(f"data.batch_size={d.batch_size} is not divisible by {process_count} processes")
    return BatchIterator(Examples(d, self.tokenizer), d.seed, d.batch_size // process_count,
                         process_index)

  def batch_signature(self, local_batch) -> float:
    return token_signature(local_batch["token_ids"])

  def tokens_in(self, local_batch) -> float:
    return float(np.sum(local_batch["attention_mask"]))


# ----------------------------------------------------------------------------- evaluation

EVAL_KINDS = {  # name -> (task, task-config overrides)
    "referring": ("grounding", {"grounding_kinds": {"referring": 1.0}, "turns": 1}),
    "category_grounding": ("grounding", {"grounding_kinds": {"category": 1.0},
                                         "grounding_max_queries": 1, "turns": 1}),
    "region_category": ("region", {"region_granularities": {"category": 1.0},
                                   "region_max_regions": 1, "turns": 1}),
}


def lookup_accuracy(task: TinyLLMTask, params, *, samples: int = 256, seed: int = 10_000) -> dict:
  """Held-out (fresh scenes, another seed) exact-answer accuracy per kind: every answer token
  argmax-correct under teacher forcing, i.e. what greedy decoding would answer."""
  examples = Examples(task.config.data, task.tokenizer)
  logits_fn = jax.jit(task.logits)
  out = {}
  for name, (kind, overrides) in EVAL_KINDS.items():
    task_cfg = dict(task.config.data.tasks)
    task_cfg.update(overrides)
    rng = np.random.default_rng([seed, len(out)])
    hits = []
    for start in range(0, samples, 32):
      batch = examples.batch(rng, min(32, samples - start), kind, task_cfg)
      logits = np.asarray(logits_fn(params, {k: jnp.asarray(v) for k, v in batch.items()},
                                    jax.random.key(start)))
      targets, valid = batch["labels"][:, 1:], batch["labels"][:, 1:] != C.IGNORE_INDEX
      right = (logits[:, :-1].argmax(-1) == targets) | ~valid
      hits += right.all(axis=1).tolist()
    out[name] = float(np.mean(hits))
  return out


# ----------------------------------------------------------------------------- command

def export(params, task: TinyLLMTask, out: pathlib.Path, summary: dict) -> None:
  """HF LLaMA folder + tokenizer + pretraining.json, written to out.partial then renamed."""
  from chatrex_jax.convert import llm as llm_convert
  tmp = out.with_name(out.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  llm_convert.save(params, task.model_config, tmp)
  task.tokenizer.save_pretrained(tmp)
  (tmp / "pretraining.json").write_text(json.dumps(summary, indent=2) + "\n")
  if out.exists():
    shutil.rmtree(out)
  tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  argv = [a for a in argv if not a.startswith("--config.")]
  parser = argparse.ArgumentParser(prog="python -m chatrex_jax.demo.tiny_llm", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="training folder (resumed when it exists)")
  parser.add_argument("--out", default=str(ASSETS), help=f"output HF folder (default {ASSETS})")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)

  from chatrex_jax.configs import load_config
  from chatrex_jax.inference.upn_export import load_trained_params
  from chatrex_jax.train.trainer import Trainer
  config = load_config("tiny_llm", overrides)
  workdir = pathlib.Path(args.workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  tokenizer = build_tokenizer(workdir / "tokenizer", config)
  task = TinyLLMTask(config, tokenizer)
  result = Trainer(config, task, workdir, devices=jax.devices()[:1]).train(progress=not args.no_progress)
  params = load_trained_params(workdir)
  accuracy = lookup_accuracy(task, params)
  history = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  summary = {
      "what": "tiny LLaMA pretrained on ChatRex-format object lookup from text "
              "(python -m chatrex_jax.demo.tiny_llm)",
      "config": config.to_dict(), "steps": result.step, "seconds": round(time.time() - t0, 1),
      "parameters": int(sum(np.size(x) for x in jax.tree.leaves(params))),
      "final_train_metrics": {k: v for k, v in history[-1].items() if isinstance(v, float)},
      "heldout_exact_answer_accuracy": accuracy,
      "machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()},
  }
  export(params, task, pathlib.Path(args.out), summary)
  print(json.dumps({"out": args.out, "seconds": summary["seconds"], **accuracy}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
