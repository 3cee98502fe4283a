"""A checkpoint in the released ChatRex-7B's layout and family (Vicuna/LLaMA: no q/k/v bias,
sentencepiece tokenizer with 104 added tokens at 32000-32103, `model_type: "chatrex"`) loads,
answers every task through `chatrex-jax predict`, converts both ways bit-identically and
starts stage-2/3 fine-tuning (issue 15)."""
import json
import pathlib

import numpy as np
from PIL import Image
import pytest

from chatrex_jax import testing
from chatrex_jax.convert import chatrex as chatrex_convert
from chatrex_jax.convert import safetensors_io
from chatrex_jax.inference import predict
from chatrex_jax.protocol import templates, tokenize
from chatrex_jax.protocol.llama_tokenizer import SentencePieceLlamaTokenizer
from chatrex_jax.tools import convert as convert_cli

SPM = pathlib.Path(__file__).parent / "fixtures" / "llama_spm" / "tokenizer.model"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  return testing.make_release_checkpoint(tmp_path_factory.mktemp("release") / "ChatRex-7B", SPM)


def test_family_and_template_come_from_the_files(release):
  folder, config, _ = release
  hf = json.loads((folder / "config.json").read_text())
  assert hf["model_type"] == "chatrex" and "attention_bias" not in hf and "architectures" not in hf
  found = chatrex_convert.read_config(folder)
  assert found.llm.family == "llama" and not found.llm.attention_bias
  assert found.llm.rope_theta == 1e4 and found.llm.rms_norm_eps == 1e-5
  assert found.llm.vocab_size == 32104 and found.llm.model_type == "chatrex"
  tok = tokenize.load_tokenizer(folder)
  assert isinstance(tok, SentencePieceLlamaTokenizer) and tok.convert_tokens_to_ids("<obj0>") == 32000
  assert templates.detect_template(tok) is templates.VICUNA_V1
  assert tokenize.adds_bos(tok)
  # disagreeing files are refused with every source named
  bad = dict(hf, model_type="qwen2")
  with pytest.raises(ValueError, match="model_type='qwen2'.*weights without q/k/v bias"):
    chatrex_convert.config_from_checkpoint(bad, {k: s for k, s in _specs(folder).items()},
                                           tokenizer_class="LlamaTokenizer")


def _specs(folder):
  ckpt = safetensors_io.Checkpoint(folder)
  specs = {k: ckpt.spec(k)[1] for k in ckpt}
  ckpt.close()
  return specs


@pytest.mark.parametrize("task,extra", [
    ("detect", ["--query", "dog,cat"]), ("refer", ["--query", "the red circle"]),
    ("count", ["--query", "dog"]), ("region_caption", ["--query", "<obj0>,<obj1>", "--granularity", "brief"]),
    ("grounded_caption", ["--granularity", "detailed"]), ("chat", ["--text", "What is on the left?"])])
def test_predict_every_task(release, tmp_path, task, extra):
  folder, _, _ = release
  img = tmp_path / "in.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(img)
  boxes = tmp_path / "boxes.json"
  boxes.write_text(json.dumps([[5, 5, 40, 30], [20, 10, 80, 50]]))
  out = tmp_path / "pred.json"
  rc = predict.main(["--checkpoint", str(folder), "--image", str(img), "--task", task, *extra,
                     "--boxes", str(boxes), "--max-new-tokens", "5", "--json", str(out),
                     "--out", str(tmp_path / "pred.png")])
  assert rc == 0
  result = json.loads(out.read_text())
  assert result["prompt"].startswith(templates.VICUNA_SYSTEM + " USER: <image>\n<obj0><objfeat><obj1><objfeat>\n")
  assert result["prompt"].endswith(" ASSISTANT:")
  assert isinstance(result["answer"], str) and len(result["boxes"]) == 2


