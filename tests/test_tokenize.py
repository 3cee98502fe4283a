"""Chat templates, placeholder tokenisation, training labels and the embedding-merge plan.

Tokenizers are real byte-level BPEs trained offline by `chatrex_jax.data.tiny_tokenizer` and
loaded back with `AutoTokenizer.from_pretrained(dir)`; no hub access.
The merge plan is checked against (a) the official merge computed by RexSeek's
`prepare_inputs_labels_for_multimodal` (golden `chatrex_forward`: merged labels, attention mask,
token types and the merged input embeddings) and (b) a loop-based reference of docs/architecture.md B.8 on
random sequences (hypothesis).
"""
from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chatrex_jax.data import merge, tiny_tokenizer
from chatrex_jax.inference import processor as P
from chatrex_jax.models import merge as model_merge
from chatrex_jax.protocol import image as I
from chatrex_jax.protocol import prompts
from chatrex_jax.protocol import templates as T
from chatrex_jax.protocol import tokenize as K
from chatrex_jax.protocol import tokens as C


@pytest.fixture(scope="module")
def qwen_tok(tmp_path_factory):
  return tiny_tokenizer.build_tiny_tokenizer(tmp_path_factory.mktemp("qwen"), family="qwen")


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
  return tiny_tokenizer.build_tiny_tokenizer(tmp_path_factory.mktemp("llama"), family="llama")


def official_tokenize(prompt, tokenizer):
  """RexSeek tokenizer_image_object_token, verbatim logic."""
  import re
  pattern = "|".join(map(re.escape, ["<image>", "<objfeat>"]))
  chunks = [s for s in re.split(f"({pattern})", prompt) if s]
  out = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
  for chunk in chunks:
    if chunk == "<image>":
      out.append(-200)
    elif chunk == "<objfeat>":
      out.append(-300)
    else:
      out.extend(tokenizer.encode(chunk, add_special_tokens=False))
  return out


# ------------------------------------------------------------------------------------------
# the tiny tokenizer


def test_tiny_tokenizer_is_real_and_deterministic(qwen_tok, tmp_path):
  assert qwen_tok.bos_token_id is None and qwen_tok.eos_token == "<|im_end|>"
  assert qwen_tok.pad_token == "<|endoftext|>"
  for t in C.SPECIAL_TOKENS + (C.QWEN_IM_START, C.QWEN_IM_END):
    ids = qwen_tok.encode(t, add_special_tokens=False)
    assert len(ids) == 1 and qwen_tok.convert_ids_to_tokens(ids[0]) == t
  obj0 = qwen_tok.convert_tokens_to_ids("<obj0>")
  assert [qwen_tok.convert_tokens_to_ids(t) for t in C.SPECIAL_TOKENS] == list(
      range(obj0, obj0 + 104))  # appended in the official order
  text = "Ünïcode ✓ 日本 <obj12> and\n\ttabs"
  assert qwen_tok.decode(qwen_tok.encode(text, add_special_tokens=False)) == text
  again = tiny_tokenizer.build_tiny_tokenizer(tmp_path, family="qwen")
  assert again.get_vocab() == qwen_tok.get_vocab()


# ------------------------------------------------------------------------------------------
# placeholder tokenisation


def test_tokenisation_matches_official_on_fixture_prompts(golden_dir, qwen_tok, llama_tok):
  meta = json.loads((golden_dir / "processor_rexseek" / "meta.json").read_text())
  for name, prompt in meta["prompts"].items():
    n_obj = meta["cases"][name]["num_boxes"]
    for tok in (qwen_tok, llama_tok):
      ids = K.tokenize_with_placeholders(prompt, tok)
      assert ids == official_tokenize(prompt, tok)
      assert ids.count(C.IMAGE_TOKEN_INDEX) == 1 and ids.count(C.OBJECT_TOKEN_INDEX) == n_obj
    assert K.tokenize_with_placeholders(prompt, llama_tok)[0] == llama_tok.bos_token_id
    assert K.tokenize_with_placeholders(prompt, qwen_tok)[0] != qwen_tok.bos_token_id


def test_chunks_are_encoded_separately(qwen_tok):
  enc = lambda s: qwen_tok.encode(s, add_special_tokens=False)  # noqa: E731
  ids = K.tokenize_with_placeholders("ab<objfeat>cd<image>ef", qwen_tok)
  assert ids == enc("ab") + [-300] + enc("cd") + [-200] + enc("ef")
  assert K.split_special_strings("<image><image>x") == ["<image>", "<image>", "x"]
  with pytest.raises(ValueError, match="no BOS"):
    K.tokenize_with_placeholders("x", qwen_tok, add_bos=True)


