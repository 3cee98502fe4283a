"""ChatRex processor: golden fixture, live official arithmetic, input policy, prompts, batching.

The live reference is the official pipeline rebuilt from its parts: RexSeek's `expand2square`
(PIL paste, copied below), transformers' PIL CLIP image processor at 768 (the
`modify_processor_resolution` settings), `torch.nn.functional.interpolate` bilinear to 336 and
the official box functions - run on real photographs (the golden fixture's images) cut /
resized / converted into every input kind of issue 6.
"""
from __future__ import annotations

import io
import pathlib
import warnings

import numpy as np
from PIL import Image
import pytest
import torch

from chatrex_jax.inference import processor as P
from chatrex_jax.protocol import image as I
from chatrex_jax.protocol import image as image_protocol
from chatrex_jax.protocol import prompts, tokenize

FIXTURE = "processor_rexseek"


# ------------------------------------------------------------------------------------------
# the official reference


def official_expand2square(pil_img, background_color):
  """RexSeek rexseek/utils/inference_utils.py::expand2square (verbatim logic)."""
  width, height = pil_img.size
  if width == height:
    return pil_img
  if width > height:
    result = Image.new(pil_img.mode, (width, width), background_color)
    result.paste(pil_img, (0, (width - height) // 2))
    return result
  result = Image.new(pil_img.mode, (height, height), background_color)
  result.paste(pil_img, ((height - width) // 2, 0))
  return result


def official_boxes(bbox, ori_wh):
  """xyxy_to_xywh -> pad_boxes -> resize_boxes -> xywh_to_xyxy as the official code runs them."""
  b = np.array([list(map(float, x)) for x in bbox])
  b = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], -1)
  old_w, old_h = ori_wh
  g = np.array(b).astype(np.float32)
  if old_w > old_h:
    g[:, 1] += (old_w - old_h) // 2
  else:
    g[:, 0] += (old_h - old_w) // 2
  s = max(old_w, old_h)
  g = np.array(g).astype(np.float32)
  g[:, 0] *= 768 / s
  g[:, 1] *= 768 / s
  g[:, 2] *= 768 / s
  g[:, 3] *= 768 / s
  return np.stack([g[:, 0], g[:, 1], g[:, 0] + g[:, 2], g[:, 1] + g[:, 3]], -1)


@pytest.fixture(scope="module")
def clip_processor():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  return CLIPImageProcessorPil(size={"shortest_edge": 768}, crop_size={"height": 768, "width": 768},
                               image_mean=list(I.CLIP_MEAN), image_std=list(I.CLIP_STD))


def official_pipeline(image, clip_processor):
  """prepare_input_for_rexseek's pixel part: (pixel_values_aux, pixel_values), NCHW."""
  if isinstance(image, (str, pathlib.Path)):
    image = Image.open(image).convert("RGB")
  square = official_expand2square(image, tuple(int(x * 255) for x in I.CLIP_MEAN))
  aux = clip_processor.preprocess(square, return_tensors="pt")["pixel_values"]
  clip = torch.nn.functional.interpolate(aux, size=[336, 336], mode="bilinear",
                                         align_corners=False)
  return aux.numpy(), clip.numpy()


@pytest.fixture(scope="module")
def photos(golden_dir):
  with np.load(golden_dir / FIXTURE / "inputs.npz") as z:
    return {k[:-len("_image")]: z[k] for k in z.files if k.endswith("_image")}


def assert_same_pixels(ours: image_protocol.ProcessedImage, ref_aux, ref_clip):
  got = ours.nchw()
  np.testing.assert_array_equal(got["pixel_values_aux"], ref_aux)  # bit-exact
  err = np.abs(got["pixel_values"] - ref_clip).max()
  assert err <= 1e-5, err


# ------------------------------------------------------------------------------------------
# golden fixture


def test_golden_fixture_passes(golden_dir):
  from chatrex_jax.tools import check_equivalence
  out = io.StringIO()
  ok = check_equivalence.check(golden_dir / FIXTURE, out=out)
  assert ok, out.getvalue()
  assert f"PASS {FIXTURE}" in out.getvalue()


def test_golden_is_bit_exact(golden_dir):
  """Stronger than the fixture tolerance: every array is bit-identical (numbers in the report)."""
  from chatrex_jax.tools.equivalence import processor as runner
  from chatrex_jax.tools.equivalence.registry import Fixture
  fx = Fixture(golden_dir / FIXTURE)
  got = runner.run_processor_rexseek(fx).outputs
  for k, want in fx.outputs.items():
    np.testing.assert_array_equal(got[k], want, err_msg=k)


# ------------------------------------------------------------------------------------------
# bilinear 768 -> 336 vs live PyTorch


@pytest.mark.parametrize("shape,out", [((768, 768), (336, 336)), ((37, 53), (11, 90)),
                                       ((5, 5), (17, 3)), ((1, 9), (4, 4))])
def test_torch_bilinear_matches_pytorch(shape, out):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3,) + shape).astype(np.float32) * 2
  want = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=list(out),
                                         mode="bilinear", align_corners=False)[0].numpy()
  got = image_protocol.torch_bilinear_resize(x.transpose(1, 2, 0), *out).transpose(2, 0, 1)
  assert got.dtype == np.float32 and got.shape == want.shape
  err = np.abs(got - want).max()
  assert err <= 1e-6, err  # bit-exact on x86 builds; 1e-6 leaves room for a non-FMA build


