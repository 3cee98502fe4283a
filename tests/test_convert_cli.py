"""`chatrex-jax convert`: every subcommand round-trips bit-identically through main(argv), and
user mistakes exit with code 2 and a message naming the problem."""
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from chatrex_jax.convert import chatrex as chatrex_convert
from chatrex_jax.convert import llm as llm_convert
from chatrex_jax.convert import mapping, safetensors_io, torch_files
from chatrex_jax.convert import upn as upn_convert
from chatrex_jax.models.chatrex import ChatRex, example_batch
from chatrex_jax.models.llm import CausalLM, LLMConfig
from chatrex_jax.models.tiny import tiny_config
from chatrex_jax.tools import convert
from tests.builders import assert_same_tree, random_like

ROOT = pathlib.Path(__file__).resolve().parents[1]


def assert_same_tensors(a_dir, b_dir, rename=lambda k: k):
  """Same keys (after rename), dtypes, shapes and bytes in two safetensors checkpoints."""
  a, b = safetensors_io.Checkpoint(a_dir), safetensors_io.Checkpoint(b_dir)
  assert {rename(k) for k in a} == set(b)
  for k in a:
    x, y = a[k], b[rename(k)]
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k
  n = len(a)
  a.close()
  b.close()
  return n


def run(argv, capsys):
  code = convert.main([str(a) for a in argv])
  out = capsys.readouterr()
  return code, out.out, out.err


# ----------------------------------------------------------------------------- llm

