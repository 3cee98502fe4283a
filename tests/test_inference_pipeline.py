"""End-to-end inference: an official-layout checkpoint folder -> pipeline -> answer -> parsed boxes."""
import dataclasses

import numpy as np
from PIL import Image
import pytest

from chatrex_jax import testing
from chatrex_jax.inference.generate import SamplingConfig, generate
from chatrex_jax.inference.pipeline import ChatRexPipeline
from chatrex_jax.models.chatrex import ChatRex
from chatrex_jax.protocol import prompts
from tests.builders import write_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def pipe(checkpoint):
  return ChatRexPipeline.from_checkpoint(checkpoint)


def _image(seed, w, h):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


# Every task of `protocol.prompts.TASK_NAMES`, with the arguments its prompt takes.
TASK_RUNS = (("detect", {"objects": "person; pigeon"}),
             ("refer", {"objects": "the man on the left"}),
             ("region_caption", {"objects": [1], "granularity": "brief"}),
             ("grounded_caption", {"granularity": "detailed"}),
             ("count", {"objects": "pigeon"}),
             ("chat", {"text": "What is in the image?"}))
BOXES = np.asarray([[5, 5, 40, 30], [20, 10, 90, 60], [0, 0, 10, 10]], np.float32)


def test_every_task_has_a_run():
  assert sorted(t for t, _ in TASK_RUNS) == sorted(prompts.TASK_NAMES)


@pytest.mark.parametrize("task,kw", TASK_RUNS, ids=[t for t, _ in TASK_RUNS])
def test_pipeline_answers_and_parses_every_task(pipe, task, kw):
  out = pipe.run(_image(0, 100, 70), task, boxes=BOXES, max_new_tokens=6, **kw)
  assert out.question == prompts.question(task, kw.get("objects"), granularity=kw.get("granularity"),
                                          text=kw.get("text"))
  assert out.question in out.prompt
  assert out.answer and isinstance(out.answer, str)
  np.testing.assert_array_equal(out.boxes, BOXES)
  assert out.to_dict()["question"] == out.question


@pytest.mark.parametrize("task,kw", TASK_RUNS, ids=[t for t, _ in TASK_RUNS])
def test_generation_equals_teacher_forced_model(pipe, task, kw):
  """The pipeline's cached, left-aligned decoding step by step == one `ChatRex.__call__` over
  prompt + generated answer (right-padded, no cache): same logits at every answer position."""
  question = prompts.question(task, kw.get("objects"), granularity=kw.get("granularity"),
                              text=kw.get("text"))
  sample = pipe.processor.process(_image(3, 90, 75), question, BOXES)
  n = 8
  sampling = SamplingConfig(max_new_tokens=n, return_logits=True, eos_ids=())
  batch = pipe.prepare([sample])
  embeds = pipe.model.apply({"params": pipe.params}, batch, method=ChatRex.embed_inputs)[0]
  out = generate(pipe.model.llm_module, pipe.params["llm"], inputs_embeds=embeds,
                 attention_mask=batch["attention_mask"], sampling=sampling)
  answer = out.tokens[0, :n]
  forced = dataclasses.replace(sample, input_ids=np.concatenate([sample.input_ids, answer]))
  full = pipe.model.apply({"params": pipe.params}, pipe.prepare([forced]))["logits"][0]
  start = int(batch["attention_mask"][0].sum()) - 1   # the prompt's last position: answer token 0
  want = np.asarray(full[start:start + n])
  testing.assert_close_to_scale(out.step_logits[:, 0], want, 1e-4, f"{task} decoding logits")
  np.testing.assert_array_equal(answer, want.argmax(-1))


def test_batched_run_equals_single_runs(checkpoint):
  """Batched and single runs agree, and so does the joined-projection LLM layout."""
  pipe = ChatRexPipeline.from_checkpoint(checkpoint)
  fused = ChatRexPipeline.from_checkpoint(checkpoint, llm_kernel_layout="out_in_fused")
  assert "qkv_proj" in fused.params["llm"]["decoder"]["layers_0"]["self_attn"]
  images = [_image(1, 120, 80), _image(2, 60, 90)]
  boxes = [np.asarray([[5, 5, 40, 30], [20, 10, 90, 60]]), np.asarray([[1, 2, 30, 40]])]
  questions = ["Please detect dog in this image. Answer the question with object indexes.",
               "Can you provide me with a brief description of <obj0>? Answer the question with brief description."]
  batched = pipe.run_batch(images, questions, boxes, max_new_tokens=8)
  assert [r.answer for r in fused.run_batch(images, questions, boxes, max_new_tokens=8)] == [
      r.answer for r in batched]
  for i in range(2):
    single = pipe.run_batch(images[i:i + 1], questions[i:i + 1], boxes[i:i + 1], max_new_tokens=8)[0]
    assert single.answer == batched[i].answer


