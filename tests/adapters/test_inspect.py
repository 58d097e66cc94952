"""`describe` and `sdserve adapters inspect`: kind, rank, targets and family of every adapter kind;
unserved kinds refused naming the kind."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from sdserve.adapters.hypernetwork import METADATA_KEY, metadata_of
from sdserve.adapters.inspect import Listing, describe, listing
from sdserve.errors import UnsupportedAdapterKind
from tests.adapters.lora_factory import kohya_file_contents, peft_file_contents
from tests.adapters.lycoris_factory import make_lycoris
from tests.adapters.test_lycoris import PLAN


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`sdserve ARGS` in process: (exit code, stdout, stderr)."""
    from sdserve.cli.main import main

    try:
        code = main([*args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


CROSS_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"


def _bytes(tensors, metadata=None) -> bytes:
    return safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def test_lycoris_file(sd15_components):
    lyco = make_lycoris(sd15_components, PLAN, seed=1)
    summary = describe(_bytes(lyco, {"ss_base_model_version": "sd_v1"}), "f")
    assert summary.kind == "LoHa+LoKr" and summary.modules == {"LoHa": 6, "LoKr": 5}
    assert summary.rank == 8 and summary.ranks == (0, 2, 3, 4, 8)  # 0: the LoKr of two whole halves
    assert summary.components == ("text_encoder", "unet") and len(summary.targets) == len(PLAN)
    assert (summary.family, summary.family_source) == ("sd1", "ss_base_model_version metadata")
    assert summary.layout == "kohya"


def test_lora_locon_and_dora(sd15_lora):
    tensors, metadata = peft_file_contents(sd15_lora)
    summary = describe(_bytes(tensors, metadata), "f")
    # mixed_configs puts conv1/conv2 (3x3) in the UNet: a LoCon; ranks 2 to 4.
    assert summary.kind == "LoCon" and summary.layout == "peft" and summary.ranks == (2, 3, 4)
    assert summary.family == "unknown"  # tiny widths say nothing about the real families
    attention_only = {k: v for k, v in tensors.items() if ".resnets." not in k and "sample" not in k
                      and "conv_in" not in k and "conv_out" not in k}
    assert describe(_bytes(attention_only, metadata), "f").kind == "LoRA"
    kohya, _ = kohya_file_contents(sd15_lora)
    stem = next(k for k in kohya if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    kohya[f"{stem}.dora_scale"] = torch.ones(1, 32)
    dora = describe(_bytes(kohya), "f")
    assert dora.kind == "DoRA+LoCon" and dora.modules["DoRA"] == 1


@pytest.mark.parametrize(
    ("tensors", "family", "source"),
    [
        ({f"{CROSS_K}.lora_down.weight": torch.ones(4, 1024), f"{CROSS_K}.lora_up.weight": torch.ones(640, 4)},
         "sd2", "cross-attention width 1024"),
        ({f"{CROSS_K}.hada_w1_a": torch.ones(640, 2), f"{CROSS_K}.hada_w1_b": torch.ones(2, 768),
          f"{CROSS_K}.hada_w2_a": torch.ones(640, 2), f"{CROSS_K}.hada_w2_b": torch.ones(2, 768)},
         "sd1", "cross-attention width 768"),
        ({f"{CROSS_K}.lokr_w1": torch.ones(8, 8), f"{CROSS_K}.lokr_w2_a": torch.ones(80, 2),
          f"{CROSS_K}.lokr_w2_b": torch.ones(2, 256)}, "sdxl", "cross-attention width 2048"),
        ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 1280),
          "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(1280, 4)},
         "sdxl", "SDXL-only keys"),
        ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 1024),
          "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(1024, 4)},
         "sd2", "text encoder width 1024"),
        ({"emb_params": torch.ones(3, 768)}, "sd1", "text width 768"),
        ({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}, "sdxl", "clip_l/clip_g keys"),
    ],
)
def test_family_from_widths_and_keys(tensors, family, source):
    summary = describe(_bytes(tensors), "f")
    assert (summary.family, summary.family_source) == (family, source)


