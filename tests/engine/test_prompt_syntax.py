"""prompt_syntax "a1111": the parser against A1111's published examples, the conditioning against
A1111's formula written out independently below (on tiny-sd1's own text encoder), one image
against diffusers given those embeddings, chunked prompts in mixed batches, and the refusals.

The tiny models' final layer norm has no bias, so every chunk's mean is ~0 and A1111's mean
restoration (mean(z) / mean(z·w)) would divide rounding noise by rounding noise. The module's
engine and the oracle both get the same nonzero bias, as a trained model has.
"""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from sdserve.engine import Engine, EngineConfig, RequestSpec
from sdserve.engine.families import family_of
from sdserve.engine.families.base import TextOptions
from sdserve.engine.prompt_syntax import extract_lora_tags, make_chunks, parse_attention
from sdserve.engine.schedulers import resolve_scheduler
from sdserve.errors import InvalidArgument
from sdserve.models.builtin import builtin_path
from tests.engine.oracle import max_pixel_difference, pipeline

MODEL = "tiny-sd1"


def _final_norm(encoder):
    return getattr(encoder, "text_model", encoder).final_layer_norm


def _bias(width: int) -> torch.Tensor:
    return 0.3 + 0.2 * torch.randn(width, generator=torch.Generator().manual_seed(7))  # [width]


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine(EngineConfig())
    norm = _final_norm(engine.models.get(MODEL).text_encoders[0])
    with torch.no_grad():
        norm.bias.copy_(_bias(norm.bias.shape[0]))
    return engine


@pytest.fixture(scope="module")
def oracle_encoder() -> tuple[CLIPTextModel, CLIPTokenizer]:
    path = builtin_path(MODEL)
    encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
    norm = _final_norm(encoder)
    with torch.no_grad():
        norm.bias.copy_(_bias(norm.bias.shape[0]))
    return encoder, CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")


# -- the parser: A1111's own docstring examples (modules/prompt_parser.py) -----------------------

PUBLISHED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
         ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
    ),
]


@pytest.mark.parametrize("text,expected", PUBLISHED)
def test_parser_gives_a1111s_published_weights(text, expected):
    got = parse_attention(text)
    assert [piece for piece, _ in got] == [piece for piece, _ in expected]
    assert all(math.isclose(w, e, rel_tol=1e-12) for (_, w), (_, e) in zip(got, expected))


def test_break_square_brackets_and_escapes():
    assert parse_attention("a BREAK b") == [("a", 1.0), (None, 1.0), ("b", 1.0)]
    assert parse_attention("[a]") == [("a", pytest.approx(1 / 1.1))]
    assert parse_attention("x \\\\ y") == [("x \\ y", 1.0)]
    # BREAK inside brackets still breaks (A1111 would encode the word "BREAK" there; see the module).
    assert parse_attention("(a BREAK b)")[1] == (None, 1.0)


def test_chunks_fill_75_then_break_at_a_nearby_comma():
    bos, eos, pad, comma = 1, 2, 0, 9
    words = [5] * 70 + [comma] + [6] * 10  # the 76th token needs a second chunk; the comma is 5 back
    chunks = make_chunks([(words, 1.2)], bos=bos, eos=eos, pad=pad, comma=comma)
    assert [len(c.ids) for c in chunks] == [77, 77]
    assert chunks[0].ids == (bos, *[5] * 70, comma, eos, *[pad] * 4)  # the words after the comma moved
    assert chunks[1].ids == (bos, *[6] * 10, eos, *[pad] * 65)
    assert chunks[1].weights[1:11] == (1.2,) * 10 and chunks[1].weights[11] == 1.0
    no_comma = make_chunks([([5] * 80, 1.0)], bos=bos, eos=eos, pad=pad, comma=comma)
    assert no_comma[0].ids == (bos, *[5] * 75, eos) and no_comma[1].ids[:6] == (bos, *[5] * 5)
    assert len(make_chunks([([5], 1.0), (None, 1.0), ([6], 1.0)], bos=bos, eos=eos, pad=pad, comma=comma)) == 2


def test_lora_tags_leave_the_text_with_their_scales():
    text, tags = extract_lora_tags("a cat <lora:style:0.8>, <lora:ink> on a mat")
    assert text == "a cat ,  on a mat"
    assert [(t.name, t.scale) for t in tags] == [("style", 0.8), ("ink", 1.0)]
    for bad in ("<lora:x:y>", "<lora:x:1:2>", "<hypernet:x:1>", "<lora:x:nan>"):
        with pytest.raises(InvalidArgument) as caught:
            extract_lora_tags(bad)
        assert caught.value.field == "prompt"