def test_predict_cli_writes_answer_json_and_png(checkpoint, tmp_path, capsys):
  import json

  from chatrex_jax import cli
  img = tmp_path / "in.png"
  _image(3, 90, 60).save(img)
  boxes = tmp_path / "boxes.json"
  boxes.write_text(json.dumps({"boxes": [[5, 5, 40, 30], [20, 10, 80, 50]]}))
  out_png, out_json = tmp_path / "pred.png", tmp_path / "pred.json"
  rc = cli.main(["predict", "--checkpoint", str(checkpoint), "--image", str(img), "--task", "detect",
                 "--query", "red circle; blue square", "--boxes", str(boxes), "--max-new-tokens", "6",
                 "--out", str(out_png), "--json", str(out_json)])
  assert rc == 0
  result = json.loads(out_json.read_text())
  assert result["question"].startswith("Please detect red circle; blue square in this image.")
  assert result["boxes"] == [[5, 5, 40, 30], [20, 10, 80, 50]]
  assert {"phrases", "dropped", "rejected"} <= set(result["parsed"])
  assert Image.open(out_png).size == (90, 60)


def test_predict_cli_reports_dropped_boxes(checkpoint, tmp_path):
  """More boxes than the 100 object tags: the highest-scoring 100 are kept, with one warning,
  a note in Prediction.notes and the JSON's box_overflow field."""
  import json

  from chatrex_jax.inference import predict
  from chatrex_jax.protocol.image import BoxOverflowWarning
  img = tmp_path / "in.png"
  _image(4, 90, 60).save(img)
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 40, (103, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (103, 2))], 1).round(1)
  scores = rng.uniform(0.3, 0.9, 103)
  low = np.argsort(scores)[:3]
  path = tmp_path / "boxes.json"
  path.write_text(json.dumps({"boxes": boxes.tolist(), "scores": scores.tolist()}))
  out_json = tmp_path / "pred.json"
  with pytest.warns(BoxOverflowWarning) as caught:
    rc = predict.main(["--checkpoint", str(checkpoint), "--image", str(img), "--task", "detect",
                       "--query", "dot", "--boxes", str(path), "--max-new-tokens", "2",
                       "--out", str(tmp_path / "pred.png"), "--json", str(out_json)])
  assert rc == 0 and len(caught) == 1
  result = json.loads(out_json.read_text())
  assert result["box_overflow"] == {"given": 103, "kept": 100, "dropped": 3,
                                    "rule": "highest_score"}
  assert [n for n in result["notes"] if "dropped" in n] == [str(caught[0].message)]
  kept = [i for i in range(103) if i not in low]
  np.testing.assert_allclose(result["boxes"], boxes[kept])


def test_predict_cli_official_demo_questions(checkpoint, tmp_path, monkeypatch):
  """--query as the gradio demo ("dog,cat" -> "dog; cat", "<obj1>,<obj0>"), --raw-question,
  and the UPN prompt per task (coarse for chat, fine otherwise; UPN stubbed)."""
  import json

  from chatrex_jax.inference import predict
  from chatrex_jax.protocol.image import BoxOverflowWarning
  img = tmp_path / "in.png"
  _image(5, 80, 64).save(img)
  calls = []
  n = 103  # more proposals than tags: UPN scores come sorted, so the first 100 are kept
  props = np.asarray([[i % 50, i % 30, i % 50 + 20, i % 30 + 20] for i in range(n)], np.float64)

  def fake_upn(path, image, prompt_type, min_score, nms, config):
    calls.append(prompt_type)
    return props, np.round(np.linspace(0.9, 0.3, n), 2)

  monkeypatch.setattr(predict, "upn_proposals", fake_upn)

  def run(*extra):
    out_json = tmp_path / "pred.json"
    rc = predict.main(["--checkpoint", str(checkpoint), "--image", str(img),
                       "--max-new-tokens", "1", "--out", str(tmp_path / "pred.png"),
                       "--json", str(out_json), *extra])
    assert rc == 0
    return json.loads(out_json.read_text())

  with pytest.warns(BoxOverflowWarning):
    r = run("--task", "chat", "--upn", "upn.pth", "--text", "Who lives here?  ", "--raw-question")
  assert calls == ["coarse"] and r["question"] == "Who lives here?  "
  assert r["box_overflow"] == {"given": n, "kept": 100, "dropped": 3, "rule": "highest_score"}
  np.testing.assert_array_equal(r["boxes"], props[:100])
  with pytest.warns(BoxOverflowWarning):
    r = run("--task", "detect", "--upn", "upn.pth", "--query", "dog, cat ,red car")
  assert calls == ["coarse", "fine"]
  assert r["question"] == ("Please detect dog; cat; red car in this image. Answer the question "
                           "with object indexes.")
  boxes = tmp_path / "boxes.json"
  boxes.write_text(json.dumps([[5, 5, 40, 30], [20, 10, 70, 50]]))
  r = run("--task", "region_caption", "--boxes", str(boxes), "--query", "<obj1>,<obj0>",
          "--granularity", "brief")
  assert r["question"].startswith("Can you provide me with a brief description of <obj1>; <obj0>?")
  assert r["box_overflow"] == {"given": 2, "kept": 2, "dropped": 0, "rule": None}
  for bad in (["--task", "detect", "--query", "dog", "--raw-question"],
              ["--task", "region_caption", "--boxes", str(boxes), "--query", "0,2"],
              ["--task", "region_caption", "--boxes", str(boxes), "--query", "dog"],
              ["--task", "chat"]):
    assert predict.main(["--checkpoint", str(checkpoint), "--image", str(img), *bad]) == 2