@pytest.mark.parametrize("family,tied", [("qwen2", False), ("llama", True)])
def test_llm_hf_to_flax_and_back_is_bit_identical(family, tied, tmp_path, capsys):
  config = LLMConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, family=family,
                     attention_bias=family == "qwen2", tie_word_embeddings=tied)
  abstract = jax.eval_shape(CausalLM(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params = random_like(abstract, seed=1)
  hf = llm_convert.save(params, config, tmp_path / "hf", max_shard_bytes=16 * 1024)
  assert (hf / safetensors_io.INDEX_NAME).exists()  # sharded source
  (hf / "tokenizer_config.json").write_text('{"model_max_length": 64}')

  code, out, err = run(["llm", "--from", hf, "--to", tmp_path / "flax", "--max-shard-mb", 0.02], capsys)
  assert code == 0, err
  n = len(llm_convert.rules(config))
  assert f"{tmp_path / 'flax'}: {n} tensors" in out and "HF -> Flax" in out
  assert_same_tree(llm_convert.load_flax_checkpoint(tmp_path / "flax"), params)
  assert (tmp_path / "flax" / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'

  code, out, err = run(["llm", "--from", tmp_path / "flax", "--to", tmp_path / "back"], capsys)
  assert code == 0, err
  assert "Flax -> HF" in out and f"{n} tensors" in out
  assert assert_same_tensors(hf, tmp_path / "back") == n
  assert (tmp_path / "back" / "tokenizer_config.json").exists()
  config2, params2 = llm_convert.load(tmp_path / "back")
  assert config2 == config
  assert_same_tree(params2, params)


# ----------------------------------------------------------------------------- chatrex

@pytest.fixture(scope="module")
def chatrex_official(tmp_path_factory):
  """A tiny random ChatRex in the official RexSeek layout (several shards) + a tokenizer file."""
  config = tiny_config(vocab_size=120)
  abstract = jax.eval_shape(ChatRex(config).init, jax.random.key(0), example_batch(config))["params"]
  params = random_like(abstract, seed=2)
  src = tmp_path_factory.mktemp("chatrex") / "official"
  chatrex_convert.save(params, config, src, layout="rexseek", max_shard_bytes=128 * 1024)
  (src / "special_tokens_map.json").write_text("{}")
  return config, params, src


def test_chatrex_layouts_round_trip_bit_identically(chatrex_official, tmp_path, capsys):
  config, params, src = chatrex_official
  code, out, err = run(["chatrex", "--from", src, "--to", tmp_path / "llava", "--layout", "llava",
                        "--max-shard-mb", 0.1], capsys)
  assert code == 0, err
  assert "official (rexseek layout) -> official (llava layout)" in out
  mm = ("vision_tower.", "vision_tower_aux.", "mm_projector.", "mm_object_projector.")
  n = assert_same_tensors(src, tmp_path / "llava", lambda k: "model." + k if k.startswith(mm) else k)
  assert f"{n} tensors" in out
  config2, params2, layout = chatrex_convert.load(tmp_path / "llava")
  assert layout == "llava" and config2 == config
  assert_same_tree(params2, params)
  assert (tmp_path / "llava" / "special_tokens_map.json").exists()
  # ... and back (the default layout is the source's, so name it).
  code, out, err = run(["chatrex", "--from", tmp_path / "llava", "--to", tmp_path / "rexseek",
                        "--layout", "rexseek"], capsys)
  assert code == 0, err
  assert assert_same_tensors(src, tmp_path / "rexseek") == n


def test_chatrex_official_to_orbax_and_back_is_bit_identical(chatrex_official, tmp_path, capsys):
  config, params, src = chatrex_official
  code, out, err = run(["chatrex", "--from", src, "--to", tmp_path / "orbax", "--format", "orbax"], capsys)
  assert code == 0, err
  assert (tmp_path / "orbax" / "params").is_dir() and (tmp_path / "orbax" / "special_tokens_map.json").exists()
  assert f"{len(mapping.flatten(params))} tensors" in out and "-> Orbax params" in out
  orbax_config, orbax_params = chatrex_convert.load_orbax(tmp_path / "orbax")
  assert_same_tree(orbax_params, params)
  assert orbax_config == config

  code, out, err = run(["chatrex", "--from", tmp_path / "orbax", "--to", tmp_path / "official"], capsys)
  assert code == 0, err
  assert "Orbax -> official (rexseek layout)" in out
  assert_same_tensors(src, tmp_path / "official")
  config2, params2, _ = chatrex_convert.load(tmp_path / "official")
  assert config2 == config
  assert_same_tree(params2, params)


# ----------------------------------------------------------------------------- upn

@pytest.fixture(scope="module")
def upn_tiny():
  from chatrex_jax.inference.upn_predict import load_config
  config = load_config("tiny")
  params = random_like(upn_convert.abstract_params(config), seed=3)
  return config, params, upn_convert.to_torch(params, config)


def test_upn_pth_to_flax_and_back_is_bit_identical(upn_tiny, tmp_path, capsys):
  config, params, state = upn_tiny
  pth = tmp_path / "upn.pth"
  extra = {"epoch": torch.tensor(3)}  # a training extra the official strict=False load skips
  torch.save({"model": {**{k: torch.from_numpy(v) for k, v in state.items()}, **extra}}, pth)

  code, out, err = run(["upn", "--from", pth, "--to", tmp_path / "flax.safetensors", "--config", "tiny"], capsys)
  assert code == 0, err
  flat = safetensors_io.load_file(tmp_path / "flax.safetensors")
  assert f"{len(flat)} tensors" in out and "skipped: 1 unused checkpoint keys" in out
  assert safetensors_io.SafetensorsFile(tmp_path / "flax.safetensors").metadata["format"] == mapping.FLAX_FORMAT
  assert_same_tree(mapping.unflatten(flat), params)

  code, out, err = run(["upn", "--from", tmp_path / "flax.safetensors", "--to", tmp_path / "back.pth",
                        "--config", "tiny"], capsys)
  assert code == 0, err
  back = torch_files.load_state_dict(tmp_path / "back.pth")
  assert back.keys() == state.keys() and f"{len(state)} tensors" in out
  for k in state:
    assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]), k
  # official .pth -> official .safetensors (torch names kept)
  code, out, err = run(["upn", "--from", tmp_path / "back.pth", "--to", tmp_path / "official.safetensors",
                        "--config", "tiny", "--format", "official"], capsys)
  assert code == 0, err
  official = safetensors_io.load_file(tmp_path / "official.safetensors")
  assert official.keys() == state.keys() and all(np.array_equal(official[k], state[k]) for k in state)


# ----------------------------------------------------------------------------- export

def _save_train_state(workdir, trainable, frozen, step):
  """Writes a checkpoint the way `Trainer.train` does (TrainState under 'state', data state)."""
  from chatrex_jax.train.checkpoint import Checkpointer
  from chatrex_jax.train.trainer import TrainState
  state = TrainState(step=jnp.int32(step), trainable=trainable, frozen=frozen,
                     opt_state={"mu": jax.tree.map(np.zeros_like, trainable)},
                     rng=jax.random.key_data(jax.random.key(step)))
  ckpt = Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
  ckpt.save(step, state, {"position": step})
  ckpt.close()


def test_export_chatrex_workdir_to_a_predict_ready_folder(tmp_path, capsys):
  from chatrex_jax.configs import load_config
  from chatrex_jax.data.tiny_tokenizer import build_tiny_tokenizer
  from chatrex_jax.inference.pipeline import ChatRexPipeline
  from chatrex_jax.train import optimizer as opt_lib
  from chatrex_jax.train.mllm_task import model_config
  tok = build_tiny_tokenizer(tmp_path / "tok", vocab_size=300)
  spec = "chatrex_tiny:stage1"
  override = f"--config.data.tokenizer_dir={tmp_path / 'tok'}"
  cfg = load_config(spec, [override[len("--config."):]])
  model = model_config(cfg.model, len(tok))
  abstract = jax.eval_shape(ChatRex(model).init, jax.random.key(0), example_batch(model))["params"]
  mask = opt_lib.trainable_mask(nn.unbox(abstract), opt_lib.STAGE_PATTERNS["stage1"])
  old, params = random_like(abstract, seed=4), random_like(abstract, seed=5)
  workdir = tmp_path / "run"
  _save_train_state(workdir, *opt_lib.partition(old, mask), step=20)
  _save_train_state(workdir, *opt_lib.partition(params, mask), step=40)

  code, out, err = run(["export", "--workdir", workdir, "--to", tmp_path / "out", "--config", spec, override], capsys)
  assert code == 0, err
  assert "official (rexseek layout)" in out and "tensors" in out
  config2, params2, layout = chatrex_convert.load(tmp_path / "out")
  assert layout == "rexseek" and config2.llm.vocab_size == len(tok)
  assert_same_tree(params2, params)  # the latest step, trainable and frozen merged
  pipe = ChatRexPipeline.from_checkpoint(tmp_path / "out")  # tokenizer travelled along
  assert len(pipe.processor.tokenizer) == len(tok)

  code, out, err = run(["export", "--workdir", workdir, "--step", 20, "--to", tmp_path / "old",
                        "--config", spec, override], capsys)
  assert code == 0, err
  assert_same_tree(chatrex_convert.load(tmp_path / "old")[1], old)


def test_export_upn_workdir_with_its_saved_config(tmp_path, capsys):
  from chatrex_jax.configs import load_config
  from chatrex_jax.train.upn_task import model_config as upn_model_config
  cfg = load_config("upn_train_tiny")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))  # as `chatrex-jax train` does
  model = upn_model_config(cfg.model)
  params = random_like(upn_convert.abstract_params(model), seed=6)
  _save_train_state(workdir, params, {}, step=5)

  code, out, err = run(["export", "--workdir", workdir, "--to", tmp_path / "upn.pth"], capsys)
  assert code == 0, err
  assert "-> official UPN" in out
  back, report = upn_convert.load(tmp_path / "upn.pth", model)
  assert report.unexpected == [] and report.missing_aliases == []
  assert_same_tree(back, params)


