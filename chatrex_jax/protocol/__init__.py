"""ChatRex's input/output protocol: what the data pipeline, the model, inference and evaluation
must agree on, in one place.

  tokens     placeholders (`<image>` -200, `<objfeat>` -300), IGNORE_INDEX, the 104 added tokens
             (`<obj0>`..`<obj99>`, `<ground>`, `</ground>`, `<objects>`, `</objects>`)
  image      image and box preprocessing for the two towers (the official arithmetic)
  templates  chat templates (ChatML as RexSeek, LLaVA's Vicuna v1) and their detection
  tokenize   tokenizer loading, placeholder-aware tokenisation, training labels
  prompts    the official task prompts, the task vocabulary, questions and user texts
  grammar    the answer grammar: building `<ground>..</ground><objects>..</objects>` answers and
             parsing them back into phrases and boxes

It depends on nothing else in the package but the box library `chatrex_jax.ops.boxes` (a leaf
module: numpy only, jax never imported); `models`, `data`, `inference`, `eval` import it.
"""
