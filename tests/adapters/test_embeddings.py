"""Textual inversion: file layouts and checks, and tokenization against diffusers' own.

The oracle is diffusers itself: a tokenizer and text encoder after `load_textual_inversion`,
then the pipeline's `maybe_convert_prompt` and the tokenizer call its `encode_prompt` makes.
"""

from __future__ import annotations

import io
import pickle

import pytest
import safetensors.torch
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from sdserve.adapters.embeddings import (
    ExtraRowsEmbedding,
    TextualInversion,
    embed_tokens,
    expand_prompt,
    load_embedding,
    placeholder_token_ids,
    tokenize_with_embeddings,
)
from sdserve.errors import AdapterError, InvalidArgument

WIDTH = 32  # hidden size of the tiny built-in text encoders
SD1_WIDTHS = {"text_encoder": WIDTH}


def _file(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save(tensors)


def _vectors(n: int, seed: int, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))  # [n, width]


@pytest.fixture(scope="module")
def tiny_sd1():
    from diffusers import StableDiffusionPipeline

    from sdserve.models.builtin import builtin_path

    path = builtin_path("tiny-sd1")
    return path, StableDiffusionPipeline.from_pretrained(path)


# --- file layouts -------------------------------------------------------------------------------


def test_diffusers_layout_takes_token_from_key():
    vectors = _vectors(3, 0)
    emb = load_embedding(_file({"<cat-toy>": vectors}), "cat.safetensors", SD1_WIDTHS)
    assert emb.token == "<cat-toy>" and emb.layout == "diffusers" and emb.num_vectors == 3
    assert emb.tokens == ("<cat-toy>", "<cat-toy>_1", "<cat-toy>_2")
    assert torch.equal(emb.vectors["text_encoder"], vectors)


def test_single_vector_1d_and_token_override():
    vector = _vectors(1, 1)[0]  # [width]
    emb = load_embedding(_file({"<x>": vector}), "x", SD1_WIDTHS, token="mine")
    assert emb.token == "mine" and emb.vectors["text_encoder"].shape == (1, WIDTH)


def test_kohya_layout_token_is_the_name():
    emb = load_embedding(_file({"emb_params": _vectors(2, 2)}), "charturner", SD1_WIDTHS)
    assert (emb.token, emb.layout, emb.num_vectors) == ("charturner", "kohya", 2)


def test_sdxl_layout_feeds_both_encoders():
    clip_l, clip_g = _vectors(2, 3, 24), _vectors(2, 4, 40)
    emb = load_embedding(_file({"clip_l": clip_l, "clip_g": clip_g}), "neg",
                         {"text_encoder": 24, "text_encoder_2": 40})
    assert emb.layout == "sdxl" and emb.token == "neg"
    assert torch.equal(emb.vectors["text_encoder"], clip_l) and torch.equal(emb.vectors["text_encoder_2"], clip_g)


@pytest.mark.parametrize(
    ("tensors", "widths", "needle"),
    [
        ({"<t>": _vectors(2, 0, 48)}, SD1_WIDTHS, "has width 48, the model's text_encoder expects width 32"),
        ({"clip_l": _vectors(1, 0, 24), "clip_g": _vectors(1, 0, 24)}, {"text_encoder": 24, "text_encoder_2": 40},
         "'clip_g' has width 24, the model's text_encoder_2 expects width 40"),
        ({"clip_l": _vectors(1, 0), "clip_g": _vectors(1, 0)}, SD1_WIDTHS, "text_encoder_2, which this model does not have"),
        ({"clip_l": _vectors(1, 0), "clip_g": _vectors(2, 0)}, {"text_encoder": 32, "text_encoder_2": 32},
         "different numbers of vectors"),
        ({"<t>": torch.full((1, WIDTH), float("nan"))}, SD1_WIDTHS, "NaN or infinite"),
        ({"<t>": _vectors(76, 0)}, SD1_WIDTHS, "76 vectors, at most 75"),
        ({"<t>": torch.zeros(1, WIDTH, dtype=torch.int32)}, SD1_WIDTHS, "dtype int32"),
        ({"<t>": torch.zeros(1, 2, WIDTH)}, SD1_WIDTHS, "expected [vectors, width]"),
        ({"a b": _vectors(1, 0)}, SD1_WIDTHS, "without spaces"),
        ({"<a>": _vectors(1, 0), "<b>": _vectors(1, 0)}, SD1_WIDTHS, "not a textual-inversion embedding"),
        ({"lora_unet_x.lora_down.weight": _vectors(1, 0)}, SD1_WIDTHS, "LoRA or hypernetwork"),
    ],
)
def test_bad_embedding_files(tensors, widths, needle):
    with pytest.raises(AdapterError) as info:
        load_embedding(_file(tensors), "bad.safetensors", widths)
    assert needle in str(info.value) and "bad.safetensors" in str(info.value)


