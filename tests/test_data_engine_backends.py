"""Backend post-processing helpers against their references (data_engine/backends/hf.py)."""
import numpy as np

from data_engine.backends import hf


def test_crop_adds_context_and_clips():
  img = np.arange(50 * 40 * 3, dtype=np.uint8).reshape(50, 40, 3)
  c = hf.crop(img, [10, 10, 20, 30], context=0.5)
  np.testing.assert_array_equal(c, img[0:40, 5:25])  # y: 10-10..30+10, x: 10-5..20+5
  edge = hf.crop(img, [0, 0, 40, 50], context=0.2)
  np.testing.assert_array_equal(edge, img)  # clipped to the image
  tiny = hf.crop(img, [5.2, 5.2, 5.4, 5.4], context=0.0)
  assert tiny.shape[0] >= 1 and tiny.shape[1] >= 1


def test_hf_verifier_left_padded_batches_score_like_single_prompts(tmp_path):
  """HFVerifier on a real (tiny, random) LLaMA and byte-level BPE written to a folder: a padded
  batch of prompts of different lengths gives each prompt the yes/no probability and rewrite it
  gets alone, and the probability is sigmoid(logsumexp yes - logsumexp no) of the next token."""
  import torch
  import transformers

  from chatrex_jax.data.tiny_tokenizer import build_tiny_tokenizer
  texts = [hf.VERIFY_PROMPT, hf.REWRITE_PROMPT, "yes no Yes No a red dog on the left the cat"] * 4
  tok = build_tiny_tokenizer(tmp_path, texts, family="llama", vocab_size=350, add_chatrex_tokens=False)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    pad_token_id=tok.pad_token_id)
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
  verifier = hf.HFVerifier(str(tmp_path), batch_size=3, max_new_tokens=5, num_threads=1)
  assert verifier.name == "hf-verifier" and verifier.version.startswith(tmp_path.name + "-")
  phrases = ["dog", "the red dog on the left", "cat"]
  descriptions = ["a red dog", "a dog on the left of the cat, red", "no"]
  batched = verifier.verify(phrases, descriptions, [{}] * 3)
  single = [verifier.verify([p], [d], [{}])[0] for p, d in zip(phrases, descriptions)]
  np.testing.assert_allclose(batched, single, atol=1e-5)
  assert len(set(np.round(batched, 6))) == 3 and all(0.0 < v < 1.0 for v in batched)

  prompt = verifier._prompt(hf.VERIFY_PROMPT.format(phrase=phrases[0], description=descriptions[0]))
  ids = tok(prompt, return_tensors="pt", add_special_tokens=not tok.chat_template)
  with torch.inference_mode():
    logits = verifier.model(**ids).logits[0, -1]
  want = torch.sigmoid(torch.logsumexp(logits[verifier.yes_ids], 0) - torch.logsumexp(logits[verifier.no_ids], 0))
  np.testing.assert_allclose(batched[0], float(want), atol=1e-5)

  rewrites = verifier.rewrite(phrases, descriptions, [None] * 3, [{}] * 3)
  assert rewrites == [verifier.rewrite([p], [d], [None], [{}])[0] for p, d in zip(phrases, descriptions)]
