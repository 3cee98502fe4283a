"""ChatRex task prompts (docs/architecture.md C) and the user-text builder (docs/architecture.md B.7).

The template lists are ChatRex `chatrex/tools/prompt_templates.py` as it stands at the
repository's HEAD (b98028c; the file last changed in 40e6401): every variant, in the official
order, element [0] first (the gradio demo and the RexSeek evaluation use element [0]); `[OBJ]` is
replaced by a category / referring expression / `<objK>`, several joined with "; ".
`official_list(name)` gives each list under its official name.

History: the file's first commit (1d4363a) missed a comma after the first string of two lists
(brief region caption, brief grounded caption), so Python joined their first two literals into
one element (16 and 21 elements instead of 17 and 22); 40e6401 added the commas.
`official_list(name, revision="1d4363a")` rebuilds those lists as that commit evaluated them.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from chatrex_jax.protocol import tokens as C

REGION_CAPTION_CATEGORY = [
    "What is the category name of [OBJ]? Answer the question with its category name in free format.",
    "What is the category name of [OBJ]? Answer with its category name.",
    "Identify the category of [OBJ].",
    "What would you call [OBJ]? Provide its category name.",
    "Give the category name for [OBJ].",
    "Classify [OBJ] and provide its category name.",
    "What is the category of [OBJ]?",
    "What is [OBJ]'s category name?",
    "Describe [OBJ] with its category name.",
    "What is the most fitting category name for [OBJ]?",
    "Provide the category name for [OBJ].",
    "Classify [OBJ] and name its category.",
    "What is the category name for [OBJ]?",
    "What is the proper name for [OBJ]?",
    "Give the category for [OBJ].",
    "What would you categorize [OBJ] as?",
    "Name [OBJ] based on its category.",
    "What is the category name for [OBJ]?",
    "Give a category name for [OBJ].",
    "Provide the category name for [OBJ].",
    "What is the category of [OBJ]?",
]

REGION_CAPTION_SHORT_PHRASE = [
    "Can you provide me with a short phrase to describe [OBJ]? Answer the question with a short phrase.",
    "Give a short phrase that describes [OBJ].",
    "What short phrase can describe [OBJ]?",
    "Provide a short phrase for [OBJ].",
    "What is a short phrase that best represents [OBJ]?",
    "Describe [OBJ] using only a short phrase.",
    "Can you summarize [OBJ] with a short phrase?",
    "What is the best short phrase for [OBJ]?",
    "Offer a short phrase for [OBJ].",
    "What short phrase would you use for [OBJ]?",
    "Give a concise short phrase for [OBJ].",
    "What short phrase summarizes [OBJ]?",
    "Provide a suitable short phrase for [OBJ].",
    "What is a fitting short phrase for [OBJ]?",
    "What\u2019s an appropriate short phrase for [OBJ]?",
    "Give a quick short phrase to describe [OBJ].",
    "Can you suggest a short phrase for [OBJ]?",
    "What short phrase would you assign to [OBJ]?",
    "Provide a quick short phrase for [OBJ].",
    "What short phrase explains [OBJ]?",
]

REGION_CAPTION_BRIEF = [
    "Can you provide me with a brief description of [OBJ]? Answer the question with brief description.",
    "Give a brief description of [OBJ].",
    "What brief description can you provide for [OBJ]?",
    "Provide a brief description for [OBJ].",
    "What is a brief description of [OBJ]?",
    "Describe [OBJ] in a few sentences.",
    "Can you summarize [OBJ] with a brief description?",
    "What is the best brief description for [OBJ]?",
    "Offer a brief description for [OBJ].",
    "How would you describe [OBJ] briefly?",
    "What brief summary can describe [OBJ]?",
    "Provide a suitable brief description for [OBJ].",
    "What is a fitting brief description for [OBJ]?",
    "What\u2019s an appropriate brief description for [OBJ]?",
    "Can you suggest a brief description for [OBJ]?",
    "What brief description would you assign to [OBJ]?",
    "What brief description explains [OBJ]?",
]

REGION_CAPTION_ONE_SENTENCE = [
    "Can you provide a one sentence description of [OBJ] in the image? Answer the question with a one sentence description.",
    "Describe [OBJ] in one sentence.",
    "What is a one sentence description of [OBJ]?",
    "Provide a one sentence description for [OBJ].",
    "Summarize [OBJ] in one sentence.",
    "How would you describe [OBJ] in a single sentence?",
    "Give a one sentence summary of [OBJ].",
    "Describe [OBJ] using only one sentence.",
    "What is the best one sentence description for [OBJ]?",
    "Offer a one sentence description for [OBJ].",
    "What is a fitting one sentence to describe [OBJ]?",
    "What\u2019s an appropriate one sentence description for [OBJ]?",
    "Can you suggest a one sentence description for [OBJ]?",
    "Provide a one sentence explanation for [OBJ].",
    "What single sentence would describe [OBJ]?",
    "Give a concise one sentence description of [OBJ].",
    "What single sentence explains [OBJ]?",
    "How would you summarize [OBJ] in one sentence?",
]

COUNTING = [
    "How many [OBJ] are there in this image? Answer the question with the number of objects and locate them with object indexes.",
    "Can you count how many [OBJ] are present in the image? Provide the total count along with the corresponding object indexes.",
    "Identify and count all the [OBJ] in this image. Please return the number of objects and their respective indexes.",
    "How many instances of [OBJ] do you see in this image? Report the count and the indexes of each detected object.",
    "Locate all [OBJ] in this image and count them. Provide the number along with their object indexes.",
    "Please count the [OBJ] present in the image and provide their total number along with the index of each object.",
    "Count the number of [OBJ] visible in the image and give the total along with the index of each object.",
    "Determine how many [OBJ] are in this image and list their indexes along with the total count.",
    "Find and count all [OBJ] in the image. Provide the object indexes along with the total number.",
    "How many [OBJ] can you find in this image? Return the count and their respective object indexes.",
]

GROUNDING = [
    "Please detect [OBJ] in this image. Answer the question with object indexes.",
    "Detect [OBJ] with object indexes.",
    "Find [OBJ] in the image and provide the object indexes.",
    "Detect [OBJ] in the image and return the object indexes.",
    "What are the object indexes for [OBJ] in this image?",
    "Locate [OBJ] in the image and give the object indexes.",
    "Identify [OBJ] in the image and provide the corresponding indexes.",
    "Detect and return the indexes of [OBJ] in this image.",
    "Please locate [OBJ] and answer with its object indexes.",
    "Find the object indexes for [OBJ] in this image.",
    "Can you detect [OBJ] in the image? Provide the object indexes.",
    "Provide the object indexes for [OBJ] detected in this image.",
    "What are the indexes for [OBJ] detected in the image?",
    "Find [OBJ] in this image and answer with its indexes.",
    "Can you locate [OBJ] and provide the object indexes?",
    "Detect [OBJ] and return the object indexes in this image.",
    "Identify and give the object indexes for [OBJ] in the image.",
    "Please find [OBJ] in the image and return the indexes.",
    "Where is [OBJ] in this image? Provide the object indexes.",
    "Can you locate [OBJ] in this image and give the indexes?",
    "Please detect [OBJ] and provide the object indexes.",
]

GROUNDED_CAPTION_BRIEF = [
    # "breifly" is the official typo; the model was trained on it.
    "Please breifly describe this image in one sentence and detect all the mentioned objects. Answer the question with grounded answer.",
    "Please briefly describe this image and detect all the mentioned objects. Answer with grounded object indexes.",
    "Breifly describe this image with grounded answer",
    "Provide a brief description of this image and detect the objects mentioned in the description.",
    "Describe this image briefly and ground all the mentioned objects by providing their indexes.",
    "Give a concise description of the image and detect all the objects mentioned in the description.",
    "What is a brief description of the image? Provide the object indexes for all mentioned objects.",
    "Summarize this image briefly and ground the mentioned objects with their indexes.",
    "Describe this image and detect all the mentioned objects, returning their indexes.",
    "Provide a short description of the image and ground the objects that are mentioned.",
    "What is a quick description of this image? Detect the objects mentioned and provide their indexes.",
    "Give a brief description and detect all mentioned objects, grounding them with their object indexes.",
    "Can you briefly describe this image and also detect the mentioned objects? Provide grounded object indexes.",
    "What is a simple description of the image? Detect and provide indexes for the mentioned objects.",
    "Provide a short description and ground the objects mentioned in the image.",
    "Give a quick description of the image and provide the indexes of all mentioned objects.",
    "Summarize this image and ground all the objects mentioned by providing their indexes.",
    "Describe this image and detect all the mentioned objects. Provide grounded object indexes as the answer.",
    "What is a brief description of this image? Detect the objects in the description and provide their indexes.",
    "Offer a short summary of the image and ground all the mentioned objects by providing their object indexes.",
    "Provide a short caption of the image and detect all mentioned objects with their indexes.",
    "Give a concise summary of the image and detect all mentioned objects, returning their object indexes.",
]

GROUNDED_CAPTION_DETAILED = [
    "Please provide a detailed description of the image and detect all the mentioned objects. Answer the question with grounded object indexes.",
    "Give a thorough description of the image and detect all mentioned objects, providing their object indexes.",
    "Describe the image in detail and ground all the mentioned objects by returning their object indexes.",
    "What is a detailed description of the image? Detect and provide the indexes for the mentioned objects.",
    "Provide a detailed explanation of this image and ground all the mentioned objects.",
    "Can you describe the image in detail and detect the objects mentioned, returning their indexes?",
    "Describe all the key details in the image and detect the mentioned objects with their indexes.",
    "Provide a complete and detailed description of the image and ground the mentioned objects.",
    "Give a comprehensive description of the image and provide the object indexes for all mentioned objects.",
    "What is happening in this image? Provide a detailed description and detect the mentioned objects with their indexes.",
    "Describe the content of this image in detail and ground the objects mentioned.",
    "Offer a full description of the image and provide the object indexes for all detected objects.",
    "What is a detailed narrative of the scene in this image? Detect and provide indexes for the mentioned objects.",
    "Explain the image thoroughly and provide the object indexes for all mentioned objects.",
    "Provide a detailed description of the image and ground the mentioned objects with their indexes.",
    "Give a detailed overview of the image and detect all mentioned objects by returning their indexes.",
    "Can you explain the details of the image and ground the mentioned objects, providing object indexes?",
    "Provide a detailed narrative of this image and detect the objects mentioned, returning their indexes.",
    "What is a full description of the image? Ground the mentioned objects and provide their indexes.",
    "Describe all the important details in the image and ground the objects mentioned with their indexes.",
    "Describe this image in detail with grounded answer.",
]

# Grounded conversation: prefix of the user question (the official test's spelling; the README
# capitalises "Grounded").
GROUNDED_CONVERSATION_PREFIX = "Answer the question in grounded format. "

# Official list names -> our lists.
OFFICIAL_NAMES = {
    "REGION_CAPTION_SINGLE_REGION_FREE_FORMAT_CATEGORY_NAME_STAGE2": REGION_CAPTION_CATEGORY,
    "REGION_CAPTION_SINGLE_REGION_SHORT_PHRASE_STAGE2": REGION_CAPTION_SHORT_PHRASE,
    "REGION_CAPTION_SINGLE_REGION_BREIFLY_STAGE2": REGION_CAPTION_BRIEF,
    "REGION_CAPTION_ONE_SENTENCE_STAGE2": REGION_CAPTION_ONE_SENTENCE,
    "COUNTING_SINGLE_REGION_STAGE2": COUNTING,
    "GROUNDING_SINGLE_REGION_STAGE2": GROUNDING,
    "BREIF_CAPTION_WITH_GROUDING_STAGE2": GROUNDED_CAPTION_BRIEF,
    "DETAILED_CAPTION_WITH_GROUDING_STAGE2": GROUNDED_CAPTION_DETAILED,
}
# Lists whose first two literals were concatenated (missing comma) in the first commit only.
_MISSING_COMMA_1D4363A = ("REGION_CAPTION_SINGLE_REGION_BREIFLY_STAGE2",
                          "BREIF_CAPTION_WITH_GROUDING_STAGE2")
OFFICIAL_REVISIONS = ("head", "1d4363a")


def official_list(name: str, revision: str = "head") -> list[str]:
  """The official list `name` as Python evaluates `prompt_templates.py`: at HEAD (default, the
  lists above), or at the first commit "1d4363a" (two lists with their first two literals
  concatenated)."""
  if revision not in OFFICIAL_REVISIONS:
    raise ValueError(f"revision must be one of {OFFICIAL_REVISIONS}, got {revision!r}")
  variants = list(OFFICIAL_NAMES[name])
  if revision == "1d4363a" and name in _MISSING_COMMA_1D4363A:
    variants = [variants[0] + variants[1]] + variants[2:]
  return variants


# task -> {granularity: list}; `None` = the task has one list.
TASKS: dict[str, dict[str | None, list[str]]] = {
    "detect": {None: GROUNDING},
    "refer": {None: GROUNDING},  # referring uses the grounding prompt with an expression as [OBJ]
    "region_caption": {"category": REGION_CAPTION_CATEGORY, "short_phrase": REGION_CAPTION_SHORT_PHRASE,
                       "brief": REGION_CAPTION_BRIEF, "one_sentence": REGION_CAPTION_ONE_SENTENCE},
    "grounded_caption": {"brief": GROUNDED_CAPTION_BRIEF, "detailed": GROUNDED_CAPTION_DETAILED},
    "count": {None: COUNTING},
}
DEFAULT_GRANULARITY = {"region_caption": "category", "grounded_caption": "brief"}
TASK_NAMES = tuple(TASKS) + ("chat",)
# The training task mix (`data.tasks.sample_task`) -> the inference tasks whose prompts it asks.
TRAINING_TASKS: dict[str, tuple[str, ...]] = {
    "grounding": ("detect", "refer"), "region": ("region_caption",),
    "grounded_caption": ("grounded_caption",), "conversation": ("chat",)}


def join_objects(objects: str | int | Iterable[str | int]) -> str:
  """[OBJ] text: strings kept (stripped), ints -> `<objK>`, several joined with "; "."""
  if isinstance(objects, (str, int)):
    objects = [objects]
  parts = [C.object_token(o) if isinstance(o, int) else str(o).strip() for o in objects]
  parts = [p for p in parts if p]
  if not parts:
    raise ValueError("no object / category given for [OBJ]")
  return "; ".join(parts)


def join_query(query: str) -> str:
  """The [OBJ] text the official gradio demo builds from its "object ids & cates" box
  (`question_creater`): split at ",", strip each piece, join with "; ". "dog,cat" ->
  "dog; cat"; "person; pigeon" stays; empty pieces are kept as the demo keeps them
  ("dog,,cat" -> "dog; ; cat")."""
  return "; ".join(part.strip() for part in str(query).split(","))


_REGION_TOKEN_RE = re.compile(r"<obj(\d+)>|(\d+)")


def region_indices(query: str | int | Iterable[str | int]) -> list[int]:
  """Box indices for a region caption: "0,2", "0 2", "0; 2", "<obj1>,<obj2>" (the gradio
  demo's form) or a mix -> [0, 2] / [1, 2]; ints pass through. Order and repeats are kept, as
  the demo would put them in the question. Raises ValueError on anything else."""
  if isinstance(query, int):
    return [query]
  if not isinstance(query, str):
    return [i for q in query for i in region_indices(q)]
  out = []
  for token in re.split(r"[,;\s]+", query.strip()):
    if not token:
      continue
    m = _REGION_TOKEN_RE.fullmatch(token)
    if m is None:
      raise ValueError(f"region index {token!r} is neither an integer nor <objK> (in {query!r})")
    out.append(int(m.group(1) or m.group(2)))
  if not out:
    raise ValueError(f"no box index in {query!r}")
  return out


def templates(task: str, granularity: str | None = None) -> list[str]:
  """All variants of a task's prompt (element [0] is the one used at inference)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known: {TASK_NAMES}")
  options = TASKS[task]
  if None in options:
    if granularity is not None:
      raise ValueError(f"task {task!r} has no granularity (got {granularity!r})")
    return options[None]
  granularity = granularity or DEFAULT_GRANULARITY[task]
  if granularity not in options:
    raise ValueError(f"task {task!r}: granularity must be one of {sorted(options)}, "
                     f"got {granularity!r}")
  return options[granularity]


def question(task: str, objects: str | int | Sequence[str | int] | None = None,
             granularity: str | None = None, variant: int = 0, text: str | None = None,
             raw: bool = False) -> str:
  """The question text of a task.

  detect / refer / count: objects = categories or referring expressions ("person; pigeon";
  `join_query` turns the demo's "dog,cat" into that form).
  region_caption: objects = box indices (ints -> `<objK>`) or `<objK>` strings.
  grounded_caption: no objects.  chat: text = the user question, prefixed with
  GROUNDED_CONVERSATION_PREFIX (the official grounded-conversation test), or sent verbatim with
  raw=True (the gradio demo's "Raw Question Input").  variant picks a paraphrase (0 = the
  official default).
  """
  if raw and task != "chat":
    raise ValueError(f"raw=True sends text verbatim and applies to task 'chat' only, not {task!r}")
  if task == "chat":
    if text is None:
      raise ValueError("task 'chat' needs text=<the question>")
    return text if raw else GROUNDED_CONVERSATION_PREFIX + text
  variants = templates(task, granularity)
  if not 0 <= variant < len(variants):
    raise ValueError(f"variant {variant} outside [0, {len(variants)}) for task {task!r}")
  t = variants[variant]
  if "[OBJ]" in t:
    if objects is None:
      raise ValueError(f"task {task!r} needs objects= (categories, expressions or box indices)")
    t = t.replace("[OBJ]", join_objects(objects))
  elif objects is not None and task != "grounded_caption":
    raise ValueError(f"variant {variant} of task {task!r} takes no objects")
  return t


def object_string(num_objects: int) -> str:
  """`<obj0><objfeat><obj1><objfeat>...<obj{N-1}><objfeat>`; "" for N = 0."""
  if not 0 <= num_objects <= C.MAX_NUM_OBJECTS:
    raise ValueError(f"num_objects={num_objects} outside [0, {C.MAX_NUM_OBJECTS}]")
  return "".join(C.object_token(i) + C.DEFAULT_OBJECT_FEATURE_TOKEN for i in range(num_objects))


def build_user_text(question_text: str, num_objects: int) -> str:
  """`<image>\\n<obj0><objfeat>...\\n{question}` with every `<image>` removed from the question
  (only the literal; a following newline stays, as in the official code)."""
  q = question_text.replace(C.DEFAULT_IMAGE_TOKEN, "")
  return C.DEFAULT_IMAGE_TOKEN + "\n" + object_string(num_objects) + "\n" + q
