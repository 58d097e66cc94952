"""The Python client's public import path: `from sdserve.client import Client`.

The client lives with the schema it speaks, in `sdserve/api/client.py`; this module is the name
users write (README, docs) and imports nothing of the server or the engine (no torch).
"""

from sdserve.api.client import CHUNK_BYTES, MAX_MESSAGE_BYTES, Client, cause_of, tls_credentials

__all__ = ["CHUNK_BYTES", "MAX_MESSAGE_BYTES", "Client", "cause_of", "tls_credentials"]