def test_embedding_and_hypernetwork():
    embedding = describe(_bytes({"<cat>": torch.ones(2, 1024)}), "f")
    assert (embedding.kind, embedding.rank, embedding.targets) == ("embedding", None, ("<cat> (2 vectors)",))
    assert embedding.family == "sd2"
    layers = {f"hypernetwork.768.{side}.{i}.{p}": torch.ones(*(s if p == "weight" else s[:1]))
              for side in "kv" for i, s in ((0, (1536, 768)), (1, (768, 1536))) for p in ("weight", "bias")}
    metadata = {METADATA_KEY: metadata_of([1, 2, 1], "relu", False, False)}
    hypernetwork = describe(_bytes(layers, metadata), "f")
    assert (hypernetwork.kind, hypernetwork.family, hypernetwork.targets) == ("hypernetwork", "sd1",
                                                                              ("attention width 768",))


def test_listing_reduces_the_description_to_form_rank_targets(sd15_components):
    # The PLAN file: 11 modules, LoHa and LoKr, highest rank 8 (see test_lycoris_file).
    assert listing(_bytes(make_lycoris(sd15_components, PLAN, seed=1)), "f", "lora") == {
        "form": "loha+lokr", "rank": 8, "targets": len(PLAN), "slider_scales": "", "slider_start": 0.0}
    lora = {f"{CROSS_K}.lora_down.weight": torch.ones(4, 1024), f"{CROSS_K}.lora_up.weight": torch.ones(640, 4)}
    assert listing(_bytes(lora), "f", "lora") == {"form": "lora", "rank": 4, "targets": 1, "slider_scales": "", "slider_start": 0.0}
    sdxl_embedding = {"clip_l": torch.ones(5, 768), "clip_g": torch.ones(5, 1280)}
    assert listing(_bytes(sdxl_embedding), "f", "embedding") == {"form": "", "rank": 0, "targets": 5, "slider_scales": "", "slider_start": 0.0}
    assert listing(_bytes({"<cat>": torch.ones(768)}), "f", "embedding")["targets"] == 1  # one vector, 1-D
    layers = {f"hypernetwork.{w}.{side}.0.weight": torch.ones(w, w) for w in (320, 768) for side in "kv"}
    assert listing(_bytes(layers), "f", "hypernetwork") == {"form": "", "rank": 0, "targets": 2, "slider_scales": "", "slider_start": 0.0}
    # A file the loader of `kind` accepted but `describe` reads otherwise, or not at all, lists empty.
    empty = {"form": "", "rank": 0, "targets": 0, "slider_scales": "", "slider_start": 0.0}
    assert listing(_bytes(lora), "f", "embedding") == empty
    assert listing(_bytes({"my.token": torch.ones(2, 768)}), "f", "embedding") == empty
    # A slider stripped of its flag is a plain LoRA: its scale keys alone list nothing.
    assert listing(_bytes(lora, {"sdserve_slider_scale_range": "-1,1"}), "f", "lora")["slider_scales"] == ""


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        ({"form": "loha+locon", "rank": 8, "targets": 11}, Listing("loha+locon", 8, 11)),
        ({"form": "", "rank": 0, "targets": 3}, Listing("", 0, 3)),
        (None, Listing()),
        ({"form": "lora"}, Listing()),
        ({"form": "LoRA\n", "rank": 2, "targets": 1}, Listing()),
        ({"form": "oft", "rank": 2, "targets": 1}, Listing()),
        ({"form": "lora", "rank": True, "targets": 1}, Listing()),
        ({"form": "lora", "rank": -1, "targets": 1}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 2**31}, Listing()),
        ({"form": "lora", "rank": 2.0, "targets": 1}, Listing()),
        # A slider's values: the scales as one string of numbers (a report holds JSON scalars only).
        ({"form": "lora", "rank": 2, "targets": 1, "slider_scales": "-2.0,-1.0,0.0,1.0,2.0", "slider_start": 0.3},
         Listing("lora", 2, 1, (-2.0, -1.0, 0.0, 1.0, 2.0), 0.3)),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_scales": "-1,1", "slider_start": 0}, Listing("lora", 2, 1, (-1.0, 1.0))),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_scales": [-1, 1], "slider_start": 0}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_scales": "-1,inf"}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_scales": "-1,101"}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_scales": ",".join(["1"] * 17)}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_scales": "1," * 2000}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_scales": "-1,", "slider_start": 0}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_start": 1.5}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_start": float("nan")}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_start": True}, Listing()),
        ({"form": "lora", "rank": 2, "targets": 1, "slider_start": "0.3"}, Listing()),
    ],
)
def test_a_workers_report_is_checked(report, expected):
    assert Listing.from_json(report) == expected


