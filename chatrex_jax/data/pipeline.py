"""The ChatRex training input pipeline on Grain (docs/architecture.md B.7, B.8, B.11 and
"Engine records contract").

    cfg = default_data_config()                      # the `data` section of a train config
    cfg.sources = [{"path": "/data/rexverse", "weight": 3.0}, {"path": "/data/conv", "weight": 1.0}]
    cfg.tokenizer_dir = "/ckpt/chatrex-7b"
    it = make_iterator(cfg)                          # this process's shard, batches of fixed shape
    batch = next(it)                                 # dict of numpy arrays (see `BATCH_SPEC`)
    state = it.get_state(); ...; it.set_state(state) # exact resume (JSON-able dict)

Stages (all `grain.MapDataset`, i.e. random access: element i is a pure function of i, so the
data order survives any restart and does not depend on threads or workers):

1. per source: ``MapDataset.range(len).shuffle(seed_s).repeat(num_epochs)`` (a new permutation
   every epoch) -> references (source id, position); several sources are combined with
   ``MapDataset.mix(weights)`` (deterministic interleaving in the weights' proportions).
   Records are read in stage 2 rather than through ``MapDataset.source(records)``: the order,
   mixture and sharding then live on plain integers (cheap to inspect: `reference_dataset`),
   every example carries its (source, record index, epoch), and a bad record's error names them.
2. ``random_map(ExampleBuilder)``: read + decode the record, sample a task
   (`chatrex_jax.data.tasks`), the official image preprocessing
   (`inference.processor`: expand2square, bicubic to `aux_image_size`, bilinear to
   `clip_image_size`, boxes to the aux frame), chat template + placeholder-aware tokenisation
   with labels on assistant responses + end-of-turn only (`tokenize.build_training_example`), and
   the static merge plan (`merge.merge_plan`) padded to `seq_len`. The rng of element i is
   seeded from (seed, i) by Grain, so the example does not depend on the process count.
3. per-process shard: global stream positions ``process_index::process_count``
   (`jax.process_index()` / `jax.process_count()` by default); global batch k is the union of
   every process's batch k.
4. ``batch(batch_size // process_count, drop_remainder=True)`` -> fixed shapes, then
   ``to_iter_dataset`` (thread prefetch; optional multiprocessing workers). The iterator's state
   is Grain's (`{"next_index": n}` or the workers' states) plus a fingerprint of the
   order-relevant config, checked on restore.

A batch (per process, Bl = batch_size // process_count; sizes from the config):

  pixel_values     float32 [Bl, clip, clip, 3]   CLIP input (NHWC, CLIP-normalised)
  pixel_values_aux float32 [Bl, aux, aux, 3]     ConvNeXt input
  boxes            float32 [Bl, M, 4]            input boxes, xyxy in the aux frame, zero padded
  box_mask         bool    [Bl, M]
  token_ids, source, source_index, attention_mask, position_ids, labels   int32 [Bl, T]
                                                 (`merge.merge_plan`; labels -100 off-answer)
  num_boxes, task_id, source_id, record_index, epoch   int32 [Bl]  (bookkeeping; not model inputs)

Bad records raise `RecordError` naming the source, the record index, the record key and the field.

Throughput: ~0.15 s per example on one CPU core at the released sizes (768/336 px, M=100,
T=1536), dominated by the official bicubic resize + bit-exact normalisation in
`inference.processor`; scale with `num_threads` (PIL releases the GIL) or `num_workers`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from chatrex_jax import storage
from chatrex_jax.data import merge, schema, tasks
from chatrex_jax.data import records as records_lib
from chatrex_jax.errors import UserError
from chatrex_jax.protocol import image as image_protocol
from chatrex_jax.protocol import templates, tokenize
from chatrex_jax.protocol import tokens as C

MODEL_KEYS = C.MODEL_INPUT_KEYS
META_KEYS = ("num_boxes", "task_id", "source_id", "record_index", "epoch")
# Config fields that do not change which example comes at which position (excluded from the
# iterator-state fingerprint).
# num_workers is NOT among them: Grain's multiprocessing state has another layout.
_PERF_KEYS = ("num_threads", "prefetch_buffer_size", "tokenizer_dir")


class RecordError(UserError, ValueError):
  """A record the pipeline cannot use; the message names source, index, key and field."""


# ------------------------------------------------------------------------------------------
# Config


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` section of a ChatRex training config (released-model sizes).

  sources: [{"path": engine output dir, "weight": mixture weight, "name": optional label,
    "split": optional split (default `split`)}]. batch_size is GLOBAL (all processes).
  Use `set_model_sizes(cfg, chatrex_config)` to take image sizes / image tokens from a model.
  """
  cfg = ml_collections.ConfigDict()
  cfg.sources = [{"path": "", "weight": 1.0}]
  cfg.split = "train"
  cfg.batch_size = 8
  cfg.seq_len = 2048
  cfg.max_objects = C.MAX_NUM_OBJECTS
  cfg.num_image_tokens = image_protocol.NUM_IMAGE_TOKENS
  cfg.clip_image_size = image_protocol.CLIP_IMAGE_SIZE
  cfg.aux_image_size = image_protocol.AUX_IMAGE_SIZE
  cfg.tokenizer_dir = ""
  cfg.chat_template = ""          # "" -> detected from the tokenizer (qwen_chat / vicuna_v1)
  cfg.system_prompt = ml_collections.config_dict.placeholder(str)  # None: template default
  cfg.pad_token_id = C.DEFAULT_PAD_TOKEN_INDEX
  cfg.truncate = True             # cut merged sequences at seq_len (official behaviour)
  cfg.seed = 0
  cfg.num_epochs = ml_collections.config_dict.placeholder(int)  # None: repeat forever
  cfg.validate_records = True     # schema.validate every record (names every bad field)
  cfg.num_threads = 2             # Grain read threads per process
  cfg.prefetch_buffer_size = 4
  cfg.num_workers = 0             # > 0: Grain multiprocessing workers (mp_prefetch)

  cfg.tasks = ml_collections.ConfigDict()
  cfg.tasks.weights = {"grounding": 1.0, "region": 1.0, "grounded_caption": 0.5,
                       "conversation": 0.5}
  cfg.tasks.grounding_kinds = {"category": 1.0, "phrase": 1.0, "referring": 1.0}
  cfg.tasks.region_granularities = {"category": 1.0, "short_phrase": 1.0, "brief": 1.0,
                                    "one_sentence": 1.0}
  cfg.tasks.grounding_max_queries = 3  # categories / phrases per grounding question ("a; b; c")
  cfg.tasks.region_max_regions = 1     # regions per region-understanding question
  cfg.tasks.prompt_variants = "all"    # "all" paraphrases (training) or "first" (inference prompt)
  cfg.tasks.brief_caption_max_sentences = 1
  cfg.tasks.turns = 1                  # > 1: follow-up grounding / region turns on the same boxes

  cfg.proposals = ml_collections.ConfigDict()
  cfg.proposals.use_stored = True      # record `proposals` (UPN) when present
  cfg.proposals.synthesize = True      # else jittered / random negatives
  cfg.proposals.min_extra = 0          # negatives per sample ~ U{min_extra..max_extra}
  cfg.proposals.max_extra = 30
  cfg.proposals.dedup_iou = 0.7        # drop negatives with IoU >= this to any ground-truth box
  cfg.proposals.jitter_prob = 0.5
  cfg.proposals.jitter_scale = 0.3
  cfg.proposals.random_min_size = 0.05
  cfg.proposals.random_max_size = 0.5
  return cfg


