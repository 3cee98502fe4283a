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

from chatrex_jax.protocol import prompts


def read_boxes(path) -> tuple[np.ndarray, np.ndarray | None]:
  """A boxes file -> (boxes float64 [N, 4], scores float64 [N] or None)."""
  data = json.loads(pathlib.Path(path).read_text())
  scores = None
  if isinstance(data, dict):
    if "boxes" not in data:
      raise ValueError(f"{path}: a JSON object needs a 'boxes' field")
    scores = data.get("scores")
    data = data["boxes"]
  boxes = np.asarray(data, np.float64).reshape(-1, 4) if len(data) else np.zeros((0, 4))
  if not np.isfinite(boxes).all():
    raise ValueError(f"{path}: non-finite box coordinates")
  if scores is not None:
    scores = np.asarray(scores, np.float64).reshape(-1)
    if scores.shape[0] != boxes.shape[0] or not np.isfinite(scores).all():
      raise ValueError(f"{path}: 'scores' must be {boxes.shape[0]} finite numbers, one per box")
  return boxes, scores


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
  image = Image.fromarray(load_image(args.image).rgb)
  scores = None
  if args.upn:
    prompt_type = args.prompt_type or default_prompt_type(args.task)
    boxes, scores = upn_proposals(args.upn, image, prompt_type, args.min_score, args.nms,
                                  args.upn_config)
    print(f"UPN: {len(boxes)} proposals ({prompt_type}-grained prompt)", file=sys.stderr)
  elif args.boxes:
    boxes, scores = read_boxes(args.boxes)
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
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
  boxes_drawn, labels = [], []
  for phrase in pred.parsed.phrases:
    for box in np.asarray(phrase.boxes).reshape(-1, 4):
      boxes_drawn.append(box)
      labels.append(phrase.phrase)
  visualize.draw_boxes(image, np.asarray(boxes_drawn).reshape(-1, 4), labels=labels).save(args.out)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