# ----------------------------------------------------------------------------- user errors

def test_user_errors_exit_2_with_a_message(chatrex_official, upn_tiny, tmp_path, capsys):
  _, _, official = chatrex_official
  config, _, state = upn_tiny
  pth = tmp_path / "upn.pth"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, pth)
  (tmp_path / "garbage.pth").write_bytes(b"not a pickle at all")
  (tmp_path / "only_config").mkdir()
  (tmp_path / "only_config" / "config.json").write_text("{}")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "model.safetensors").write_bytes(b"x")
  (tmp_path / "no_ckpt").mkdir()
  llm_dir = tmp_path / "llm"
  cfg = LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)
  abstract = jax.eval_shape(CausalLM(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  llm_convert.save(random_like(abstract, 7), cfg, llm_dir)
  cases = [
      (["llm", "--from", pth, "--to", tmp_path / "a"], f"{pth} is a file; expected an LLM checkpoint folder"),
      (["llm", "--from", tmp_path / "nope", "--to", tmp_path / "a"], "does not exist"),
      (["llm", "--from", tmp_path / "only_config", "--to", tmp_path / "a"], "no safetensors checkpoint"),
      (["llm", "--from", llm_dir, "--to", tmp_path / "full"], "exists and is not empty; pass --overwrite"),
      (["llm", "--from", llm_dir, "--to", llm_dir], "is the source folder"),
      (["chatrex", "--from", llm_dir, "--to", tmp_path / "a"], "not a ChatRex/RexSeek checkpoint"),
      (["chatrex", "--from", pth, "--to", tmp_path / "a"], "is a file; expected a ChatRex checkpoint folder"),
      (["upn", "--from", official, "--to", tmp_path / "u.safetensors"], "is a folder; expected a UPN checkpoint file"),
      (["upn", "--from", tmp_path / "garbage.pth", "--to", tmp_path / "u.safetensors", "--config", "tiny"],
       "not a readable PyTorch checkpoint"),
      (["upn", "--from", pth, "--to", tmp_path / "u.npz", "--config", "tiny"], "Flax-keyed UPN file is safetensors"),
      (["upn", "--from", pth, "--to", tmp_path / "u.safetensors", "--config", "large"], "does not match the model"),
      (["upn", "--from", pth, "--to", tmp_path / "u.safetensors", "--config", "nope.py"],
       "config 'nope.py' is neither a file nor a packaged config"),
      (["export", "--workdir", tmp_path / "nope", "--to", tmp_path / "a"], "is not a folder"),
      (["export", "--workdir", tmp_path / "no_ckpt", "--to", tmp_path / "a"], "has no checkpoints/ folder"),
      (["llm", "--from", llm_dir, "--to", tmp_path / "a", "--config.x=1"], "apply to `export` only"),
      (["frobnicate"], "invalid choice"),
  ]
  for argv, message in cases:
    code, out, err = run(argv, capsys)
    assert code == 2 and message in err, (argv, err)
    assert "Traceback" not in err
  assert not (tmp_path / "u.safetensors").exists()


def test_export_unknown_step_and_missing_config(tmp_path, capsys):
  workdir = tmp_path / "run"
  params = {"a": {"kernel": np.ones((2, 2), np.float32)}}
  _save_train_state(workdir, params, {}, step=3)
  code, _, err = run(["export", "--workdir", workdir, "--to", tmp_path / "o"], capsys)
  assert code == 2 and "config.json not found: give the run's training config with --config" in err
  spec = "upn_train_tiny"
  code, _, err = run(["export", "--workdir", workdir, "--step", 9, "--to", tmp_path / "o.pth",
                      "--config", spec], capsys)
  assert code == 2 and "has no step 9; saved steps: [3]" in err, err
  code, _, err = run(["export", "--workdir", workdir, "--to", tmp_path / "o", "--config", spec], capsys)
  assert code == 2 and "expected a .pth/.pt or .safetensors file name" in err, err