# ------------------------------------------------------------------------------------------
# templates


def test_templates(qwen_tok, llama_tok):
  user = prompts.build_user_text("Q?", 1)
  assert T.apply_template(T.QWEN_CHAT, user) == (
      "<|im_start|>user\n<image>\n<obj0><objfeat>\nQ?<|im_end|>\n<|im_start|>assistant\n")
  assert T.apply_template(T.QWEN_CHAT, "x", system="S") == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")
  assert T.apply_template(T.VICUNA_V1, "x") == T.VICUNA_SYSTEM + " USER: x ASSISTANT:"
  assert T.detect_template(qwen_tok) is T.QWEN_CHAT
  assert T.detect_template(llama_tok) is T.VICUNA_V1
  assert T.detect_template(config={"model_type": "qwen2"}) is T.QWEN_CHAT
  assert T.detect_template(config={"architectures": ["LlavaLlamaForCausalLM"]}) is T.VICUNA_V1
  # the tokenizer decides, not the network's model_type (SmolLM2 is a LLaMA chatting in ChatML)
  assert T.detect_template(qwen_tok, config={"model_type": "llama"}) is T.QWEN_CHAT
  with pytest.raises(ValueError, match="cannot tell"):
    T.detect_template(config={"model_type": "gpt2"})
  with pytest.raises(ValueError, match="unknown chat template"):
    T.get_template("chatml2")
  ids = K.build_inference_ids(user, qwen_tok)
  assert ids.dtype == np.int64 and ids.tolist() == official_tokenize(
      T.apply_template(T.QWEN_CHAT, user), qwen_tok)


def _labelled_text(tok, ids, labels):
  keep = labels != C.IGNORE_INDEX
  assert (ids[keep] == labels[keep]).all()
  runs, cur = [], []
  for i, k in zip(ids, keep):
    if k:
      cur.append(int(i))
    elif cur:
      runs.append(tok.decode(cur)); cur = []
  if cur:
    runs.append(tok.decode(cur))
  return runs


def test_training_labels_qwen(qwen_tok):
  turns = [(prompts.build_user_text("What is <obj1>?", 2), "<ground>a cat</ground><objects><obj1></objects>"),
           ("And the other?", "a dog")]
  ids, labels = K.build_training_example(turns, qwen_tok)
  assert ids.shape == labels.shape and ids.dtype == np.int64
  assert (labels[ids < 0] == C.IGNORE_INDEX).all()
  assert (ids == -200).sum() == 1 and (ids == -300).sum() == 2
  assert _labelled_text(qwen_tok, ids, labels) == [turns[0][1] + "<|im_end|>", "a dog<|im_end|>"]
  full = "".join(t for t, _ in T.conversation_chunks(T.QWEN_CHAT, turns))
  assert ids.tolist() == official_tokenize(full, qwen_tok)  # same ids as the joined string
  assert full.endswith("<|im_start|>assistant\na dog<|im_end|>\n")  # XTuner: SEP after each turn


def test_training_labels_vicuna(llama_tok):
  ids, labels = K.build_training_example([("<image>\nhi", "yes"), ("more", "no")], llama_tok)
  assert ids[0] == llama_tok.bos_token_id and labels[0] == C.IGNORE_INDEX
  eos = llama_tok.eos_token_id
  assert (ids == eos).sum() == 2 and (labels == eos).sum() == 2
  assert _labelled_text(llama_tok, ids, labels) == [" yes</s>", " no</s>"]


# ------------------------------------------------------------------------------------------
# merge plan vs the official merge (golden chatrex_forward)


def test_merge_plan_matches_official_merge(golden_dir):
  from chatrex_jax.convert import safetensors_io
  d = golden_dir / "chatrex_forward"
  with np.load(d / "inputs.npz") as z:
    inp = {k: z[k] for k in z.files}
  with np.load(d / "outputs.npz") as z:
    out = {k: z[k] for k in z.files}
  n = inp["num_gt_boxes_per_image"]
  kmax = inp["gt_boxes"].shape[1]
  ni = out["image_features"].shape[1]
  plan = merge.merge_plan(inp["input_ids"], labels=inp["labels"], attention_mask=inp["attention_mask"],
                      num_objects=n, max_objects=kmax, num_image_tokens=ni)
  np.testing.assert_array_equal(plan["labels"], out["merged_labels"])
  np.testing.assert_array_equal(plan["attention_mask"], out["merged_attention_mask"])
  np.testing.assert_array_equal(plan["source"], out["merged_token_types"])
  embed = safetensors_io.load_file(d / "weights.safetensors")["model.embed_tokens.weight"]
  obj = np.zeros((2, kmax, out["object_features"].shape[1]), np.float32)
  obj[0, :n[0]] = out["object_features"][:n[0]]
  obj[1, :n[1]] = out["object_features"][n[0]:n[0] + n[1]]
  merged = jax.jit(model_merge.merge_embeddings)(jnp.asarray(embed)[plan["token_ids"]],
                                       out["image_features"], obj, plan["source"],
                                       plan["source_index"])
  np.testing.assert_array_equal(np.asarray(merged), out["merged_inputs_embeds"])