def set_model_sizes(cfg: ml_collections.ConfigDict, model_config) -> ml_collections.ConfigDict:
  """Copies clip / aux image sizes and the image-token count of a `ChatRexConfig` into cfg."""
  cfg.clip_image_size = int(model_config.clip.image_size)
  cfg.aux_image_size = int(model_config.aux_image_size)
  cfg.num_image_tokens = int(model_config.num_image_tokens)
  return cfg


def _check_config(cfg) -> None:
  errs = []
  if not 1 <= cfg.max_objects <= C.MAX_NUM_OBJECTS:
    errs.append(f"max_objects={cfg.max_objects} outside [1, {C.MAX_NUM_OBJECTS}]")
  if cfg.seq_len < cfg.num_image_tokens + 2:
    errs.append(f"seq_len={cfg.seq_len} cannot hold the {cfg.num_image_tokens} image tokens")
  if cfg.batch_size < 1:
    errs.append(f"batch_size={cfg.batch_size} < 1")
  for k, v in dict(cfg.tasks.weights).items():
    if k not in tasks.TASK_NAMES or float(v) < 0:
      errs.append(f"tasks.weights[{k!r}]={v}: task must be one of {tasks.TASK_NAMES}, weight >= 0")
  if not any(float(v) > 0 for v in dict(cfg.tasks.weights).values()):
    errs.append("tasks.weights: every weight is 0")
  if errs:
    raise ValueError("data config: " + "; ".join(errs))