STEM = "lora_unet_mid_block_resnets_0_conv1"


@pytest.mark.parametrize(
    ("tensors", "kind"),
    [
        ({f"{STEM}.oft_blocks": torch.ones(4, 8, 8), f"{STEM}.alpha": torch.tensor(1.0)}, "oft"),
        ({"unet.conv_in.boft_R": torch.ones(1, 4, 2, 2)}, "boft"),
        ({f"{STEM}.a1.weight": torch.ones(2, 32), f"{STEM}.a2.weight": torch.ones(32, 2)}, "glora"),
        ({f"{STEM}.weight": torch.ones(32), f"{STEM}.on_input": torch.ones(1)}, "ia3"),
    ],
)
def test_unserved_kinds_are_refused_by_name(tensors, kind):
    with pytest.raises(UnsupportedAdapterKind) as info:
        describe(_bytes(tensors), "f")
    assert info.value.kind == kind and repr(kind) in str(info.value)


def test_cli(capsys, tmp_path, sd15_components):
    path = tmp_path / "style.safetensors"
    path.write_bytes(_bytes(make_lycoris(sd15_components, PLAN, seed=1)))
    code, out, _ = run_cli(capsys, "adapters", "inspect", str(path), "--json")
    report = json.loads(out)
    assert code == 0 and report["kind"] == "LoHa+LoKr" and report["rank"] == 8 and report["file"] == "style.safetensors"
    code, out, _ = run_cli(capsys, "adapters", "inspect", str(path), "--model", "tiny-sd1")
    assert code == 0 and "kind        LoHa+LoKr" in out and "tiny-sd1: loads (sd1): 11 modules" in out
    assert "loha dense: 1 module served at rank 64" in out and "lokr factorized: 4 modules" in out
    oft = tmp_path / "oft.safetensors"
    oft.write_bytes(_bytes({f"{STEM}.oft_blocks": torch.ones(4, 8, 8)}))
    code, _, err = run_cli(capsys, "adapters", "inspect", str(oft))
    assert code != 0 and "adapter kind 'oft' is not supported" in err and str(tmp_path) not in err


@pytest.mark.parametrize(
    ("metadata", "scales", "start"),
    [
        # What the trainer writes (sdserve.trainers.slider: "-1,1" and its --start as "%g").
        ({"sdserve_slider_scale_range": "-1,1", "sdserve_slider_start": "0.3"}, (-1.0, 1.0), 0.3),
        # A slider without a start is applied from step 0.
        ({"sdserve_slider_scale_range": "-2,-1,0,1,2"}, (-2.0, -1.0, 0.0, 1.0, 2.0), 0.0),
        # A value out of range or not a number lists empty; the other value is still listed.
        ({"sdserve_slider_scale_range": "-1,nan", "sdserve_slider_start": "0.5"}, (), 0.5),
        ({"sdserve_slider_scale_range": "-1,1000", "sdserve_slider_start": "0.5"}, (), 0.5),
        ({"sdserve_slider_scale_range": "-1,1", "sdserve_slider_start": "1.5"}, (-1.0, 1.0), 0.0),
        ({"sdserve_slider_scale_range": "small,large", "sdserve_slider_start": "x"}, (), 0.0),
    ],
)
def test_a_sliders_scales_and_start_are_listed_when_in_range(metadata, scales, start):
    from sdserve.adapters import inspect
    from sdserve.engine.request import MAX_ADAPTER_SCALE

    assert inspect._MAX_SLIDER_SCALE == MAX_ADAPTER_SCALE  # listed scales are scales a request may use
    lora = {f"{CROSS_K}.lora_down.weight": torch.ones(4, 1024), f"{CROSS_K}.lora_up.weight": torch.ones(640, 4)}
    report = listing(_bytes(lora, {"sdserve_slider": "true", **metadata}), "f", "lora")
    facts = Listing.from_json(report)  # the way back from the worker accepts what the worker sends
    assert (facts.form, facts.rank, facts.targets, facts.slider_scales, facts.slider_start) == (
        "lora", 4, 1, scales, start)
