"""The replicas as a Serve config file (`--print-serve-config`, `serve run`) and a front that attaches.

The fast tests read the file as Ray Serve's own schema reads it and build the application from it
without starting Ray; the slow one deploys the file with Ray's `serve run` command on a local Ray
instance and serves an image through a front started with `--attach`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

ray = pytest.importorskip("ray", reason="ray is an optional extra (pip install 'sdserve[ray]')")

from sdserve.cli.main import build_parser  # noqa: E402
from sdserve.errors import InvalidArgument  # noqa: E402
from sdserve.scaleout.app import app_args, build_app, describe, parse_app_args, serve_config_yaml  # noqa: E402
from sdserve.scaleout.config import LEAST_LOADED, RayConfig  # noqa: E402
from tests.server.conftest import MODEL, make_config, max_diff, png_pixels, reference_images  # noqa: E402


def _print_config(capsys, *argv: str) -> dict:
    args = build_parser("serve").parse_args(["serve", "--ray", "--print-serve-config", *argv])
    assert args.func(args) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_printed_file_is_a_serve_config_that_builds_the_flags_replicas(capsys, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    toml = tmp_path / "server.toml"
    toml.write_text(f'[models]\nserve = ["{MODEL}"]\n')
    document = _print_config(capsys, "--config", str(toml), "--replicas", "3", "--routing", "least_loaded",
                             "--cpus-per-replica", "2", "--app-name", "tenants-a")
    schema = ServeDeploySchema.model_validate(document)  # what `serve run` / `serve deploy` check first
    (app,) = schema.applications
    assert app.name == "tenants-a" and app.route_prefix is None and schema.proxy_location.value == "Disabled"
    assert app.args == {"config": str(toml.resolve()), "replicas": 3, "routing": "least_loaded",
                        "cpus_per_replica": 2.0}
    config, ray_config = parse_app_args(app.args)
    assert config.models.serve == (MODEL,)
    assert ray_config == RayConfig(replicas=3, routing=LEAST_LOADED, cpus_per_replica=2.0)
    built = build_app(app.args)  # Ray's builder call, no Ray started
    options = built._bound_deployment._deployment_config
    assert options.num_replicas == 3 and options.max_ongoing_requests == RayConfig().max_ongoing_requests


def test_the_affine_router_is_in_the_built_application():
    built = build_app(app_args(None, [MODEL], None, RayConfig(replicas=2, spill_threshold=2)))
    router = built._bound_deployment._deployment_config.request_router_config
    assert router.request_router_class.endswith("StackAffinityRouter")
    assert router.request_router_kwargs == {"spill_threshold": 2, "remembered": RayConfig().stacks_per_replica}


def test_application_args_are_checked_in_one_line():
    with pytest.raises(InvalidArgument, match="unknown key.*replica\\b"):
        parse_app_args({"replica": 2})
    with pytest.raises(InvalidArgument, match="--routing: must be one of"):
        parse_app_args({"routing": "random"})


def test_a_replica_describes_what_an_attaching_front_adopts(tmp_path):
    config = make_config(tmp_path)
    facts = describe(config, RayConfig(replicas=4, routing=LEAST_LOADED, store_url="file:///s"), [MODEL])
    assert facts["models"] == [MODEL] and facts["default_model"] == config.models.default_model
    assert facts["ray_config"]["replicas"] == 4 and facts["ray_config"]["store_url"] == "file:///s"
    assert "address" not in facts["ray_config"] and "attach" not in facts["ray_config"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--attach"], "--attach: needs --address"),
    (["--attach", "--address", "auto", "--replicas", "2"], "--replicas: is set by the application's Serve config"),
    (["--attach", "--address", "auto", "--print-serve-config"], "--attach: is for the front"),
])
def test_bad_attach_flags_exit_2_with_one_line(argv, message, capsys):
    args = build_parser("serve").parse_args(["serve", "--ray", *argv])
    with pytest.raises(SystemExit) as exit_info:
        args.func(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.slow
def test_serve_run_deploys_the_file_and_an_attached_front_serves_it(tmp_path, reference_engine, lora_bytes):
    """Ray's own `serve run FILE` deploys the replicas (with a compiled variant of a hot stack from
    the server.toml both read); `attach` adopts their settings; images through the front equal the
    in-process engine's, the hot stack's from the variant; the front's stop leaves the application."""
    from ray import serve

    from sdserve.compile.fused_model import FuseConfig, fuse_model
    from sdserve.compile.source import LoRAArg
    from sdserve.scaleout.app import attach
    from sdserve.scaleout.cluster import start_ray
    from sdserve.server.variants import VariantConfig
    from tests.scaleout.test_ray_serve import RayServerThread

    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    data_dir = tmp_path / "registry"
    lora = tmp_path / "ink.safetensors"
    lora.write_bytes(lora_bytes["sd1_a"])
    fuse_model(FuseConfig(model=MODEL, out=tmp_path / "ink-fused", progress=False, loras=(LoRAArg(lora, 0.9),)))
    toml = tmp_path / "server.toml"
    toml.write_text(f'[models]\nserve = ["{MODEL}"]\n[registry]\ndata_dir = "{data_dir}"\n'
                    f'[[variants]]\nmodel = "{MODEL}"\ndir = "{tmp_path / "ink-fused"}"\nname = "ink-hot"\n')
    config = make_config(data_dir, variants=(VariantConfig(model=MODEL, dir=str(tmp_path / "ink-fused"),
                                                           name="ink-hot"),))
    local = RayConfig(app_name="sdserve-yaml")
    started = start_ray(local, num_cpus=2, object_store_memory=100 * 1024 * 1024,
                        runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
    address = ray.get_runtime_context().gcs_address
    file = tmp_path / "sdserve.yaml"
    file.write_text(serve_config_yaml(app_args(toml, (), None, RayConfig(replicas=2, routing=LEAST_LOADED)),
                                      "sdserve-yaml"))
    log = (tmp_path / "serve-run.log").open("wb")
    runner = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "serve"), "run", str(file),
                               "--address", address], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, start_new_session=True)
    front = None
    try:
        deadline = time.monotonic() + 240
        while True:  # serve run returns nothing to wait on: poll the application's status
            status = serve.status().applications.get("sdserve-yaml")
            if status is not None and status.status == "RUNNING":
                break
            assert runner.poll() is None, (tmp_path / "serve-run.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"not running after 240 s: {status}"
            time.sleep(1.0)
        handle, adopted = attach(config, RayConfig(address=address, attach=True, app_name="sdserve-yaml"))
        assert adopted.replicas == 2 and adopted.routing == LEAST_LOADED and adopted.address == address
        front = RayServerThread(config, handle, adopted).start()
        request = {"model": MODEL, "prompt": "a red circle", "seed": 7, "steps": 2}
        response = front.client("alice").generate(request, timeout=120)
        (image,) = response.images
        (want,) = reference_images(reference_engine, request)
        assert max_diff(png_pixels(image.png), want) <= 2
        front.client("alice").upload_adapter(lora_bytes["sd1_a"], name="ink", family="sd1")
        hot = {**request, "seed": 8, "adapters": [{"name": "ink", "scale": 0.9}]}
        response = front.client("alice").generate(hot, timeout=120)
        assert (response.backend, response.variant) == ("fused", "ink-hot")
        (image,) = response.images
        (want,) = reference_images(reference_engine, {**hot, "adapters": [{"path": str(lora), "scale": 0.9}]})
        assert max_diff(png_pixels(image.png), want) <= 2
        front.stop()
        front = None
        assert serve.status().applications["sdserve-yaml"].status == "RUNNING"  # the operator's to stop
        other = make_config(data_dir, models=(MODEL, "tiny-sdxl"))
        with pytest.raises(InvalidArgument, match="serves tiny-sd1, this front's config tiny-sd1, tiny-sdxl"):
            attach(other, RayConfig(address=address, attach=True, app_name="sdserve-yaml"))
    finally:
        if front is not None:
            front.stop()
        os.killpg(runner.pid, signal.SIGINT)  # serve run's Ctrl-C: it shuts Serve down (the app with it)
        try:
            runner.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
        if started:
            ray.shutdown()
