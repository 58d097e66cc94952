"""Package boundaries that the seams redesign promises (ARCHITECTURE "Packages"):

- `import sdserve.client`, and the CLI's client commands run end to end, load no module of
  `sdserve.server` or `sdserve.engine` and no torch (a client machine needs grpcio and protobuf);
- no module of `sdserve/server` imports `sdserve.models` (the server reaches models through the
  engine's façade), and `sdserve/api` imports neither the engine nor the server.

The first is checked in a fresh interpreter (this one has imported everything); the second by
reading every import statement, top-level or inside a function, of each module's source.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sdserve"
FORBIDDEN_ON_CLIENTS = ("sdserve.server", "sdserve.engine", "sdserve.models", "torch")


def _loaded_after(code: str) -> list[str]:
    """Modules loaded by running `code` in a fresh interpreter (its last line prints them)."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forbidden(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_ON_CLIENTS)]


def test_importing_the_client_loads_no_server_engine_or_torch():
    modules = _loaded_after("import sdserve.client\nfrom sdserve.client import Client")
    assert "sdserve.api.client" in modules
    assert _forbidden(modules) == []


def test_the_clients_request_helpers_load_no_server_engine_or_torch():
    # Building a request (JSON -> proto -> the domain types) is what `client generate` does.
    modules = _loaded_after(
        "from sdserve.api.convert import pb_from_dict, spec_from_dict\n"
        "spec = spec_from_dict({'prompt': 'x', 'adapters': [{'name': 'a', 'scale': 0.5}],"
        " 'controlnets': [{'model': 'canny', 'image': 'AA=='}]})\n"
        "assert spec.adapters[0].scale == 0.5 and spec.controlnets[0].model == 'canny'"
    )
    assert _forbidden(modules) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["client", "--target", "127.0.0.1:9", "--timeout", "2", "health"],
        ["client", "--target", "127.0.0.1:9", "--timeout", "2", "generate", "--prompt", "x",
         "--adapter", "style:0.8", "--out", "{tmp}/out.png"],
        ["client", "--target", "127.0.0.1:9", "--timeout", "2", "models"],
    ],
    ids=["health", "generate", "models"],
)
def test_cli_client_commands_load_no_server_engine_or_torch(argv, tmp_path):
    # Nothing listens on port 9: each command fails with UNAVAILABLE after building its request.
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    modules = _loaded_after(
        "import contextlib\nfrom sdserve.cli.main import main\n"
        f"with contextlib.suppress(SystemExit):\n    main({argv!r})"
    )
    assert "sdserve.cli.client_cmd" in modules
    assert _forbidden(modules) == []


def _imports_of(path: Path) -> set[str]:
    """Every module an import statement in `path` names, top level or nested, absolute form."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from sdserve import models`
    return names


def _violations(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        bad = sorted(n for n in _imports_of(path) if any(n == f or n.startswith(f + ".") for f in forbidden))
        if bad:
            found[str(path.relative_to(PACKAGE.parent))] = bad
    return found


def test_no_server_module_imports_models():
    assert _violations("server", ("sdserve.models",)) == {}


def test_api_imports_neither_engine_nor_server():
    assert _violations("api", ("sdserve.engine", "sdserve.server", "sdserve.models", "torch")) == {}


def test_the_import_reader_sees_nested_and_from_imports(tmp_path):
    # The checks above are only as good as _imports_of: it must see an import inside a function
    # and `from sdserve import models`, or a violation would pass unseen.
    sample = PACKAGE / "server" / "app.py"
    names = _imports_of(sample)
    assert "sdserve.paths.cache_root" in names and "grpc" in names
    probe = PACKAGE / "server" / "_probe_for_test.py"
    try:
        probe.write_text("def f():\n    from sdserve import models\n    import sdserve.models.builtin\n")
        assert _violations("server", ("sdserve.models",)) == {
            "sdserve/server/_probe_for_test.py": ["sdserve.models", "sdserve.models.builtin"]
        }
    finally:
        probe.unlink()
