"""`chatrex-jax predict`: image + task [+ boxes | UPN proposals] -> answer, parsed JSON, PNG.

  chatrex-jax predict --checkpoint DIR --image photo.jpg --task detect --query "person,pigeon" \
      --upn upn_large.pth --out pred.png
  chatrex-jax predict --checkpoint DIR --image photo.jpg --task region_caption \
      --query "<obj0>,<obj2>" --granularity brief --boxes boxes.json
  chatrex-jax predict --checkpoint DIR --image room.jpg --task chat --upn upn_large.pth \
      --text "What kind of person lives here?"
  chatrex-jax predict --upn upn_large.pth --image photo.jpg --prompt-type coarse --out props.png

Questions follow the official demos: --query "dog,cat" becomes "dog; cat" (the gradio demo's
question builder: split at ",", strip, join with "; "); region captions take box indices as
"0,2" or "<obj0>,<obj2>"; --task chat prefixes "Answer the question in grounded format. " (the
official grounded-conversation test) unless --raw-question sends --text verbatim (the gradio
demo's raw question box). UPN proposals use the coarse-grained prompt for chat (as the official
grounded-conversation test) and the fine-grained one for every other task, unless --prompt-type
says otherwise.

Boxes files are JSON: a list of [x1, y1, x2, y2] in original-image pixels, or
{"boxes": [...], "scores": [...]} (scores optional). Without --checkpoint only the UPN proposals
are computed and drawn.

ChatRex has 100 object tags: with more boxes, 100 are kept - the highest-scoring when scores are
known (UPN proposals, or a boxes file with scores; UPN's come sorted, so these are its first
100), else the first 100 (RexSeek's evaluation rule). A warning says so, and the JSON output's
"box_overflow" field ({given, kept, dropped, rule}) and "notes" record it.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from chatrex_jax.errors import UserError, atomic_path, command
from chatrex_jax.protocol import prompts
from chatrex_jax.protocol import tokens as C

BOXES_FORMAT = ('a JSON list of [x1, y1, x2, y2] (original-image pixels, x1 < x2, y1 < y2) or '
                '{"boxes": [...], "scores": [...]} (scores optional)')


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_boxes(path) -> tuple[np.ndarray, np.ndarray | None]:
  """A boxes file -> (boxes float64 [N, 4], scores float64 [N] or None); a `UserError` naming
  the file, the box and the fix for anything else than `BOXES_FORMAT`."""
  where = f"--boxes {path}"
  try:
    text = pathlib.Path(path).read_text()
  except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
    raise UserError(f"{where}: {e.strerror}; expected a file holding {BOXES_FORMAT}") from e
  except UnicodeDecodeError as e:
    raise UserError(f"{where}: not JSON ({e}); expected {BOXES_FORMAT}") from e
  return parse_boxes(text, where)


def parse_boxes(text: str, where: str = "boxes") -> tuple[np.ndarray, np.ndarray | None]:
  """JSON text in `BOXES_FORMAT` -> (boxes float64 [N, 4], scores float64 [N] or None); a
  `UserError` starting with `where` for anything else."""
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"{where}: not JSON ({e}); expected {BOXES_FORMAT}") from e
  scores = None
  if isinstance(data, dict):
    if "boxes" not in data:
      raise UserError(f"{where}: a JSON object needs a 'boxes' field; expected {BOXES_FORMAT}")
    scores = data.get("scores")
    data = data["boxes"]
  if not isinstance(data, list):
    raise UserError(f"{where}: holds a {type(data).__name__}; expected {BOXES_FORMAT}")
  for i, box in enumerate(data):
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
      raise UserError(f"{where}: box {i} is {json.dumps(box)}; each box is four numbers "
                      "[x1, y1, x2, y2] in original-image pixels")
  boxes = np.asarray(data, np.float64).reshape(-1, 4)
  bad = np.flatnonzero(~np.isfinite(boxes).all(-1))
  if bad.size:
    raise UserError(f"{where}: box {int(bad[0])} has non-finite coordinates "
                    f"{boxes[bad[0]].tolist()}; give finite pixel coordinates")
  bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
  if bad.size:
    raise UserError(f"{where}: box {int(bad[0])} {boxes[bad[0]].tolist()} is inverted or empty "
                    f"({bad.size} such box(es)); boxes are [x1, y1, x2, y2] with x1 < x2 and "
                    "y1 < y2 (corners, not [x, y, width, height])")
  if scores is not None:
    if not (isinstance(scores, list) and all(_number(v) for v in scores)
            and len(scores) == len(boxes) and np.isfinite(np.asarray(scores, np.float64)).all()):
      raise UserError(f"{where}: 'scores' must be {len(boxes)} finite numbers, one per box")
    scores = np.asarray(scores, np.float64).reshape(-1)
  return boxes, scores


def report_boxes(boxes: np.ndarray, scores, width: int, height: int, max_objects: int) -> list[str]:
  """The notes a user should see about their boxes: outside the image, more than the model has
  object tags for."""
  from chatrex_jax.protocol.image import select_boxes
  notes = []
  outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
  if outside.any():
    notes.append(f"{int(outside.sum())} box(es) extend outside the {width}x{height} image; kept "
                 "unchanged, as the official processor does (no clipping)")
  overflow = select_boxes(boxes, scores, max_objects).note()
  if overflow:
    notes.append(overflow)
  return notes


def check_output_paths(*paths) -> None:
  """Output files go to existing folders (checked before any model runs)."""
  for path in paths:
    if path is None:
      continue
    p = pathlib.Path(path)
    if p.is_dir():
      raise UserError(f"output {path} is a folder; give a file name (e.g. {p / 'prediction.png'})")
    if not p.absolute().parent.is_dir():
      raise UserError(f"output {path}: folder {p.absolute().parent} does not exist; create it "
                      "or write elsewhere")


def check_checkpoint(path) -> None:
  """A ChatRex checkpoint folder: exists, holds config.json."""
  p = pathlib.Path(path)
  if not p.is_dir():
    raise UserError(f"--checkpoint {path}: {'not a folder' if p.exists() else 'does not exist'}; "
                    "give a ChatRex checkpoint folder (config.json, safetensors, tokenizer), e.g. "
                    "a demo's chatrex/stage3/export or `chatrex-jax convert chatrex` output")
  if not (p / "config.json").is_file():
    raise UserError(f"--checkpoint {path}: no config.json; give a ChatRex checkpoint folder "
                    "(`chatrex-jax convert chatrex --from OFFICIAL --to DIR` writes one)")


def upn_proposals(upn_path, image, prompt_type: str, min_score: float, nms: float, config: str = "large"):
  from chatrex_jax.inference.upn import UPNPredictor
  from chatrex_jax.inference.upn_predict import load_config
  predictor = UPNPredictor.from_checkpoint(upn_path, load_config(config))
  result = predictor([image], prompt_type=prompt_type)
  props = predictor.filter(result, min_score=min_score, nms_iou=nms if nms > 0 else None)[0]
  return np.asarray(props.boxes, np.float64).reshape(-1, 4), np.asarray(props.scores, np.float64)


def default_prompt_type(task: str) -> str:
  """UPN prompt when --prompt-type is not given: coarse-grained for grounded chat (the official
  tests/test_chatrex_grounded_conversation.py), fine-grained otherwise (the detection and
  grounded-caption tests, the gradio demo's default)."""
  return "coarse" if task == "chat" else "fine"


def objects_from_query(task: str, query: str | None):
  """--query -> the `objects` of `prompts.question`: box indices for region_caption ("0,2",
  "<obj0>,<obj2>"), else the gradio demo's "; "-joined pieces ("dog,cat" -> "dog; cat")."""
  if query is None:
    return None
  if task == "region_caption":
    return prompts.region_indices(query)
  return prompts.join_query(query)


@command("predict")
def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="chatrex-jax predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", help="ChatRex/RexSeek checkpoint folder (config.json, safetensors, tokenizer)")
  p.add_argument("--image", required=True)
  p.add_argument("--task", choices=prompts.TASK_NAMES, default="detect")
  p.add_argument("--query", help="categories / expressions ('dog,cat' -> 'dog; cat', as the "
                                 "official demo) or, for region_caption, box indices ('0,2' or "
                                 "'<obj0>,<obj2>')")
  p.add_argument("--granularity", help="region_caption: category|short_phrase|brief|one_sentence; "
                                       "grounded_caption: brief|detailed")
  p.add_argument("--text", help="the question for --task chat")
  p.add_argument("--raw-question", action="store_true",
                 help="--task chat: send --text verbatim, without the 'Answer the question in "
                      "grounded format. ' prefix (the official gradio demo's raw question)")
  group = p.add_mutually_exclusive_group()
  group.add_argument("--boxes", help="JSON file of input boxes (xyxy, original pixels)")
  group.add_argument("--upn", help="UPN checkpoint (.pth or .safetensors) to propose the boxes")
  p.add_argument("--prompt-type", choices=("fine", "coarse"), default=None,
                 help="UPN prompt (default: coarse for --task chat, fine otherwise)")
  p.add_argument("--upn-config", default="large", help="UPN model: large | tiny | FILE[:ARG]")
  p.add_argument("--min-score", type=float, default=0.3)
  p.add_argument("--nms", type=float, default=0.8, help="NMS IoU threshold; <= 0 disables")
  p.add_argument("--max-new-tokens", type=int, default=512)
  p.add_argument("--chat-template", choices=("qwen_chat", "vicuna_v1"), default=None,
                 help="default: the tokenizer's own (its Jinja template, else its vocabulary: "
                      "<|im_start|> -> qwen_chat, a sentencepiece <s> -> vicuna_v1)")
  p.add_argument("--system", default=None,
                 help="system turn (default: the template's own: LLaVA's vicuna_v1 sentence, none "
                      "for qwen_chat); '' leaves it out")
  p.add_argument("--out", default="prediction.png", help="PNG with the boxes drawn")
  p.add_argument("--json", help="also write the parsed result here")
  args = p.parse_args(argv)
  if args.raw_question and args.task != "chat":
    p.error("--raw-question applies to --task chat only")
  check_output_paths(args.out, args.json)
  if not args.checkpoint:  # proposals only
    if not args.upn:
      p.error("give --checkpoint (ChatRex) and/or --upn (proposals only)")
    from chatrex_jax.inference import upn_predict
    prompt_type = args.prompt_type or default_prompt_type(args.task)
    return upn_predict.main(["--upn", args.upn, "--image", args.image, "--prompt-type", prompt_type,
                             "--min-score", str(args.min_score), "--nms", str(args.nms),
                             "--out", args.out, "--config", args.upn_config])

  try:  # the question is checked before any model is loaded
    task_kw = dict(objects=objects_from_query(args.task, args.query),
                   granularity=args.granularity, text=args.text, raw_question=args.raw_question)
    prompts.question(args.task, task_kw["objects"], granularity=args.granularity, text=args.text,
                     raw=args.raw_question)
  except ValueError as e:
    p.error(str(e))

  from PIL import Image

  from chatrex_jax.inference import visualize
  from chatrex_jax.protocol.image import load_image, select_boxes
  check_checkpoint(args.checkpoint)
  given = read_boxes(args.boxes) if args.boxes else None   # a bad file fails before any model loads
  image = Image.fromarray(load_image(args.image).rgb)
  scores = None
  if args.upn:
    prompt_type = args.prompt_type or default_prompt_type(args.task)
    boxes, scores = upn_proposals(args.upn, image, prompt_type, args.min_score, args.nms,
                                  args.upn_config)
    print(f"UPN: {len(boxes)} proposals ({prompt_type}-grained prompt)", file=sys.stderr)
  elif given is not None:
    boxes, scores = given
    for note in report_boxes(boxes, scores, image.width, image.height, C.MAX_NUM_OBJECTS):
      print(f"warning: {note}", file=sys.stderr)
  else:
    boxes = np.zeros((0, 4))

  if args.task == "region_caption":
    kept = select_boxes(boxes, scores).indices.shape[0]
    bad = [i for i in task_kw["objects"] if i >= kept]
    if bad:
      p.error(f"--query names box(es) {bad} but there are only {kept} input boxes")

  from chatrex_jax.inference.pipeline import ChatRexPipeline
  pipe = ChatRexPipeline.from_checkpoint(args.checkpoint, template=args.chat_template,
                                         system=args.system)
  pred = pipe.run(image, args.task, boxes=boxes, scores=scores,
                  max_new_tokens=args.max_new_tokens, **task_kw)
  result = pred.to_dict()
  # the same selection the processor made (it warned and noted it in pred.notes)
  result["box_overflow"] = select_boxes(boxes, scores, pipe.processor.max_objects).to_dict()
  print(pred.answer)
  print(json.dumps(result["parsed"]))
  if args.json:
    with atomic_path(args.json) as tmp:
      tmp.write_text(json.dumps(result, indent=2))
  boxes_drawn, labels = [], []
  for phrase in pred.parsed.phrases:
    for box in np.asarray(phrase.boxes).reshape(-1, 4):
      boxes_drawn.append(box)
      labels.append(phrase.phrase)
  drawn = visualize.draw_boxes(image, np.asarray(boxes_drawn).reshape(-1, 4), labels=labels)
  with atomic_path(args.out) as tmp:
    drawn.save(tmp, format="PNG")
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