def test_convert_both_ways_bit_identical(release, tmp_path, capsys):
  folder, _, _ = release
  llava, back = tmp_path / "llava", tmp_path / "back"
  assert convert_cli.main(["chatrex", "--from", str(folder), "--to", str(llava), "--layout", "llava"]) == 0
  assert convert_cli.main(["chatrex", "--from", str(llava), "--to", str(back), "--layout", "rexseek"]) == 0
  orbax, back2 = tmp_path / "orbax", tmp_path / "back2"
  assert convert_cli.main(["chatrex", "--from", str(folder), "--to", str(orbax), "--format", "orbax"]) == 0
  assert convert_cli.main(["chatrex", "--from", str(orbax), "--to", str(back2)]) == 0
  for out in (back, back2):
    a, b = safetensors_io.Checkpoint(folder), safetensors_io.Checkpoint(out)
    assert set(a) == set(b)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    a.close(), b.close()
    want = json.loads((folder / "config.json").read_text())
    got = json.loads((out / "config.json").read_text())
    assert got["model_type"] == "chatrex"
    assert chatrex_convert.read_config(out) == chatrex_convert.read_config(folder)
    assert tokenize.load_tokenizer(out).encode("of <obj0> in") == tokenize.load_tokenizer(folder).encode("of <obj0> in")
    del want


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_stage_config_inits_from_the_release(release, stage):
  from chatrex_jax.configs import load_config
  from chatrex_jax.train.mllm_task import ChatRexTask
  folder, config, params = release
  c = load_config(f"chatrex_7b:{stage},vicuna")
  assert c.model.llm["vocab_size"] == 32104 and c.model.llm["rope_theta"] == 1e4
  # tiny sizes, same keys: the release-sized config with this checkpoint's widths
  c.model.llm = dict(c.model.llm, hidden_size=config.llm.hidden_size,
                     intermediate_size=config.llm.intermediate_size,
                     num_hidden_layers=config.llm.num_hidden_layers,
                     num_attention_heads=config.llm.num_attention_heads,
                     num_key_value_heads=config.llm.num_key_value_heads, max_position_embeddings=4096)
  c.model.clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      image_size=56, patch_size=14, select_layer=-2)
  c.model.convnext = dict(depths=[1, 1, 2, 1], dims=[8, 16, 32, 64])
  c.model.aux_image_size, c.model.compute_dtype = 128, "float32"
  c.model.init_from = str(folder)
  c.data.tokenizer_dir = str(folder)
  c.model.scan_layers = True        # the 7B configs scan the layers: the loader stacks them
  task = ChatRexTask(c)
  loaded = task.pretrained_params()
  from flax.core import meta

  from chatrex_jax.convert.mapping import flatten
  want = {k: tuple(v.shape) for k, v in flatten(meta.unbox(task.abstract_params())).items()}
  assert {k: np.shape(v) for k, v in flatten(loaded).items()} == want
  np.testing.assert_array_equal(loaded["llm"]["decoder"]["layers"]["layer"]["mlp"]["up_proj"]["kernel"][1],
                                params["llm"]["decoder"]["layers_1"]["mlp"]["up_proj"]["kernel"])
  # the paper's Qwen2.5 config under this LLaMA checkpoint: refused, every difference named
  q = load_config(f"chatrex_7b:{stage}")
  q.model.init_from, q.data.tokenizer_dir = str(folder), str(folder)
  with pytest.raises(ValueError, match="family: checkpoint 'llama', config 'qwen2'.*STAGE,vicuna"):
    ChatRexTask(q).pretrained_params()


def test_sizes_from_the_release_keep_the_config_switches(release):
  """An empty `model.llm` takes every size from `init_from`; the switches stay the config's,
  ConvNeXt's depthwise-conv lowering included (what `tools/aot` sets for a TPU compile from a
  CPU host, where "auto" would pick the CPU's shifted sums)."""
  from chatrex_jax.configs import load_config
  from chatrex_jax.tools.aot import _select_tpu_kernels
  from chatrex_jax.train.mllm_task import model_config
  folder, config, _ = release
  c = load_config("chatrex_7b:stage2,vicuna")
  c.model.llm, c.model.init_from, c.model.remat_policy = {}, str(folder), "full"
  c.data.seq_len = 2048
  built = model_config(c.model)
  assert (built.llm.hidden_size, built.convnext.dims) == (config.llm.hidden_size, config.convnext.dims)
  assert (built.llm.remat_policy, built.convnext.dwconv_impl, built.llm.attention_impl) == ("full", "auto", "auto")
  _select_tpu_kernels(c)
  built = model_config(c.model)
  assert built.convnext.dims == config.convnext.dims      # the checkpoint's sizes, not the config's
  assert (built.convnext.dwconv_impl, built.llm.attention_impl) == ("conv", "pallas_tpu")


def test_system_turn_is_an_explicit_choice(release):
  from chatrex_jax.inference.processor import ChatRexProcessor
  folder, _, _ = release
  question = "Please detect dog in this image. Answer the question with object indexes."
  default = ChatRexProcessor.from_checkpoint(folder).prompt(question, 1)[1]
  assert default.startswith(templates.VICUNA_SYSTEM + " USER: <image>\n<obj0><objfeat>\n")
  bare = ChatRexProcessor.from_checkpoint(folder, system="").prompt(question, 1)[1]
  assert bare == "USER: <image>\n<obj0><objfeat>\n" + question + " ASSISTANT:"
  chatml = ChatRexProcessor.from_checkpoint(folder, template="qwen_chat").prompt(question, 0)[1]
  assert chatml == "<|im_start|>user\n<image>\n\n" + question + "<|im_end|>\n<|im_start|>assistant\n"
