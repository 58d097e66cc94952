"""Regenerate the Python stubs of the sdserve protos (`make protos`).

The .proto files live under `sdserve/protos/sdserve/v1/` so that other languages import them as
`sdserve/v1/<file>.proto`; protoc writes `from sdserve.v1 import x_pb2` into the gRPC stubs,
which we rewrite to a relative import because the Python package is `sdserve.protos.sdserve.v1`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).parent
PROTO_DIR = PROTO_ROOT / "sdserve" / "v1"
# The protos' descriptors with their comments (source info), which the generated stubs lack:
# the request schema's field docs (CLI help, docs) are read from it, not from the .proto text.
DESCRIPTOR_SET = PROTO_DIR / "sdserve.binpb"


def generate(out_root: Path = PROTO_ROOT) -> list[Path]:
    from grpc_tools import protoc  # only needed by maintainers, not at run time

    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    descriptor = out_root / DESCRIPTOR_SET.relative_to(PROTO_ROOT)
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_root}", f"--grpc_python_out={out_root}",
            f"--descriptor_set_out={descriptor}", "--include_source_info"]
    args += [str(p.relative_to(PROTO_ROOT)) for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted((out_root / "sdserve" / "v1").glob("*_pb2*.py")):
        text = re.sub(r"^from sdserve\.v1 import ", "from . import ", path.read_text(), flags=re.M)
        path.write_text(text)
        written.append(path)
    written.append(descriptor)
    return written


if __name__ == "__main__":
    for p in generate():
        print(p, file=sys.stderr)