# -- the conditioning: A1111's formula, written out as sd_hijack_clip.py does it -------------------


def a1111_conditioning(encoder, tokenizer, text: str, clip_skip: int, sdxl: bool = False,
                       ids_out: list | None = None) -> torch.Tensor:
    """[1, 77 * chunks, dim], following FrozenCLIPEmbedderWithCustomWordsBase: tokenize_line (pad
    with id_end, then ids after the first id_end become id_pad), encode_with_transformers
    (CLIP_stop_at_last_layers; SDXL: diffusers' hidden_states[-(clip_skip + 1)], no final norm),
    EmphasisOriginal, torch.hstack."""
    id_start, id_end, id_pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    comma_token = tokenizer.get_vocab().get(",</w>")
    parsed = parse_attention(text)  # checked against A1111's published outputs above
    chunks, tokens, multipliers, last_comma = [], [], [], -1

    def next_chunk():
        nonlocal tokens, multipliers, last_comma
        to_add = 75 - len(tokens)
        if to_add > 0:
            tokens += [id_end] * to_add
            multipliers += [1.0] * to_add
        chunks.append(([id_start] + tokens + [id_end], [1.0] + multipliers + [1.0]))
        tokens, multipliers, last_comma = [], [], -1

    for piece, weight in parsed:
        if piece is None:
            next_chunk()
            continue
        for token in tokenizer(piece, truncation=False, add_special_tokens=False).input_ids:
            if token == comma_token:
                last_comma = len(tokens)
            elif len(tokens) == 75 and last_comma != -1 and len(tokens) - last_comma <= 20:
                reloc_tokens, reloc_mults = tokens[last_comma + 1 :], multipliers[last_comma + 1 :]
                tokens, multipliers = tokens[: last_comma + 1], multipliers[: last_comma + 1]
                next_chunk()
                tokens, multipliers = reloc_tokens, reloc_mults
            if len(tokens) == 75:
                next_chunk()
            tokens.append(token)
            multipliers.append(weight)
    if tokens or not chunks:
        next_chunk()
    zs = []
    for ids, mults in chunks:
        ids = list(ids)
        if id_end != id_pad:
            first_end = ids.index(id_end)
            ids[first_end + 1 :] = [id_pad] * (len(ids) - first_end - 1)
        if ids_out is not None:
            ids_out.append(ids)
        outputs = encoder(input_ids=torch.tensor([ids]), output_hidden_states=True)
        if sdxl:
            z = outputs.hidden_states[-(clip_skip + 1)]
        elif clip_skip > 1:
            z = _final_norm(encoder)(outputs.hidden_states[-clip_skip])
        else:
            z = outputs.last_hidden_state
        original_mean = z.mean()
        z = z * torch.tensor(mults).reshape(1, -1, 1).expand(z.shape)
        z = z * (original_mean / z.mean())
        zs.append(z)
    return torch.hstack(zs)


LONG = ", ".join(f"(shape {i}:1.{i % 9})" if i % 3 else f"[colour {i}]" for i in range(40))
CASES = [
    # prompt, negative prompt, clip_skip
    ("a (red:1.3) circle, [blue] square", "((ugly))", 1),
    (LONG + " BREAK a (((tail)))", "", 2),  # 6 chunks (the comma rule moves words), negative 1: padded
    ("\\(literal\\) (nested (weights:1.2):0.8) BREAK end", None, 3),
]


