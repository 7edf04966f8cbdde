#!/usr/bin/env python
"""Build the tiny CLIP BPE tokenizer fixture in ``src/uniportrait/assets/tiny_tokenizer/``.

The fixture is a genuine CLIP byte-level BPE tokenizer with a truncated merge list, so it
loads with ``transformers.CLIPTokenizer.from_pretrained(path)`` fully offline and tokenizes
common English words the way the real CLIP tokenizer does, with a vocabulary of ~2.5k.

Vocabulary layout (same order as OpenAI CLIP's ``SimpleTokenizer``):

1. the 256 byte-level unicode symbols (GPT-2/CLIP ``bytes_to_unicode``),
2. the same 256 symbols with a ``</w>`` end-of-word suffix,
3. one token per merge (the concatenation of the merged pair), in merge order,
4. ``<|startoftext|>`` and ``<|endoftext|>``.

Merge sources, best first:

* ``--bpe PATH``: OpenAI CLIP's merge list ``bpe_simple_vocab_16e6.txt.gz`` (MIT license). It
  ships in the ``open_clip_torch`` wheel, which can be fetched without installing it::

      pip download open_clip_torch --no-deps -d /tmp/oc
      unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
      python scripts/make_tiny_tokenizer.py --bpe /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

  The first ``--num-merges`` (default 2000) merges after the header line are kept.
* no ``--bpe``: merges are learned from a small built-in English prompt corpus (default 1000,
  fewer if the corpus runs out of pairs). Tokenization then differs from real CLIP.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "uniportrait" / "assets" / "tiny_tokenizer"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"
MODEL_MAX_LENGTH = 77

# Small prompt corpus for the fallback merge learner (only used without --bpe).
FALLBACK_CORPUS = """
a photo of a man and a woman at the beach
a portrait of a young woman with long hair, smiling, high quality, detailed
a close up photo of an old man wearing glasses and a hat in the city
two people standing in front of a house, sunny day, realistic photograph
a girl and a boy playing in the park with a dog, cinematic lighting
a professional headshot of a person in a suit, studio lighting, sharp focus
a painting of a woman in the style of an oil painting, masterpiece
a man riding a bicycle on the street at night, neon lights, rain
a family having dinner together at home, warm light, happy faces
a child reading a book in a library, soft light, bokeh background
a woman wearing a red dress walking on the road in the mountains
a smiling man with a beard and short hair, looking at the camera
a group of friends sitting on the grass near the lake at sunset
the face of a beautiful woman, natural skin, eyes, nose, mouth, ears
an astronaut in a white space suit on the moon, science fiction art
a chef cooking in the kitchen, black and white photo, film grain
a photograph of a person wearing a blue shirt and a black jacket
low quality, blurry, worst quality, bad anatomy, deformed, ugly, watermark, text
best quality, ultra detailed, 8k, photorealistic, trending on artstation
a cartoon of a cat and a dog, anime style, colorful illustration
portrait of an old woman with white hair and wrinkles, dramatic light
a man and a woman dancing at a wedding party, people in the background
a soldier, a doctor, a teacher and a student standing in a row
a boy with curly hair wearing a green sweater in the snow, winter
""".strip()

_WORD_RE = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode character mapping."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_clip_merges(path: Path, num_merges: int) -> list[tuple[str, str]]:
    """First ``num_merges`` merges of OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (header skipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = []
    for line in lines[1 : num_merges + 1]:
        a, b = line.split()
        merges.append((a, b))
    return merges


def learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Learn CLIP-style BPE merges (words end with ``</w>``) on a small corpus."""
    b2u = bytes_to_unicode()
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for word in _WORD_RE.findall(corpus.lower()):
        symbols = [b2u[b] for b in word.encode("utf-8")]
        symbols[-1] = symbols[-1] + EOW
        counts[tuple(symbols)] += 1

    merges: list[tuple[str, str]] = []
    words = dict(counts)
    while len(merges) < num_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, c in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += c
        if not pairs:
            break
        # Most frequent pair, ties broken deterministically by the pair itself.
        best, _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(best)
        merged = best[0] + best[1]
        new_words = {}
        for symbols, c in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + c
        words = new_words
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + EOW for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in tokens:
        if tok in vocab:
            raise ValueError(f"duplicate vocabulary entry {tok!r}")
        vocab[tok] = len(vocab)
    return vocab


def write_fixture(out_dir: Path, merges: list[tuple[str, str]]) -> dict[str, int]:
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return vocab


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bpe", type=Path, default=None, help="path to CLIP's bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--num-merges", type=int, default=None, help="2000 with --bpe, 1000 without")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    if args.bpe is not None:
        merges = read_clip_merges(args.bpe, args.num_merges or 2000)
        source = f"OpenAI CLIP merges from {args.bpe}"
    else:
        merges = learn_merges(FALLBACK_CORPUS, args.num_merges or 1000)
        source = "merges learned from the built-in corpus"
    vocab = write_fixture(args.out, merges)
    print(f"wrote {args.out}: {len(merges)} merges ({source}), vocab size {len(vocab)}")


if __name__ == "__main__":
    main()
