"""Every command fails cleanly on bad input: exit status 2, one message on stderr naming the bad
input, no traceback, and no output file left behind (`chatrex_jax.errors`).

The table runs each case through the command's `main(argv)` (as `chatrex-jax CMD` does); a few
also run through the installed console script. Cases that fail before any model is built keep
this fast: the only model is one tiny ChatRex checkpoint, shared by the table.
"""
import io
import json
import shutil
import subprocess
import sys

from PIL import Image
import pytest

from chatrex_jax import cli
from tests.builders import write_tiny_checkpoint

PREDICT = ["predict", "--checkpoint", "{ckpt}", "--query", "dog", "--out", "{out}/pred.png",
           "--json", "{out}/pred.json"]
IMAGE = ["--image", "{inputs}/ok.png"]
TINY_TRAIN = ["train", "--config", "chatrex_tiny:stage1", "--workdir", "{out}/run"]

# (case, argv, what the message must name)
CASES = [
    # predict: images
    ("predict/image-missing", PREDICT + ["--image", "{inputs}/missing.png"], "missing.png"),
    ("predict/image-text-named-jpg", PREDICT + ["--image", "{inputs}/text.jpg"], "text.jpg"),
    ("predict/image-truncated-jpeg", PREDICT + ["--image", "{inputs}/truncated.jpg"], "truncated.jpg"),
    ("predict/image-empty-file", PREDICT + ["--image", "{inputs}/empty.png"], "empty.png"),
    ("predict/image-is-a-folder", PREDICT + ["--image", "{inputs}"], "inputs"),
    # predict: boxes files
    ("predict/boxes-three-numbers", PREDICT + IMAGE + ["--boxes", "{inputs}/three.json"], "box 0"),
    ("predict/boxes-not-json", PREDICT + IMAGE + ["--boxes", "{inputs}/notjson.json"], "not JSON"),
    ("predict/boxes-strings", PREDICT + IMAGE + ["--boxes", "{inputs}/strings.json"], "box 1"),
    ("predict/boxes-nan", PREDICT + IMAGE + ["--boxes", "{inputs}/nan.json"], "non-finite"),
    ("predict/boxes-inverted", PREDICT + IMAGE + ["--boxes", "{inputs}/inverted.json"], "inverted"),
    ("predict/boxes-zero-size", PREDICT + IMAGE + ["--boxes", "{inputs}/zero.json"], "inverted or empty"),
    ("predict/boxes-scores-mismatch", PREDICT + IMAGE + ["--boxes", "{inputs}/scores.json"], "'scores'"),
    ("predict/boxes-object-no-field", PREDICT + IMAGE + ["--boxes", "{inputs}/nofield.json"], "'boxes' field"),
    ("predict/boxes-not-a-list", PREDICT + IMAGE + ["--boxes", "{inputs}/number.json"], "holds a int"),
    ("predict/boxes-missing", PREDICT + IMAGE + ["--boxes", "{inputs}/missing.json"], "missing.json"),
    # predict: checkpoint, question, output
    ("predict/checkpoint-missing", ["predict", "--checkpoint", "{inputs}/nockpt", "--query", "dog",
                                    "--out", "{out}/pred.png"] + IMAGE, "nockpt"),
    ("predict/checkpoint-not-chatrex", ["predict", "--checkpoint", "{inputs}", "--query", "dog",
                                        "--out", "{out}/pred.png"] + IMAGE, "config.json"),
    ("predict/question-missing", ["predict", "--checkpoint", "{ckpt}", "--out", "{out}/pred.png"] + IMAGE,
     "needs objects"),
    ("predict/out-folder-missing", ["predict", "--checkpoint", "{ckpt}", "--query", "dog",
                                    "--out", "{out}/no/such/dir/pred.png"] + IMAGE, "does not exist"),
    ("predict/upn-missing", ["predict", "--upn", "{inputs}/missing.pth", "--out", "{out}/pred.png"] + IMAGE,
     "missing.pth"),
    # train
    ("train/config-unknown", ["train", "--config", "no_such_config", "--workdir", "{out}/run"], "no_such_config"),
    ("train/override-unknown-key", TINY_TRAIN + ["--config.optim.lrx=1"], "optim.lrx"),
    ("train/override-wrong-type", TINY_TRAIN + ["--config.optim.lr=fast"], "optim.lr"),
    ("train/override-not-key-value", TINY_TRAIN + ["--config.optim.lr"], "KEY=VALUE"),
    ("train/data-source-missing", TINY_TRAIN + ["--config.data.sources=[{'path': '{inputs}/nodata'}]",
                                                "--config.data.tokenizer_dir={ckpt}"], "nodata"),
    ("train/tokenizer-missing", TINY_TRAIN + ["--config.data.sources=[{'path': '{inputs}'}]",
                                              "--config.data.tokenizer_dir={inputs}/notok"], "notok"),
    ("train/mesh-does-not-fit", TINY_TRAIN + ["--config.mesh.data=3", "--config.data.tokenizer_dir={ckpt}"], "mesh"),
    # eval
    ("eval/annotations-missing", ["eval", "rexseek", "--annotations", "{inputs}/missing.jsonl",
                                  "--predictions", "{inputs}/preds.jsonl", "--out", "{out}/ev"], "missing.jsonl"),
    ("eval/predictions-not-jsonl", ["eval", "rexseek", "--annotations", "{inputs}/ann.jsonl",
                                    "--predictions", "{inputs}/notjson.json", "--out", "{out}/ev"], "notjson.json"),
    ("eval/checkpoint-missing", ["eval", "run", "--checkpoint", "{inputs}/nockpt", "--annotations",
                                 "{inputs}/ann.jsonl", "--image-dir", "{inputs}", "--out", "{out}/ev"], "nockpt"),
    # data-engine
    ("data-engine/config-unknown", ["data-engine", "--config", "no_such_config", "--output", "{out}/eng"],
     "no_such_config"),
    ("data-engine/override-unknown-key", ["data-engine", "--config", "data_engine_synthetic:4",
                                          "--output", "{out}/eng", "--config.nope=1"], "nope"),
    # demo
    ("demo/override-unknown-key", ["demo", "--workdir", "{out}/demo", "--config.chatrex.stage9.steps=1"],
     "chatrex.stage9"),
    ("demo/llm-source-unknown", ["demo", "--quick", "--workdir", "{out}/demo", "--config.llm.source=hub"],
     "llm.source"),
    ("demo/gguf-missing", ["demo", "--quick", "--workdir", "{out}/demo", "--config.llm.source=gguf",
                           "--config.llm.gguf={inputs}/missing.gguf"], "missing.gguf"),
    # check-equivalence
    ("check-equivalence/fixture-missing", ["check-equivalence", "{inputs}/no_fixture"], "no_fixture"),
    ("check-equivalence/not-a-fixture", ["check-equivalence", "{inputs}/empty_dir"], "empty_dir"),
    # AOT tool
    ("aot/topology-unknown", ["aot", "--quick", "--topology", "v9-1"], "v9-1"),
    ("aot/override-unknown-key", ["aot", "--quick", "--config.mesh.nope=1"], "mesh.nope"),
    # convert (already strict; kept in the table so it stays so)
    ("convert/llm-from-missing", ["convert", "llm", "--from", "{inputs}/nomodel", "--to", "{out}/llm"], "nomodel"),
]