# ------------------------------------------------------------------------------------------
# merge plan vs a loop reference of docs/architecture.md B.8


def reference_merge(ids_list, labels_list, n_img_tok, img_feats, obj_feats, embed):
  """docs/architecture.md B.8 with Python loops: returns (embeds list, labels list) per sample, unpadded."""
  embs, labs = [], []
  for b, (ids, lab) in enumerate(zip(ids_list, labels_list)):
    e, l, j = [], [], 0
    for t, y in zip(ids, lab):
      if t == -200:
        e.extend(img_feats[b]); l.extend([-100] * n_img_tok)
      elif t == -300:
        e.append(obj_feats[b][j]); l.append(-100); j += 1
      else:
        e.append(embed[t]); l.append(y)
    embs.append(np.array(e).reshape(-1, embed.shape[1])); labs.append(np.array(l))
  return embs, labs


@st.composite
def batches(draw):
  b = draw(st.integers(1, 3))
  samples = []
  for _ in range(b):
    n_obj = draw(st.integers(0, 4))
    text = draw(st.lists(st.integers(0, 19), min_size=0, max_size=6))
    body = [-300] * n_obj + text
    body = draw(st.permutations(body))
    has_img = draw(st.booleans())
    pos = draw(st.integers(0, len(body)))
    ids = body[:pos] + ([-200] if has_img else []) + body[pos:]
    if not ids:
      ids = [draw(st.integers(0, 19))]
    labels = [draw(st.sampled_from([-100, t])) if t >= 0 else -100 for t in ids]
    samples.append((ids, labels, n_obj))
  return samples


_jit_merge = jax.jit(model_merge.merge_embeddings)


@settings(max_examples=40, deadline=None)
@given(batches())
def test_merge_plan_matches_loop_reference(samples):
  ni, m, d = 3, 4, 5
  rng = np.random.default_rng(len(samples))
  embed = rng.normal(size=(20, d)).astype(np.float32)
  b = len(samples)
  img = rng.normal(size=(b, ni, d)).astype(np.float32)
  obj = rng.normal(size=(b, m, d)).astype(np.float32)
  ids_list = [s[0] for s in samples]
  lab_list = [s[1] for s in samples]
  kw = dict(labels=lab_list, num_objects=[s[2] for s in samples], max_objects=m,
            num_image_tokens=ni)
  want_e, want_l = reference_merge(ids_list, lab_list, ni, img, obj, embed)
  assert merge.merge_plan(ids_list, **kw)["source"].shape == (b, max(len(x) for x in want_l))
  t = 16  # static length (>= the longest possible sample): one compile per batch size
  plan = merge.merge_plan(ids_list, seq_len=t, **kw)
  got = np.asarray(_jit_merge(embed[plan["token_ids"]], img, obj, plan["source"],
                              plan["source_index"]))
  for i in range(b):
    n = len(want_l[i])
    assert plan["lengths"][i] == n
    np.testing.assert_array_equal(got[i, :n], want_e[i])
    assert not got[i, n:].any()
    np.testing.assert_array_equal(plan["labels"][i, :n], want_l[i])
    assert (plan["labels"][i, n:] == -100).all()
    assert plan["attention_mask"][i].tolist() == [1] * n + [0] * (t - n)
    assert plan["position_ids"][i, :n].tolist() == list(range(n))
    # scatter form agrees with the gather form
    for k, p in enumerate(plan["image_positions"][i]):
      if p >= 0:
        assert plan["source"][i, p] == C.SOURCE_IMAGE and plan["source_index"][i, p] == k
    n_obj = ids_list[i].count(-300)
    assert (plan["object_positions"][i, :n_obj] >= 0).all()
    assert (plan["object_positions"][i, n_obj:] == -1).all()
    for j in range(n_obj):
      p = plan["object_positions"][i, j]
      assert plan["source"][i, p] == C.SOURCE_OBJECT and plan["source_index"][i, p] == j


