"""The TOML configuration: sections to frozen dataclasses, clear errors, CLI overrides."""

from __future__ import annotations

import dataclasses

import pytest

from sdserve.errors import InvalidArgument
from sdserve.server.app import describe_access
from sdserve.server.auth import Authenticator
from sdserve.server.config import LOCAL_TENANT, Config, hash_key, load_config, with_overrides

FULL = """
[server]
host = "0.0.0.0"
port = 6000
metrics_port = 9100
grace_seconds = 5

[models]
serve = ["tiny-sd1", "tiny-sdxl"]
default = "tiny-sdxl"

[engine]
max_batch_rows = 8

[engine.residency]
device_slots = 4

[admission]
max_pending_cost = 1000
max_tenant_pending_cost = 500
max_inflight_cost = 100

[registry]
data_dir = "/srv/sdserve"

[[tenants]]
name = "acme"
key = "acme-secret"
max_adapters = 5

[[tenants]]
name = "ops"
key_sha256 = "OPS_HASH"
admin = true
""".replace("OPS_HASH", hash_key("ops-secret"))


def test_defaults_are_make_serve():
    config = load_config(None)
    assert (config.server.host, config.server.port, config.models.default_model) == ("127.0.0.1", 50051, "default")
    assert [(t.name, t.key_sha256, t.admin) for t in config.tenants] == [(LOCAL_TENANT, "", True)]
    assert "no API key" in describe_access(config)


def test_full_file(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(FULL)
    config = load_config(path)
    assert config.server.port == 6000 and config.server.metrics_port == 9100
    assert config.models.serve == ("tiny-sd1", "tiny-sdxl") and config.models.default_model == "tiny-sdxl"
    assert config.engine.max_batch_rows == 8 and config.engine.residency.device_slots == 4
    assert config.admission.max_inflight_cost == 100
    acme, ops = config.tenants
    assert acme.key_sha256 == hash_key("acme-secret") and acme.max_adapters == 5 and not acme.admin
    assert ops.admin and not config.open_access
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    auth = Authenticator(config.tenants)
    assert auth.tenant_for([("authorization", "Bearer ops-secret")]).name == "ops"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[server]\nprot = 1", "unknown key 'prot'"),
        ("[serve]\nport = 1", "unknown section [serve]"),
        ("[server]\nport = 'x'", "server.port: must be of type int"),
        ("[models]\nserve = []", "at least one model"),
        ("[models]\nserve = ['a']\ndefault = 'b'", "default must be one of serve"),
        ("[[tenants]]\nname = 'a'\n[[tenants]]\nname = 'b'", "keys must be unique"),
        ("[[tenants]]\nname = 'a/b'\nkey = 'k'", "tenants[0].name"),
        ("[admission]\nmax_inflight_cost = 0", "positive"),
        ("[server\n", "not valid TOML"),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=None) as info:
        load_config(path)
    assert needle in str(info.value)


def test_cli_overrides():
    config = with_overrides(Config(), server__port=7000, models__serve=("tiny-sd1",), models__default="tiny-sd1",
                            server__host=None)
    assert config.server.port == 7000 and config.server.host == "127.0.0.1"
    assert config.models.default_model == "tiny-sd1"


def test_the_example_config_parses():
    from pathlib import Path

    import sdserve.server

    config = load_config(Path(sdserve.server.__file__).parent / "example-config.toml")
    assert config.server.metrics_port == 9400 and [t.name for t in config.tenants] == ["acme", "ops"]
    assert config.admission == Config().admission  # the file shows the real defaults