# ------------------------------------------------------------------------------------------
# Sources


class RecordSource:
  """Random-access engine records of one directory (Grain `RandomAccessDataSource` protocol).

  Reads the serialized records with Grain's `ArrayRecordDataSource` and decodes them here, so a
  record that does not decode is reported with its shard position and (when readable) its key.
  Elements are record dicts (`schema.decode`).
  """

  def __init__(self, directory: str, split: str = "train", name: str | None = None):
    self.directory = directory
    self.split = split
    self.name = name or os.path.basename(os.path.normpath(directory))
    # ArrayRecord's reader opens local files only: a gs:// dataset is read from a local mirror.
    self._paths = records_lib.shard_paths(storage.cached_copy(directory), split)
    from grain.python import ArrayRecordDataSource
    self._source = ArrayRecordDataSource(self._paths) if self._paths else None

  def __len__(self) -> int:
    return 0 if self._source is None else len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._source is None:
      raise IndexError(index)
    buf = self._source[index]
    try:
      return schema.decode(buf)
    except Exception as e:  # name the record as well as we can
      key = "<unreadable key>"
      try:
        key = schema.decode_example(buf).get("key", [b"?"])[0].decode("utf-8", "replace")
      except Exception:
        pass
      raise RecordError(f"source {self.name!r} index {index} (record {key}): cannot decode: "
                        f"{e}") from e

  def __repr__(self) -> str:
    return f"RecordSource({self.directory!r}, {len(self)} records)"


def open_sources(cfg) -> list[tuple[str, Sequence[Mapping[str, Any]], float]]:
  """[(name, source, weight)] for `cfg.sources`."""
  out = []
  for i, s in enumerate(cfg.sources):
    s = dict(s)
    if not s.get("path"):
      raise ValueError(f"data.sources[{i}]: no path (an engine output directory)")
    weight = float(s.get("weight", 1.0))
    src = RecordSource(s["path"], s.get("split", cfg.split), s.get("name"))
    out.append((src.name, src, weight))
  return out


# ------------------------------------------------------------------------------------------
# Per-example transform


@dataclasses.dataclass(frozen=True)
class _Ref:
  """One element of the global reference stream: record `index` of source `source_id`, drawn in
  that source's `epoch`-th pass."""
  source_id: int
  index: int
  epoch: int


