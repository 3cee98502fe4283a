"""`chatrex-jax serve`: the official gradio demos (UPN proposals; ChatRex tasks) on the JAX pipeline.

  chatrex-jax serve                                   # the models `chatrex-jax demo` trained in ./chatrex_demo
  chatrex-jax serve --checkpoint ChatRex-7B --upn upn_large.pth --port 7860

Two tabs: "UPN" (image, fine or coarse prompt, score threshold, NMS -> proposals) and "ChatRex"
(image, task, categories / expression / question, boxes from UPN or drawn on the image or typed
as JSON -> the answer, its boxes drawn with their phrases, the parsed JSON). The models load and
compile once at start-up; requests are queued and served one at a time. Every input problem is
a message in the page. The same endpoints answer `gradio_client` (api names "propose" and
"answer").
"""
from __future__ import annotations

import argparse
import sys

from chatrex_jax.errors import command
from chatrex_jax.serve.models import Models, load_models
from chatrex_jax.serve.service import BOX_SOURCES, TASKS, RequestError, Service

GRANULARITIES = ("", "category", "short_phrase", "brief", "one_sentence", "detailed")
HELP = """**ChatRex** - pick a task; boxes come from UPN, or from you: draw rectangles on the image
(brush) or type JSON like `[[10, 20, 200, 180]]`. Categories: `dog,cat` or `dog; cat`. Regions
for region captions: `0,2` or `<obj0>,<obj2>` (empty: every box)."""


def _upn_controls(gr, prompt_label: str):
  """The UPN settings both tabs offer: (prompt, score threshold, NMS IoU)."""
  return (gr.Radio(["fine", "coarse"], value="fine", label=prompt_label),
          gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="score threshold"),
          gr.Slider(0.0, 1.0, value=0.8, step=0.01, label="NMS IoU (0: off)"))


def build_app(service: Service):
  """The gradio Blocks of both demos, bound to `service`."""
  import gradio as gr

  def call(fn, *args, **kw):
    try:
      return fn(*args, **kw)
    except RequestError as e:
      raise gr.Error(str(e), print_exception=False) from None

  def propose(image, prompt_type, min_score, nms, progress=gr.Progress()):
    progress(0.1, desc="UPN")
    drawn, result = call(service.propose, image, prompt_type, min_score, nms)
    for note in result["notes"]:
      gr.Warning(note)
    return drawn, result

  def answer(editor, task, query, granularity, question, raw, box_source, boxes_json, prompt_type,
             min_score, nms, progress=gr.Progress()):
    progress(0.1, desc="ChatRex")
    editor = editor or {}
    image = editor.get("background") if isinstance(editor, dict) else editor
    layers = editor.get("layers") if isinstance(editor, dict) else None
    out = call(service.answer, image, task, query=query, granularity=granularity or None,
               question=question, raw_question=bool(raw), box_source=box_source,
               boxes_json=boxes_json or "", drawn_layers=layers, prompt_type=prompt_type,
               min_score=min_score, nms=nms)
    for note in out.result["notes"]:
      gr.Warning(note)
    return out.image, out.answer, out.result

  with gr.Blocks(title="chatrex-jax") as app:
    gr.Markdown("# chatrex-jax: UPN and ChatRex")
    if service.models.problems:
      gr.Markdown("**Not every model is loaded.** " + " ".join(service.models.problems),
                  elem_id="model-problems")
    gr.Markdown(f"`{service.models.describe().splitlines()[0]}` / "
                f"`{service.models.describe().splitlines()[1]}`")
    with gr.Tab("UPN", id="upn"):
      with gr.Row():
        with gr.Column():
          upn_image = gr.Image(type="filepath", label="image", elem_id="upn-image")
          upn_prompt, upn_score, upn_nms = _upn_controls(gr, "prompt")
          upn_run = gr.Button("Propose", variant="primary", elem_id="upn-run")
        with gr.Column():
          upn_out = gr.Image(type="pil", format="png", label="proposals", elem_id="upn-output")
          upn_json = gr.JSON(label="boxes and scores", elem_id="upn-json")
      upn_run.click(propose, [upn_image, upn_prompt, upn_score, upn_nms], [upn_out, upn_json],
                    api_name="propose")
    with gr.Tab("ChatRex", id="chatrex"):
      gr.Markdown(HELP)
      with gr.Row():
        with gr.Column():
          editor = gr.ImageEditor(type="filepath", label="image (draw boxes with the brush)",
                                  elem_id="chatrex-image", layers=False, transforms=())
          task = gr.Dropdown(list(TASKS), value="detect", label="task", elem_id="chatrex-task")
          query = gr.Textbox(label="categories / expression / regions", elem_id="chatrex-query")
          granularity = gr.Dropdown(list(GRANULARITIES), value="", label="granularity (captions)")
          question = gr.Textbox(label="question (chat)", elem_id="chatrex-question")
          raw = gr.Checkbox(False, label="send the question verbatim (no grounded-format prefix)")
          box_source = gr.Radio(list(BOX_SOURCES), value=BOX_SOURCES[0], label="boxes")
          boxes_json = gr.Textbox(label="boxes as JSON (optional)", elem_id="chatrex-boxes")
          with gr.Accordion("UPN settings", open=False):
            prompt_type, score, nms = _upn_controls(gr, "UPN prompt")
          run = gr.Button("Answer", variant="primary", elem_id="chatrex-run")
        with gr.Column():
          out_image = gr.Image(type="pil", format="png", label="answer", elem_id="chatrex-output")
          out_text = gr.Textbox(label="raw answer", elem_id="chatrex-answer")
          out_json = gr.JSON(label="parsed (phrase -> boxes)", elem_id="chatrex-json")
      run.click(answer, [editor, task, query, granularity, question, raw, box_source, boxes_json,
                         prompt_type, score, nms], [out_image, out_text, out_json], api_name="answer")
  app.queue(default_concurrency_limit=1)
  return app


def serve(models: Models, *, host: str = "127.0.0.1", port: int = 7860, warm_up: bool = True,
          block: bool = True):
  """Builds the app on `models`, compiles the request path and starts the server."""
  service = Service(models)
  if warm_up:
    service.warm_up()
  app = build_app(service)
  app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
             show_error=True)
  return app


@command("serve")
def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="chatrex-jax serve", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="chatrex_demo",
                 help="a `chatrex-jax demo` work directory: its models are the defaults")
  p.add_argument("--checkpoint", help="ChatRex folder (official layout: config.json, safetensors, tokenizer)")
  p.add_argument("--upn", help="UPN checkpoint (.pth or .safetensors)")
  p.add_argument("--upn-config", default="large", help="UPN model for --upn: large | tiny | FILE[:ARG]")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=7860)
  args = p.parse_args(argv)
  if not 0 < args.port < 65536:
    p.error(f"--port {args.port} is not a TCP port (1-65535)")
  models = load_models(workdir=args.workdir, checkpoint=args.checkpoint, upn=args.upn,
                       upn_config=args.upn_config)
  print(models.describe(), file=sys.stderr)
  print(f"serving on http://{args.host}:{args.port}", file=sys.stderr)
  serve(models, host=args.host, port=args.port)
  return 0

