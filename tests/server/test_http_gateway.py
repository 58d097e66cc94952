"""The HTTP/JSON gateway against a real server on tiny-sd1, over urllib: the same images, auth,
admission and messages as gRPC (the gRPC client on the same server is the oracle), and the
playground page driven in Debian's headless Chromium (slow; skipped without /usr/bin/chromium).
"""

from __future__ import annotations

import base64
import http.client
import json
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from sdserve.api import convert
from sdserve.server.config import AdmissionConfig
from tests.server.conftest import KEYS, MODEL, ServerThread, make_config, max_diff, png_pixels, sha, wait_for

# A tenant's share holds one 32x32 request of up to 3 guided steps (32*32*3*2), not two of 2 steps.
ADMISSION = AdmissionConfig(max_pending_cost=1 << 20, max_tenant_pending_cost=6144, max_inflight_cost=1 << 20)
REQUEST = {"prompt": "a red circle", "seed": 11, "steps": 2, "width": 32, "height": 32}
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Any:
    config = make_config(tmp_path_factory.mktemp("registry"), admission=ADMISSION)
    config = replace(config, server=replace(config.server, http_port=0, metrics_port=None))
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def call(gateway: ServerThread, path: str, body: Any = None, tenant: str | None = "alice",
         method: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    """-> (HTTP status, parsed JSON or raw bytes, response headers)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{gateway.server.http.port}{path}", data=data,
                                     method=method, headers=headers or {})
    if tenant:
        request.add_header("Authorization", f"Bearer {KEYS[tenant]}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw, head = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, raw, head = error.code, error.read(), error.headers
    if head.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(raw), head
    return status, raw, head


def grpc_error(gateway: ServerThread, tenant: str | None, request: dict[str, Any]) -> grpc.RpcError:
    with gateway.client(tenant) as client, pytest.raises(grpc.RpcError) as caught:
        client.generate(request)
    return caught.value


def sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_generate_over_http_equals_grpc(gateway):
    status, body, _ = call(gateway, "/v1/generate", REQUEST)
    assert status == 200, body
    with gateway.client("alice") as client:
        expected = client.generate(REQUEST)
    assert body["model"] == MODEL and int(body["seed"]) == REQUEST["seed"]
    (image,) = body["images"]
    png = base64.b64decode(image["png"])
    assert max_diff(png_pixels(png), png_pixels(expected.images[0].png)) == 0
    assert png == expected.images[0].png  # same pixels, same A1111 parameters chunk


def test_stream_gives_queued_progress_with_previews_then_the_image(gateway):
    request = {**REQUEST, "steps": 3, "preview_every": 1}
    status, raw, head = call(gateway, "/v1/generate:stream", request)
    assert status == 200 and head["Content-Type"] == "text/event-stream"
    events = sse(raw)
    assert [name for name, _ in events] == ["queued", "progress", "progress", "progress", "result"]
    with gateway.client("alice") as client:
        expected = list(client.generate_stream(request))
    # Every progress event as gRPC streams it: step, total and the preview's PNG bytes.
    progress = [data["progress"] for name, data in events if name == "progress"]
    assert [(p["step"], p["total_steps"], base64.b64decode(p.get("preview_png", ""))) for p in progress] == [
        (e.progress.step, e.progress.total_steps, e.progress.preview_png) for e in expected if e.HasField("progress")]
    assert progress[0].get("preview_png")  # previews asked for, and there
    final = base64.b64decode(events[-1][1]["result"]["images"][0]["png"])
    assert max_diff(png_pixels(final), png_pixels(expected[-1].result.images[0].png)) == 0


@pytest.mark.parametrize("tenant_key", [None, "not-a-key"])
def test_unauthenticated_is_refused_with_grpcs_message(gateway, tenant_key):
    headers = {"Authorization": f"Bearer {tenant_key}"} if tenant_key else {}
    status, body, head = call(gateway, "/v1/generate", REQUEST, tenant=None, headers=headers)
    assert status == 401 and head["WWW-Authenticate"] == "Bearer"
    from sdserve.client import Client

    with Client(gateway.target, api_key=tenant_key) as client, pytest.raises(grpc.RpcError) as caught:
        client.generate(REQUEST)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert body == {"code": "UNAUTHENTICATED", "message": caught.value.details()}
    # Streams and the other calls are refused the same way, before any event.
    assert call(gateway, "/v1/generate:stream", REQUEST, tenant=None, headers=headers)[0] == 401
    assert call(gateway, "/v1/adapters", tenant=None, headers=headers)[0] == 401


def test_bad_json_is_a_400_with_one_line_after_authentication(gateway):
    status, body, _ = call(gateway, "/v1/generate", b'{"prompt": "a", ')
    assert status == 400 and body["code"] == "INVALID_ARGUMENT"
    assert body["message"].startswith("the request body is not valid JSON") and "\n" not in body["message"]
    # The schema's own checks, with the message the JSON request files get (ARCHITECTURE rule 1).
    status, body, _ = call(gateway, "/v1/generate", {"prompt": "a", "steps": "many"})
    assert (status, body["message"]) == (400, 'steps: must be an integer (got "many")')
    # A valid JSON request the engine refuses: gRPC's INVALID_ARGUMENT message, word for word.
    bad = {**REQUEST, "width": 33}
    assert call(gateway, "/v1/generate", bad)[1]["message"] == grpc_error(gateway, "alice", bad).details()
    # Unauthenticated callers hear 401 whatever they sent.
    assert call(gateway, "/v1/generate", b"{bad", tenant=None)[0] == 401


def test_admission_refusal_is_a_429_with_grpcs_message(gateway):
    # A gRPC stream nobody reads (1-byte flow-control window) keeps alice's share taken until it ends.
    channel = grpc.insecure_channel(gateway.target, options=[("grpc.http2.lookahead_bytes", 1), ("grpc.http2.bdp_probe", 0)])
    held = convert.stubs(channel).generation.GenerateStream(
        convert.pb_from_dict(REQUEST), metadata=[("authorization", f"Bearer {KEYS['alice']}")], timeout=60)
    try:
        assert wait_for(lambda: gateway.on_loop(lambda: gateway.core.admission.pending_cost) > 0)
        status, body, _ = call(gateway, "/v1/generate", REQUEST)
        error = grpc_error(gateway, "alice", REQUEST)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (status, body) == (429, {"code": "RESOURCE_EXHAUSTED", "message": error.details()})
        assert call(gateway, "/v1/generate:stream", REQUEST)[0] == 429  # refused before any event
        assert call(gateway, "/v1/generate", REQUEST, tenant="bob")[0] == 200  # bob's share is his own
    finally:
        held.cancel()
        channel.close()
    assert wait_for(lambda: gateway.on_loop(lambda: gateway.core.admission.pending_cost) == 0)


def test_size_limits_endpoints_and_methods(gateway):
    connection = http.client.HTTPConnection("127.0.0.1", gateway.server.http.port, timeout=10)
    # A body over the limit is refused from its Content-Length, before it is read.
    connection.putrequest("POST", "/v1/generate")
    connection.putheader("Content-Length", str(gateway.server.http.limits.json_body_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["code"] == "RESOURCE_EXHAUSTED"
    connection.close()
    assert call(gateway, "/v1/nothing")[0] == 404
    assert call(gateway, "/v1/models", method="DELETE")[0] == 405
    assert call(gateway, "/v1/adapters?colour=red")[0] == 400
    # Another site's page cannot make a visitor's browser call the gateway (it sends Origin).
    port = gateway.server.http.port
    assert call(gateway, "/v1/generate", REQUEST, headers={"Origin": "http://evil.example"})[0] == 403
    assert call(gateway, "/v1/models", headers={"Origin": f"http://127.0.0.1:{port}"})[0] == 200


def test_models_health_and_adapters_round_trip(gateway, lora_bytes):
    assert call(gateway, "/v1/health", tenant=None)[:2] == (200, {"status": "SERVING"})
    with gateway.client("alice") as client:
        assert call(gateway, "/v1/models")[1] == convert.to_dict(client.list_models())
    data = lora_bytes["sd1_a"]
    status, info, _ = call(gateway, "/v1/adapters?name=http-style&family=sd1", data)
    assert status == 200, info
    assert (info["name"], info["sha256"], int(info["size"])) == ("http-style", sha(data), len(data))
    assert [a["name"] for a in call(gateway, "/v1/adapters?family=sd1")[1]["adapters"]] == ["http-style"]
    assert call(gateway, "/v1/adapters", tenant="bob")[1] == {}  # another tenant's adapter is not listed
    assert call(gateway, "/v1/adapters/http-style", tenant="bob")[0] == 404
    # A wrong declared digest is refused by the server's own check.
    assert call(gateway, f"/v1/adapters?name=x&family=sd1&sha256={'0' * 64}", data)[0] == 400
    stacked = {**REQUEST, "adapters": [{"name": "http-style", "scale": 0.8, "start": 0.5, "end": 1.0}]}
    status, body, _ = call(gateway, "/v1/generate", stacked)
    with gateway.client("alice") as client:
        expected = client.generate(stacked)
    png = base64.b64decode(body["images"][0]["png"])
    assert max_diff(png_pixels(png), png_pixels(expected.images[0].png)) == 0
    assert body["adapters"][0]["sha256"] == sha(data)
    assert call(gateway, "/v1/adapters/http-style", method="DELETE")[1] == {"sha256": sha(data)}
    assert call(gateway, "/v1/adapters/http-style")[0] == 404
    # The upload's target model travels as the header's `model` (AdapterHeader.model).
    status, info, _ = call(gateway, f"/v1/adapters?name=for-model&model={MODEL}", data)
    assert (status, info.get("models")) == (200, [MODEL]), info
    assert call(gateway, "/v1/adapters/for-model", method="DELETE")[0] == 200
    status, info, _ = call(gateway, "/v1/adapters?name=nowhere&model=no-such-model", data)
    assert (status, info["code"]) == (400, "INVALID_ARGUMENT") and "no-such-model" in info["message"]


@pytest.mark.slow  # ~6-10 s of Chromium start-up alone at load 15 on 2 cores: past the default suite's budget
@pytest.mark.skipif(not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
                    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
def test_playground_in_headless_chromium(gateway, tmp_path, lora_bytes, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    data = lora_bytes["sd1_b"]
    assert call(gateway, "/v1/adapters?name=playground-style&family=sd1", data)[0] == 200
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,1000"):
        options.add_argument(flag)
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # selenium-manager reports nothing either
    # An explicit driver path: selenium-manager has nothing to look up or download.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(f"http://127.0.0.1:{gateway.server.http.port}/")
        key = driver.find_element(By.ID, "api-key")
        key.send_keys(KEYS["alice"])
        driver.find_element(By.ID, "refresh").click()
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 1)
        driver.find_element(By.ID, "prompt").send_keys(REQUEST["prompt"])
        for field, value in (("steps", 3), ("seed", REQUEST["seed"]), ("width", 32), ("height", 32)):
            driver.find_element(By.ID, field).send_keys(str(value))
        driver.find_element(By.ID, "add-adapter").click()
        wait.until(lambda d: "playground-style" in d.find_element(By.CSS_SELECTOR, ".adapter-name").text)
        Select(driver.find_element(By.CSS_SELECTOR, ".adapter-name")).select_by_value("playground-style")
        start = driver.find_element(By.CSS_SELECTOR, "#adapters .start")
        start.clear()
        start.send_keys("0.3")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
            driver.find_element(By.ID, "status").text
        shot = tmp_path / "playground.png"
        driver.save_screenshot(str(shot))
        print(f"playground screenshot: {shot}")
        src = driver.find_element(By.ID, "result-image").get_attribute("src")
        preview = driver.find_element(By.ID, "preview-image").get_attribute("src")
        params = driver.find_element(By.ID, "params").text
    finally:
        driver.quit()
    assert preview.startswith("data:image/png;base64,")
    assert "Steps: 3" in params and f"Seed: {REQUEST['seed']}" in params and "playground-style" in params, params
    stacked = {**REQUEST, "steps": 3, "adapters": [{"name": "playground-style", "scale": 1.0, "start": 0.3, "end": 1.0}]}
    with gateway.client("alice") as client:
        expected = client.generate(stacked)
    png = base64.b64decode(src.removeprefix("data:image/png;base64,"))
    assert max_diff(png_pixels(png), png_pixels(expected.images[0].png)) == 0
