"""The CLI starts fast: commands that need no model never import torch, diffusers or transformers.

Wall time on a shared machine is noise, so the test reads what a fresh interpreter imported
(`python -X importtime` writes one stderr line per module) instead of timing it; the times
themselves are in docs/benchmarks.md ("CLI start-up").
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdserve.cli import main as cli_main

HEAVY = ("torch", "diffusers", "transformers", "sdserve.engine", "sdserve.server", "sdserve.models.shapes.components")
# The engine package loads its names lazily, and model_limits imports nothing: the built-in
# models' specs (`models list`) read their defaults from it (docs/maintainers.md).
LIGHT = {"sdserve.engine", "sdserve.engine.model_limits"}
NO_MODEL = ["--help", "--version", "models list"] + [f"{command} --help" for command in cli_main.SUBCOMMANDS]
# Nothing listens on port 9: the client commands fail with UNAVAILABLE after their imports.
CLIENT = ["client --target 127.0.0.1:9 --timeout 2 health", "client --target 127.0.0.1:9 --timeout 2 models"]


def imported_by(command: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """Modules that `sdserve COMMAND` imports in a fresh interpreter, read from -X importtime."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sdserve.cli.main", *command.split()],
        capture_output=True, text=True, timeout=120,
    )
    modules = {
        line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    }
    modules.discard("package")  # the header line's last column
    return modules, done


def _heavy(modules: set[str], extra: tuple[str, ...] = ()) -> list[str]:
    return sorted(
        m for m in modules - LIGHT if any(m == h or m.startswith(h + ".") for h in HEAVY + extra)
    )


@pytest.mark.parametrize("command", NO_MODEL)
def test_commands_without_a_model_import_no_torch_and_no_grpc(command):
    modules, done = imported_by(command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sdserve.cli" in modules  # the reader of -X importtime works (main itself runs as __main__)
    # `generate --help` and `client --help` list the request's flags, read from the proto (grpc).
    extra = () if command.split()[0] in ("generate", "client") else ("grpc", "google.protobuf")
    assert _heavy(modules, extra) == []


@pytest.mark.parametrize("command", CLIENT, ids=["health", "models"])
def test_client_commands_import_no_torch(command):
    modules, done = imported_by(command)
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr  # it got as far as calling
    assert "grpc" in modules
    # A health check needs neither the request schema nor sdserve's stubs (protobuf descriptors).
    extra = ("sdserve.api.convert", "sdserve.protos") if command.endswith("health") else ()
    assert _heavy(modules, extra) == []


def test_the_filter_sees_submodules_and_spares_lookalikes():
    # imported_by is shown to read real lines by the asserts on sdserve.cli and grpc above.
    assert _heavy({"torch._C", "diffusers", "torchvision", "grpc._cython", "sdserve.engine.engine"}, ("grpc",)) == [
        "diffusers", "grpc._cython", "sdserve.engine.engine", "torch._C"
    ]


def test_top_level_summaries_are_the_subcommands_own():
    parser = cli_main.build_parser()  # every module registered: their own help= texts
    subparsers = parser._subparsers._group_actions[0]
    registered = {action.dest: action.help for action in subparsers._choices_actions}
    assert registered == cli_main.SUMMARIES
    assert list(cli_main.SUMMARIES) == list(cli_main.SUBCOMMANDS)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for command, summary in cli_main.SUMMARIES.items():
        assert command in out and summary.split()[0] in out


def test_train_help_default_is_the_shapes_models_width():
    from sdserve.cli.train import DEFAULT_UNET_CHANNELS
    from sdserve.models.shapes.components import ComponentSizes

    assert ",".join(str(c) for c in ComponentSizes().unet_channels) == DEFAULT_UNET_CHANNELS
