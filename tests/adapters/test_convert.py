"""A1111 pickle -> safetensors conversion and `sdserve adapters convert`."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from sdserve.adapters.convert import convert_file
from sdserve.adapters.embeddings import load_embedding
from sdserve.errors import AdapterError


def a1111_embedding(vectors: torch.Tensor, name: str) -> dict:
    """What A1111's `Embedding.save` writes."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 500,
            "sd_checkpoint": "a1b2c3d4", "sd_checkpoint_name": "v1-5-pruned"}


class NotWeights:
    """Any class outside torch's weights-only allow-list."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_a1111_embedding_converts_like_diffusers_loads_it(tmp_path):
    """diffusers' load_textual_inversion reads the `.pt` itself: token `name`, the same rows."""
    from diffusers import StableDiffusionPipeline

    from sdserve.models.builtin import builtin_path

    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))  # [n, width]
    torch.save(a1111_embedding(vectors, "mystyle"), tmp_path / "style.pt")
    assert convert_file(tmp_path / "style.pt", tmp_path / "style.safetensors") == "embedding"
    emb = load_embedding(tmp_path / "style.safetensors", "style", {"text_encoder": 32})

    path = builtin_path("tiny-sd1")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
    pipe.load_textual_inversion(str(tmp_path / "style.pt"), tokenizer=tokenizer, text_encoder=encoder)
    ids = tokenizer.convert_tokens_to_ids(list(emb.tokens))
    assert emb.tokens == ("mystyle", "mystyle_1", "mystyle_2")
    assert torch.equal(encoder.get_input_embeddings().weight.detach()[ids], emb.vectors["text_encoder"])


def test_token_override_and_diffusers_bin(tmp_path):
    torch.save({"<cat-toy>": torch.ones(1, 8)}, tmp_path / "learned_embeds.bin")
    convert_file(tmp_path / "learned_embeds.bin", tmp_path / "a.safetensors")
    assert set(safetensors.torch.load_file(tmp_path / "a.safetensors")) == {"<cat-toy>"}
    torch.save(a1111_embedding(torch.ones(2, 8), "has space"), tmp_path / "b.pt")
    with pytest.raises(AdapterError, match="give one with --token"):
        convert_file(tmp_path / "b.pt", tmp_path / "b.safetensors")
    convert_file(tmp_path / "b.pt", tmp_path / "b.safetensors", token="spaced")
    assert set(safetensors.torch.load_file(tmp_path / "b.safetensors")) == {"spaced"}


def test_weights_only_refusal_is_final(tmp_path):
    torch.save({"string_to_param": {"*": torch.ones(1, 8)}, "name": "x", "extra": NotWeights()}, tmp_path / "evil.pt")
    with pytest.raises(AdapterError, match="weights-only loading refused it") as info:
        convert_file(tmp_path / "evil.pt", tmp_path / "out.safetensors")
    message = str(info.value)
    assert "evil.pt" in message and str(tmp_path) not in message and "NotWeights" not in message
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("obj", "kind", "needle"),
    [
        ({"string_to_param": {"*": torch.ones(1, 8)}, "name": "x"}, "hypernetwork", "holds a embedding, not a hypernetwork"),
        ({"string_to_param": {"*": torch.ones(1, 8), "b": torch.ones(1, 8)}, "name": "x"}, None, "exactly one '*'"),
        ({"a": 1, "b": 2}, None, "neither an A1111 embedding nor an A1111 hypernetwork"),
        ({32: ({"linear.0.weight": torch.ones(64, 32), "linear.0.bias": torch.ones(64)},) * 2,
          "layer_structure": [1, 2, 1]}, None, "1 linear layers, layer_structure [1, 2, 1] needs 2"),
        ({32: ({"linear.0.weight": torch.ones(32, 32), "linear.0.bias": torch.ones(32)},) * 2,
          "layer_structure": [1, 1], "activation_func": "prelu"}, None, "activation 'prelu' is not supported"),
        ({32: ({"linear.0.weight": torch.ones(32, 32), "linear.0.bias": torch.ones(32)},) * 2,
          "layer_structure": [1, 1], "is_layer_norm": True}, None, "layer norms do not match"),
    ],
)
def test_bad_pickles(tmp_path, obj, kind, needle):
    torch.save(obj, tmp_path / "in.pt")
    with pytest.raises(AdapterError) as info:
        convert_file(tmp_path / "in.pt", tmp_path / "out.safetensors", kind=kind)
    assert needle in str(info.value)


def test_garbage_file(tmp_path):
    (tmp_path / "in.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(AdapterError, match="not a readable PyTorch file"):
        convert_file(tmp_path / "in.pt", tmp_path / "out.safetensors")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from sdserve.cli.main import main

    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_convert(tmp_path, capsys):
    torch.save(a1111_embedding(torch.ones(2, 8), "tok"), tmp_path / "e.pt")
    out = str(tmp_path / "e.safetensors")
    code, stdout, _ = _cli(capsys, "adapters", "convert", str(tmp_path / "e.pt"), out, "--kind", "embedding")
    assert code == 0 and "wrote embedding" in stdout
    assert torch.equal(safetensors.torch.load_file(out)["tok"], torch.ones(2, 8))

    code, _, stderr = _cli(capsys, "adapters", "convert", str(tmp_path / "e.pt"), out)
    assert code == 2 and "exists; pass --force" in stderr
    code, _, stderr = _cli(capsys, "adapters", "convert", str(tmp_path / "e.pt"), out, "--force", "--kind", "hypernetwork")
    assert code == 2 and stderr.count("\n") == 1 and "not a hypernetwork" in stderr
