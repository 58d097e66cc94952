"""Follow docs/quickstart.md literally: every ```bash block, in order, in a fresh clone.

    python scripts/quickstart_check.py [--repo DIR] [--doc docs/quickstart.md] [--keep] [--from N]

The repository's committed HEAD is cloned into a temporary directory whose `.venv` is a link to
this checkout's (nothing is reinstalled) and whose own code comes first on PYTHONPATH, so the
clone's sdserve runs, not this checkout's. SDSERVE_HOME is a fresh directory too. Each block runs
as one `bash -e -o pipefail` script in the clone. A `sdserve serve` line that the doc does not
put in the background itself is started in the background, must log "sdserve: serving", and is
then stopped. A block preceded by `<!-- quickstart-check: skip: REASON -->` is not run; the
check prints the reason. Exit 0 when every other block exited 0, else 1 naming the first failure.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SKIP = re.compile(r"<!--\s*quickstart-check:\s*skip:\s*(.+?)\s*-->")
SERVE_LINE = re.compile(r"^(\s*)(\.venv/bin/sdserve serve\b[^&]*?)\s*(#.*)?$")
BLOCK_TIMEOUT_S = 1200
# Started servers: wait for the start-up line (or the server's exit), then stop it.
PRELUDE = r"""
wait_serving() {  # PID LOG: 0 once the server logs that it serves, else its failure
  for _ in $(seq 600); do
    if grep -q "sdserve: serving" "$2"; then kill "$1"; wait "$1" || true; return 0; fi
    if ! kill -0 "$1" 2>/dev/null; then cat "$2" >&2; wait "$1"; return 1; fi
    sleep 1
  done
  kill "$1"; cat "$2" >&2; return 1
}
"""


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence in the doc
    code: str
    skip: str | None  # why the check does not run it, or None


def extract_blocks(text: str) -> list[Block]:
    """Every ```bash block of a markdown text, with its skip reason if marked."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        if lines[index].strip() == "```bash":
            start, body = index, []
            index += 1
            while lines[index].strip() != "```":
                body.append(lines[index])
                index += 1
            before = next((line for line in reversed(lines[:start]) if line.strip()), "")
            marker = SKIP.search(before)
            blocks.append(Block(start + 1, "\n".join(body) + "\n", marker.group(1) if marker else None))
        index += 1
    return blocks


def commands(code: str) -> list[str]:
    """A block's shell commands: continuation lines joined, heredoc bodies left out."""
    found, heredoc_end, pending = [], None, ""
    for line in code.splitlines():
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            continue
        pending += line.rstrip("\\") + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        heredoc = re.search(r"<<-?'?(\w+)'?", pending)
        if heredoc:
            heredoc_end = heredoc.group(1)
        if pending.strip() and not pending.strip().startswith("#"):
            found.append(pending.strip())
        pending = ""
    return found


def background_servers(code: str) -> str:
    """`sdserve serve ...` lines not already backgrounded -> started, awaited, stopped."""
    out = []
    for number, line in enumerate(code.splitlines()):
        match = SERVE_LINE.match(line)
        if match and not line.rstrip().endswith("&"):
            log = f"serve-{number}.log"
            line = f'{match.group(1)}{match.group(2)} > {log} 2>&1 & wait_serving $! {log}'
        out.append(line)
    return "\n".join(out) + "\n"


def run(repo: Path, doc: Path, keep: bool, first: int = 1) -> int:
    blocks = extract_blocks(doc.read_text())
    work = Path(tempfile.mkdtemp(prefix="quickstart-"))
    clone = work / "sdserve"
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
    (clone / ".venv").symlink_to(repo / ".venv")
    env = dict(os.environ, PYTHONPATH=str(clone), SDSERVE_HOME=str(work / "home"))
    print(f"clone of {repo} HEAD in {clone}; {len(blocks)} bash blocks in {doc.name}")
    failed = None
    for number, block in enumerate(blocks, 1):
        where = f"block {number} (line {block.line})"
        if block.skip:
            print(f"{where}: skipped: {block.skip}")
            continue
        if number < first:
            print(f"{where}: not run (--from {first})")
            continue
        started = time.perf_counter()
        try:
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", PRELUDE + background_servers(block.code)],
                                  cwd=clone, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, output = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}"
        elapsed = time.perf_counter() - started
        if code != 0:
            print(f"{where}: FAILED (exit {code}) after {elapsed:.0f} s:\n{block.code}--- output (tail) ---\n"
                  f"{output[-3000:]}")
            failed = where
            break
        print(f"{where}: ok in {elapsed:.0f} s")
    if keep:
        print(f"kept {work}")
    else:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    if failed:
        print(f"quickstart check failed at {failed}", file=sys.stderr)
        return 1
    print("quickstart check passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=root, help="repository to clone (default: this checkout)")
    parser.add_argument("--doc", type=Path, default=root / "docs" / "quickstart.md",
                        help="the markdown file to follow (default: docs/quickstart.md)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone for inspection")
    parser.add_argument("--from", dest="first", type=int, default=1, metavar="N",
                        help="start at block N, to iterate on a later block (a full check starts at 1; default 1)")
    args = parser.parse_args(argv)
    return run(args.repo.resolve(), args.doc, args.keep, args.first)


if __name__ == "__main__":
    sys.exit(main())
