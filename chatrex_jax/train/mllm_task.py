"""The ChatRex MLLM as a `TrainTask` of the shared trainer (three stages, docs/architecture.md B.11)."""
from __future__ import annotations

import dataclasses
import fnmatch

import jax
import jax.numpy as jnp
import numpy as np

from chatrex_jax.configs import ConfigError
from chatrex_jax.models.chatrex import ChatRex, ChatRexConfig, example_batch
from chatrex_jax.protocol import tokens as C
from chatrex_jax.train.optimizer import STAGE_PATTERNS
from chatrex_jax.train.task import TrainTask, token_signature
from chatrex_jax.train.trainer import SelectKeys

# What the train step reads: the model inputs and the labels.
MODEL_BATCH_KEYS = (*C.MODEL_INPUT_KEYS, "labels")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(model_cfg, vocab_size: int | None = None) -> ChatRexConfig:
  """ChatRexConfig from the `model` section of a training config.

  An empty `model.llm` takes the whole architecture (LLM, towers, image sizes) from the
  `model.init_from` checkpoint, so fine-tuning a released or converted model needs no sizes
  in the config; the training switches (dtype, scan, remat, tower freezing) stay the config's.
  """
  dtype = DTYPES[model_cfg.get("compute_dtype", "float32")]
  remat = model_cfg.get("remat_policy", "none")
  loss_chunks = int(model_cfg.get("loss_chunks", 0) or 0)  # see LLMConfig.loss_chunks
  scan_unroll = int(model_cfg.get("scan_unroll", 1) or 1)   # see LLMConfig.scan_unroll
  attention_impl = model_cfg.get("attention_impl", "auto")   # see LLMConfig.attention_impl
  switches = dict(train_vision_tower=model_cfg.get("train_vision_tower", True),
                  train_vision_tower_aux=model_cfg.get("train_vision_tower_aux", False))
  if not model_cfg.get("llm"):
    if not model_cfg.get("init_from"):
      raise ConfigError("model.llm is empty and model.init_from is not set: give the LLM sizes, or "
                       "a checkpoint to take the architecture from")
    from chatrex_jax.convert import chatrex as chatrex_convert
    config = chatrex_convert.read_config(model_cfg.init_from)
    # The depthwise-conv lowering is a switch, not a size: `tools/aot` names XLA's grouped conv
    # for a TPU compile from a CPU host, where "auto" would pick the CPU's shifted sums.
    dwconv_impl = (model_cfg.get("convnext") or {}).get("dwconv_impl", config.convnext.dwconv_impl)
    return dataclasses.replace(
        config, llm=dataclasses.replace(config.llm, dtype=dtype, scan_layers=model_cfg.get("scan_layers", False),
                                        remat_policy=remat, loss_chunks=loss_chunks,
                                        scan_unroll=scan_unroll, attention_impl=attention_impl),
        clip=dataclasses.replace(config.clip, dtype=dtype, remat=remat != "none"),
        convnext=dataclasses.replace(config.convnext, dtype=dtype, dwconv_impl=dwconv_impl), **switches)
  llm_hf = dict(model_cfg.llm)
  if not llm_hf.get("vocab_size"):
    if vocab_size is None:
      raise ConfigError("model.llm.vocab_size is 0 (take it from the tokenizer) but no tokenizer "
                       "was given: set data.tokenizer_dir")
    llm_hf["vocab_size"] = vocab_size
  sizes = dict(llm=llm_hf, clip=dict(model_cfg.clip), convnext=dict(model_cfg.convnext),
               aux_image_size=model_cfg.aux_image_size, **switches)
  return ChatRexConfig.from_dict(sizes, dtype=dtype, scan_layers=model_cfg.get("scan_layers", False),
                                 remat_policy=remat,
                                 llm_hints={"loss_chunks": loss_chunks, "scan_unroll": scan_unroll,
                                            "attention_impl": attention_impl})


