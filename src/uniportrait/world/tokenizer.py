"""The world's text tokenizer: a genuine CLIP byte-level BPE tokenizer whose merges spell every
caption word as one token.

The files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``)
load with ``transformers.CLIPTokenizer.from_pretrained`` like SD1.5's tokenizer. The vocabulary
follows CLIP's layout: the 256 byte symbols, the same with ``</w>``, one token per merge, then
``<|startoftext|>`` and ``<|endoftext|>``. Words outside the world's vocabulary still tokenize
(into smaller pieces), as with any BPE tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, EOW = "<|startoftext|>", "<|endoftext|>", "</w>"
#: Token positions of the world's text encoder (as SD1.5's; the longest four-person caption fits).
MAX_LENGTH = 77


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    """Merges that build each word left to right, repaired until every word is one token."""
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()

    def add(pair: tuple[str, str]) -> None:
        if pair not in seen:
            seen.add(pair)
            merges.append(pair)

    for word in words:
        symbols = list(word[:-1]) + [word[-1] + EOW]
        for k in range(1, len(symbols)):
            add(("".join(symbols[:k]), symbols[k]))
    # BPE applies the lowest-ranked pair first, so another word's merge can split a word
    # differently: join whatever pieces come out, until all words are single tokens.
    for _ in range(10):
        broken = False
        for word in words:
            pieces = _apply(word, {pair: rank for rank, pair in enumerate(merges)})
            while len(pieces) > 1:
                broken = True
                add((pieces[0], pieces[1]))
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
        if not broken:
            return merges
    raise RuntimeError("could not build single-token merges for the world vocabulary")


def _apply(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    pieces = list(word[:-1]) + [word[-1] + EOW]
    while len(pieces) > 1:
        pairs = [(ranks.get((pieces[i], pieces[i + 1]), 1 << 30), i) for i in range(len(pieces) - 1)]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def write_tokenizer(folder: str | Path, words: list[str]) -> Path:
    """Write the tokenizer files for ``words`` (lower-case ASCII) into ``folder``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = _merges_for(sorted(set(words)))
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + EOW for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2 (uniportrait world tokenizer)"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return folder
