"""Every `sdserve` option has a help text, and every default a help text states is the real one.

The parsers are built (sdserve.cli.main.build_parser), never run. A help text's "default X" is
read as a literal when X is a number or a plain word/list; descriptive defaults ("default: the
model's native size", "default: off") are not checked. Where the parser's default is None because
the value is resolved later (from a config dataclass or a module constant), RESOLVED names where
the real value lives, so the help and the code cannot drift apart silently.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator

import pytest

from sdserve.cli.main import SUBCOMMANDS, build_parser

_SKIPPED_ACTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
# "default 4", "default: 1e-4", "(default kohya; ...)": the first token after "default".
_DEFAULT = re.compile(r"\bdefault:?\s+([^\s;)]+)")
_NUMBER = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?%?")
_WORD = re.compile(r"[A-Za-z0-9_.,:-]+")
# First words of defaults that describe rather than state a value.
_DESCRIPTIVE = {"the", "off", "none", "all", "both", "by", "detected", "alpha", "model", "start"}


def _shapes_default(field: str) -> Callable[[], str]:
    """What `train data shapes` writes when the flag is absent: the config its parser builds."""

    def value() -> str:
        from sdserve.cli.train_data import config_from_args

        args = build_parser("train").parse_args(["train", "data", "shapes", "--out", "unused-dir", "--count", "1"])
        chosen = getattr(config_from_args(args), field)
        return chosen if isinstance(chosen, str) else ",".join(chosen)

    return value


def _server(field: str) -> Callable[[], object]:
    def value() -> object:
        from sdserve.server.config import ServerConfig

        return getattr(ServerConfig(), field)

    return value


def _ray(field: str) -> Callable[[], object]:
    def value() -> object:
        from sdserve.scaleout.config import RayConfig

        return getattr(RayConfig(), field)

    return value


def _lora(field: str) -> Callable[[], object]:
    def value() -> object:
        from sdserve.trainers.lora import LoRAConfig

        return getattr(LoRAConfig(), field)

    return value


def _num_class_images() -> int:
    from sdserve.trainers.dreambooth import DEFAULT_NUM_CLASS_IMAGES

    return DEFAULT_NUM_CLASS_IMAGES


def _vae_share_percent() -> float:
    from sdserve.cli.train import config_from_args

    args = build_parser("train").parse_args(["train", "base", "--out", "unused-dir", "--minutes", "10"])
    return config_from_args(args).vae_minutes / 10 * 100


def _jpeg_quality() -> int:
    from sdserve.cli.image_output import DEFAULT_QUALITY

    return DEFAULT_QUALITY


# (command path, option) -> where the value the code uses when the option is absent comes from.
RESOLVED: dict[tuple[str, str], Callable[[], object]] = {
    ("serve", "--host"): _server("host"),
    ("serve", "--port"): _server("port"),
    ("serve", "--replicas"): _ray("replicas"),
    ("serve", "--cpus-per-replica"): _ray("cpus_per_replica"),
    ("serve", "--gpus-per-replica"): _ray("gpus_per_replica"),
    ("serve", "--app-name"): _ray("app_name"),
    ("train dreambooth", "--num-class-images"): _num_class_images,
    ("train dreambooth", "--rank"): _lora("rank"),
    ("train dreambooth", "--targets"): lambda: ",".join(_lora("unet_targets")()),
    ("train data shapes", "--kinds"): _shapes_default("kinds"),
    ("train data shapes", "--styles"): _shapes_default("styles"),
    ("train data shapes", "--layout"): _shapes_default("layout"),
    ("train base", "--vae-minutes"): _vae_share_percent,
    ("generate", "--quality"): _jpeg_quality,
    ("client generate", "--quality"): _jpeg_quality,
}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _options() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    found = []
    for path, parser in _walk(build_parser()):
        for action in parser._actions:
            if not isinstance(action, _SKIPPED_ACTIONS):
                found.append((path, parser, action))
    return found


@pytest.fixture(scope="module")
def options() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    return _options()


def _name(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def _stated_defaults(parser: argparse.ArgumentParser, action: argparse.Action) -> list[str]:
    text = parser._get_formatter()._expand_help(action)  # %(default)s filled in, as --help shows it
    stated = []
    for match in _DEFAULT.finditer(text):
        token = match.group(1).rstrip(".,:")
        if (token.lower() in _DESCRIPTIVE or token.startswith(("$", "OUT")) or not _WORD.fullmatch(token)
                or text[match.end():].startswith(" or ")  # "OUT.class beside OUT", "1 or 2, as ..."
                or not _NUMBER.fullmatch(token) and re.match(r" [a-z]", text[match.end():])):  # "build one"
            continue
        stated.append(token)
    return stated


def _same(token: str, value: object) -> bool:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if _NUMBER.fullmatch(token) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(token.rstrip("%")) == float(value)
    return token == str(value)


def test_every_subcommand_is_walked(options):
    commands = {path.split()[0] for path, _, _ in options if path}
    assert commands == set(SUBCOMMANDS), "a subcommand failed to register or has no options"
    assert {"train controlnet", "compile onnx", "models fit-preview", "client adapters upload"} <= {
        path for path, _, _ in options}


def test_every_option_has_help(options):
    missing = [f"sdserve {path} {_name(action)}" for path, _, action in options
               if not action.help or action.help == argparse.SUPPRESS and action.default != argparse.SUPPRESS]
    assert not missing, "options without a help text: " + ", ".join(missing)


def test_stated_defaults_are_the_real_ones(options):
    wrong, unresolved, checked = [], [], 0
    for path, parser, action in options:
        if action.default == argparse.SUPPRESS:
            continue  # a subparser's copy of a parent flag: the parent's own action is checked
        if isinstance(action, argparse._AppendAction):
            continue  # "FILE[:SCALE] ... its scale (default 1)": a default of a part of each value
        for token in _stated_defaults(parser, action):
            key = (path, _name(action))
            if action.default is None:
                if key not in RESOLVED:
                    unresolved.append(f"sdserve {path} {key[1]} says default {token}")
                    continue
                actual = RESOLVED[key]()
            else:
                actual = action.default
            checked += 1
            if not _same(token, actual):
                wrong.append(f"sdserve {path} {key[1]}: help says default {token}, the code uses {actual!r}")
    assert not unresolved, ("help states a default the parser does not hold; add where it lives to RESOLVED: "
                            + "; ".join(unresolved))
    assert not wrong, "; ".join(wrong)
    assert checked > 50  # the pattern still finds the defaults the help texts state


def test_the_checker_catches_a_wrong_default():
    parser = argparse.ArgumentParser()
    action = parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 20)")
    (token,) = _stated_defaults(parser, action)
    assert not _same(token, action.default)
    resolved = parser.add_argument("--rank", type=int, help="rank (default 4)")
    assert _stated_defaults(parser, resolved) == ["4"] and _same("4", 4)
