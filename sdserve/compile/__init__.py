"""Compile: compiled variants of (base model, adapter stack), written to new directories.

- `fuse.py`, `fused_model.py`: fold a LoRA stack (and single-vector embeddings) into a diffusers
  model directory, or take it back out (`sdserve compile fuse|unfuse`).
- `onnx_export.py`, `onnx_check.py`: export every component to ONNX and check it in onnxruntime
  against torch (`sdserve compile onnx`); `manifest.py`: what a compiled directory holds and which
  sdserve wrote it, read back by whatever serves or refits it (`sdserve compile check`).
- `source.py`: the base model, the stack and the output directory, checked before any work.

Submodules are imported by name (they pull in torch and diffusers); nothing is re-exported here.
"""