def test_fp16_overflow_is_caught():
    big = torch.full((1, WIDTH), 1e6)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        load_embedding(_file({"<t>": big}), "big", SD1_WIDTHS, dtype=torch.float16)


def test_pickle_and_garbage_are_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"string_to_param": {"*": _vectors(1, 0)}, "name": "x"}, buffer)
    for data in (buffer.getvalue(), pickle.dumps({"a": 1}), b"garbage"):
        with pytest.raises(AdapterError, match="not a valid safetensors file") as info:
            load_embedding(data, "emb.pt", SD1_WIDTHS)
        assert str(tmp_path) not in str(info.value)


# --- prompt rewrite and tokenization, against diffusers ----------------------------------------


def test_expand_prompt_matches_diffusers_rewrite():
    assert expand_prompt("a <s>, <s>!", "<s>", 3) == "a <s> <s>_1 <s>_2, <s> <s>_1 <s>_2!"
    assert expand_prompt("a <s>", "<s>", 1) == "a <s>"


EMBEDDINGS = {
    "cat": ({"<cat-toy>": _vectors(1, 10)}, None),
    "style": ({"<style>": _vectors(3, 11)}, None),
    "turner": ({"emb_params": _vectors(2, 12)}, "charturner"),
    "upper": ({"MyTok": _vectors(2, 13)}, None),
}

CASES = [
    (["cat"], "<cat-toy> on a table"),
    (["cat"], "a photo of <cat-toy> in the city"),
    (["style"], "a painting, <style>"),
    (["cat", "style"], "a <cat-toy>, <style>! and <cat-toy>."),
    (["style", "cat"], "a<style>b hot<cat-toy>s"),
    (["turner"], "charturner, multiple views"),
    (["cat"], "A <CAT-TOY> photo"),
    (["upper", "style"], "MyTok and mytok with <style>"),
    (["style"], "x <style>_1 y"),
    (["style", "cat"], "a red cat"),
    (["style"], "a " * 72 + "<style> tail"),  # truncation inside the 3-vector expansion
    (["cat", "style"], "a " * 80 + "<cat-toy>"),  # the token falls past the 77 limit
]


def _embedding(key: str) -> TextualInversion:
    tensors, name = EMBEDDINGS[key]
    return load_embedding(_file(tensors), name or key, SD1_WIDTHS)


def _oracle(tiny_sd1, embeddings: list[TextualInversion], prompt: str):
    """diffusers: fresh tokenizer and text encoder, load_textual_inversion, encode_prompt's call."""
    path, pipe = tiny_sd1
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
    state_dicts = [{e.token: e.vectors["text_encoder"].clone()} for e in embeddings]
    pipe.load_textual_inversion(state_dicts, token=[e.token for e in embeddings],
                                tokenizer=tokenizer, text_encoder=encoder)
    converted = pipe.maybe_convert_prompt(prompt, tokenizer)
    ids = tokenizer(converted, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids  # [1, 77]
    return converted, ids, encoder


@pytest.mark.parametrize(("keys", "prompt"), CASES, ids=[p[:30] for _, p in CASES])
def test_tokenize_matches_diffusers(tiny_sd1, keys, prompt):
    path, _ = tiny_sd1
    embeddings = [_embedding(k) for k in keys]
    converted, oracle_ids, oracle_encoder = _oracle(tiny_sd1, embeddings, prompt)

    shared = CLIPTokenizer.from_pretrained(path / "tokenizer")
    before = (len(shared), dict(shared.added_tokens_encoder))
    result = tokenize_with_embeddings(shared, prompt, embeddings)
    assert (len(shared), dict(shared.added_tokens_encoder)) == before  # the shared tokenizer is untouched

    assert result.prompt == converted
    assert torch.equal(result.input_ids, oracle_ids)
    extra_positions = {int(p) for p in torch.nonzero(oracle_ids[0] >= len(shared)).flatten()}
    assert set(result.overrides) == extra_positions
    oracle_table = oracle_encoder.get_input_embeddings().weight.detach()
    for position, (index, vector) in result.overrides.items():
        expected = oracle_table[oracle_ids[0, position]]
        assert torch.equal(embeddings[index].vectors["text_encoder"][vector], expected)


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_wrapped_encoder_matches_diffusers_encoder(tiny_sd1, legacy_eos):
    """The whole text encoder, shared weights untouched, equals diffusers' resized encoder,
    pooled output included (with the legacy eos_token_id=2 rule, pooling takes the largest id)."""
    path, _ = tiny_sd1
    embeddings = [_embedding("style"), _embedding("cat")]
    prompt = "a <cat-toy> in the <style> sky"
    _, oracle_ids, oracle_encoder = _oracle(tiny_sd1, embeddings, prompt)

    shared_tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
    table_before = encoder.get_input_embeddings().weight.detach().clone()
    current: list = [None]  # what the engine's row context would hand the table
    encoder.embeddings.token_embedding = ExtraRowsEmbedding(encoder.embeddings.token_embedding, lambda: current[0])
    if legacy_eos:
        encoder.eos_token_id = oracle_encoder.eos_token_id = 2
    result = tokenize_with_embeddings(shared_tokenizer, prompt, embeddings)
    with torch.no_grad():
        expected = oracle_encoder(oracle_ids)
        current[0] = (result.first_extra_id, result.extra_rows)
        got = encoder(result.input_ids)
        current[0] = None
        plain = encoder(torch.tensor([[shared_tokenizer.bos_token_id, 320, shared_tokenizer.eos_token_id]]))
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=0, atol=1e-6)
    assert torch.equal(encoder.embeddings.token_embedding.base.weight, table_before)
    assert plain.last_hidden_state.shape == (1, 3, WIDTH)  # outside the block: the plain table


