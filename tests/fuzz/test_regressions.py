"""Every input a fuzz harness ever crashed on, as a plain test (see tests/fuzz/__init__.py).

Each finding is kept twice: the fuzzer's own input, replayed through its harness (it must now
pass the harness's property), and the smallest input that shows the bug, against the public
function, with the error the user must now get.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sdserve.errors import InvalidArgument
from sdserve.server.config import config_from_dict, load_config

# -- config: found by harness_config ------------------------------------------------------------

# A config file that is not UTF-8 raised UnicodeDecodeError out of load_config (found by mutating
# tests/fuzz/seeds/config/tenants.toml: two bytes of a directory string turned into \xe6\xf5).
NOT_UTF8 = b'[models.ip_adapters]\nface = "/models/ip-adapter\xe6\xf5\n'

# `[models] controlnets` (and ip_adapters) that was not a table reached `check`, which called
# `.items()` on it: AttributeError. A scalar `[engine] residency` loaded and failed only when the
# engine first read it. The fuzzer's input below builds {"models": {"ip_adapters": [],
# "controlnets": 7}} through harness_config.structured_config.
STRUCTURED_CONTROLNETS_INT = (
    b"[\xb0\xb0\xb0grace_seconds" + b"\xb0" * 18 + b"741824\nmerg\xb0741824\na p" + b"\xff" * 36
    + b'OOOOOOOOOOOOOcal s = "anonymous"\n'
)


@pytest.mark.parametrize("data", [NOT_UTF8, STRUCTURED_CONTROLNETS_INT], ids=["not-utf8", "controlnets-int"])
def test_config_findings_replay_clean(data, tmp_path):
    from tests.fuzz import harness_config

    harness_config.setup(tmp_path)
    harness_config.one_input(data)


def test_config_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "server.toml"
    path.write_bytes(NOT_UTF8)
    with pytest.raises(InvalidArgument, match="not UTF-8 text"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[models]\ncontrolnets = 7", "models.controlnets: must be of type dict"),
        ('[models]\ncontrolnets = "canny"', "models.controlnets: must be of type dict"),
        ("[models]\nip_adapters = [1]", "models.ip_adapters: must be of type dict"),
        ("[models]\ncontrolnets = { canny = 1 }", "models.controlnets: must be a table of strings"),
        ("[engine]\nresidency = 5", "[engine.residency] must be a table"),
        ("[engine]\nresidency = []", "[engine.residency] must be a table"),
    ],
)
def test_config_tables_of_the_wrong_type_are_refused(text, needle, tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        load_config(path)
    assert needle in str(info.value)


def test_config_nested_tables_still_load():
    config = config_from_dict({"models": {"controlnets": {"canny": "/models/c"}},
                               "engine": {"residency": {"device_slots": 2}}})
    assert config.models.controlnets == {"canny": "/models/c"} and config.engine.residency.device_slots == 2


# -- requests: found by harness_requests --------------------------------------------------------

# Nested and bytes fields went to protobuf's JSON parser unchecked, whose errors quote Python
# exceptions: {"mask": 5} -> "Failed to parse mask field: object of type 'int' has no len()".
# Every field is now checked by path before the parser sees it.
@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"prompt": "x", "mask": 5}, "mask: must be a base64 string"),
        ({"prompt": "x", "mask": "!!"}, "mask: is not valid base64"),
        # found by harness_requests on the first version of the check: non-ASCII text made
        # base64 raise ValueError, not binascii.Error
        ({"prompt": "x", "init_image": "\u00e9AAA"}, "init_image: is not valid base64"),
        ({"prompt": "x", "adapters": {"a": 1}}, "adapters: must be a list"),
        ({"prompt": "x", "adapters": [None]}, "adapters[0]: must not be null"),
        ({"prompt": "x", "adapters": ["style"]}, "adapters[0]: must be a JSON object"),
        ({"prompt": "x", "adapters": [{"name": 3}]}, "adapters[0].name: must be a string"),
        ({"prompt": "x", "adapters": [{"name": "a", "scale": "big"}]}, "adapters[0].scale: must be a number"),
        ({"prompt": "x", "adapters": [{"nam": "a"}]}, "unknown field 'nam' in adapters[0]"),
    ],
)
def test_request_fields_of_the_wrong_type_name_their_path(data, needle):
    from sdserve.api.convert import spec_from_dict

    with pytest.raises(InvalidArgument) as info:
        spec_from_dict(data)
    assert needle in str(info.value)
    assert "object of type" not in str(info.value) and "Failed to parse" not in str(info.value)


# Findings too long to keep inline: tests/fuzz/findings/<target>-<what>, each replayed through
# its harness. requests-base64-not-ascii: a request whose init_image string held non-ASCII text
# (base64's ValueError escaped the first version of the by-path field checks).
FINDINGS = sorted((Path(__file__).parent / "findings").iterdir())


@pytest.mark.parametrize("path", FINDINGS, ids=[p.name for p in FINDINGS])
def test_kept_findings_replay_clean(path, tmp_path):
    import importlib

    target = path.name.split("-", 1)[0]
    harness = importlib.import_module(f"tests.fuzz.harness_{target}")
    harness.setup(tmp_path)
    harness.one_input(path.read_bytes())
