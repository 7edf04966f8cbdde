"""Experiment: teach the world's base model to steer identity traits through its text
cross-attention, then see whether UniPortrait transfers identity better on it (docs/world.md,
"Captions that describe faces").

World captions never describe a face's identity traits, so the shipped base UNet never learnt to
change hair, skin or beard in response to its cross-attention, which is where UniPortrait's
identity tokens enter. SD learnt that from captions like "a bearded man with red hair". This
script continues the shipped base UNet on portraits whose captions also say some of the person's
traits (``uniportrait.world.scenes.identity_phrase``). The words new to the tokenizer are added
as whole-word tokens whose embeddings are learnt (textual inversion); the rest of the text
encoder is frozen, so every old caption is encoded exactly as before. Group pictures keep their
captions. It writes a pipeline folder ``OUT/base`` that ``uniportrait train --set
model.pretrained_model=OUT/base`` and ``uniportrait world identity-report --base OUT/base`` read,
and, with ``--check``, measures how often the base model draws the traits a caption asks for,
next to the shipped base model.

    python scripts/world_trait_captions.py runs/world/traits --steps 1200 --check
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("world_trait_captions")
#: The world build's training renders (``uniportrait world build --work runs/world``).
DATA = Path("runs/world/data")


def add_identity_words(tokenizer, text_encoder) -> list[int]:
    """Add the words of identity phrases that the tokenizer lacks; return their token ids."""
    from transformers import AddedToken

    from uniportrait.world.scenes import identity_vocabulary

    vocab = tokenizer.get_vocab()
    new = [w for w in identity_vocabulary() if w + "</w>" not in vocab]
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in new])
    old_rows = text_encoder.get_input_embeddings().weight.shape[0]
    text_encoder.resize_token_embeddings(len(tokenizer))
    emb = text_encoder.get_input_embeddings().weight
    with torch.no_grad():  # start each new word at the mean word, a little apart
        gen = torch.Generator().manual_seed(0)
        emb[old_rows:] = emb[:old_rows].mean(0) + 0.01 * torch.randn(emb[old_rows:].shape, generator=gen)
    return list(range(old_rows, emb.shape[0]))


def trait_captions(captions, identities, rng, p: float) -> list[str]:
    from uniportrait.world.scenes import identity_phrase
    from uniportrait.world.traits import Traits

    out = []
    for text, ident in zip(captions, identities):
        phrase = identity_phrase(Traits.of(int(ident)), rng, p)
        out.append(f"{text}, {phrase}" if phrase else str(text))
    return out


def train(out: Path, steps: int, lr: float, word_lr: float, p: float, batch: int = 32) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from uniportrait.atomic import atomic_directory
    from uniportrait.presets.tiny import published_ddim_scheduler
    from uniportrait.world.build import WORLD_ASSETS
    from uniportrait.world.data import load_set
    from uniportrait.world.loop import run_loop
    from uniportrait.world.train_base import denoising_step, ema_update, encode_latents, tokenize

    base = WORLD_ASSETS / "base"
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32)
    vae = AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32).eval()
    s, g = load_set(DATA / "singles_train.npz"), load_set(DATA / "groups_train.npz")
    before = [tokenize(tokenizer, s["captions"][:3000]), tokenize(tokenizer, g["captions"][:1000])]
    new_ids = add_identity_words(tokenizer, text_encoder)
    after = [tokenize(tokenizer, s["captions"][:3000]), tokenize(tokenizer, g["captions"][:1000])]
    if not all(torch.equal(a, b) for a, b in zip(before, after)):
        raise SystemExit("adding the identity words changed how old captions tokenize")
    logger.info("added %d words: %s", len(new_ids), tokenizer.convert_ids_to_tokens(new_ids))

    cache = out / "latents.pt"
    if cache.is_file():
        z = torch.load(cache, weights_only=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            z = {"1": encode_latents(vae, s["images"]).half(), "g": encode_latents(vae, g["images"]).half()}
        torch.save(z, cache)
    captions = {"1": s["captions"], "g": g["captions"]}
    identities = s["identities"][:, 0]

    text_encoder.requires_grad_(False)
    emb = text_encoder.get_input_embeddings().weight
    emb.requires_grad_(True)
    keep = torch.ones(emb.shape[0], 1)
    keep[new_ids] = 0.0
    emb.register_hook(lambda grad: grad * (1.0 - keep))  # only the new words learn
    ema = UNet2DConditionModel.from_config(unet.config)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "base_lr": lr, "weight_decay": 0.01},
            {"params": [emb], "base_lr": word_lr, "weight_decay": 0.0},
        ]
    )
    schedule = DDPMScheduler.from_config(published_ddim_scheduler().config)
    gen = torch.Generator().manual_seed(1)
    rng = np.random.default_rng(1)

    def step(i: int) -> dict[str, float]:
        key = "g" if i % 3 == 2 else "1"
        idx = torch.randint(len(z[key]), (batch,), generator=gen)
        texts = [str(captions[key][k]) for k in idx.numpy()]
        if key == "1":
            texts = trait_captions(texts, identities[idx.numpy()], rng, p)
        drop = torch.rand(batch, generator=gen) < 0.1
        texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
        cond = text_encoder(tokenize(tokenizer, texts))[0]
        return {"loss" + key: denoising_step(unet, schedule, z[key][idx].float(), cond, gen)}

    def update_ema() -> None:
        ema_update(ema, unet, 0.995)

    modules = {"unet": unet, "ema": ema, "text_encoder": text_encoder}
    run_loop(out / "run", modules, opt, step, steps, lr, "UNet+words", warmup=100, after_step=update_ema)
    with atomic_directory(out / "base") as folder:  # the shipped base with the three parts replaced
        shutil.copytree(
            base,
            folder,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("unet", "text_encoder", "tokenizer"),
        )
        ema.save_pretrained(folder / "unet")
        text_encoder.save_pretrained(folder / "text_encoder")
        tokenizer.save_pretrained(folder / "tokenizer")
    return out / "base"


def _portrait(pipe, prompt: str, seed: int) -> np.ndarray:
    """One 64 px portrait, (64, 64, 3) uint8 (DDIM 25 steps, CFG 7.5)."""
    image = pipe(
        prompt, height=64, width=64, num_inference_steps=25, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images[0]  # fmt: skip
    return (image * 255).round().astype(np.uint8)


TRAITS_CHECKED = ("hair_colour", "hair_style", "facial_hair", "eye_colour")


@torch.no_grad()
def trait_following(base: Path, count: int = 100, seed: int = 0) -> dict[str, float]:
    """How often the base model, asked for a held-out person's traits, draws them (oracle)."""
    from uniportrait.world.identity_report import _split_traits
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import base_pipeline
    from uniportrait.world.scenes import identity_phrase
    from uniportrait.world.traits import HELD_OUT_START, Traits

    pipe = base_pipeline(base)
    oracles = WorldOracles()
    rng = np.random.default_rng(seed)
    hits = {name: [] for name in TRAITS_CHECKED}
    faces = 0
    for k in range(count):
        traits = Traits.of(HELD_OUT_START + 5000 + k)
        prompt = "a photo of a person, " + identity_phrase(traits, rng, 1.0)
        image = _portrait(pipe, prompt, seed + k)
        found = oracles.detect(image)
        if len(found) != 1:
            continue
        faces += 1
        got = _split_traits(oracles.describe(image, found)["traits"][0])
        want = _split_traits(traits.vector())
        for name in TRAITS_CHECKED:
            hits[name].append(got[name] == want[name])
    result = {name: float(np.mean(v)) if v else float("nan") for name, v in hits.items()}
    result["one_face"] = faces / count
    return result


