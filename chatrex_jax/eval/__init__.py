"""Evaluation: COCO/LVIS box AP/AR (pycocotools), the paper's recall@0.5, referring accuracy,
RexSeek/HumanRef precision / recall / DensityF1, chunked detection prompts, `chatrex-jax eval`.

Modules: `coco`, `recall`, `referring`, `density_f1`, `prompts`, `main`. Imported lazily by
the CLI; importing this package pulls in no JAX.
"""
