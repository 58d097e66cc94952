"""The xformers attention backend (issue 23 item 11).

Here (CPU, no xformers): the config key, the one-line refusals (API: InvalidArgument; CLI: exit
2), and the wiring, proven with a stand-in `xformers.ops` injected into sys.modules that computes
attention by torch's sdpa and records its calls: with attention = "xformers" every UNet attention
layer runs the backend's kernel, the IP-Adapter multi-branch path passes it its image branches, and
the images equal the sdpa engine's. Where xformers and CUDA exist, the parity tests at the end run
the real kernel against sdpa; elsewhere they skip saying so.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.ip_adapter import IPAdapterSpec
from sdserve.errors import InvalidArgument
from sdserve.kernels import attention_xformers, scaled_multi_branch_attention_reference
from sdserve.kernels.attention import scaled_multi_branch_attention

REAL_XFORMERS = importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()
NO_REAL_XFORMERS = "needs xformers and CUDA (xformers has no CPU kernels); the CPU tests above use a stand-in"


class FakeXformers:
    """A stand-in `xformers.ops.memory_efficient_attention`: sdpa on xformers' [B, L, H, D] layout."""

    def __init__(self) -> None:
        self.key_lengths: list[int] = []

    def memory_efficient_attention(self, q, k, v):  # [B, Lq, H, D], [B, Lk, H, D] -> [B, Lq, H, D]
        assert q.dim() == 4 and q.stride(-1) == 1 and k.stride(-1) == 1, "xformers needs the last dim contiguous"
        self.key_lengths.append(k.shape[1])
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def install(self, monkeypatch) -> None:
        package, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
        ops.memory_efficient_attention = self.memory_efficient_attention
        package.ops = ops
        monkeypatch.setitem(sys.modules, "xformers", package)
        monkeypatch.setitem(sys.modules, "xformers.ops", ops)


# -- configuration and refusals --------------------------------------------------------------------


def test_config_values_and_refusals(monkeypatch):
    assert EngineConfig().attention == "sdpa"
    with pytest.raises(InvalidArgument, match=r"attention must be sdpa or xformers \(got 'flash'\)"):
        EngineConfig(attention="flash")
    monkeypatch.setitem(sys.modules, "xformers", None)  # as if not installed, even where it is
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(InvalidArgument) as info:
        EngineConfig(attention="xformers", device="cpu")
    message = str(info.value)
    assert "xformers is not usable here (" in message and "sdserve[xformers]" in message
    assert "\n" not in message
    # Installed but on CPU: refused for the device.
    FakeXformers().install(monkeypatch)
    with pytest.raises(InvalidArgument, match=r"needs CUDA, and this engine runs on cpu; use attention = \"sdpa\""):
        EngineConfig(attention="xformers", device="cpu")
    # Installed and on CUDA: usable (the check alone; nothing runs).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention_xformers.xformers_unavailable(torch.device("cuda")) is None


def test_server_config_and_cli_refuse_xformers_here(tmp_path, monkeypatch, capsys):
    from sdserve.cli.main import main
    from sdserve.server.config import config_from_dict

    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    with pytest.raises(InvalidArgument, match="xformers is not usable here"):
        config_from_dict({"engine": {"attention": "xformers", "device": "cpu"}})
    assert config_from_dict({"engine": {"attention": "sdpa"}}).engine.attention == "sdpa"
    config = tmp_path / "server.toml"
    config.write_text('[engine]\nattention = "xformers"\ndevice = "cpu"\n')
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2, err
    assert len(err.splitlines()) == 1 and 'attention = "xformers": xformers is not usable here' in err, err
    # The in-process CLI: refused before any model loads.
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--prompt", "a cat", "--out", str(tmp_path / "x.png"), "--attention", "xformers"])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and len(err.splitlines()) == 1 and "xformers is not usable here" in err, err


# -- the kernel, against sdpa ------------------------------------------------------------------------


def test_multi_branch_attention_with_a_kernel_equals_the_reference():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 10, 8, generator=generator)  # [B, H, Lq, D]
    k_text, v_text = torch.randn(2, 3, 2, 7, 8, generator=generator)  # [B, H, Lt, D] each
    k_image, v_image = torch.randn(2, 3, 2, 2, 5, 8, generator=generator)  # [B, NB, H, Li, D] each
    scales = torch.tensor([[0.5, 1.0], [0.0, 0.7], [1.0, 0.0]])
    present = torch.tensor([[True, True], [False, True], [True, False]])
    lengths = torch.tensor([[5, 3], [5, 5], [2, 5]], dtype=torch.int32)
    calls: list[int] = []

    def attend(query, key, value):
        calls.append(key.shape[2])
        return F.scaled_dot_product_attention(query, key, value)

    args = (q, k_text, v_text, k_image, v_image, scales, present, lengths)
    want = scaled_multi_branch_attention_reference(*args)
    got = scaled_multi_branch_attention(*args, attend=attend)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert calls.count(7) == 1 and sorted(calls) == [2, 3, 5, 5, 7]  # text once, then each (branch, length) group


