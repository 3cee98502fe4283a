"""The packaged configs and their one loader (`chatrex_jax.configs`): names, paths, overrides."""
import pathlib

import ml_collections
import pytest

from chatrex_jax import configs

ARGS = {"chatrex_7b": ["stage1", "stage2,vicuna", "stage3,qwen2.5"], "chatrex_tiny": ["stage1", "stage3"],
        "demo": ["full", "quick"], "data_engine_synthetic": ["", "8,64,3"], "data_engine_hf": ["/models"],
        "upn_tiny": ["", "d32"], "upn_train_tiny": ["", "d32"]}


@pytest.mark.parametrize("name", configs.names())
def test_every_packaged_config_loads(name):
  for arg in ARGS.get(name, [""]):
    c = configs.load_config(f"{name}:{arg}" if arg else name)
    assert isinstance(c, ml_collections.ConfigDict) and len(c)


def test_names_paths_and_old_locations(tmp_path):
  want = configs.load_config("chatrex_tiny:stage2").to_dict()
  for spec in ("chatrex_tiny.py:stage2", "configs/chatrex_tiny.py:stage2",
               "chatrex_jax/configs/chatrex_tiny.py:stage2", "/elsewhere/configs/chatrex_tiny.py:stage2"):
    assert configs.load_config(spec).to_dict() == want, spec
  own = tmp_path / "mine.py"
  own.write_text("import ml_collections\n\ndef get_config(arg='a'):\n"
                 "  return ml_collections.ConfigDict(dict(arg=arg, lr=1.0, flag=False))\n")
  assert configs.load_config(str(own)).arg == "a" and configs.load_config(f"{own}:b").arg == "b"
  with pytest.raises(FileNotFoundError, match="packaged: .*chatrex_tiny"):
    configs.load_config("no_such_config")
  with pytest.raises(FileNotFoundError):
    configs.load_config(str(tmp_path / "other" / "chatrex_tiny.py"))   # a path, not in configs/
  (tmp_path / "bad.py").write_text("X = 1\n")
  with pytest.raises(ValueError, match="get_config"):
    configs.load_config(str(tmp_path / "bad.py"))


def test_one_override_syntax(tmp_path):
  own = tmp_path / "mine.py"
  own.write_text("import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict(dict("
                 "lr=1.0, steps=3, flag=False, name='x', values=[1], section=dict(a=1)))\n")
  c = configs.load_config(str(own), ["lr=2", "steps=5", "flag=true", "name=hello world", "values=[1, 2]",
                                     "section.a=5"])
  assert c.lr == 2.0 and isinstance(c.lr, float) and c.steps == 5 and c.flag is True
  assert c.name == "hello world" and c["values"] == [1, 2] and c.section.a == 5
  configs.apply_overrides(c, ["--config.flag=False", "steps=7"])
  assert c.flag is False and c.steps == 7
  with pytest.raises(KeyError, match="no field 'nope'; known at that level"):
    configs.apply_overrides(c, ["nope=1"])
  with pytest.raises(KeyError, match="no field 'section.b'"):
    configs.apply_overrides(c, ["section.b=1"])
  with pytest.raises(KeyError, match="no 'deep'"):
    configs.apply_overrides(c, ["deep.x=1"])
  with pytest.raises(ValueError, match="not KEY=VALUE"):
    configs.apply_overrides(c, ["lr"])
  rest, overrides = configs.split_overrides(["--workdir", "w", "--config.lr=3", "--quick"])
  assert rest == ["--workdir", "w", "--quick"] and overrides == ["lr=3"]


def test_configs_ship_inside_the_package():
  root = pathlib.Path(configs.__file__).parent
  assert {p.stem for p in root.glob("*.py")} - {"__init__", "common"} == set(configs.names())


def test_merge_config_is_as_strict_as_overrides():
  c = configs.load_config("upn_train_tiny")
  configs.merge_config(c, {"optim": {"lr": 5e-4}, "data": {"scales": [32]}, "base": "x"}, skip=("base",))
  assert c.optim.lr == 5e-4 and list(c.data.scales) == [32] and c.optim.total_steps == 300
  with pytest.raises(configs.ConfigKeyError, match=r"no field 'optim\.learning_rate'"):
    configs.merge_config(c, {"optim": {"learning_rate": 1.0}})
  with pytest.raises(configs.ConfigError, match=r"optim\.total_steps: the field is of type int"):
    configs.merge_config(c, {"optim": {"total_steps": "many"}})


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_demo_sections_are_fields_of_their_trainer_configs(mode, tmp_path):
  """The demo names each trainer config's own keys: every one exists there, and a
  `--config.chatrex.stage2.optim.lr` override reaches stage 2's optimizer."""
  from chatrex_jax.demo import run
  cfg = run.load_demo_config(mode == "quick", ["chatrex.stage2.optim.lr=7e-4",
                                               "upn.optim.total_steps=11"])
  paths = run.Paths(tmp_path)
  upn = run.upn_training_config(cfg, paths)
  assert upn.optim.total_steps == 11 and upn.data.max_size == cfg.upn.data.max_size
  stages = [run.chatrex_stage_config(cfg, paths, s) for s in (1, 2, 3)]
  assert [s.optim.lr for s in stages] == [cfg.chatrex.stage1.optim.lr, 7e-4, cfg.chatrex.stage3.optim.lr]
  assert [s.data.seed for s in stages] == [1, 2, 3]
  assert all(s.data.batch_size == cfg.chatrex.all_stages.data.batch_size for s in stages)
  assert stages[1].model.init_from == str(paths.stage_export(1))
