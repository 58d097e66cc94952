"""The server tests' session fixtures, shared here: LoRA files for tiny-sd1 and the in-process
engine that is the oracle of every image."""

from tests.server.conftest import lora_bytes, reference_engine  # noqa: F401