def test_merge_plan_static_shapes_and_errors():
  ids = [[5, -200, 6, -300, 7]]
  plan = merge.merge_plan(ids, seq_len=20, num_objects=[1], max_objects=3, num_image_tokens=4)
  assert all(v.shape[0] == 1 for v in plan.values()) and plan["source"].shape == (1, 20)
  assert plan["lengths"].tolist() == [8] and merge.merged_length(ids[0], 4) == 8
  cut = merge.merge_plan(ids, seq_len=3, num_objects=[1], max_objects=3, num_image_tokens=4,
                     truncate=True)
  assert cut["lengths"].tolist() == [3] and cut["image_positions"][0].tolist() == [1, 2, -1, -1]
  assert cut["object_positions"][0].tolist() == [-1, -1, -1]
  with pytest.raises(ValueError, match="merged length 8 > seq_len 3"):
    merge.merge_plan(ids, seq_len=3, num_objects=[1], num_image_tokens=4)
  with pytest.raises(ValueError, match="only 0 objects"):
    merge.merge_plan(ids, num_objects=[0], num_image_tokens=4)
  with pytest.raises(ValueError, match="one is supported"):
    merge.merge_plan([[-200, -200]], num_image_tokens=4)
  with pytest.raises(ValueError, match="not placeholders"):
    merge.merge_plan([[-5]], num_image_tokens=4)


def test_merge_embeddings_jits_once():
  traces = []

  @jax.jit
  def f(tok, img, obj, src, idx):
    traces.append(1)
    return model_merge.merge_embeddings(tok, img, obj, src, idx)

  for ids in ([[1, -200, 2, -300]], [[-300, -300, 3, -200]]):
    p = merge.merge_plan(ids, seq_len=8, max_objects=2, num_image_tokens=2)
    f(jnp.ones((1, 8, 3)), jnp.ones((1, 2, 3)), jnp.ones((1, 2, 3)), p["source"], p["source_index"])
  assert len(traces) == 1


# ------------------------------------------------------------------------------------------
# processor end to end (image + boxes + question -> fixed-shape batch)


def test_processor_batch(qwen_tok):
  proc = P.ChatRexProcessor(tokenizer=qwen_tok)
  assert proc.template is T.QWEN_CHAT
  img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
  a = proc.process(img, prompts.question("detect", "cat"), [[0, 0, 5, 5], [2, 2, 9, 9]])
  b = proc.process(img[:, :10], prompts.question("region_caption", 0, granularity="brief"),
                   [[1, 1, 3, 3]])
  assert a.input_ids.tolist() == official_tokenize(a.prompt, qwen_tok)
  batch = proc.batch([a, b], seq_len=700, max_objects=4)
  assert batch["token_ids"].shape == (2, 700) and batch["boxes"].shape == (2, 4, 4)
  for i, s in enumerate((a, b)):
    n = len(s.input_ids) - 1 + I.NUM_IMAGE_TOKENS
    assert batch["lengths"][i] == n
    p = batch["image_positions"][i]
    assert (np.diff(p) == 1).all()  # 576 contiguous image tokens
    k = s.image.boxes.shape[0]
    assert (batch["object_positions"][i, :k] > p[-1]).all()
    assert (batch["object_positions"][i, k:] == -1).all()
    assert batch["box_mask"][i].sum() == k


def test_processor_from_checkpoint_dir(tmp_path):
  ckpt = tmp_path / "ckpt"
  tiny_tokenizer.build_tiny_tokenizer(ckpt, family="llama")
  (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
  proc = P.ChatRexProcessor.from_checkpoint(ckpt, max_objects=7)
  assert proc.template is T.VICUNA_V1 and proc.max_objects == 7
  img = np.zeros((6, 4, 3), np.uint8)
  s = proc.process_task(img, "region_caption", [[0, 0, 2, 2], [1, 1, 3, 3]], objects=[1],
                        granularity="category")
  assert s.prompt.startswith(T.VICUNA_SYSTEM + " USER: <image>\n<obj0><objfeat><obj1><objfeat>\n"
                             "What is the category name of <obj1>?")
  assert s.input_ids[0] == proc.tokenizer.bos_token_id
  r = proc.parse("<ground>cup</ground><objects><obj1></objects>", s)
  np.testing.assert_array_equal(r.phrases[0].boxes, [[1, 1, 3, 3]])
  plain = tmp_path / "plain"
  tiny_tokenizer.build_tiny_tokenizer(plain, family="qwen", add_chatrex_tokens=False)
  with pytest.raises(ValueError, match="lacks 104 ChatRex tokens"):
    P.ChatRexProcessor.from_checkpoint(plain)