@pytest.mark.parametrize("shape", [(64, 48, 3), (2, 1, 3), (3, 5, 3), (1, 1, 3)])
def test_normalisation_lookup_is_transformers_arithmetic(shape):
  """Both lookups (byte pairs for an even byte count, single bytes otherwise) give exactly
  transformers' rescale + normalise, for every level in every channel position."""
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, shape, dtype=np.uint8)
  if pixels.size >= 768:
    pixels.reshape(-1)[:768] = np.repeat(np.arange(256, dtype=np.uint8), 3)
  rescaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
  want = (rescaled - np.asarray(I.CLIP_MEAN, np.float32)) / np.asarray(I.CLIP_STD, np.float32)
  got = I._normalise(pixels, I.CLIP_MEAN, I.CLIP_STD)
  assert got.dtype == np.float32 and got.shape == shape
  np.testing.assert_array_equal(got, want)
  # a crop (not contiguous) reads the same values
  np.testing.assert_array_equal(I._normalise(pixels[:, :1], I.CLIP_MEAN, I.CLIP_STD),
                                want[:, :1])


# ------------------------------------------------------------------------------------------
# live official arithmetic on every kind of input of issue 6


def _crop(a, x0, y0, x1, y1):
  return np.ascontiguousarray(a[y0:y1, x0:x1])


def test_aspect_ratios_match_official(photos, clip_processor):
  proc = P.ChatRexProcessor()
  base = photos["detection"]  # 683 x 512 real photograph
  cases = {
      "landscape": base,
      "portrait": _crop(base, 100, 0, 391, 512),
      "square": _crop(base, 50, 10, 450, 410),
      "odd_pad": _crop(base, 0, 0, 300, 97),  # odd padding total
  }
  for arr in cases.values():
    ref_aux, ref_clip = official_pipeline(Image.fromarray(arr), clip_processor)
    assert_same_pixels(proc.preprocess_image(arr), ref_aux, ref_clip)
    assert_same_pixels(proc.preprocess_image(Image.fromarray(arr)), ref_aux, ref_clip)


def test_tiny_images_match_official(photos, clip_processor):
  proc = P.ChatRexProcessor()
  photo = Image.fromarray(photos["install"])
  for size in [(1, 1), (2, 7), (9, 4), (3, 3)]:
    small = photo.resize(size, Image.LANCZOS)
    ref_aux, ref_clip = official_pipeline(small, clip_processor)
    out = proc.preprocess_image(small, [[0, 0, size[0], size[1]]])
    assert_same_pixels(out, ref_aux, ref_clip)
    np.testing.assert_array_equal(out.boxes, official_boxes([[0, 0, size[0], size[1]]], size))


def test_huge_image_matches_official_and_limit(photos, clip_processor):
  proc = P.ChatRexProcessor()
  huge = Image.fromarray(photos["upn"]).resize((3000, 2124), Image.BICUBIC)
  ref_aux, ref_clip = official_pipeline(huge, clip_processor)
  assert_same_pixels(proc.preprocess_image(huge), ref_aux, ref_clip)
  with pytest.raises(image_protocol.ImageInputError, match="max_square_side"):
    P.ChatRexProcessor(max_square_side=2999).preprocess_image(huge)


