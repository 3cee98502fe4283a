"""Checkpoint conversion: torch state dicts <-> Flax parameter trees, one module per family.

Every family module (`llm`, `chatrex`, `clip`, `convnext`, `projector`, `upn`) offers the same
verbs with the same strictness:

  rules(...)               the declarative key map (`mapping.Rule`s, checked bijective in tests)
  to_flax(state, ...)      torch-named tensors -> Flax params; every missing, unexpected or
                           mis-shaped tensor reported together in one `mapping.ConversionError`
  to_torch(params, ...)    Flax params -> torch-named tensors (round trips are bit-identical)
  load(path, ...)          a checkpoint file or folder -> Flax params (with the config where
                           the files carry one: `llm`, `chatrex`)
  save(params, ..., path)  Flax params -> files in the official layout

Shared pieces: `mapping` (the engine, layouts and rule builders), `torch_files` (weights-only
`torch.load`, lazy safetensors), `safetensors_io`. `gguf` is a source only (llama.cpp files
-> HF layout); `chatrex.save_orbax` / `load_orbax` keep ChatRex params as an Orbax tree;
ChatRex's vocabulary extension changes the model, not a format: `chatrex_jax.models.vocab`.
"""
