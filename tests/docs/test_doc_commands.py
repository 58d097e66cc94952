"""docs/quickstart.md's and the README's shell blocks: every `sdserve` command in them parses.

Fast (the parsers only; nothing runs): a renamed flag or subcommand breaks this before a user
finds it. The whole quickstart, run in a fresh clone, is scripts/quickstart_check.py and the
slow test below.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sdserve.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from quickstart_check import background_servers, commands, extract_blocks  # noqa: E402

_SHELL_ENDS = {"&", "&&", "||", "|", ";", ">", ">>", "2>&1"}


def _sdserve_argv(command: str) -> list[str] | None:
    """`.venv/bin/sdserve generate --x 1 > f &` -> ["generate", "--x", "1"]; None for other programs."""
    words = shlex.split(command, comments=True)
    for start, word in enumerate(words):
        at_command = start == 0 or words[start - 1] in _SHELL_ENDS  # not `cd sdserve`
        if at_command and (word.endswith("bin/sdserve") or word == "sdserve"):
            argv = []
            for token in words[start + 1:]:
                if token in _SHELL_ENDS or token.startswith(">"):
                    break
                argv.append(token)
            return argv
    return None


def _doc_commands(name: str) -> list[tuple[int, list[str]]]:
    found = []
    for block in extract_blocks((ROOT / name).read_text()):
        for command in commands(block.code):
            argv = _sdserve_argv(command)
            if argv is not None:
                found.append((block.line, argv))
    return found


def test_extraction_finds_blocks_skips_and_commands():
    text = ("# t\n\n```bash\necho a \\\n  b\ncat > f <<'X'\nnot a command\nX\n```\n\n"
            "<!-- quickstart-check: skip: needs a GPU -->\n```bash\nsdserve serve\n```\n\n```python\nx\n```\n")
    first, second = extract_blocks(text)
    assert (first.line, first.skip, second.skip) == (3, None, "needs a GPU")
    assert commands(first.code) == ["echo a    b", "cat > f <<'X'"]
    started = background_servers(".venv/bin/sdserve serve --model m   # note\n.venv/bin/sdserve serve &\n")
    assert "wait_serving $!" in started.splitlines()[0] and started.splitlines()[1] == ".venv/bin/sdserve serve &"


def test_quickstart_runs_most_of_its_blocks():
    blocks = extract_blocks((ROOT / "docs" / "quickstart.md").read_text())
    assert len(blocks) >= 10
    assert sum(block.skip is None for block in blocks) >= len(blocks) // 2  # skipping is the exception


@pytest.mark.parametrize("doc", ["docs/quickstart.md", "README.md"])
def test_every_sdserve_command_in_the_docs_parses(doc):
    found = _doc_commands(doc)
    assert found, f"no sdserve commands found in {doc}"
    parsers: dict[str, object] = {}
    bad = []
    for line, argv in found:
        parser = parsers.setdefault(argv[0], build_parser(argv[0]))
        try:
            parser.parse_args(argv)
        except SystemExit:
            bad.append(f"{doc} block at line {line}: sdserve {' '.join(argv)}")
    assert not bad, "commands that do not parse: " + "; ".join(bad)


@pytest.mark.slow
def test_quickstart_followed_literally_in_a_fresh_clone():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "quickstart_check.py")],
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "quickstart check passed" in proc.stdout


def _leaf_commands() -> list[list[str]]:
    import argparse

    def walk(parser: argparse.ArgumentParser, path: list[str]):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield path
        for action in subs:
            for name, sub in action.choices.items():
                yield from walk(sub, [*path, name])

    return list(walk(build_parser(), []))


def test_readme_commands_table_names_every_subcommand():
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `sdserve ")]
    heads = [row.split("`")[1].replace("\\|", " ").split() for row in rows]  # a row's command, alternatives split
    missing = [" ".join(leaf) for leaf in _leaf_commands()
               if not any(head[1] == leaf[0] and set(leaf) <= set(head[:12]) for head in heads)]
    assert not missing, "README's commands table lacks: " + ", ".join(missing)