def test_memory_efficient_attention_wraps_xformers_layout(monkeypatch):
    fake = FakeXformers()
    fake.install(monkeypatch)
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)  # [B, H, L, D]
    torch.testing.assert_close(attention_xformers.memory_efficient_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v), rtol=0, atol=1e-6)
    assert fake.key_lengths == [6]
    with pytest.raises(ValueError, match=r"q \[B, H, Lq, D\]"):
        attention_xformers.memory_efficient_attention(q[0], k, v)


# -- the engine wired to the backend -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ip_dir(tmp_path_factory):
    from tests.engine.test_ip_adapter import make_ip_adapter

    return make_ip_adapter("tiny-sd1", tmp_path_factory.mktemp("ip"))


def _requests(ip_dir) -> list[RequestSpec]:
    from tests.engine.test_image_inputs import png, scene

    ip = IPAdapterSpec(model=str(ip_dir), image=png(scene(40, 40, seed=9)), scale=0.7)
    return [
        RequestSpec(model="tiny-sd1", prompt="a red circle", seed=3, steps=2, guidance_scale=6.0, ip_adapters=(ip,)),
        RequestSpec(model="tiny-sd1", prompt="a blue square", seed=4, steps=2, guidance_scale=6.0),
    ]


def _images(engine: Engine, specs: list[RequestSpec]) -> list[np.ndarray]:
    outcomes = engine.generate([engine.validate(spec) for spec in specs])  # one batch: IP rows beside plain ones
    return [np.asarray(outcome.images[0], dtype=np.int16) for outcome in outcomes]


def test_xformers_engine_runs_the_kernel_everywhere_and_gives_sdpa_images(monkeypatch, ip_dir):
    from sdserve.engine.attention_backend import KernelAttnProcessor
    from sdserve.engine.ip_adapter import RowBranchAttnProcessor

    specs = _requests(ip_dir)
    want = _images(Engine(EngineConfig(device="cpu")), specs)
    fake = FakeXformers()
    fake.install(monkeypatch)
    # The stand-in runs on CPU; the availability check would (rightly) refuse CPU.
    monkeypatch.setattr(attention_xformers, "xformers_unavailable", lambda device: None)
    engine = Engine(EngineConfig(device="cpu", attention="xformers"))
    unet = engine.models.get("tiny-sd1").unet
    assert {type(p) for p in unet.attn_processors.values()} == {KernelAttnProcessor}  # from load, no adapters yet
    got = _images(engine, specs)
    processors = list(unet.attn_processors.values())
    # Once the model serves adapters and IP-Adapters, the row-aware processors keep the kernel.
    assert all(isinstance(p, RowBranchAttnProcessor) and isinstance(p.plain, KernelAttnProcessor)
               and p.attend is attention_xformers.memory_efficient_attention for p in processors)
    lengths = set(fake.key_lengths)
    image_tokens = 4  # make_ip_adapter's projection: 4 tokens per image
    assert {77, image_tokens} <= lengths, lengths  # text cross-attention, and the IP branch through the kernel
    assert any(length not in (77, image_tokens) for length in lengths)  # self-attention (latent tokens)
    for ours, theirs in zip(got, want):
        assert int(np.abs(ours - theirs).max()) <= 1
    assert int(np.abs(got[0] - got[1]).max()) > 10  # two different requests: the comparison can fail


# -- parity where xformers and CUDA exist ------------------------------------------------------------


@pytest.mark.skipif(not REAL_XFORMERS, reason=NO_REAL_XFORMERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 8, 4096, 77, 40), (1, 10, 1024, 1024, 64), (3, 20, 256, 4, 64)])
def test_real_xformers_kernel_matches_sdpa(shape, dtype):
    batch, heads, lq, lk, head_dim = shape
    q = torch.randn(batch, lq, heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2)  # [B, H, Lq, D]
    k, v = (torch.randn(batch, lk, heads, head_dim, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2))
    atol = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(attention_xformers.memory_efficient_attention(q, k, v),
                               F.scaled_dot_product_attention(q, k, v), rtol=0, atol=atol)


@pytest.mark.skipif(not REAL_XFORMERS, reason=NO_REAL_XFORMERS)
def test_real_xformers_engine_matches_sdpa_engine(ip_dir):
    specs = _requests(ip_dir)
    want = _images(Engine(EngineConfig(device="cuda", dtype="float16")), specs)
    got = _images(Engine(EngineConfig(device="cuda", dtype="float16", attention="xformers")), specs)
    for ours, theirs in zip(got, want):
        assert int(np.abs(ours - theirs).max()) <= 2
