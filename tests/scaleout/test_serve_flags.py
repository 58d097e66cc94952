"""`sdserve serve`'s Ray flags: refused in one line (exit 2) where they cannot run, before any
config, model or Ray is touched; turned into the RayConfig the deployment uses."""

from __future__ import annotations

import pytest

from sdserve.cli.main import build_parser
from sdserve.cli.serve_cmd import ray_config
from sdserve.scaleout.config import LEAST_LOADED, RayConfig


def parse(*argv: str):
    return build_parser("serve").parse_args(["serve", *argv])


@pytest.mark.parametrize(("argv", "message"), [
    (["--replicas", "2"], "--replicas: needs --ray"),
    (["--address", "auto"], "--address: needs --ray"),
    (["--ray", "--replicas", "0"], "--replicas: must be at least 1"),
    (["--store-url", "file:///shared/sdserve"], "--store-url: needs --ray"),
    (["--ray", "--store-url", "/shared/sdserve"], "--store-url: must be a URL such as file:///shared/sdserve or "
     "s3://bucket/sdserve"),
])
def test_bad_ray_flags_exit_2_with_one_line(argv, message, capsys):
    args = parse(*argv)
    with pytest.raises(SystemExit) as exit_info:
        args.func(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(message) and "\n" not in err


def test_ray_flags_become_the_ray_config():
    assert ray_config(parse()) is None
    assert ray_config(parse("--ray")) == RayConfig()
    chosen = ray_config(parse("--ray", "--replicas", "3", "--address", "auto", "--routing", "least_loaded",
                              "--cpus-per-replica", "2", "--gpus-per-replica", "1"))
    assert chosen == RayConfig(replicas=3, address="auto", routing=LEAST_LOADED, cpus_per_replica=2.0,
                               gpus_per_replica=1.0)
    assert ray_config(parse("--ray")).store_url is None  # replicas read the front's registry paths
    assert ray_config(parse("--ray", "--store-url", "s3://bucket/sdserve")) == RayConfig(store_url="s3://bucket/sdserve")
