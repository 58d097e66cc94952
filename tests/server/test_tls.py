"""TLS on the gRPC port (issue 23 item 5): a CA, server and client certificates made here with
`openssl`, the whole generate path over TLS and mutual TLS, clients without TLS or without a
certificate refused at the handshake, and bad certificate files refused at start-up in one line.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from sdserve.client import Client
from sdserve.errors import InvalidArgument
from sdserve.server.app import Server
from sdserve.server.config import ServerConfig
from tests.server.conftest import (
    KEYS,
    MODEL,
    ServerThread,
    make_config,
    max_diff,
    png_pixels,
    reference_images,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

REQUEST = {"model": MODEL, "prompt": "a red circle", "steps": 2, "seed": 11}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key_and_csr(name: str, cwd: Path) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)


def _sign(name: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem, server.pem/.key (for 127.0.0.1 and localhost), client.pem/.key, all signed by the CA."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=sdserve-test-ca", cwd=d)
    _key_and_csr("server", d)
    _sign("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", d)
    _key_and_csr("client", d)
    _sign("client", "extendedKeyUsage=clientAuth\n", d)
    return d


def _tls_config(pki: Path, data_dir: Path, mutual: bool):
    config = make_config(data_dir)
    server = replace(config.server, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                     tls_client_ca=str(pki / "ca.pem") if mutual else "")
    return replace(config, server=server)


@pytest.fixture(scope="module", params=["tls", "mutual"])
def tls_server(request, pki, tmp_path_factory) -> Iterator[tuple[ServerThread, bool]]:
    mutual = request.param == "mutual"
    thread = ServerThread(_tls_config(pki, tmp_path_factory.mktemp("registry"), mutual)).start()
    yield thread, mutual
    thread.stop()


def _client(server: ServerThread, pki: Path, mutual: bool, **kwargs) -> Client:
    if mutual:
        kwargs.update(cert=pki / "client.pem", key=pki / "client.key")
    return Client(server.target, api_key=KEYS["alice"], ca=pki / "ca.pem", **kwargs)


def test_generate_over_tls_returns_the_engines_image(tls_server, pki, reference_engine):
    server, mutual = tls_server
    with _client(server, pki, mutual) as client:
        assert client.health() == "SERVING"
        response = client.generate(REQUEST, timeout=120)
        streamed = [e for e in client.generate_stream({**REQUEST, "seed": 12}, timeout=120)]
    assert max_diff(png_pixels(response.images[0].png), reference_images(reference_engine, REQUEST)[0]) <= 2
    assert streamed[-1].WhichOneof("event") == "result" and streamed[-1].result.images


def test_a_plaintext_client_is_refused_cleanly_and_the_server_goes_on(tls_server, pki):
    server, mutual = tls_server
    with server.client("alice", timeout=10) as plain, pytest.raises(grpc.RpcError) as refused:
        plain.generate(REQUEST)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with _client(server, pki, mutual) as client:
        assert client.health() == "SERVING"


def test_without_the_ca_the_server_is_not_trusted(tls_server, pki):
    server, mutual = tls_server
    kwargs = {"cert": pki / "client.pem", "key": pki / "client.key"} if mutual else {}
    system_cas = Client(server.target, api_key=KEYS["alice"], tls=True, timeout=10, **kwargs)
    with system_cas as client, pytest.raises(grpc.RpcError) as refused:
        client.list_models()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_a_certificate(tls_server, pki):
    server, mutual = tls_server
    if not mutual:
        pytest.skip("the server asks for no client certificate")
    without_certificate = Client(server.target, api_key=KEYS["alice"], ca=pki / "ca.pem", timeout=10)
    with without_certificate as client, pytest.raises(grpc.RpcError) as refused:
        client.list_models()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_cli_client_speaks_tls(tls_server, pki, capsys):
    from sdserve.cli.main import main

    server, mutual = tls_server
    flags = ["--target", server.target, "--api-key", KEYS["alice"], "--ca", str(pki / "ca.pem")]
    if mutual:
        flags += ["--cert", str(pki / "client.pem"), "--key", str(pki / "client.key")]
    assert main(["client", *flags, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    with pytest.raises(SystemExit) as exited:  # the same server without --ca/--tls: plaintext
        main(["client", "--target", server.target, "--timeout", "5", "health"])
    assert exited.value.code == 1 and "UNAVAILABLE" in capsys.readouterr().err


def test_the_cli_client_refuses_unreadable_pem_files_in_one_line(tmp_path, capsys):
    from sdserve.cli.main import main

    for flags in (["--ca", str(tmp_path / "missing.pem")], ["--cert", str(tmp_path / "c.pem")]):
        with pytest.raises(SystemExit) as exited:
            main(["client", "--target", "127.0.0.1:9", *flags, "health"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1 and err.startswith("sdserve: error: --"), err


# -- bad files: one line at start-up, before any model loads -------------------------------------


def _bad_files(pki: Path, tmp: Path) -> dict[str, tuple[dict[str, str], str]]:
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    good = {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}
    return {
        "missing cert": ({**good, "tls_cert": str(tmp / "nope.pem")}, "tls_cert: cannot read"),
        "key of another certificate": ({**good, "tls_key": str(pki / "client.key")}, "does not belong to tls_cert"),
        "not PEM": ({**good, "tls_cert": str(garbage)}, "is not a PEM certificate and key"),
        "client CA not PEM": ({**good, "tls_client_ca": str(garbage)}, "tls_client_ca is not a PEM CA"),
        "missing client CA": ({**good, "tls_client_ca": str(tmp / "nope-ca.pem")}, "tls_client_ca: cannot read"),
    }


@pytest.mark.parametrize(
    "case", ["missing cert", "key of another certificate", "not PEM", "client CA not PEM", "missing client CA"]
)
def test_bad_tls_files_fail_the_server_before_it_loads_a_model(case, pki, tmp_path):
    values, expected = _bad_files(pki, tmp_path)[case]
    config = make_config(tmp_path / "data")
    config = replace(config, server=replace(config.server, **values))
    with pytest.raises(InvalidArgument) as refused:
        Server(config)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


def test_sdserve_serve_with_a_bad_tls_file_exits_2_with_one_line(pki, tmp_path, capsys):
    from sdserve.cli.main import main

    config = tmp_path / "server.toml"
    config.write_text(f'[server]\nport = 0\ntls_cert = "{tmp_path / "missing.pem"}"\ntls_key = "{pki / "server.key"}"\n'
                      f'[registry]\ndata_dir = "{tmp_path / "data"}"\n')
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2
    assert err[-1].startswith("sdserve: error: [server] tls_cert: cannot read"), err


@pytest.mark.parametrize(
    ("values", "expected"),
    [({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
     ({"tls_key": "k.pem"}, "tls_cert and tls_key go together"),
     ({"tls_client_ca": "ca.pem"}, "tls_client_ca needs tls_cert")],
)
def test_config_refuses_half_a_tls_setup(values, expected):
    from sdserve.server.config import config_from_dict

    with pytest.raises(InvalidArgument, match=expected):
        config_from_dict({"server": values})
    assert ServerConfig().tls_cert == ""  # plaintext unless asked
