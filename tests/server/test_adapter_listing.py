"""ListAdapters / GetAdapter report each file's form, rank and targets, and a Concept Slider's
trained scales and suggested start: read once at upload, kept across a restart, and empty for
adapters registered before servers reported them."""

from __future__ import annotations

import safetensors
import safetensors.torch
import torch

from sdserve.api import convert
from sdserve.server.registry import SHARED
from tests.server.conftest import MODEL, ServerThread, make_config, sha
from tests.server.test_registry import write_old_registry

# A LoHa for tiny-sd1 (LyCORIS's own modules): ranks 4, 2 and 3 on two attention projections and a conv.
MID = "unet.mid_block"
LOHA_PLAN = {
    f"{MID}.attentions.0.transformer_blocks.0.attn1.to_q": ("loha", {"lora_dim": 4, "alpha": 2.0}),
    f"{MID}.attentions.0.transformer_blocks.0.attn2.to_k": ("loha", {"lora_dim": 2, "alpha": 1.0}),
    f"{MID}.resnets.0.conv1": ("loha", {"lora_dim": 3, "alpha": 1.0}),
}


def _files(tmp_path) -> dict[str, tuple[str, bytes]]:
    """name -> (kind, file bytes): the LoHa, a 3-vector embedding and a two-width hypernetwork."""
    from diffusers import UNet2DConditionModel

    from sdserve.adapters.convert import convert_file
    from sdserve.models.builtin import builtin_path
    from tests.adapters.lycoris_factory import make_lycoris
    from tests.adapters.test_hypernetwork import a1111_hypernetwork

    unet = UNet2DConditionModel.from_pretrained(builtin_path(MODEL), subfolder="unet")
    loha = make_lycoris({"unet": unet}, LOHA_PLAN, seed=3)
    embedding = {"<cat-toy>": torch.randn(3, 32, generator=torch.Generator().manual_seed(1))}
    saved, _ = a1111_hypernetwork([32, 64], [1, 2, 1], "relu", False, False)
    torch.save(saved, tmp_path / "hn.pt")
    convert_file(tmp_path / "hn.pt", tmp_path / "hn.safetensors")
    return {
        "style-loha": ("lora", safetensors.torch.save(loha)),
        "cat-toy": ("embedding", safetensors.torch.save(embedding)),
        "mood": ("hypernetwork", (tmp_path / "hn.safetensors").read_bytes()),
    }


def as_slider(lora: bytes, tmp_path, metadata: dict[str, str]) -> bytes:
    """`lora` (file bytes) with sdserve's slider flag and `metadata` added to its header, as
    sdserve.trainers.slider writes a slider (a LoRA file flagged `sdserve_slider: true`)."""
    path = tmp_path / "plain.safetensors"
    path.write_bytes(lora)
    with safetensors.safe_open(path, "pt") as handle:
        header = handle.metadata() or {}
    return safetensors.torch.save(safetensors.torch.load(lora), metadata={**header, "sdserve_slider": "true", **metadata})


def _to_q_and_to_v_modules() -> int:
    """How many modules the conftest LoRAs adapt: PEFT targets every to_q and to_v of the UNet."""
    from diffusers import UNet2DConditionModel

    from sdserve.models.builtin import builtin_path

    unet = UNet2DConditionModel.from_pretrained(builtin_path(MODEL), subfolder="unet")
    return sum(1 for name, _ in unet.named_modules() if name.endswith((".to_q", ".to_v")))


def _listed(server: ServerThread) -> dict[str, tuple]:
    alice = server.client("alice")
    return {a.name: (a.kind, a.form, a.rank, a.targets, a.shared, a.sha256, tuple(a.slider_scales), a.slider_start)
            for a in alice.list_adapters().adapters}


def test_form_rank_targets_listed_kept_across_a_restart_and_empty_for_old_records(tmp_path, lora_bytes):
    data = tmp_path / "data"
    old_bytes = b"a file registered by an older server"
    write_old_registry(data, [(SHARED, "from-before", "lora", "sd1", old_bytes, 1700000000.0)])
    # The trainer writes "-1,1" and its --start; a range of five scales shows they are kept as written.
    slider = as_slider(lora_bytes["sd1_b"], tmp_path,
                       {"sdserve_slider_scale_range": "-2,-1,0,1,2", "sdserve_slider_start": "0.3"})
    files = {"style-lora": ("lora", lora_bytes["sd1_a"]), "size-slider": ("lora", slider), **_files(tmp_path)}
    modules = _to_q_and_to_v_modules()
    expected = {  # slider scales and start are empty for every file but the slider
        "style-lora": ("lora", "lora", 2, modules, False, sha(lora_bytes["sd1_a"]), (), 0.0),  # PEFT r=2
        "size-slider": ("lora", "lora", 2, modules, False, sha(slider), (-2.0, -1.0, 0.0, 1.0, 2.0), 0.3),
        "style-loha": ("lora", "loha", 4, len(LOHA_PLAN), False, sha(files["style-loha"][1]), (), 0.0),
        "cat-toy": ("embedding", "", 0, 3, False, sha(files["cat-toy"][1]), (), 0.0),  # 3 vectors
        "mood": ("hypernetwork", "", 0, 2, False, sha(files["mood"][1]), (), 0.0),  # widths 32 and 64
        "from-before": ("lora", "", 0, 0, True, sha(old_bytes), (), 0.0),
    }
    config = make_config(data)

    server = ServerThread(config).start()
    try:
        alice = server.client("alice")
        assert _listed(server) == {"from-before": expected["from-before"]}  # the old row lists, fields empty
        for name, (kind, payload) in files.items():
            info = alice.upload_adapter(payload, name=name, family="sd1", kind=kind)
            assert (info.kind, info.form, info.rank, info.targets, info.shared, info.sha256,
                    tuple(info.slider_scales), info.slider_start) == expected[name]
        assert _listed(server) == expected
        got = alice.get_adapter("style-loha")
        assert (got.form, got.rank, got.targets) == ("loha", 4, 3)
        got = alice.get_adapter("size-slider")
        assert (tuple(got.slider_scales), got.slider_start) == ((-2, -1, 0, 1, 2), 0.3)
        # The JSON mapping (the HTTP gateway's) has them too; proto3 JSON leaves out empty values.
        assert {key: convert.to_dict(got)[key] for key in ("slider_scales", "slider_start")} == {
            "slider_scales": [-2.0, -1.0, 0.0, 1.0, 2.0], "slider_start": 0.3}
        assert "slider_scales" not in convert.to_dict(alice.get_adapter("style-lora"))
        old = alice.get_adapter("from-before")
        assert (old.family, old.size, old.created) == ("sd1", len(old_bytes), 1700000000.0)
    finally:
        server.stop()

    restarted = ServerThread(config).start()  # read back from the registry on disk
    try:
        assert _listed(restarted) == expected
    finally:
        restarted.stop()