def test_second_encoder_gets_clip_g(tiny_sd1):
    """SDXL: clip_g goes into tokenizer_2/text_encoder_2 (diffusers' documented way)."""
    path, _ = tiny_sd1
    clip_l, clip_g = _vectors(2, 20), _vectors(2, 21)
    emb = load_embedding(_file({"clip_l": clip_l, "clip_g": clip_g}), "neg",
                         {"text_encoder": WIDTH, "text_encoder_2": WIDTH})
    prompt = "neg, a blurry photo"
    oracle = TextualInversion(name="neg", token="neg", vectors={"text_encoder": clip_g}, layout="sdxl")
    _, oracle_ids, oracle_encoder = _oracle(tiny_sd1, [oracle], prompt)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    result = tokenize_with_embeddings(tokenizer, prompt, [emb], component="text_encoder_2")
    assert torch.equal(result.input_ids, oracle_ids)
    assert torch.equal(result.extra_rows, clip_g)


def test_embedding_without_vectors_for_component_is_plain_text(tiny_sd1):
    path, _ = tiny_sd1
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    emb = _embedding("cat")
    result = tokenize_with_embeddings(tokenizer, "a <cat-toy>", [emb], component="text_encoder_2")
    plain = tokenizer("a <cat-toy>", padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids
    assert torch.equal(result.input_ids, plain) and not result.overrides


def test_placeholder_ids_and_refusals(tiny_sd1):
    path, pipe = tiny_sd1
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    ids = placeholder_token_ids(tokenizer, [_embedding("style"), _embedding("cat")])
    base = len(tokenizer)
    assert ids == {"<style>": base, "<style>_1": base + 1, "<style>_2": base + 2, "<cat-toy>": base + 3}

    in_vocab = load_embedding(_file({"ho": _vectors(1, 0)}), "ho", SD1_WIDTHS)
    with pytest.raises(AdapterError, match="already in the model's vocabulary"):
        placeholder_token_ids(tokenizer, [in_vocab])
    with pytest.raises(ValueError, match="already in tokenizer vocabulary"):  # diffusers refuses it too
        pipe.load_textual_inversion({"ho": _vectors(1, 0)}, tokenizer=CLIPTokenizer.from_pretrained(
            path / "tokenizer"), text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder"))
    with pytest.raises(InvalidArgument, match="two embeddings use the token"):
        placeholder_token_ids(tokenizer, [_embedding("cat"), _embedding("cat")])


def test_embed_tokens_batch_rows_read_their_own_table():
    """Rows of different requests share ids past the vocabulary; each reads its own rows."""
    vocab, width = 10, 4
    weight = torch.randn(vocab, width)  # [vocab, width]
    first = [_vectors(2, 30, width), _vectors(3, 31, width)]  # per request [n_extra_r, width]
    ids = torch.tensor([[0, 10, 11, 9], [10, 12, 3, 9]])  # [2, 4]
    table = torch.zeros(2, 3, width)  # [batch, max n_extra, width], zero-padded
    table[0, :2], table[1, :3] = first[0], first[1]
    out = embed_tokens(weight, ids, vocab, table)  # [2, 4, width]
    expected = torch.stack([
        torch.stack([weight[0], first[0][0], first[0][1], weight[9]]),
        torch.stack([first[1][0], first[1][2], weight[3], weight[9]]),
    ])
    assert torch.equal(out, expected)
    assert torch.equal(embed_tokens(weight, ids[:1], vocab, first[0]), expected[:1])  # one shared table
    plain = ExtraRowsEmbedding(torch.nn.Embedding.from_pretrained(weight), lambda: None)
    assert torch.equal(plain(torch.tensor([[1, 2]])), weight[[1, 2]][None])  # no rows: the table