def test_grayscale(photos, clip_processor, tmp_path):
  gray = photos["gray_portrait"][..., 0]  # 251 x 426, mode L
  pil = Image.fromarray(gray)
  path = tmp_path / "gray.png"
  pil.save(path)
  ref_aux, ref_clip = official_pipeline(str(path), clip_processor)  # official path branch
  proc = P.ChatRexProcessor()
  for feed in (str(path), pil, gray, gray[..., None]):
    assert_same_pixels(proc.preprocess_image(feed), ref_aux, ref_clip)
  # the official PIL-object branch refuses a non-square mode-L image (recorded in meta.json)
  with pytest.raises(TypeError):
    official_expand2square(pil, (122, 116, 104))
  # a square L image works officially (the CLIP processor converts it) and here
  sq = Image.fromarray(gray[:251, :251])
  assert_same_pixels(proc.preprocess_image(sq), *official_pipeline(sq, clip_processor))


def test_rgba_composited_on_white_like_official(photos, clip_processor):
  rgb = photos["portrait_crop"]
  alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :].repeat(rgb.shape[0], 0)
  rgba = np.dstack([rgb, alpha])
  pil = Image.fromarray(rgba, "RGBA")
  ref_aux, ref_clip = official_pipeline(pil, clip_processor)  # official PIL-object branch
  proc = P.ChatRexProcessor()
  assert_same_pixels(proc.preprocess_image(pil), ref_aux, ref_clip)
  assert_same_pixels(proc.preprocess_image(rgba), ref_aux, ref_clip)
  la = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA")  # official raises on LA
  out = proc.preprocess_image(la)
  assert np.isfinite(out.pixel_values_aux).all()


def test_16bit_png(photos, clip_processor, tmp_path):
  gray8 = photos["gray_portrait"][..., 0]
  gray16 = gray8.astype(np.uint16) * 256 + 77  # high byte == the 8-bit image
  path = tmp_path / "g16.png"
  Image.fromarray(gray16).save(path)
  assert Image.open(path).mode.startswith("I")
  proc = P.ChatRexProcessor()
  want_aux, want_clip = official_pipeline(Image.fromarray(gray8).convert("RGB"), clip_processor)
  assert_same_pixels(proc.preprocess_image(str(path)), want_aux, want_clip)
  assert_same_pixels(proc.preprocess_image(gray16), want_aux, want_clip)
  # the official path branch saturates 16-bit data (documented deviation)
  assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.9


def test_exif_rotated_jpeg(photos, clip_processor, tmp_path):
  arr = photos["install"]
  path = tmp_path / "rot.jpg"
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 CW on display
  Image.fromarray(arr).save(path, quality=95, exif=exif)
  proc = P.ChatRexProcessor()
  out = proc.preprocess_image(str(path))
  assert out.size_wh == (arr.shape[1], arr.shape[0])  # stored frame, as the official code
  assert any("EXIF orientation 6 NOT applied" in n for n in out.notes)
  ref = official_pipeline(str(path), clip_processor)
  assert_same_pixels(out, *ref)
  turned = P.ChatRexProcessor(exif_transpose=True).preprocess_image(str(path))
  assert turned.size_wh == (arr.shape[0], arr.shape[1])
  from PIL import ImageOps
  ref_t = official_pipeline(ImageOps.exif_transpose(Image.open(path)).convert("RGB"),
                            clip_processor)
  assert_same_pixels(turned, *ref_t)


