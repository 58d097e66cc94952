"""Another language: Node.js (@grpc/grpc-js + @grpc/proto-loader) loads the repo's .proto and
drives Generate, GenerateStream and ListModels against a real `sdserve serve` process."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from sdserve.protos.generate import PROTO_ROOT
from tests.server.conftest import max_diff, png_pixels, reference_images, start_subprocess_server

SCRIPT = r"""
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");
const fs = require("fs");
const [protoRoot, target, outDir] = process.argv.slice(2);
const definition = loader.loadSync("sdserve/v1/sdserve.proto", {
  includeDirs: [protoRoot], keepCase: true, longs: String, defaults: true, oneofs: true,
});
const v1 = grpc.loadPackageDefinition(definition).sdserve.v1;
const options = { "grpc.max_receive_message_length": 64 * 1024 * 1024 };
const generation = new v1.ImageGeneration(target, grpc.credentials.createInsecure(), options);
const models = new v1.Models(target, grpc.credentials.createInsecure());
const meta = new grpc.Metadata();
meta.add("authorization", "Bearer node-key");
const request = { model: "tiny-sd1", prompt: "a red circle", seed: 42, steps: 3 };
const report = {};
models.ListModels({}, meta, (err, reply) => {
  if (err) throw err;
  report.models = reply.models.map((m) => m.name);
  generation.Generate(request, meta, { deadline: Date.now() + 60000 }, (err, response) => {
    if (err) throw err;
    fs.writeFileSync(`${outDir}/node.png`, response.images[0].png);
    report.seed = response.seed;
    report.denoise = response.timings.denoise;
    generation.Generate({ prompt: "" }, meta, (err) => {
      report.error = { code: err.code, details: err.details };
      const steps = [];
      const call = generation.GenerateStream({ ...request, steps: 4 }, meta);
      call.on("data", (event) => { steps.push(event.event); });
      call.on("error", (e) => { throw e; });
      call.on("end", () => {
        report.stream = steps;
        console.log(JSON.stringify(report));
      });
    });
  });
});
"""

CONFIG = """
[server]
port = @PORT@

[models]
serve = ["tiny-sd1"]

[registry]
data_dir = "@DATA@"

[[tenants]]
name = "node"
key = "node-key"
"""


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js or npm is not installed")
    directory = tmp_path_factory.mktemp("node")
    result = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "@grpc/grpc-js", "@grpc/proto-loader"],
        cwd=directory, capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        pytest.skip(f"npm could not install @grpc/grpc-js (registry unreachable?): {result.stderr[-300:]}")
    return directory


# slow: a subprocess server and Node.js (26 s); the Python client drives the same proto by default
@pytest.mark.slow
def test_node_client_drives_generate(node_modules, tmp_path, reference_engine):
    process, port, log = start_subprocess_server(tmp_path, CONFIG)
    try:
        script = node_modules / "client.js"
        script.write_text(SCRIPT)
        result = subprocess.run(
            ["node", str(script), str(PROTO_ROOT), f"127.0.0.1:{port}", str(tmp_path)],
            capture_output=True, text=True, timeout=120, cwd=node_modules,
        )
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        process.terminate()
        process.wait(30)
    assert report["models"] == ["tiny-sd1"]
    assert report["seed"] == "42" and report["denoise"] > 0
    assert report["error"]["code"] == 3 and report["error"]["details"].startswith("prompt:")  # INVALID_ARGUMENT
    assert report["stream"] == ["queued", "progress", "progress", "progress", "progress", "result"]
    want = reference_images(reference_engine, {"model": "tiny-sd1", "prompt": "a red circle", "seed": 42, "steps": 3})[0]
    assert max_diff(png_pixels((tmp_path / "node.png").read_bytes()), want) <= 2