def _padded(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A1111's pad_cond_uncond, as sd_samplers_cfg_denoiser.py does it."""
    repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
    if repeats < 0:
        cond = torch.cat([cond, empty.repeat(1, -repeats, 1)], dim=1)
    elif repeats > 0:
        uncond = torch.cat([uncond, empty.repeat(1, repeats, 1)], dim=1)
    return cond, uncond


def _oracle_rows(oracle_encoder, prompt, negative, clip_skip):
    encoder, tokenizer = oracle_encoder
    with torch.no_grad():
        cond = a1111_conditioning(encoder, tokenizer, prompt, clip_skip)
        uncond = a1111_conditioning(encoder, tokenizer, negative or "", clip_skip)
        empty = a1111_conditioning(encoder, tokenizer, "", clip_skip)
    return _padded(cond, uncond, empty)


@pytest.mark.parametrize("prompt,negative,clip_skip", CASES)
def test_conditioning_equals_a1111s_formula(engine, oracle_encoder, prompt, negative, clip_skip):
    model = engine.models.get(MODEL)
    with torch.inference_mode():
        rows = family_of("sd1").encode(model, prompt, negative, True, 1, 32, 32, (), TextOptions("a1111", clip_skip))
    cond, uncond = _oracle_rows(oracle_encoder, prompt, negative, clip_skip)
    ours = rows.encoder_hidden_states  # [uncond, cond]
    assert ours.shape == (2, cond.shape[1], cond.shape[2])
    torch.testing.assert_close(ours[1], cond[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[0], uncond[0], atol=1e-5, rtol=1e-5)
    # The oracle can fail: weights change the conditioning.
    plain = a1111_conditioning(*oracle_encoder, prompt.replace("(", "").replace(")", ""), clip_skip)
    assert plain.shape != cond.shape or (plain - cond).abs().max() > 1e-3


def test_unweighted_short_prompt_reads_as_plain_text(engine):
    model = engine.models.get(MODEL)
    family = family_of("sd1")
    with torch.inference_mode():
        a1111 = family.encode(model, "a red circle", "blurry", True, 1, 32, 32, (), TextOptions("a1111"))
        plain = family.encode(model, "a red circle", "blurry", True, 1, 32, 32, ())
    assert torch.equal(a1111.encoder_hidden_states, plain.encoder_hidden_states)


def test_image_matches_diffusers_given_a1111_embeddings(engine, oracle_encoder):
    prompt, negative, clip_skip = CASES[1]
    spec = RequestSpec(model=MODEL, prompt=prompt, negative_prompt=negative, seed=3, steps=3, guidance_scale=7.5,
                       width=32, height=32, prompt_syntax="a1111", clip_skip=clip_skip)
    request = engine.validate(spec)
    ours = np.stack(engine.generate([request])[0].images)
    cond, uncond = _oracle_rows(oracle_encoder, prompt, negative, clip_skip)
    pipe = pipeline(MODEL)
    original = pipe.scheduler
    choice = resolve_scheduler(request.scheduler)
    pipe.scheduler = getattr(diffusers, choice.class_name).from_config(original.config, **choice.overrides)
    try:
        theirs = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=7.5, num_inference_steps=3,
                      width=32, height=32, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    finally:
        pipe.scheduler = original
    assert max_pixel_difference(ours, (theirs * 255).round().astype(np.uint8)) <= 2
    plain = np.stack(engine.generate([engine.validate(RequestSpec(**{**spec.__dict__, "prompt_syntax": "plain"}))])[0].images)
    assert max_pixel_difference(ours, plain) > 2  # the syntax changed the image


def test_long_and_short_prompts_in_one_call_equal_each_alone(engine):
    base = dict(model=MODEL, seed=5, steps=2, guidance_scale=7.5, width=32, height=32)
    specs = [
        RequestSpec(prompt=CASES[1][0], negative_prompt="", prompt_syntax="a1111", **base),  # 6 chunks
        RequestSpec(prompt="a (red:1.2) circle", prompt_syntax="a1111", clip_skip=2, **base),  # 77
        RequestSpec(prompt="a red circle BREAK blue", negative_prompt="x", **base),  # plain: 77
    ]
    together = engine.generate([engine.validate(spec) for spec in specs])
    for spec, result in zip(specs, together):
        alone = engine.generate([engine.validate(spec)])[0]
        assert max_pixel_difference(np.stack(result.images), np.stack(alone.images)) <= 2


def test_refusals_name_their_field(engine):
    with pytest.raises(InvalidArgument) as caught:
        engine.validate(RequestSpec(model=MODEL, prompt="x", prompt_syntax="markdown"))
    assert caught.value.field == "prompt_syntax"
    with pytest.raises(InvalidArgument) as caught:  # tags are the server's to resolve
        engine.validate(RequestSpec(model=MODEL, prompt="x <lora:ink:0.5>", prompt_syntax="a1111"))
    assert caught.value.field == "prompt"
    # Plain text keeps the tag as text.
    assert engine.validate(RequestSpec(model=MODEL, prompt="x <lora:ink:0.5>")).prompt == "x <lora:ink:0.5>"
    too_long = engine.validate(RequestSpec(model=MODEL, prompt=" BREAK ".join(["x"] * 9), prompt_syntax="a1111",
                                           steps=1, width=32, height=32))
    error = engine.generate([too_long])[0]
    assert isinstance(error, InvalidArgument) and error.field == "prompt" and "chunks" in error.message


def test_server_default_syntax_applies_when_the_request_is_silent():
    with pytest.raises(InvalidArgument):
        EngineConfig(prompt_syntax="markdown")
    engine = Engine(EngineConfig(prompt_syntax="a1111"))
    assert engine.validate(RequestSpec(model=MODEL, prompt="x")).prompt_syntax == "a1111"
    assert engine.validate(RequestSpec(model=MODEL, prompt="x", prompt_syntax="plain")).prompt_syntax == "plain"


def test_sdxl_conditioning_equals_a1111s_formula_per_encoder(engine):
    """SDXL: each encoder chunks, weighs and rescales on its own (A1111 wraps each embedder), the
    states are concatenated along the width, the pooled embedding is the first chunk's."""
    from transformers import CLIPTextModelWithProjection

    path = builtin_path("tiny-sdxl")
    encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval(),
                CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2").eval()]
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")]
    prompt = LONG[:300] + " BREAK a (((tail)))"
    model = engine.models.get("tiny-sdxl")
    with torch.inference_mode():
        rows = family_of("sdxl").encode(model, prompt, None, False, 1, 32, 32, (), TextOptions("a1111", 2))
        plain = family_of("sdxl").encode(model, "a red circle", None, False, 1, 32, 32, ())
        short = family_of("sdxl").encode(model, "a red circle", None, False, 1, 32, 32, (), TextOptions("a1111"))
    chunk_ids: list = []
    with torch.no_grad():
        parts = [a1111_conditioning(e, t, prompt, 2, sdxl=True, ids_out=chunk_ids if k else None)
                 for k, (e, t) in enumerate(zip(encoders, tokenizers))]
        pooled = encoders[1](input_ids=torch.tensor([chunk_ids[0]])).text_embeds  # [1, 32], chunk 0, unweighted
    expected = torch.cat(parts, dim=-1)  # [1, 77 * chunks, 32 + 32]
    assert expected.shape[1] > 77
    torch.testing.assert_close(rows.encoder_hidden_states[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rows.text_embeds, pooled, atol=1e-5, rtol=1e-5)
    assert torch.equal(short.encoder_hidden_states, plain.encoder_hidden_states)
    assert torch.equal(short.text_embeds, plain.text_embeds)


def test_textual_inversion_tokens_inside_weighted_pieces(engine, tmp_path):
    """Embedding tokens (multi-vector too) keep working when the a1111 parser splits the prompt
    into weighted pieces: the oracle is diffusers' own textual-inversion loading (its prompt
    rewrite and tokenizer), encoded by the A1111 formula above."""
    import safetensors.torch
    from diffusers import StableDiffusionPipeline

    from sdserve.adapters.embeddings import load_embedding
    from sdserve.engine.request import EmbeddingSpec
    from sdserve.engine.row_context import RowContext

    toy = tmp_path / "toy.safetensors"
    safetensors.torch.save_file({"<toy>": torch.randn(3, 32, generator=torch.Generator().manual_seed(1))}, str(toy))
    prompt, negative = "a (<toy>:1.3) on a [table], <toy>", "(blurry <toy>)"
    spec = RequestSpec(model=MODEL, prompt=prompt, negative_prompt=negative, seed=4, steps=2, guidance_scale=6.0,
                       width=32, height=32, prompt_syntax="a1111", embeddings=(EmbeddingSpec(path=str(toy)),))
    request = engine.validate(spec)
    result = engine.generate([request])[0]
    assert not isinstance(result, Exception), result
    # The conditioning as the engine encodes it (state.prepare_state's row context, one row).
    model = engine.models.get(MODEL)
    embeddings = (load_embedding(str(toy), "toy", model.info.text_widths),)
    with torch.inference_mode(), model.adapters.rows(RowContext(lora=((),), embeddings=(embeddings,))):
        state_rows = family_of("sd1").encode(model, prompt, negative, True, 1, 32, 32, embeddings, TextOptions("a1111"))
    pipe = StableDiffusionPipeline.from_pretrained(builtin_path(MODEL))
    pipe.load_textual_inversion(str(toy))
    norm = _final_norm(pipe.text_encoder)
    with torch.no_grad():
        norm.bias.copy_(_bias(norm.bias.shape[0]))
        cond = a1111_conditioning(pipe.text_encoder, pipe.tokenizer, pipe.maybe_convert_prompt(prompt, pipe.tokenizer), 1)
        uncond = a1111_conditioning(pipe.text_encoder, pipe.tokenizer,
                                    pipe.maybe_convert_prompt(negative, pipe.tokenizer), 1)
    torch.testing.assert_close(state_rows.encoder_hidden_states[1], cond[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state_rows.encoder_hidden_states[0], uncond[0], atol=1e-5, rtol=1e-5)