class _MakeRef:
  """map_with_index fn: (position in the source's repeated stream, record index) -> _Ref."""

  def __init__(self, source_id: int, length: int):
    self.source_id, self.length = source_id, length

  def __call__(self, position: int, index) -> _Ref:
    return _Ref(self.source_id, int(index), int(position) // self.length)


def _tokenizer_and_template(tokenizer_dir: str, template_name: str):
  if not tokenizer_dir:
    raise ValueError("data.tokenizer_dir is empty: point it at a checkpoint / tokenizer directory")
  tok = tokenize.load_tokenizer(tokenizer_dir)
  missing = [t for t in C.SPECIAL_TOKENS if t not in tok.get_vocab()]
  if missing:
    raise ValueError(f"tokenizer {tokenizer_dir} lacks {len(missing)} ChatRex tokens (first "
                     f"{missing[0]!r}); add them (docs/architecture.md B.7) before training")
  template = (templates.get_template(template_name) if template_name
              else templates.detect_template(tok))
  return tok, template


def fit_turns(turns, tokenizer, template, *, system=None, seq_len: int,
              num_image_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(input_ids, labels, turns kept) of the conversation without the trailing turns whose
  merged sequence would pass `seq_len` (follow-ups are dropped whole, never cut mid-answer);
  the first turn is always kept (a longer one is cut at seq_len by the merge plan, `truncate`)."""
  turns = list(turns)
  while True:
    ids, labels = tokenize.build_training_example(turns, tokenizer, template, system=system)
    if len(turns) == 1 or merge.merged_length(ids, num_image_tokens) <= seq_len:
      return ids, labels, len(turns)
    turns.pop()


class ExampleBuilder:
  """(reference, rng) -> one fixed-shape training example (numpy dict, see module doc).

  Picklable (the tokenizer is loaded lazily in each worker); `build(record, rng)` is the
  source-free part, useful on its own.
  """

  def __init__(self, cfg, sources: Sequence[tuple[str, Sequence[Mapping[str, Any]], float]],
               tokenizer=None, template=None):
    self.cfg = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    self.sources = [(name, src) for name, src, _ in sources]
    self._tokenizer = tokenizer
    self._template = template

  def __getstate__(self):
    state = dict(self.__dict__)
    if state["cfg"].tokenizer_dir:  # reload in the worker rather than pickling the tokenizer
      state["_tokenizer"] = state["_template"] = None
    return state

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      self._tokenizer, self._template = _tokenizer_and_template(self.cfg.tokenizer_dir,
                                                                self.cfg.chat_template)
    return self._tokenizer

  @property
  def template(self):
    if self._template is None:
      tok = self.tokenizer
      self._template = (templates.get_template(self.cfg.chat_template) if self.cfg.chat_template
                        else templates.detect_template(tok))
    return self._template

  def __call__(self, ref: _Ref, rng: np.random.Generator) -> dict[str, np.ndarray]:
    name, src = self.sources[ref.source_id]
    index, epoch = ref.index, ref.epoch
    where = f"source {name!r} (#{ref.source_id}) index {index}"
    try:
      record = src[index]
    except RecordError:
      raise
    except Exception as e:
      raise RecordError(f"{where}: cannot read the record: {e}") from e
    out = self.build(record, rng, where=where)
    out.update(source_id=np.int32(ref.source_id), record_index=np.int32(index),
               epoch=np.int32(epoch))
    return out

  def build(self, record: Mapping[str, Any], rng: np.random.Generator, where: str = "",
            return_sample: bool = False):
    """Record dict -> example dict (and the `tasks.TaskSample` when return_sample)."""
    cfg = self.cfg
    tokenizer, template = self.tokenizer, self.template  # config errors are not record errors
    key = record.get("key", "<no key>") if isinstance(record, Mapping) else "<not a dict>"
    prefix = f"{where + ': ' if where else ''}record {key}"
    stage = "validation"
    try:
      if cfg.validate_records:
        schema.validate(record)
      stage = "task sampling"
      sample = tasks.sample_task(record, rng, cfg.tasks, max_objects=cfg.max_objects,
                                 proposals=cfg.proposals)
      stage = "image"
      image = self._load_image(record)
      processed = image_protocol.preprocess_image(
          image, sample.boxes, aux_size=self.cfg.aux_image_size,
          clip_size=self.cfg.clip_image_size, max_objects=self.cfg.max_objects,
          box_overflow="raise")
      stage = "tokenisation"
      ids, labels, kept = fit_turns(sample.turns, tokenizer, template, system=cfg.system_prompt,
                                    seq_len=cfg.seq_len, num_image_tokens=cfg.num_image_tokens)
      sample = tasks.keep_turns(sample, kept)
      stage = "merge plan"
      n_boxes = processed.boxes.shape[0]
      plan = merge.merge_plan([ids], labels=[labels], seq_len=cfg.seq_len,
                                 num_objects=[n_boxes], max_objects=cfg.max_objects,
                                 num_image_tokens=cfg.num_image_tokens,
                                 pad_token_id=cfg.pad_token_id, truncate=cfg.truncate)
    except schema.SchemaError as e:
      raise RecordError(f"{where + ': ' if where else ''}{e}") from e
    except tasks.FieldError as e:
      raise RecordError(f"{prefix}: {e}") from e
    except Exception as e:  # anything else: still name the record and the stage
      field = {"image": "field image", "merge plan": "field seq_len",
               "tokenisation": "tokenizer"}.get(stage, stage)
      raise RecordError(f"{prefix}: {field} ({stage}): {e}") from e
    m = cfg.max_objects
    boxes = np.zeros((m, 4), np.float32)
    boxes[:n_boxes] = processed.boxes
    box_mask = np.zeros((m,), bool)
    box_mask[:n_boxes] = True
    out = {
        "pixel_values": processed.pixel_values.astype(np.float32),
        "pixel_values_aux": processed.pixel_values_aux.astype(np.float32),
        "boxes": boxes, "box_mask": box_mask,
        **{k: plan[k][0] for k in ("token_ids", "source", "source_index", "attention_mask",
                                   "position_ids", "labels")},
        "num_boxes": np.int32(n_boxes), "task_id": np.int32(sample.task_id),
        "source_id": np.int32(0), "record_index": np.int32(0), "epoch": np.int32(0),
    }
    return (out, sample) if return_sample else out

  def _load_image(self, record):
    from PIL import Image
    data = record.get("image")
    if not isinstance(data, (bytes, bytearray)) or not data:
      raise tasks.FieldError("image", "expected non-empty encoded image bytes")
    try:
      with Image.open(io.BytesIO(data)) as f:
        f.load()
        img = f.copy()
    except Exception as e:
      raise tasks.FieldError("image", f"not a decodable image ({e})") from e
    if (img.width, img.height) != (record.get("width"), record.get("height")):
      raise tasks.FieldError("width/height", f"record says {record.get('width')}x"
                             f"{record.get('height')}, the image is {img.width}x{img.height}")
    return img


# ------------------------------------------------------------------------------------------
# Datasets and iterators


def _seeds(seed: int, n: int) -> list[int]:
  return [int(s) for s in np.random.SeedSequence(seed).generate_state(n, np.uint32)]


def _process_info(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} outside [0, {process_count})")
  return int(process_index), int(process_count)


def reference_dataset(cfg, lengths: Sequence[int], weights: Sequence[float]):
  """The global stream of (source id, position) references: per-source per-epoch shuffles,
  mixed by weight. grain.MapDataset of `_Ref` (infinite unless cfg.num_epochs)."""
  if not lengths:
    raise ValueError("data.sources is empty")
  seeds = _seeds(cfg.seed, len(lengths) + 1)
  parts = []
  for i, n in enumerate(lengths):
    if n == 0:
      raise ValueError(f"data source #{i} has no records")
    ds = grain.MapDataset.range(n).shuffle(seed=seeds[i]).repeat(cfg.num_epochs)
    parts.append(ds.map_with_index(_MakeRef(i, n)))
  if len(parts) == 1:
    return parts[0]
  w = [float(x) for x in weights]
  if any(x < 0 for x in w) or sum(w) <= 0:
    raise ValueError(f"data.sources weights must be >= 0 with a positive sum, got {w}")
  keep = [i for i, x in enumerate(w) if x > 0]
  return grain.MapDataset.mix([parts[i] for i in keep], [w[i] for i in keep])


def process_share(examples, batch_size: int, pi: int, pc: int, batched: bool = True):
  """This process's share of a grain MapDataset (every pc-th element from pi), batched to its
  part of the global batch_size (dropping the remainder) unless batched=False."""
  local = examples[pi::pc]
  if not batched:
    return local
  if batch_size % pc:
    raise ValueError(f"data.batch_size={batch_size} (global) is not divisible by "
                     f"process_count={pc}")
  return local.batch(batch_size // pc, drop_remainder=True)


def build_dataset(cfg, *, sources=None, process_index: int | None = None,
                  process_count: int | None = None, tokenizer=None, template=None,
                  batched: bool = True):
  """This process's grain.MapDataset of batches (or of examples with batched=False).

  sources: optional [(name, random-access source of record dicts, weight)] instead of
    `cfg.sources` (e.g. in-memory lists, `records.EngineRecords`).
  tokenizer / template: optional preloaded tokenizer (else `cfg.tokenizer_dir`).
  """
  _check_config(cfg)
  pi, pc = _process_info(process_index, process_count)
  sources = open_sources(cfg) if sources is None else list(sources)
  refs = reference_dataset(cfg, [len(s) for _, s, _ in sources], [w for _, _, w in sources])
  builder = ExampleBuilder(cfg, sources, tokenizer=tokenizer, template=template)
  examples = refs.random_map(builder, seed=_seeds(cfg.seed, len(sources) + 1)[-1])
  return process_share(examples, cfg.batch_size, pi, pc, batched)


def fingerprint(cfg, lengths: Sequence[int], process_index: int, process_count: int) -> str:
  """Hash of everything that decides which example comes at which iterator position."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  for k in _PERF_KEYS:
    d.pop(k, None)
  d["sources"] = [{k: v for k, v in dict(s).items() if k != "path"} for s in d.get("sources", [])]
  d.update(lengths=list(lengths), process_index=process_index, process_count=process_count)
  return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DataIterator(grain.DatasetIterator):
  """Batches of this process's shard; `get_state()` / `set_state()` restore the exact position.

  The state is a JSON-able dict {"grain": Grain iterator state, "fingerprint": str}; restoring
  a state from a pipeline with another order-relevant config (seed, sources, weights, batch size,
  process count/index, task settings, ...) raises ValueError. Works with Grain's Orbax
  `grain.checkpoint.CheckpointHandler` (it is a `grain.DatasetIterator`).
  """

  def __init__(self, inner, fingerprint_: str):
    super().__init__(inner)
    self._inner = inner
    self._fingerprint = fingerprint_

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._inner)

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._inner.get_state(), "fingerprint": self._fingerprint}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if "grain" not in state:
      raise ValueError(f"not a DataIterator state (keys {sorted(state)})")
    fp = state.get("fingerprint")
    if fp is not None and fp != self._fingerprint:
      raise ValueError(f"data iterator state was saved by a pipeline with another config "
                       f"(fingerprint {fp} != {self._fingerprint}; seed, sources, weights, "
                       "batch size, process count, num_workers or task settings differ)")
    self._inner.set_state(state["grain"])

  def start_prefetch(self) -> None:
    fn = getattr(self._inner, "start_prefetch", None)
    if fn is not None:
      fn()

  def close(self) -> None:
    fn = getattr(self._inner, "close", None)
    if fn is not None:
      fn()


def make_iterator(cfg, *, sources=None, process_index: int | None = None,
                  process_count: int | None = None, tokenizer=None,
                  template=None) -> DataIterator:
  """The checkpointable batch iterator of this process (see `build_dataset`)."""
  pi, pc = _process_info(process_index, process_count)
  srcs = open_sources(cfg) if sources is None else list(sources)
  ds = build_dataset(cfg, sources=srcs, process_index=pi, process_count=pc, tokenizer=tokenizer,
                     template=template)
  return to_iterator(ds, cfg, fingerprint(cfg, [len(s) for _, s, _ in srcs], pi, pc))


def to_iterator(ds, cfg, fingerprint_: str) -> DataIterator:
  """A batched MapDataset -> the checkpointable iterator (threads, optional worker processes)."""
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                               prefetch_buffer_size=cfg.prefetch_buffer_size))
  if cfg.num_workers > 0:
    # Grain 0.2.18 reads an absl flag in mp_prefetch and fails in scripts that never parse
    # flags (google/grain#1355, fixed after 0.2.18); default values are what we want.
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return DataIterator(iter(it_ds), fingerprint_)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The keys `ChatRex.__call__` reads (drops labels and bookkeeping)."""
  return {k: batch[k] for k in MODEL_KEYS}
