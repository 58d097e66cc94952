"""The server's TOML config: bytes -> `load_config` and `config_from_dict`.

Operators are trusted, but a typo must still end in one clear start-up error naming the key,
never a traceback: the same property as for tenants' inputs. A config that loads must also be
well-typed, since nothing checks it again before the server uses it.

One input is used twice: as the bytes of a TOML file (`sdserve serve --config FILE`), and as
the choices that build a parsed TOML document directly (known and unknown sections and keys,
values of every TOML type), since byte mutations of a TOML text mostly break its syntax.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from tests.fuzz.common import Choices, typed_errors_only

# tomllib is pure Python: instrumented, its branches guide the fuzzer into valid TOML.
INSTRUMENT = ("sdserve", "tomllib")
MODULES = ("tomllib", "sdserve.server.config", "sdserve.engine.config")

_state: dict[str, Path] = {}


def setup(workdir: Path) -> None:
    _state["path"] = Path(workdir) / "server.toml"


class IllTyped(Exception):
    """A config loaded although a field does not have its declared type: a finding."""


def _matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is tuple:
        item = typing.get_args(annotation)[0]
        return isinstance(value, tuple) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(annotation):
        return isinstance(value, annotation) and _well_typed(value)
    return isinstance(value, annotation)


def _well_typed(config: Any) -> bool:
    hints = typing.get_type_hints(type(config))
    return all(_matches(getattr(config, f.name), hints[f.name]) for f in dataclasses.fields(config))


_WORDS = ("", "x", "auto", "cpu", "cuda", "cuda:0", "float16", "default", "tiny-sd1", "0.0.0.0", "INFO", "a" * 65,
          "acme", "ops", "0" * 64, "c49311f3b39b0f28ee58a93abc692a3dc827595905a9ef1681eb2e2b0b9e96b8")


def _value(choices: Choices, depth: int = 0) -> Any:
    """A value of any type tomllib produces."""
    kind = choices.below(9 if depth < 2 else 7)
    if kind == 0:
        return choices.integer()
    if kind == 1:
        return choices.number()
    if kind == 2:
        return choices.chance(128)
    if kind == 3:
        return choices.pick(_WORDS)
    if kind == 4:
        import datetime

        return choices.pick((datetime.date(1979, 5, 27), datetime.time(7, 32), datetime.datetime(1979, 5, 27, 7, 32)))
    if kind in (5, 6):
        return [choices.pick(_WORDS) for _ in range(choices.below(3))] if kind == 5 else []
    if kind == 7:
        return [_value(choices, depth + 1) for _ in range(choices.below(3))]
    return {choices.pick(_WORDS): _value(choices, depth + 1) for _ in range(choices.below(3))}


def _table(choices: Choices, cls: type) -> dict[str, Any]:
    keys = [f.name for f in dataclasses.fields(cls)] + ["bogus"]
    table: dict[str, Any] = {}
    for _ in range(choices.below(6)):
        key = choices.pick(keys)
        nested = next((f.default_factory for f in dataclasses.fields(cls) if f.name == key), None)
        if dataclasses.is_dataclass(nested) and choices.chance(192):
            table[key] = _table(choices, nested)  # e.g. [engine.residency]
        else:
            table[key] = _value(choices)
    return table


def structured_config(data: bytes) -> dict[str, Any]:
    """A parsed TOML document built from `data` (see the module docstring)."""
    from sdserve.engine.config import EngineConfig
    from sdserve.server import config as server

    sections = {"server": server.ServerConfig, "models": server.ModelsConfig, "engine": EngineConfig,
                "admission": server.AdmissionConfig, "registry": server.RegistryConfig}
    choices = Choices(data)
    document: dict[str, Any] = {}
    for _ in range(choices.below(5)):
        name = choices.pick((*sections, "tenants", "bogus"))
        if name == "tenants":
            tenant_keys = (*(f.name for f in dataclasses.fields(server.TenantConfig)), "key")
            document[name] = [
                {choices.pick(tenant_keys): _value(choices) for _ in range(choices.below(4))} | (
                    {"name": choices.pick(_WORDS)} if choices.chance(200) else {})
                for _ in range(choices.below(3))
            ] if choices.chance(224) else _value(choices)
        elif name in sections and choices.chance(224):
            document[name] = _table(choices, sections[name])
        else:
            document[name] = _value(choices)
    return document


def _loaded(config: Any) -> None:
    if not _well_typed(config):
        raise IllTyped(repr(config)[:400])


def one_input(data: bytes) -> None:
    from sdserve.server.config import config_from_dict, load_config

    path = _state["path"]
    path.write_bytes(data)
    typed_errors_only(lambda: _loaded(load_config(path)))
    typed_errors_only(lambda: _loaded(config_from_dict(structured_config(data))))
