"""Compile: compiled variants of (base model, adapter stack), written to new directories.

- `source.py`: the base model, the stack and the output directory, checked before any work.
- `fuse.py`, `fused_model.py`: fold a LoRA stack (and single-vector embeddings) into a diffusers
  model directory, or take it back out (`sdserve compile fuse|unfuse`).
- `onnx_graphs.py`, `onnx_export.py`: every component behind a plain-tensor wrapper, exported to
  ONNX and checked in onnxruntime against torch (`sdserve compile onnx`).
- `manifest.py`: what a compiled directory holds and which sdserve wrote it, read back by whatever
  serves or refits it (`sdserve compile check`); `onnx_session.py` opens a component with its
  refit weights.
- `refit.py`: new weights for an export from its refit map, without re-export (`sdserve compile refit`).

Submodules are imported by name (they pull in torch and diffusers); nothing is re-exported here.
"""
