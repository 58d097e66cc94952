"""The request schema as code and the Python client.

`types` holds a request as given (the proto's GenerateRequest as frozen dataclasses), `convert`
maps proto <-> types <-> JSON <-> CLI flags from the proto's descriptor, `client` calls a server.
Nothing here imports torch, the engine or the server (tests/api/test_boundaries.py).
"""