def next_token_metrics(total, hits, targets, valid, object_ids=None, dropped=None):
  """(summed NLL, label count, metrics) from `CausalLM.token_loss`'s terms.

  total [] summed NLL; hits [B, L] bool (valid and argmax-correct); targets [B, L] int;
  valid [B, L] bool; object_ids: the [first, last) ids of `<obj0>`..`<obj99>`, for
  `object_token_accuracy`, the accuracy of the grounding decision itself (which `<objK>` to
  emit); dropped: labelled tokens left out (`train.max_label_tokens`).
  """
  count = valid.sum().astype(jnp.float32)
  metrics = {"token_accuracy": jnp.sum(hits) / jnp.maximum(count, 1.0)}
  if dropped is not None:
    metrics["label_tokens_dropped"] = dropped.astype(jnp.float32)
  if object_ids is not None:
    is_obj = valid & (targets >= object_ids[0]) & (targets < object_ids[1])
    metrics["object_token_accuracy"] = jnp.sum(hits & is_obj) / jnp.maximum(jnp.sum(is_obj), 1)
  return total, count, metrics


class ChatRexTask(TrainTask):
  """Binds model, stage mask and data pipeline for `chatrex_jax.train.trainer.Trainer`."""

  def __init__(self, config):
    self.config = config
    self.tokenizer = None
    vocab = None
    if config.data.get("tokenizer_dir"):
      from chatrex_jax.protocol import tokenize
      self.tokenizer = tokenize.load_tokenizer(config.data.tokenizer_dir)
      vocab = len(self.tokenizer)
    self.model_config = model_config(config.model, vocab)
    if self.tokenizer is not None and len(self.tokenizer) > self.model_config.llm.vocab_size:
      raise ConfigError(f"tokenizer has {len(self.tokenizer)} tokens but the LLM vocabulary is "
                       f"{self.model_config.llm.vocab_size}: resize with models.vocab.resize_vocab")
    self.model = ChatRex(self.model_config)
    self.stage = config.stage
    # `<obj0>`..`<obj99>` ids (contiguous, added in order): for the object-choice accuracy.
    self.object_ids = None
    if self.tokenizer is not None and C.OBJECT_TOKENS[0] in self.tokenizer.get_vocab():
      first = self.tokenizer.convert_tokens_to_ids(C.OBJECT_TOKENS[0])
      self.object_ids = (first, first + C.MAX_NUM_OBJECTS)

  # -- parameters ------------------------------------------------------------------------------

  def _example(self):
    d = self.config.data
    return example_batch(self.model_config, batch_size=1, num_tokens=8, max_objects=min(d.max_objects, 4))

  def abstract_params(self):
    return jax.eval_shape(self.model.init, jax.random.key(0), self._example())["params"]

  def init_params(self, rng):
    return self.model.init(rng, self._example())["params"]

  def pretrained_params(self):
    """Parameters from `model.init_from` (official-layout folder), or None for random init.

    The checkpoint must hold the configured network: every LLM size, the family and the
    vocabulary are compared first, and a mismatch names each field (e.g. a Vicuna-based
    release under the Qwen2.5 config: pass the config argument `STAGE,vicuna`)."""
    path = self.config.model.get("init_from", "")
    if not path:
      return None
    from chatrex_jax.convert import chatrex as chatrex_convert
    found = chatrex_convert.read_config(path)
    fields = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "attention_bias", "tie_word_embeddings",
              "rope_theta", "rms_norm_eps")
    want = self.model_config.llm
    diff = [f"{f}: checkpoint {getattr(found.llm, f)!r}, config {getattr(want, f)!r}"
            for f in fields if getattr(found.llm, f) != getattr(want, f)]
    if diff:
      raise ConfigError(f"model.init_from={path} holds another LLM than model.llm: " + "; ".join(diff)
                       + ". Use the config of its base (chatrex_jax/configs/chatrex_7b.py:STAGE,vicuna for the "
                       "released ChatRex-7B) or leave model.llm empty to take the checkpoint's")
    config, params, _ = chatrex_convert.load(path)
    if self.model_config.llm.scan_layers:
      from chatrex_jax.convert import llm as llm_convert
      params["llm"] = llm_convert.stack_layers(params["llm"], config.llm.num_hidden_layers)
    return params

  def trainable_patterns(self):
    """The stage's parameters (`optimizer.STAGE_PATTERNS`), or `train.trainable_patterns`."""
    return tuple(self.config.train.get("trainable_patterns", None) or STAGE_PATTERNS[self.stage])

  def frozen_patterns(self):
    out = []
    if not self.model_config.train_vision_tower:
      out.append("vision_tower/*")
    if not self.model_config.train_vision_tower_aux:
      out.append("vision_tower_aux/*")
    return out

  # -- loss ------------------------------------------------------------------------------------

  def loss(self, params, batch, rng):
    """Summed next-token NLL over the answer tokens, their count, and token accuracy.

    The logits are never materialised (`ChatRex.token_loss`). With `train.max_label_tokens`
    = L > 0 only the (first L) labelled positions of each row go through the LM head: ChatRex
    labels answers only, so this skips most of it; labels beyond L are counted in the
    `label_tokens_dropped` metric (keep it at 0 by sizing L to the longest answer).
    """
    limit = int(self.config.train.get("max_label_tokens", 0) or 0)
    total, hits, targets, valid, dropped = self.model.apply({"params": params}, batch, limit,
                                                            method=ChatRex.token_loss)
    return next_token_metrics(total, hits, targets, valid, self.object_ids, dropped)

  def abstract_batch(self):
    """MODEL_BATCH_KEYS of a global batch: data.batch_size rows of data.seq_len tokens,
    data.max_objects boxes, images at the model's sizes (`example_batch`)."""
    d = self.config.data
    shapes = jax.eval_shape(lambda: example_batch(self.model_config, batch_size=int(d.batch_size),
                                                  num_tokens=int(d.seq_len),
                                                  max_objects=int(d.max_objects)))
    shapes["labels"] = jax.ShapeDtypeStruct(shapes["token_ids"].shape, jnp.int32)
    return {k: shapes[k] for k in MODEL_BATCH_KEYS}

  # -- data ------------------------------------------------------------------------------------

  def make_data(self, process_index: int, process_count: int):
    from chatrex_jax.data import pipeline
    d = self.config.data
    pipeline.set_model_sizes(d, self.model_config)
    it = pipeline.make_iterator(d, process_index=process_index, process_count=process_count,
                                tokenizer=self.tokenizer)
    return SelectKeys(it, MODEL_BATCH_KEYS)

  def batch_signature(self, local_batch) -> float:
    return token_signature(local_batch["token_ids"])

  def model_flops(self, local_batch) -> float:
    """PaLM's MFU count for the LLM: per token 2 x the matmul parameters forward, 2 x backward
    to the inputs and 2 x more for the weight gradients of layers that train (6N; 4N for a
    frozen LLM that stage 1 back-propagates through to the projectors), attention
    4 x layers x width x sequence per pass. The vision towers are left out (about 2% of a 7B
    step), so MFU is slightly conservative."""
    llm = self.model_config.llm
    d, f, layers = llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers
    kv = llm.num_key_value_heads * llm.dim_per_head
    layer_trains = any(self._trains(f"llm/decoder/{layer}/mlp/up_proj/kernel")   # scanned or not
                       for layer in ("layers/layer", "layers_0"))
    passes = 3.0 if layer_trains else 2.0
    head = 3.0 if self._trains("llm/lm_head/kernel") else 2.0
    tokens = float(np.sum(local_batch["attention_mask"]))
    seq = local_batch["attention_mask"].shape[1]
    layer_matmuls = 2 * d * d + 2 * d * kv + 3 * d * f
    return (2.0 * tokens * (passes * layers * layer_matmuls + head * d * llm.vocab_size)
            + passes * 4.0 * layers * d * seq * tokens)

  def _trains(self, path: str) -> bool:
    return (any(fnmatch.fnmatchcase(path, p) for p in self.trainable_patterns())
            and not any(fnmatch.fnmatchcase(path, p) for p in self.frozen_patterns()))

  def tokens_in(self, local_batch) -> float:
    return float(np.sum(local_batch["attention_mask"]))
