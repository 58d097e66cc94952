"""The load generator's own end-of-run cancellations are not failures; `bench.load --target` takes
any HOST:PORT, API keys from flags or a file (kept out of the JSON) and writes where it is told."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import bench.load as load_cli
from bench.load_gen import CUT_OFF, Connection, Record, _one, summarize


class _SilentStub:
    """A server that never answers: the stream waits until the generator cancels it."""

    def GenerateStream(self, request, timeout, metadata):  # noqa: N802 (the gRPC method's name)
        async def events():
            await asyncio.sleep(3600)
            yield None

        return events()


def test_a_request_the_generator_cancels_is_a_cut_off_not_a_failure() -> None:
    record = Record(0, 0, 0, 2, 0.0)

    async def run() -> None:
        task = asyncio.ensure_future(_one(_SilentStub(), record, None, [], 30.0, 0.0))
        await asyncio.sleep(0.05)
        task.cancel()  # what drive() does to whatever is open when the drain time ends
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    assert record.status == CUT_OFF
    served = [Record(i, 0, 0, 2, 0.1 * i, status="OK", latency=1.0, timings={"queue": 0.0, "adapter_load": 0.0,
              "denoise": 0.5, "decode": 0.1}) for i in range(1, 4)]
    shed = Record(4, 0, 0, 2, 0.4, status="RESOURCE_EXHAUSTED")
    summary = summarize([*served, shed, record, Record(5, 0, 0, 2, 0.5, status=CUT_OFF)], slo=2.0)
    assert summary["cut_off"] == 2 and summary["errors"][CUT_OFF] == 2
    assert summary["unexpected_errors"] == 0
    broken = summarize([*served, Record(6, 0, 0, 2, 0.6, status="INTERNAL"), record], slo=2.0)
    assert broken["unexpected_errors"] == 1  # a server failure still fails the run


def test_target_flags_keys_tls_and_output_outside_the_checkout(tmp_path: Path, monkeypatch) -> None:
    seen: dict = {}

    def fake_upload(target, model, count, tenants, directory, connection):
        seen["upload"] = (target, tenants, directory, connection)

    def fake_run(target, workload, **kwargs):
        seen["run"] = (target, workload, kwargs["connection"])
        return {"summary": summarize([], slo=2.0), "records": []}

    monkeypatch.setattr(load_cli, "upload_adapters", fake_upload)
    monkeypatch.setattr(load_cli, "run_one", fake_run)
    keys = tmp_path / "keys.txt"
    keys.write_text("key-one\n\nkey-two\n")
    out = tmp_path / "elsewhere" / "load.json"
    argv = ["--target", "gpu-box.example:7443", "--api-key", "key-zero", "--api-keys-file", str(keys), "--ca",
            str(tmp_path / "ca.pem"), "--rate", "2", "--out", str(out), "--adapter-dir", str(tmp_path / "adapters")]
    assert load_cli.main(argv) == 0
    connection = Connection(keys=("key-zero", "key-one", "key-two"), ca=str(tmp_path / "ca.pem"))
    assert seen["upload"] == ("gpu-box.example:7443", 3, tmp_path / "adapters", connection)
    target, workload, used = seen["run"]
    assert (target, workload.tenants, used) == ("gpu-box.example:7443", 3, connection) and used.secure
    written = json.loads(out.read_text())
    assert "key-zero" not in written["command"] and "--api-key ***" in written["command"]


@pytest.mark.parametrize("argv", [["--target", "no-port", "--rate", "1"], ["--target", "host:x", "--rate", "1"],
                                  ["--target", "h:1", "--rate", "1", "--api-keys-file", "/nonexistent/keys"]])
def test_bad_target_flags_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        load_cli.main(argv)
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].split(": error: ")[1].startswith("--")


def test_a_connection_needs_one_key_per_tenant() -> None:
    assert Connection().tenant_keys(2) == ["bench-tenant-0", "bench-tenant-1"]
    with pytest.raises(ValueError, match="3 tenants need 3 API keys"):
        Connection(keys=("a",)).tenant_keys(3)
