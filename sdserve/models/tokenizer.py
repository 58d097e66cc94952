"""A CLIP tokenizer whose vocabulary sdserve builds itself (no download).

CLIP's tokenizer is byte-level BPE: a word is split into byte-symbols, the last one carrying
the `</w>` end-of-word marker, and merges join symbols by rank. We start from the 256 byte
symbols (each also with `</w>`), so any text tokenizes, and add merges that build each given
word into one token, so the words a model is trained on get one embedding each.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character map that GPT-2/CLIP BPE uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _apply_merges(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as the tokenizer runs it: repeatedly join the adjacent pair of lowest merge rank."""
    pieces = list(pieces)
    while len(pieces) > 1:
        rank, index = min((ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == 1 << 30:
            break
        pieces[index : index + 2] = [pieces[index] + pieces[index + 1]]
    return pieces


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) holding every byte symbol plus one whole-word token per word.

    Merges made for earlier words can fire inside later ones ("a n" of "and" inside "orange"),
    so each word is first split the way the merges so far split it, and only the pieces left
    are chained; every new merge ranks after the earlier ones, so earlier words stay whole.
    """
    byte_map = _bytes_to_unicode()
    symbols = list(byte_map.values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted({w.lower() for w in words if w}):
        pieces = [byte_map[b] for b in word.encode("utf-8")]
        pieces[-1] += "</w>"
        pieces = _apply_merges(pieces, ranks)
        current = pieces[0]
        for nxt in pieces[1:]:
            ranks[(current, nxt)] = len(merges)
            merges.append(f"{current} {nxt}")
            current = current + nxt
            vocab.setdefault(current, len(vocab))
    for special in (BOS, EOS):
        vocab.setdefault(special, len(vocab))
    return vocab, merges


def write_clip_tokenizer(out_dir: Path, words: Iterable[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json/merges.txt (+ tokenizer config) to `out_dir`, loadable by `CLIPTokenizer`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""))
    tokenizer = CLIPTokenizer(
        vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"), model_max_length=model_max_length
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def vocab_size(words: Iterable[str] = ()) -> int:
    return len(build_vocab(words)[0])


def write_openai_clip_tokenizer(out_dir: Path, merges_file: Path, pad_token: str = EOS) -> CLIPTokenizer:
    """Write OpenAI CLIP's own tokenizer (49408 tokens, as SD 1.x/2.x/XL use) to `out_dir`.

    `merges_file` is a gzipped list of CLIP's 48894 BPE merges, in rank order (sdserve ships
    it, taken from open_clip's `bpe_simple_vocab_16e6.txt.gz`); the vocabulary follows from them
    the way CLIP builds it: the 256 byte symbols, the same with `</w>`, one token per merge, then
    the two specials. SD 2.x and SDXL's second tokenizer pad with "!", SD 1.x with the end token.
    """
    import gzip

    merges = gzip.decompress(merges_file.read_bytes()).decode("utf-8").splitlines()
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"), model_max_length=77, pad_token=pad_token
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer
