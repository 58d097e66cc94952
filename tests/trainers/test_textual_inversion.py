"""The textual-inversion method: only the new rows train; a trained file gives the trainer's text
encoding in diffusers (load_textual_inversion + encode_prompt, the oracle) and in sdserve (the
engine's own model and family encoder); SDXL's two encoders; resume and bytes; the CLI."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from sdserve.adapters.embeddings import load_embedding
from sdserve.engine.config import ResidencyConfig
from sdserve.engine.families import family_of
from sdserve.engine.model import LoadedModel, load_model, read_model_info
from sdserve.engine.residency import AdapterRuntime
from sdserve.engine.row_context import RowContext
from sdserve.errors import InvalidArgument
from sdserve.models.builtin import builtin_path
from sdserve.trainers.components import Components
from sdserve.trainers.data import load_folder
from sdserve.trainers.loop import CHECKPOINT_FILE, LoopConfig, train
from sdserve.trainers.output import load_checkpoint
from sdserve.trainers.textual_inversion import TextualInversionConfig, TextualInversionMethod
from tests.trainers.conftest import run_cli, write_folder

CFG = LoopConfig(steps=3, lr=5e-2, batch_size=2, progress=False)
TEAL = TextualInversionConfig(token="<teal>", init_token="blue", num_vectors=3)
PROMPT = "a small <teal> square on the left"


def engine_model(name: str) -> LoadedModel:
    """The model as the engine serves it: its loader, its adapter runtime (wrapped token tables,
    row-aware attention processors), float32 on the CPU."""
    model = load_model(read_model_info(name, builtin_path(name)), torch.device("cpu"), torch.float32)
    model.adapters = AdapterRuntime(model, ResidencyConfig(), max_rows=4)
    return model


def weights_digest(components: Components) -> str:
    """sha256 over every base tensor's bytes (the token tables included), in name order."""
    digest = hashlib.sha256()
    for prefix, module in (("unet", components.unet), ("vae", components.vae),
                           *((f"te{i}", e) for i, e in enumerate(components.text_encoders))):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{prefix}.{name}".encode() + tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def teal_folder(tmp_path) -> Path:
    return write_folder(tmp_path / "teal", count=3, caption="a large <teal> circle")


def _trained(components: Components, folder: Path, out: Path, config=TEAL, cfg=CFG):
    method = TextualInversionMethod(components, config)
    initial = [v.detach().clone() for v in method.vectors]
    result = train(method, components, load_folder(folder, 32), cfg, out)
    return method, initial, result


def test_only_the_new_rows_train_and_the_file_matches_diffusers_and_sdserve(sd1, teal_folder, tmp_path):
    before = weights_digest(sd1)
    tokenizer_size = len(sd1.tokenizers[0])
    out = tmp_path / "teal.safetensors"
    method, initial, result = _trained(sd1, teal_folder, out)

    # Every vector started as "blue"'s row (one token in tiny-sd1's vocabulary), then moved.
    (blue,) = sd1.tokenizers[0]("blue", add_special_tokens=False).input_ids
    table = method._tables[0].weight  # [vocab, 32]
    assert all(torch.equal(row, table[blue]) for row in initial[0])
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert not torch.allclose(method.vectors[0], initial[0])
    assert method.first_ids == [tokenizer_size]
    assert method.tokenizers[0].convert_tokens_to_ids(["<teal>", "<teal>_1", "<teal>_2"]) == [
        tokenizer_size, tokenizer_size + 1, tokenizer_size + 2]

    with safetensors.safe_open(str(out), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
        stored = handle.get_tensor("<teal>")
    assert keys == ["<teal>"] and list(stored.shape) == [3, 32]
    assert torch.equal(stored, method.vectors[0].detach())
    assert metadata["sdserve_method"] == "textual_inversion" and metadata["sdserve_token"] == "<teal>"
    assert metadata["sdserve_num_vectors"] == "3" and metadata["sdserve_init_token"] == "blue"
    assert metadata["sdserve_trigger_tokens"] == "<teal>" and metadata["sdserve_format"] == "diffusers"

    with torch.no_grad():
        ours = method.encode_text([PROMPT]).states  # [1, 77, 32]
        pipe = StableDiffusionPipeline.from_pretrained(builtin_path("tiny-sd1"))
        pipe.load_textual_inversion(str(out), token="<teal>")
        theirs, _ = pipe.encode_prompt(PROMPT, "cpu", 1, False)

        embedding = load_embedding(out, "teal", {"text_encoder": 32})
        assert embedding.token == "<teal>" and embedding.num_vectors == 3
        model = engine_model("tiny-sd1")
        with model.adapters.rows(RowContext(embeddings=((embedding,),))):
            served = family_of("sd1").encode(model, PROMPT, None, False, 1, 32, 32, (embedding,))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(served.encoder_hidden_states, ours, rtol=1e-5, atol=1e-5)
    # ... and the token matters: the prompt without it encodes differently.
    assert (sd1.encode_text([PROMPT.replace("<teal> ", "")]).states - ours).abs().max() > 1e-3

    method.remove()
    assert weights_digest(sd1) == before  # the token table and every base weight, byte for byte
    assert len(sd1.tokenizers[0]) == tokenizer_size  # the shared tokenizer was never extended


def test_sdxl_writes_clip_l_and_clip_g_that_load_in_diffusers_and_sdserve(components_of, teal_folder, tmp_path):
    components = components_of("tiny-sdxl")
    out = tmp_path / "xl.safetensors"
    config = TextualInversionConfig(token="<teal>", init_token="blue", num_vectors=2)
    method, initial, _ = _trained(components, teal_folder, out, config, replace(CFG, steps=2))
    assert all(not torch.allclose(v, i) for v, i in zip(method.vectors, initial))
    state = safetensors.torch.load_file(str(out))
    assert sorted(state) == ["clip_g", "clip_l"] and [list(state[k].shape) for k in ("clip_l", "clip_g")] == [[2, 32]] * 2
    embedding = load_embedding(out, "xl", {"text_encoder": 32, "text_encoder_2": 32}, token="<teal>")
    assert embedding.layout == "sdxl" and set(embedding.vectors) == {"text_encoder", "text_encoder_2"}

    with torch.no_grad():
        ours = method.encode_text([PROMPT], resolution=32)
        pipe = StableDiffusionXLPipeline.from_pretrained(builtin_path("tiny-sdxl"), add_watermarker=False)
        pipe.load_textual_inversion(state["clip_l"], token="<teal>", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token="<teal>", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        theirs, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        model = engine_model("tiny-sdxl")
        with model.adapters.rows(RowContext(embeddings=((embedding,),))):
            served = family_of("sdxl").encode(model, PROMPT, None, False, 1, 32, 32, (embedding,))
    torch.testing.assert_close(theirs, ours.states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ours.added["text_embeds"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(served.encoder_hidden_states, ours.states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(served.text_embeds, ours.added["text_embeds"], rtol=1e-5, atol=1e-5)


def test_default_model_adds_the_token_whole_and_averages_a_split_init_word(components_of):
    """The embedded model's tiny vocabulary spells "<teal>" and "teal" letter by letter."""
    components = components_of("default")
    base = components.tokenizers[0]
    pieces = base("teal", add_special_tokens=False).input_ids
    assert len(pieces) > 1 and len(base.tokenize("<teal>")) > 1
    method = TextualInversionMethod(components, TextualInversionConfig(token="<teal>", init_token="teal"))
    ids = method._encoding.tokenize(["a <teal> circle"])[0].tolist()
    assert ids[:4] == [base.bos_token_id, *base("a", add_special_tokens=False).input_ids, len(base),
                       *base("circle", add_special_tokens=False).input_ids]
    table = method._tables[0].weight  # [vocab, 128]
    torch.testing.assert_close(method.vectors[0][0], table[pieces].mean(dim=0), rtol=0, atol=0)


def test_resume_is_exact_and_the_same_seed_gives_the_same_bytes(components_of, teal_folder, tmp_path):
    cfg = replace(CFG, steps=4)
    straight = _trained(components_of("tiny-sd1"), teal_folder, tmp_path / "a.safetensors", cfg=cfg)[2]
    again = _trained(components_of("tiny-sd1"), teal_folder, tmp_path / "b.safetensors", cfg=cfg)[2]
    assert straight.out.read_bytes() == again.out.read_bytes()
    half = _trained(components_of("tiny-sd1"), teal_folder, tmp_path / "c.safetensors", cfg=replace(cfg, steps=2))[2]
    assert load_checkpoint(half.state_dir / CHECKPOINT_FILE)["step"] == 2
    resumed = _trained(components_of("tiny-sd1"), teal_folder, tmp_path / "c.safetensors",
                       cfg=replace(cfg, resume=half.state_dir))[2]
    assert resumed.losses == straight.losses[2:]
    assert resumed.out.read_bytes() == straight.out.read_bytes()
    # A checkpoint of another token is refused.
    with pytest.raises(InvalidArgument, match="--resume"):
        _trained(components_of("tiny-sd1"), teal_folder, tmp_path / "d.safetensors",
                 TextualInversionConfig(token="<teal>", init_token="blue", num_vectors=2),
                 cfg=replace(cfg, resume=half.state_dir))


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, *args)


def test_cli_trains_a_file_that_sdserve_generate_uses(capsys, teal_folder, tmp_path):
    out = tmp_path / "teal.safetensors"
    code, stdout, stderr = _cli(capsys, "train", "textual-inversion", "--no-progress", "--model", "tiny-sd1",
                                "--data", str(teal_folder), "--out", str(out), "--token", "<teal>",
                                "--init-token", "blue", "--num-vectors", "2", "--steps", "2")
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out} (textual_inversion, 2 steps")
    with safetensors.safe_open(str(out), "pt") as handle:
        assert handle.metadata()["sdserve_learning_rate"] == "0.005"  # the method's own default
    image = tmp_path / "teal.png"
    code, stdout, stderr = _cli(capsys, "generate", "--model", "tiny-sd1", "--prompt", "a <teal> circle",
                                "--embedding", str(out), "--steps", "2", "--out", str(image), "--quiet")
    assert code == 0, stderr
    assert image.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("flags", "named", "says"),
    [
        (["--num-vectors", "0"], "--num-vectors", "between 1 and 75"),
        (["--num-vectors", "76"], "--num-vectors", "between 1 and 75"),
        (["--token", "two words"], "--token", "without spaces"),
        (["--token", "blue"], "--token", "already in the model's vocabulary"),
        (["--token", "<Teal>"], "--token", "'<teal>'"),
        (["--init-token", " "], "--init-token", "empty"),
        (["--caption", "a large circle"], "--token", "does not contain the token"),
        (["--steps", "-1"], "--steps", ">= 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(capsys, teal_folder, tmp_path, flags, named, says):
    args = {"--token": "<teal>", "--init-token": "blue"}
    rest = []
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in args:
            args[flag] = value
        else:
            rest += [flag, value]
    out = tmp_path / "o.safetensors"
    code, _, stderr = _cli(capsys, "train", "textual-inversion", "--no-progress", "--model", "tiny-sd1",
                           "--data", str(teal_folder), "--out", str(out),
                           *(x for pair in args.items() for x in pair), *rest)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("sdserve: error: "), stderr
    assert named in lines[0] and says in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "o.state").exists()