def _truncated_jpeg() -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="JPEG")
  return buf.getvalue()[:200]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("inputs")
  Image.new("RGB", (64, 48), (90, 120, 200)).save(d / "ok.png")
  (d / "text.jpg").write_text("this is a text file, not a JPEG\n")
  (d / "truncated.jpg").write_bytes(_truncated_jpeg())
  (d / "empty.png").write_bytes(b"")
  files = {
      "three.json": "[[1, 2, 3]]", "notjson.json": "[[1, 2, 3, 4]",
      "strings.json": '[[1, 2, 3, 4], ["a", 1, 2, 3]]', "nan.json": "[[NaN, 1, 2, 3]]",
      "inverted.json": "[[10, 10, 5, 20]]", "zero.json": "[[5, 5, 5, 9]]",
      "scores.json": '{"boxes": [[1, 2, 3, 4]], "scores": [0.5, 0.4]}',
      "nofield.json": '{"box": [[1, 2, 3, 4]]}', "number.json": "7", "preds.jsonl": "", "ann.jsonl": ""}
  for name, text in files.items():
    (d / name).write_text(text)
  (d / "empty_dir").mkdir()
  return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _argv(argv, **paths):
  out = []
  for a in argv:
    for name, path in paths.items():
      a = a.replace("{" + name + "}", str(path))
    out.append(a)
  return out


