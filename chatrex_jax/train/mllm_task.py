"""The ChatRex MLLM as a `TrainTask` of the shared trainer (three stages, spec B.11)."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.data import constants as C
from chatrex_jax.models.chatrex import ChatRex, ChatRexConfig, example_batch
from chatrex_jax.models.clip_vit import CLIPVisionConfig
from chatrex_jax.models.convnext import ConvNeXtConfig
from chatrex_jax.models.llm import LLMConfig
from chatrex_jax.train.optimizer import STAGE_PATTERNS
from chatrex_jax.train.trainer import SelectKeys

# What the train step reads: the model inputs and the labels.
MODEL_BATCH_KEYS = ("pixel_values", "pixel_values_aux", "boxes", "box_mask", "token_ids", "source",
                    "source_index", "attention_mask", "position_ids", "labels")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(model_cfg, vocab_size: int | None = None) -> ChatRexConfig:
  """ChatRexConfig from the `model` section of a training config."""
  llm_hf = dict(model_cfg.llm)
  if not llm_hf.get("vocab_size"):
    if vocab_size is None:
      raise ValueError("model.llm.vocab_size is 0 (take it from the tokenizer) but no tokenizer "
                       "was given: set data.tokenizer_dir")
    llm_hf["vocab_size"] = vocab_size
  dtype = DTYPES[model_cfg.get("compute_dtype", "float32")]
  llm = LLMConfig.from_hf(llm_hf, dtype=dtype, scan_layers=model_cfg.get("scan_layers", False),
                          remat_policy=model_cfg.get("remat_policy", "none"))
  clip = dict(model_cfg.clip)
  clip = CLIPVisionConfig(**clip, dtype=dtype, remat=model_cfg.get("remat_policy", "none") != "none")
  convnext = ConvNeXtConfig(depths=tuple(model_cfg.convnext["depths"]), dims=tuple(model_cfg.convnext["dims"]),
                            dtype=dtype)
  return ChatRexConfig(llm=llm, clip=clip, convnext=convnext, aux_image_size=model_cfg.aux_image_size,
                       train_vision_tower=model_cfg.get("train_vision_tower", True),
                       train_vision_tower_aux=model_cfg.get("train_vision_tower_aux", False))


class ChatRexTask:
  """Binds model, stage mask and data pipeline for `chatrex_jax.train.trainer.Trainer`."""

  def __init__(self, config):
    self.config = config
    self.tokenizer = None
    vocab = None
    if config.data.get("tokenizer_dir"):
      from transformers import AutoTokenizer
      self.tokenizer = AutoTokenizer.from_pretrained(config.data.tokenizer_dir, local_files_only=True)
      vocab = len(self.tokenizer)
    self.model_config = model_config(config.model, vocab)
    if self.tokenizer is not None and len(self.tokenizer) > self.model_config.llm.vocab_size:
      raise ValueError(f"tokenizer has {len(self.tokenizer)} tokens but the LLM vocabulary is "
                       f"{self.model_config.llm.vocab_size}: resize with convert.llm.resize_vocab")
    self.model = ChatRex(self.model_config)
    self.stage = config.stage

  # -- parameters ------------------------------------------------------------------------------

  def _example(self):
    d = self.config.data
    return example_batch(self.model_config, batch_size=1, num_tokens=8, max_objects=min(d.max_objects, 4))

  def abstract_params(self):
    return jax.eval_shape(self.model.init, jax.random.key(0), self._example())["params"]

  def init_params(self, rng):
    return self.model.init(rng, self._example())["params"]

  def pretrained_params(self):
    """Parameters from `model.init_from` (official-layout folder), or None for random init."""
    path = self.config.model.get("init_from", "")
    if not path:
      return None
    from chatrex_jax.convert import chatrex as chatrex_convert
    config, params, _ = chatrex_convert.load_checkpoint(path)
    if config.llm.vocab_size != self.model_config.llm.vocab_size:
      raise ValueError(f"{path}: vocabulary {config.llm.vocab_size} != model {self.model_config.llm.vocab_size}")
    if self.model_config.llm.scan_layers:
      from chatrex_jax.convert import llm as llm_convert
      params["llm"] = llm_convert.stack_layers(params["llm"], config.llm.num_hidden_layers)
    return params

  def trainable_patterns(self):
    return STAGE_PATTERNS[self.stage]

  def frozen_patterns(self):
    out = []
    if not self.model_config.train_vision_tower:
      out.append("vision_tower/*")
    if not self.model_config.train_vision_tower_aux:
      out.append("vision_tower_aux/*")
    return out

  def group_lrs(self):
    return None

  # -- loss ------------------------------------------------------------------------------------

  def loss(self, params, batch, rng):
    logits = self.model.apply({"params": params}, batch)["logits"]
    labels = batch["labels"]
    shift_logits = logits[:, :-1].astype(jnp.float32)
    shift_labels = labels[:, 1:]
    valid = shift_labels != C.IGNORE_INDEX
    logp = jax.nn.log_softmax(shift_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, shift_labels, 0)[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, nll, 0.0))
    count = valid.sum().astype(jnp.float32)
    correct = jnp.sum(jnp.where(valid, jnp.argmax(shift_logits, -1) == shift_labels, False))
    return total, count, {"token_accuracy": correct / jnp.maximum(count, 1.0)}

  # -- data ------------------------------------------------------------------------------------

  def make_data(self, process_index: int, process_count: int):
    from chatrex_jax.data import pipeline
    d = self.config.data
    pipeline.set_model_sizes(d, self.model_config)
    it = pipeline.make_iterator(d, process_index=process_index, process_count=process_count,
                                tokenizer=self.tokenizer)
    return SelectKeys(it, MODEL_BATCH_KEYS)

  def batch_signature(self, local_batch) -> float:
    ids = np.asarray(local_batch["token_ids"], np.int64)
    return float(np.sum(ids * np.arange(1, ids.size + 1).reshape(ids.shape)) % 1_000_003)

  def model_flops(self, local_batch) -> float:
    """6 x (LLM parameters without embeddings) x tokens + attention (PaLM's MFU count);
    the vision towers are left out, so MFU is slightly conservative."""
    llm = self.model_config.llm
    d, f, layers = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers
    kv = llm.num_key_value_heads * llm.dim_per_head
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f
    dense = layers * per_layer + d * llm.vocab_size  # + the LM head
    tokens = float(np.sum(local_batch["attention_mask"]))
    seq = local_batch["attention_mask"].shape[1]
    return 6.0 * dense * tokens + 12.0 * layers * d * seq * tokens

  def tokens_in(self, local_batch) -> float:
    return float(np.sum(local_batch["attention_mask"]))