def test_refusals(tmp_path):
  proc = P.ChatRexProcessor()
  with pytest.raises(image_protocol.ImageInputError, match="float"):
    proc.preprocess_image(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(image_protocol.ImageInputError, match="empty"):
    proc.preprocess_image(np.zeros((0, 4, 3), np.uint8))
  with pytest.raises(image_protocol.ImageInputError, match="shape"):
    proc.preprocess_image(np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(image_protocol.ImageInputError, match="mode F"):
    proc.preprocess_image(Image.fromarray(np.zeros((4, 4), np.float32)))
  with pytest.raises(image_protocol.ImageInputError, match="not found"):
    proc.preprocess_image(str(tmp_path / "missing.png"))
  bad = tmp_path / "bad.jpg"
  bad.write_bytes(b"not an image")
  with pytest.raises(image_protocol.ImageInputError, match="not a readable image"):
    proc.preprocess_image(str(bad))
  with pytest.raises(image_protocol.ImageInputError, match="unsupported image input"):
    proc.preprocess_image(12)


# ------------------------------------------------------------------------------------------
# boxes


def test_boxes_match_official_and_invert():
  rng = np.random.default_rng(3)
  for wh in [(640, 426), (287, 512), (375, 375), (1, 9)]:
    b = rng.uniform(-50, 700, size=(13, 4)).astype(np.float32)
    got = image_protocol.transform_boxes(b, wh)
    np.testing.assert_array_equal(got, official_boxes(b, wh))
    back = image_protocol.boxes_to_original(got, wh)
    assert np.abs(back - b).max() <= 1e-3 * max(wh)


def test_box_policy():
  img = np.zeros((10, 20, 3), np.uint8)
  boxes = np.tile(np.array([[0, 0, 5, 5]], np.float32), (103, 1))
  boxes[:, 2] += np.arange(103)
  # No scores: the first 100 (RexSeek evaluate_rexseek.py), one warning, one note.
  with pytest.warns(image_protocol.BoxOverflowWarning) as caught:
    out = P.ChatRexProcessor().preprocess_image(img, boxes)
  assert len(caught) == 1 and "3 of 103 boxes dropped (rule 'first'" in str(caught[0].message)
  assert out.boxes.shape == (100, 4) and out.num_boxes_dropped == 3
  np.testing.assert_array_equal(out.boxes_original, boxes[:100])
  assert [n for n in out.notes if "dropped" in n] == [str(caught[0].message)]
  assert out.box_selection.to_dict() == {"given": 103, "kept": 100, "dropped": 3, "rule": "first"}
  # Scores: the 100 highest-scoring, in input order (ties: the earlier box).
  scores = np.linspace(1, 0.5, 103)
  scores[5] = -1.0
  scores[100:] = 0.1  # a three-way tie at the cut: 100 stays, 101 and 102 go
  with pytest.warns(image_protocol.BoxOverflowWarning, match="rule 'highest_score'"):
    out = P.ChatRexProcessor().preprocess_image(img, boxes, scores)
  keep = [i for i in range(103) if i not in (5, 101, 102)]
  np.testing.assert_array_equal(out.box_selection.indices, keep)
  np.testing.assert_array_equal(out.boxes_original, boxes[keep])
  np.testing.assert_array_equal(out.boxes, image_protocol.transform_boxes(boxes[keep], (20, 10)))
  # Sorted scores (UPN proposals) keep the first 100, as without scores.
  sorted_sel = image_protocol.select_boxes(boxes, np.round(np.linspace(0.9, 0.3, 103), 2))
  np.testing.assert_array_equal(sorted_sel.indices, np.arange(100))
  assert sorted_sel.rule == "highest_score"
  # At or under the cap nothing is dropped and nothing is said.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = P.ChatRexProcessor().preprocess_image(img, boxes[:100], scores[:100])
  assert out.num_boxes_dropped == 0 and out.box_selection.rule is None
  assert not any("dropped" in n for n in out.notes)
  with pytest.raises(ValueError, match="scores for"):
    P.ChatRexProcessor().preprocess_image(img, boxes, scores[:5])
  with pytest.raises(ValueError, match="at most max_objects=100"):
    P.ChatRexProcessor(box_overflow="raise").preprocess_image(img, boxes)
  with pytest.raises(ValueError, match="non-finite"):
    P.ChatRexProcessor().preprocess_image(img, [[0, 0, np.nan, 1]])
  with pytest.raises(ValueError, match=r"\[N, 4\]"):
    P.ChatRexProcessor().preprocess_image(img, [[0, 0, 1]])
  for empty in (None, [], np.zeros((0, 4))):
    out = P.ChatRexProcessor().preprocess_image(img, empty)
    assert out.boxes.shape == (0, 4)


# ------------------------------------------------------------------------------------------
# prompts


def test_prompts_match_fixture(golden_dir):
  import json
  meta = json.loads((golden_dir / FIXTURE / "meta.json").read_text())
  proc = P.ChatRexProcessor(template="qwen_chat")
  for case in meta["config"]["cases"]:
    n = meta["cases"][case["name"]]["num_boxes"]
    _, prompt = proc.prompt(case["question"], n)
    assert prompt == meta["prompts"][case["name"]]
    assert (tokenize.split_special_strings(prompt)
            == meta["prompt_chunks_split_special_strings"][case["name"]])


def test_user_text():
  assert prompts.build_user_text("Hi <image>there", 0) == "<image>\n\nHi there"
  assert prompts.build_user_text("<image>\nQ?", 2) == "<image>\n<obj0><objfeat><obj1><objfeat>\n\nQ?"
  with pytest.raises(ValueError):
    prompts.object_string(101)


def test_task_questions():
  q = prompts.question
  assert q("detect", "person; pigeon") == ("Please detect person; pigeon in this image. Answer the "
                                           "question with object indexes.")
  assert q("detect", ["person", " pigeon "]) == q("detect", "person; pigeon")
  assert q("refer", "the man in red").startswith("Please detect the man in red in this image.")
  assert q("region_caption", [0, 3], granularity="category") == (
      "What is the category name of <obj0>; <obj3>? Answer the question with its category name in "
      "free format.")
  assert q("region_caption", 1, granularity="one_sentence") == (
      "Can you provide a one sentence description of <obj1> in the image? Answer the question "
      "with a one sentence description.")
  assert q("region_caption", "<obj2>", granularity="brief") == (
      "Can you provide me with a brief description of <obj2>? Answer the question with brief "
      "description.")
  assert q("region_caption", 0, granularity="short_phrase").startswith(
      "Can you provide me with a short phrase to describe <obj0>?")
  assert q("grounded_caption", granularity="brief").startswith("Please breifly describe this image")
  assert q("grounded_caption", granularity="detailed").startswith(
      "Please provide a detailed description of the image")
  assert q("count", "apples").startswith("How many apples are there in this image?")
  assert q("chat", text="Who am I?") == "Answer the question in grounded format. Who am I?"
  assert q("detect", "cat", variant=1) == "Detect cat with object indexes."
  for bad in [dict(task="nope"), dict(task="detect"), dict(task="region_caption", objects=0,
              granularity="long"), dict(task="detect", objects="x", variant=99)]:
    with pytest.raises(ValueError):
      q(**bad)


def test_demo_question_builder():
  """The official gradio demo's question_creater: split at ",", strip, join with "; "."""
  assert prompts.join_query("dog,cat") == "dog; cat"
  assert prompts.join_query(" dog , red car ") == "dog; red car"
  assert prompts.join_query("person; pigeon") == "person; pigeon"  # no comma: unchanged
  assert prompts.join_query("dog,,cat") == "dog; ; cat"  # empty pieces kept, as the demo
  assert prompts.join_query("<obj1>,<obj2>") == "<obj1>; <obj2>"
  assert prompts.region_indices("0,2") == [0, 2]
  assert prompts.region_indices("<obj1>,<obj2>") == [1, 2]
  assert prompts.region_indices(" <obj3> ; 0 5") == [3, 0, 5]
  assert prompts.region_indices([4, "<obj1>"]) == [4, 1] and prompts.region_indices(7) == [7]
  for bad in ("", "dog", "<obj1", "1>", "-1", "1.5", "<obj>"):
    with pytest.raises(ValueError):
      prompts.region_indices(bad)
  # region captions: the demo's "<obj1>,<obj2>" and integers give the same question
  q = prompts.question
  want = ("Can you provide me with a brief description of <obj1>; <obj2>? Answer the question "
          "with brief description.")
  for query in ("<obj1>,<obj2>", "1,2", "1 2"):
    assert q("region_caption", prompts.region_indices(query), granularity="brief") == want
  # chat: the grounded-format prefix, or the question verbatim (the demo's raw question box)
  text = "This is my room, what kind of person am I?  "
  assert q("chat", text=text) == "Answer the question in grounded format. " + text
  assert q("chat", text=text, raw=True) == text
  with pytest.raises(ValueError, match="chat"):
    q("detect", "cat", raw=True)
  from chatrex_jax.inference import predict
  assert predict.default_prompt_type("chat") == "coarse"
  assert {predict.default_prompt_type(t) for t in prompts.TASK_NAMES if t != "chat"} == {"fine"}
  assert predict.objects_from_query("detect", "dog,cat") == "dog; cat"
  assert predict.objects_from_query("region_caption", "<obj0>,<obj2>") == [0, 2]


# name -> (count, first element, sha256[:16] of "\n".join(list)) of the official lists at ChatRex
# HEAD b98028c (chatrex/tools/prompt_templates.py, unchanged since 40e6401).
OFFICIAL_LISTS_AT_HEAD = {
    "REGION_CAPTION_SINGLE_REGION_FREE_FORMAT_CATEGORY_NAME_STAGE2": (
        21, "What is the category name of [OBJ]? Answer the question with its category name in "
        "free format.", "1ea069ae7b988f23"),
    "REGION_CAPTION_SINGLE_REGION_SHORT_PHRASE_STAGE2": (
        20, "Can you provide me with a short phrase to describe [OBJ]? Answer the question with a "
        "short phrase.", "6327cd21c6f18456"),
    "REGION_CAPTION_SINGLE_REGION_BREIFLY_STAGE2": (
        17, "Can you provide me with a brief description of [OBJ]? Answer the question with brief "
        "description.", "9621994fe8eee584"),
    "REGION_CAPTION_ONE_SENTENCE_STAGE2": (
        18, "Can you provide a one sentence description of [OBJ] in the image? Answer the question "
        "with a one sentence description.", "59ab78fe58b700d0"),
    "COUNTING_SINGLE_REGION_STAGE2": (
        10, "How many [OBJ] are there in this image? Answer the question with the number of "
        "objects and locate them with object indexes.", "31accd1e8a6b93c8"),
    "GROUNDING_SINGLE_REGION_STAGE2": (
        21, "Please detect [OBJ] in this image. Answer the question with object indexes.",
        "625aa097a1a160be"),
    "BREIF_CAPTION_WITH_GROUDING_STAGE2": (
        22, "Please breifly describe this image in one sentence and detect all the mentioned "
        "objects. Answer the question with grounded answer.", "1bf00aedc2f8c96f"),
    "DETAILED_CAPTION_WITH_GROUDING_STAGE2": (
        21, "Please provide a detailed description of the image and detect all the mentioned "
        "objects. Answer the question with grounded object indexes.", "e13311bce8f42112"),
}


def test_template_lists():
  import hashlib
  assert list(prompts.OFFICIAL_NAMES) == list(OFFICIAL_LISTS_AT_HEAD)  # the file's order
  for name, (n, first, digest) in OFFICIAL_LISTS_AT_HEAD.items():
    official = prompts.official_list(name)
    assert len(official) == n and official[0] == first, name
    assert hashlib.sha256("\n".join(official).encode()).hexdigest()[:16] == digest, name
    assert official == prompts.OFFICIAL_NAMES[name]
    assert all("[OBJ]" in v for v in official) or "CAPTION_WITH" in name
  # The first commit (1d4363a) joined the first two literals of two lists (missing commas).
  for name in ("REGION_CAPTION_SINGLE_REGION_BREIFLY_STAGE2", "BREIF_CAPTION_WITH_GROUDING_STAGE2"):
    old = prompts.official_list(name, revision="1d4363a")
    assert len(old) == OFFICIAL_LISTS_AT_HEAD[name][0] - 1
    assert old[0] == prompts.OFFICIAL_NAMES[name][0] + prompts.OFFICIAL_NAMES[name][1]
  assert prompts.official_list("GROUNDING_SINGLE_REGION_STAGE2", revision="1d4363a") == (
      prompts.GROUNDING)
  with pytest.raises(ValueError, match="revision"):
    prompts.official_list("GROUNDING_SINGLE_REGION_STAGE2", revision="v2")


# ------------------------------------------------------------------------------------------
# batching


def test_batch_images_padding():
  proc = P.ChatRexProcessor()
  a = proc.preprocess_image(np.full((8, 12, 3), 7, np.uint8), [[0, 0, 4, 4], [1, 1, 2, 2]])
  b = proc.preprocess_image(np.full((12, 8, 3), 9, np.uint8), None)
  out = image_protocol.batch_images([a, b], max_objects=5)
  assert out["pixel_values"].shape == (2, 336, 336, 3)
  assert out["pixel_values_aux"].shape == (2, 768, 768, 3)
  assert out["boxes"].shape == (2, 5, 4) and out["box_mask"].tolist() == [
      [True, True, False, False, False], [False] * 5]
  np.testing.assert_array_equal(out["boxes"][0, :2], a.boxes)
  assert not out["boxes"][0, 2:].any() and out["num_boxes"].tolist() == [2, 0]
  with pytest.raises(ValueError, match="max_objects"):
    image_protocol.batch_images([a], max_objects=1)