@torch.no_grad()
def colour_binding(base: Path, per_colour: int = 40) -> dict[str, dict[str, float]]:
    """Where a hair colour that is also a clothing/hat colour goes: "with long red hair" → how
    often the oracles see red hair, a red shirt, a red hat (portraits with one face)."""
    from uniportrait.world.identity_report import _split_traits
    from uniportrait.world.oracles import WorldOracles
    from uniportrait.world.report import base_pipeline
    from uniportrait.world.traits import COLOURS, HAIR_COLOURS, HATS

    pipe = base_pipeline(base)
    oracles = WorldOracles()
    rows = {}
    for colour in ("black", "red", "white"):
        counts = {"hair": 0, "shirt": 0, "hat": 0, "faces": 0}
        for k in range(per_colour):
            image = _portrait(pipe, f"a photo of a person, with long {colour} hair", k)
            found = oracles.detect(image)
            if len(found) != 1:
                continue
            counts["faces"] += 1
            traits = _split_traits(oracles.describe(image, found)["traits"][0])
            person = oracles.person_attributes(image[None], np.asarray([found[0].box], np.float32))
            counts["hair"] += HAIR_COLOURS[traits["hair_colour"]] == colour
            counts["shirt"] += COLOURS[int(person["clothing"][0])] == colour
            counts["hat"] += HATS[int(person["hat"][0])] == colour
        n = max(counts.pop("faces"), 1)
        rows[colour] = {key: value / n for key, value in counts.items()} | {"faces": n}
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=1e-4, help="UNet learning rate")
    parser.add_argument("--word-lr", type=float, default=2e-3, help="new word embeddings' learning rate")
    parser.add_argument("--p", type=float, default=0.5, help="probability that a caption says each trait")
    parser.add_argument("--check", action="store_true", help="measure trait following afterwards")
    args = parser.parse_args(argv)
    if args.steps < 1 or not 0.0 <= args.p <= 1.0 or args.lr <= 0 or args.word_lr <= 0:
        parser.error("--steps must be at least 1, --p in [0, 1], and the learning rates positive")
    missing = [n for n in ("singles_train.npz", "groups_train.npz") if not (DATA / n).is_file()]
    if missing:
        parser.error(f"{DATA} lacks {', '.join(missing)}: run `uniportrait world build --stages render`")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    folder = train(args.out, args.steps, args.lr, args.word_lr, args.p)
    print(f"{folder}: written")
    if args.check:
        from uniportrait.world.build import WORLD_ASSETS

        rows = {
            "shipped base": trait_following(WORLD_ASSETS / "base"),
            "trait-caption base": trait_following(folder),
            "colour binding, shipped base": colour_binding(WORLD_ASSETS / "base"),
            "colour binding, trait-caption base": colour_binding(folder),
        }
        (args.out / "trait_following.json").write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
