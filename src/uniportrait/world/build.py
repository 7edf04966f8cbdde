"""``uniportrait world build``: render the world's data and train all its models, resumably.

Stages run in order; a finished stage (its output exists) is skipped, an interrupted one resumes
from its last save. The final weights are exported in fp16 to the shipped folder
(:data:`WORLD_ASSETS`)::

    base/            diffusers SD layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/
    image_encoder/   CLIP vision tower (transformers CLIPVisionModelWithProjection)
    face_backbone/   IR backbone, a diffusers model (config.json + diffusion_pytorch_model.safetensors)
    oracles/         detector/, face/, person/, scene/ (evaluation only; never used to generate)
    face_detector/   the generator side's face detector (``get_face_analyzer("world")``)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

WORLD_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "world"
UNET_LR = 3e-4  # the base UNet's peak learning rate (AdamW, warm-up then cosine)
UNET_LR_RANGE = (1e-6, 1e-2)  # what --unet-lr accepts
UNET_FACE_WEIGHT_RANGE = (0.0, 100.0)  # what --unet-face-weight accepts (0: off)
UNET_SNR_GAMMA_RANGE = (0.0, 100.0)  # what --unet-snr-gamma accepts (0: off)


@dataclass(frozen=True)
class BuildPlan:
    """Set sizes and training lengths (steps) of every stage; ``scale`` shortens them all (tests)."""

    singles_train: int = 24000
    groups_train: int = 6000
    train_identities: int = 4000
    singles_val: int = 1200
    groups_val: int = 600
    val_identities: int = 200
    vae_steps: int = 1200
    vae_decoder_steps: int = 5000
    clip_steps: int = 400
    unet_steps: int = 2000
    backbone_steps: int = 500
    detector_steps: int = 700
    face_oracle_steps: int = 1500
    person_oracle_steps: int = 500
    scene_oracle_steps: int = 300
    face_detector_steps: int = 500
    layout: str = "4x"  # the base's sizes: a key of models.WORLD_LAYOUTS
    unet_offset_noise: float = 0.0  # train_base.train_unet's offset_noise (docs/world.md)
    unet_init: str = ""  # a trained UNet folder of the same layout to continue from ("": from scratch)
    unet_face_weight: float = 0.0  # train_base.train_unet's face_weight (0: off; docs/world.md)
    unet_lr: float = UNET_LR  # the UNet's peak learning rate
    unet_seed: int = 0  # the UNet's batches, noise and timesteps
    unet_bf16: bool = False  # train_base.train_unet's bf16: steps under CPU bf16 autocast
    unet_snr_gamma: float = 0.0  # train_base.train_unet's snr_gamma: min-SNR-γ loss weights (0: off)
    framing: str = "wide"  # how large the rendered faces are: a key of scenes.FRAMINGS

    def scaled(self, scale: float) -> BuildPlan:
        """Every set size and step count times ``scale`` (at least 2); seeds and switches unchanged."""
        values = {
            k: max(2, int(v * scale)) if type(v) is int and k not in UNSCALED else v
            for k, v in asdict(self).items()
        }
        values["train_identities"] = max(8, values["train_identities"])
        values["val_identities"] = max(8, values["val_identities"])
        return BuildPlan(**values)


UNSCALED = ("unet_seed",)  # BuildPlan's integers that are not sizes or lengths
STAGES = ("render", "vae", "vae_decoder", "clip", "unet", "crops", "backbone", "oracles", "face_detector")
GROUP_COUNTS = (2, 3, 2, 3, 4)  # people per group picture, cycled


def _render_stage(work: Path, plan: BuildPlan) -> None:
    from uniportrait.world.data import render_set, save_set

    sets = {
        "singles_val": dict(
            count=plan.singles_val, num_people=1, seed=101, num_identities=plan.val_identities, held_out=True
        ),
        "groups_val": dict(
            count=plan.groups_val,
            num_people=GROUP_COUNTS,
            seed=102,
            num_identities=plan.val_identities,
            held_out=True,
        ),
        "singles_train": dict(
            count=plan.singles_train, num_people=1, seed=1, num_identities=plan.train_identities
        ),
        "groups_train": dict(
            count=plan.groups_train, num_people=GROUP_COUNTS, seed=2, num_identities=plan.train_identities
        ),
    }
    for name, kwargs in sets.items():
        path = work / "data" / f"{name}.npz"
        if not path.is_file():
            save_set(render_set(**kwargs, framing=plan.framing), path)


def _crops_stage(work: Path, plan: BuildPlan) -> None:
    from uniportrait.world.data import load_set
    from uniportrait.world.faces import build_crops

    data = work / "data"
    if not (data / "crops_train.npz").is_file():
        build_crops(
            [load_set(data / "singles_train.npz"), load_set(data / "groups_train.npz")],
            data / "crops_train.npz",
        )
    if not (data / "crops_val.npz").is_file():
        build_crops(
            [load_set(data / "singles_val.npz"), load_set(data / "groups_val.npz")],
            data / "crops_val.npz",
            jitter=0.0,
        )


def _train_oracles(data: Path, folder: Path, plan: BuildPlan) -> None:
    from uniportrait.world.train_oracles import train_all

    train_all(data, folder, plan)


def _train_face_detector(data: Path, folder: Path, plan: BuildPlan) -> None:
    from uniportrait.world.train_oracles import train_face_detector

    train_face_detector(data, folder, plan.face_detector_steps)


def run_build(
    work: str | Path, out: str | Path = WORLD_ASSETS, plan: BuildPlan = BuildPlan(), stages=None
) -> Path:
    """Run every stage (or the named ``stages``) and export to ``out``.

    Raises:
        UniPortraitError: ``plan.layout`` is unknown, ``plan.unet_offset_noise`` is outside
            [0, 1], ``plan.unet_face_weight`` outside [0, 100], ``plan.unet_snr_gamma`` outside
            [0, 100], ``plan.unet_lr`` outside
            :data:`UNET_LR_RANGE`, ``plan.unet_seed`` negative, ``plan.unet_init`` is not a UNet
            folder of the layout, ``plan.framing`` is unknown, or ``work`` holds a build of another
            layout (its VAE and UNet would not fit together) or pictures of another framing.
            Nothing is written then.
    """
    from uniportrait.errors import UniPortraitError
    from uniportrait.world import train_base
    from uniportrait.world.models import WORLD_LAYOUTS
    from uniportrait.world.scenes import FRAMINGS

    if plan.layout not in WORLD_LAYOUTS:
        raise UniPortraitError(f"unknown layout {plan.layout!r}; known: {', '.join(WORLD_LAYOUTS)}")
    if plan.framing not in FRAMINGS:
        raise UniPortraitError(f"unknown framing {plan.framing!r}; known: {', '.join(FRAMINGS)}")
    if not 0 <= plan.unet_offset_noise <= 1:
        raise UniPortraitError(
            f"the UNet's offset noise (--unet-offset-noise) must be in [0, 1], got {plan.unet_offset_noise}"
        )
    for what, flag, value, (low, high) in (
        ("face weight", "--unet-face-weight", plan.unet_face_weight, UNET_FACE_WEIGHT_RANGE),
        ("min-SNR gamma", "--unet-snr-gamma", plan.unet_snr_gamma, UNET_SNR_GAMMA_RANGE),
    ):
        if not low <= value <= high:
            raise UniPortraitError(f"the UNet's {what} ({flag}) must be in [{low:g}, {high:g}], got {value}")
    low, high = UNET_LR_RANGE
    if not low <= plan.unet_lr <= high:
        raise UniPortraitError(
            f"the UNet's learning rate (--unet-lr) must be in [{low:g}, {high:g}], got {plan.unet_lr}"
        )
    if plan.unet_seed < 0:
        raise UniPortraitError(f"the UNet's seed (--unet-seed) must be 0 or more, got {plan.unet_seed}")
    sizes = WORLD_LAYOUTS[plan.layout]
    if plan.unet_init:
        train_base.check_unet_init(Path(plan.unet_init), sizes)
    work, out = Path(work), Path(out)
    data, previous = work / "data", work / "plan.json"
    if previous.is_file():
        built = json.loads(previous.read_text())
        layout = built.get("layout", "4x")  # plans before layouts: 4x
        if layout != plan.layout and (work / "vae").exists():
            raise UniPortraitError(
                f"{work} holds a {layout} build; build the {plan.layout} layout in another --work folder"
            )
        framing = built.get("framing", "wide")  # plans before framings: wide
        if framing != plan.framing and (data / "singles_val.npz").exists():
            raise UniPortraitError(
                f"{work} holds {framing}-framed pictures; build the {plan.framing} framing in another --work folder"
            )
    work.mkdir(parents=True, exist_ok=True)
    previous.write_text(json.dumps(asdict(plan), indent=2))
    steps = {
        "render": (lambda: _render_stage(work, plan), data / "groups_train.npz"),
        "vae": (
            lambda: train_base.train_vae(data, work / "vae", steps=plan.vae_steps, batch=16, sizes=sizes),
            work / "vae" / "vae",
        ),
        "vae_decoder": (
            lambda: train_base.finetune_vae_decoder(
                data, work / "vae", work / "vae_decoder", steps=plan.vae_decoder_steps
            ),
            work / "vae_decoder" / "vae",
        ),
        "clip": (
            lambda: train_base.train_clip(data, work / "clip", steps=plan.clip_steps, batch=96),
            work / "clip" / "image_encoder",
        ),
        "unet": (
            lambda: train_base.train_unet(
                data,
                work / "vae",
                work / "clip",
                work / "unet",
                steps=plan.unet_steps,
                sizes=sizes,
                offset_noise=plan.unet_offset_noise,
                init=Path(plan.unet_init) if plan.unet_init else None,
                face_weight=plan.unet_face_weight,
                lr=plan.unet_lr,
                seed=plan.unet_seed,
                bf16=plan.unet_bf16,
                snr_gamma=plan.unet_snr_gamma,
            ),
            work / "unet" / "unet",
        ),
        "crops": (lambda: _crops_stage(work, plan), data / "crops_val.npz"),
        "backbone": (
            lambda: train_base.train_backbone(
                data / "crops_train.npz", work / "backbone", steps=plan.backbone_steps, batch=64
            ),
            work / "backbone" / "face_backbone",
        ),
        "oracles": (lambda: _train_oracles(data, work / "oracles", plan), work / "oracles" / "done"),
        "face_detector": (
            lambda: _train_face_detector(data, work / "face_detector", plan),
            work / "face_detector" / "face_detector",
        ),
    }
    assert tuple(steps) == STAGES
    for name, (fn, done) in steps.items():
        if stages and name not in stages:
            continue
        if done.exists():
            logger.info("world build: %s already done", name)
            continue
        start = time.time()
        logger.info("world build: %s …", name)
        fn()
        with open(work / "timings.jsonl", "a") as f:
            f.write(json.dumps({"stage": name, "seconds": round(time.time() - start, 1)}) + "\n")
    export(work, out)
    return out


def export(work: Path, out: Path) -> None:
    """Copy the trained models to ``out`` in fp16 safetensors (the shipped layout)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from uniportrait.atomic import atomic_directory
    from uniportrait.models.face_backbone import IRBackbone
    from uniportrait.presets.tiny import published_ddim_scheduler

    vae = work / "vae_decoder" / "vae"  # the decoder fine-tuned on faces, when that stage ran
    vae = vae if vae.exists() else work / "vae" / "vae"
    needed = [
        work / "unet" / "unet",
        vae,
        work / "clip" / "text_encoder",
        work / "backbone" / "face_backbone",
    ]
    if not all(p.exists() for p in needed):
        logger.info("world build: not exporting yet (stages missing)")
        return
    if (out / "adapter").exists():  # trained on the base model this export replaces
        logger.warning(
            "world build: %s was trained on the previous base model and is removed with it; train "
            "one for the new base (configs/world/, docs/world.md) and ship it with `uniportrait world "
            "export-adapter`",
            out / "adapter",
        )
    with atomic_directory(out) as tmp:
        # a whole diffusers SD pipeline folder (model_index.json + parts), readable by
        # DiffusionPipeline.from_pretrained as well as by our loaders
        StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(vae).to(torch.float16),
            text_encoder=CLIPTextModel.from_pretrained(work / "clip" / "text_encoder").to(torch.float16),
            tokenizer=CLIPTokenizer.from_pretrained(work / "clip" / "tokenizer"),
            unet=UNet2DConditionModel.from_pretrained(work / "unet" / "unet").to(torch.float16),
            scheduler=published_ddim_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(tmp / "base")
        CLIPVisionModelWithProjection.from_pretrained(work / "clip" / "image_encoder").to(
            torch.float16
        ).save_pretrained(tmp / "image_encoder")
        IRBackbone.from_pretrained(work / "backbone" / "face_backbone").to(torch.float16).save_pretrained(
            tmp / "face_backbone"
        )
        if (work / "oracles" / "done").exists():
            shutil.copytree(work / "oracles" / "export", tmp / "oracles")
        if (work / "face_detector" / "face_detector").exists():
            from uniportrait.world.oracles import FaceDetector

            FaceDetector.from_pretrained(work / "face_detector" / "face_detector").half().save_pretrained(
                tmp / "face_detector"
            )
    logger.info("world build: exported to %s", out)


def export_adapter(src: str | Path, out: str | Path | None = None) -> Path:
    """Ship a trained world adapter: ``src`` (an adapter folder or a training checkpoint) → ``out``
    (default ``assets/world/adapter``) in float16, without a face backbone copy (the world's
    shipped backbone is the one it was trained with); written atomically."""
    import torch

    from uniportrait.errors import UniPortraitError
    from uniportrait.models.adapter import UniPortraitAdapter

    src = Path(src)
    src = src / "adapter" if (src / "adapter" / "config.json").is_file() else src
    if not (src / "config.json").is_file():
        raise UniPortraitError(f"{src}: not an adapter folder or a training checkpoint (no config.json)")
    out = Path(out) if out is not None else WORLD_ASSETS / "adapter"
    UniPortraitAdapter.from_pretrained(src).to(torch.float16).save_pretrained(out)
    logger.info("world adapter exported to %s", out)
    return out