def _files(folder):
  return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("case,argv,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_message(case, argv, names, inputs, ckpt, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  before = _files(inputs)
  rc = cli.main(_argv(argv, inputs=inputs, ckpt=ckpt, out=out))
  err = capsys.readouterr().err
  assert rc == 2, f"{case}: exit {rc}\n{err}"
  assert "Traceback" not in err, err
  message = [line for line in err.splitlines() if "error:" in line]
  assert message, f"{case}: no 'error:' line in\n{err}"
  assert names in message[-1], f"{case}: the message does not name {names!r}:\n{message[-1]}"
  # nothing written: no output files, no half-written temporaries, inputs untouched
  assert _files(out) == [], f"{case} left {_files(out)}"
  assert _files(inputs) == before


def test_too_many_boxes_are_capped_with_a_warning(inputs, ckpt, tmp_path, capsys):
  """120 boxes: the model has 100 object tags; the first 100 are kept (no scores: RexSeek's
  rule), a warning says so, and the JSON records it."""
  boxes = [[i % 60, 0, i % 60 + 4, 4 + i % 40] for i in range(120)]
  path = tmp_path / "boxes.json"
  path.write_text(json.dumps(boxes + [[50, 40, 70, 60]]))   # and one reaching outside the image
  rc = cli.main(["predict", "--checkpoint", str(ckpt), "--image", str(inputs / "ok.png"),
                 "--boxes", str(path), "--task", "region_caption", "--query", "0",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "p.png"),
                 "--json", str(tmp_path / "p.json")])
  err = capsys.readouterr().err
  assert rc == 0, err
  assert "21 of 121 boxes dropped" in err and "extend outside the 64x48 image" in err, err
  result = json.loads((tmp_path / "p.json").read_text())
  assert result["box_overflow"] == {"given": 121, "kept": 100, "dropped": 21, "rule": "first"}
  assert (tmp_path / "p.png").exists() and not list(tmp_path.glob("*.partial*"))


@pytest.mark.parametrize("case", ["predict/image-text-named-jpg", "train/override-unknown-key",
                                  "aot/topology-unknown"])
def test_console_script_reports_the_same(case, inputs, ckpt, tmp_path):
  exe = shutil.which("chatrex-jax")
  if exe is None:
    pytest.fail("the chatrex-jax console script is not installed (pip install -e .)")
  _, argv, names = next(c for c in CASES if c[0] == case)
  out = tmp_path / "out"
  out.mkdir()
  p = subprocess.run([exe, *_argv(argv, inputs=inputs, ckpt=ckpt, out=out)], capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr and names in p.stderr, p.stderr


def test_programming_errors_keep_their_traceback():
  from chatrex_jax.errors import command

  @command("probe")
  def main(argv):
    raise ZeroDivisionError("a bug")

  with pytest.raises(ZeroDivisionError):
    main([])


def test_atomic_path_keeps_the_old_file_on_failure(tmp_path):
  from chatrex_jax.errors import atomic_path
  final = tmp_path / "result.json"
  final.write_text("old")
  with pytest.raises(RuntimeError):
    with atomic_path(final) as tmp:
      tmp.write_text("half")
      raise RuntimeError("killed")
  assert final.read_text() == "old" and _files(tmp_path) == ["result.json"]
  with atomic_path(final) as tmp:
    tmp.write_text("new")
  assert final.read_text() == "new" and _files(tmp_path) == ["result.json"]


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))
