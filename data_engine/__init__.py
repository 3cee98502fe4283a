"""The data engine: a resumable Apache Beam pipeline that builds Rexverse-style
image-region-text records (ChatRex, arXiv 2411.18363, section 4).

Stages: sources -> filters -> captioning (VLM) -> spaCy phrases -> grounding (open-set
detector) -> phrase-conditioned region descriptions (VLM) -> verification + referring
expression rewriting (LLM) -> ArrayRecord writer. Records follow
`chatrex_jax/data/schema.py`; read them with `chatrex_jax.data.records.EngineRecords`.

Modules: sources, filters, phrases, backends/ (interfaces, transformers, synthetic
oracles), stages (Beam-free stage functions), pipeline (Beam graph + resumable driver),
writer (shards, markers, manifest, TFDS metadata), synthetic (SYNTHETIC SCENES), config,
main (CLI).
"""
