"""The sdserve bench suite: run from a checkout, e.g. `python -m bench.engine_batching`.

Importing the package sets OMP_WAIT_POLICY=PASSIVE before torch loads: with two cores shared
by a server, a client or anything else, spinning OpenMP threads turn every small op into a
scheduling fight (seen here: a LoRA path 60× slower than its FLOPs with spinning threads).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
