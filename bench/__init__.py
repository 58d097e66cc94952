"""The sdserve bench suite: run from a checkout, e.g. `python -m bench.engine_batching`."""
