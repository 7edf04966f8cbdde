"""Named pipeline presets: ``tiny`` (offline, random weights) and ``sd15`` (the published setup)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from uniportrait.errors import WeightsNotFoundError
from uniportrait.presets.registry import get_preset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyAdapterSizes:
    """Sizes of the tiny identity encoders and adapter (see :func:`build_tiny_pipeline`)."""

    backbone_blocks: tuple[int, ...] = (1, 1, 1, 1)
    backbone_channels: tuple[int, ...] = (8, 16, 32, 64)
    qformer_depth: int = 2
    qformer_heads: int = 2
    qformer_dim_head: int = 16
    lora_rank: int = 4
    init_std: float = 0.05  # LoRA "up" and router weights: non-zero so every path has an effect


def tiny_adapter_config(unet, image_encoder, sizes: TinyAdapterSizes = TinyAdapterSizes(), ip_adapter=True):
    from uniportrait.models.adapter import AdapterConfig
    from uniportrait.models.qformer import QFormerConfig

    dim = unet.config.cross_attention_dim
    qformer = QFormerConfig(
        dim=dim,
        id_dim=sizes.backbone_channels[-1],
        structure_dim=sum(sizes.backbone_channels[:3]) + image_encoder.config.hidden_size,
        depth=sizes.qformer_depth,
        heads=sizes.qformer_heads,
        dim_head=sizes.qformer_dim_head,
    )
    return AdapterConfig.from_unet(
        unet,
        qformer=qformer,
        lora_rank=sizes.lora_rank,
        multi_id=True,
        ip_adapter=ip_adapter,
        clip_embed_dim=image_encoder.config.projection_dim,
    )


def tiny_backbone_config(sizes: TinyAdapterSizes = TinyAdapterSizes()):
    from uniportrait.models.face_backbone import IRBackboneConfig

    return IRBackboneConfig(
        blocks=sizes.backbone_blocks,
        channels=sizes.backbone_channels,
        embedding_dim=sizes.backbone_channels[-1],
    )


def build_tiny_pipeline(
    seed: int = 0,
    ip_adapter: bool = True,
    controlnet: bool = False,
    sizes=None,
    adapter=None,
    device=None,
    torch_dtype=None,
):
    """Every component built offline from small configs; deterministic for ``seed``.

    ``adapter``: a folder in our format (e.g. a tiny training run's output) to use instead of
    the random adapter; its face backbone too, if it has one. ``device``/``torch_dtype``: where
    to put it (default: CPU, float32). The caller's global RNG state is left as it was.
    """
    from uniportrait.models.adapter import UniPortraitAdapter
    from uniportrait.models.face_backbone import IRBackbone
    from uniportrait.pipeline import UniPortraitPipeline
    from uniportrait.presets.tiny import build_tiny_base, build_tiny_controlnet

    sizes = sizes or TinyAdapterSizes()
    adapter_folder = adapter
    base = build_tiny_base(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        backbone = IRBackbone.from_sizes(tiny_backbone_config(sizes)).eval()
        _randomise_batchnorm(backbone)
        adapter = UniPortraitAdapter.from_sizes(
            tiny_adapter_config(base["unet"], base["image_encoder"], sizes, ip_adapter)
        )
        for name, param in adapter.named_parameters():
            if name.endswith("up.weight") or "router" in name:
                torch.nn.init.normal_(param, std=sizes.init_std)
        adapter.eval()
        control = build_tiny_controlnet(base["unet"], seed=seed + 2) if controlnet else None
    encoder_id = f"tiny-seed{seed}"
    if adapter_folder is not None:
        from uniportrait.convert import ROUTER_FILE, is_published_folder, read_published_folder
        from uniportrait.models.adapter import read_adapter_files

        def configs_for(published, with_ip):  # the published files, read for the tiny UNet
            config = tiny_adapter_config(base["unet"], base["image_encoder"], sizes, ip_adapter=with_ip)
            return dataclasses.replace(config, multi_id=ROUTER_FILE in published), tiny_backbone_config(sizes)

        if is_published_folder(adapter_folder):
            adapter, own_backbone = read_published_folder(adapter_folder, configs_for)
        else:
            adapter, own_backbone = read_adapter_files(adapter_folder)
        if own_backbone is not None:
            backbone, encoder_id = own_backbone, None  # fingerprint the shipped backbone
    pipe = UniPortraitPipeline(
        **base, face_backbone=backbone, adapter=adapter, controlnet=control, encoder_id=encoder_id
    )
    if device is not None or torch_dtype is not None:
        pipe.to(device=device, dtype=torch_dtype)
    pipe.generation_defaults = get_preset("tiny").defaults
    return pipe


def _randomise_batchnorm(module: torch.nn.Module) -> None:
    """Give BatchNorm layers non-trivial statistics, as a trained backbone has."""
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.normal_(0.0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


# -- world: the identity world (docs/world.md) ---------------------------------------------------


def world_base_folder(base=None):
    """``base`` (default: the shipped world base) as a Path, checked to be a pipeline folder.

    Raises:
        WeightsNotFoundError: it has no ``model_index.json``.
    """
    from pathlib import Path

    from uniportrait.world.build import WORLD_ASSETS

    base = Path(base) if base is not None else WORLD_ASSETS / "base"
    if not (base / "model_index.json").is_file():
        raise WeightsNotFoundError(f"{base} is not a base model folder (no model_index.json)")
    return base


def build_world_pipeline(adapter=None, device=None, torch_dtype=None, base=None):
    """The identity world's shipped models: its SD base, CLIP vision tower and face backbone
    (``uniportrait/assets/world``), with ``adapter`` (a folder in our format, e.g. from
    ``uniportrait train --config configs/world/stage1.yaml``) or the shipped world adapter.
    Its photos are world pictures, read with the ``"world"`` face analyzer. ``base``: another
    SD pipeline folder for the world (one the adapter was trained on) instead of the shipped one.

    Raises:
        WeightsNotFoundError: no adapter given and none shipped yet, or ``base`` is not a
            pipeline folder.
    """
    from pathlib import Path

    from uniportrait.models.adapter import BACKBONE_FOLDER, BACKBONE_WEIGHTS
    from uniportrait.pipeline import UniPortraitPipeline
    from uniportrait.world.build import WORLD_ASSETS

    shipped = WORLD_ASSETS / "adapter"
    if adapter is None and not shipped.is_dir():
        raise WeightsNotFoundError(
            "the world preset has no trained adapter shipped yet: train one "
            "(uniportrait train --config configs/world/stage1.yaml) and pass it with --adapter DIR"
        )
    folder = Path(adapter) if adapter is not None else shipped
    base = world_base_folder(base)
    own = (folder / BACKBONE_WEIGHTS).is_file() or (folder / BACKBONE_FOLDER).is_dir()
    pipe = UniPortraitPipeline.from_pretrained(
        base,
        uniportrait=folder,
        image_encoder=WORLD_ASSETS / "image_encoder",
        face_backbone=None if own else WORLD_ASSETS / "face_backbone",
        torch_dtype=torch_dtype or torch.float32,
        device=device,
    )
    pipe.generation_defaults = get_preset("world").defaults
    return pipe


# -- sd15: the published setup -----------------------------------------------------------------

SD15_BASE = "SG161222/Realistic_Vision_V5.1_noVAE"
SD15_VAE = "stabilityai/sd-vae-ft-mse"
SD15_UNIPORTRAIT = "Junjie96/UniPortrait"
SD15_IMAGE_ENCODER = "h94/IP-Adapter/models/image_encoder"
SD15_IP_ADAPTER = "h94/IP-Adapter/models/ip-adapter_sd15.bin"
SAFETY_CHECKER = "CompVis/stable-diffusion-safety-checker"


def sd15_scheduler():
    """DDIM as published: scaled-linear betas 0.00085–0.012, no clipping, steps_offset 1."""
    from uniportrait.presets.tiny import published_ddim_scheduler

    return published_ddim_scheduler()


def build_sd15_pipeline(
    base_model: str = SD15_BASE,
    vae: str = SD15_VAE,
    uniportrait: str = SD15_UNIPORTRAIT,
    image_encoder: str = SD15_IMAGE_ENCODER,
    ip_adapter: str | None = SD15_IP_ADAPTER,
    controlnet=None,
    torch_dtype=None,
    device=None,
    face_backbone=None,
    safety_checker: str | None = None,
):
    """The published setup. Each argument may be a Hub id or a local path.

    ``uniportrait`` may also be an adapter folder in our format (e.g. from ``uniportrait
    train``); without its own face backbone, the published one is used.

    Raises:
        WeightsNotFoundError: before loading anything, listing every part that is missing.
    """
    from pathlib import Path

    from uniportrait.loading import load_pipeline
    from uniportrait.models.adapter import BACKBONE_FOLDER, BACKBONE_WEIGHTS, is_adapter_folder

    ours = Path(uniportrait).is_dir() and is_adapter_folder(Path(uniportrait))
    has_backbone = ours and (
        (Path(uniportrait) / BACKBONE_WEIGHTS).is_file() or (Path(uniportrait) / BACKBONE_FOLDER).is_dir()
    )
    if ours and face_backbone is None and not has_backbone:
        face_backbone = SD15_UNIPORTRAIT
    preflight_sd15(base_model, vae, uniportrait, image_encoder, ip_adapter, face_backbone, safety_checker)
    pipe = load_pipeline(
        base_model,
        uniportrait=uniportrait,
        image_encoder=image_encoder,
        ip_adapter=ip_adapter,
        controlnet=controlnet,
        vae=vae,
        scheduler=sd15_scheduler(),
        torch_dtype=torch_dtype,
        device=device,
        face_backbone=face_backbone,
        safety_checker=safety_checker,
    )
    pipe.generation_defaults = get_preset("sd15").defaults
    return pipe


def sd15_files(
    base_model=SD15_BASE,
    vae=SD15_VAE,
    uniportrait=SD15_UNIPORTRAIT,
    image_encoder=SD15_IMAGE_ENCODER,
    ip_adapter=SD15_IP_ADAPTER,
    face_backbone=None,
    safety_checker=None,
) -> list[tuple[str, str | None]]:
    """``(spec, file)`` of every part the published setup reads (a folder by its config file)."""
    from pathlib import Path

    from uniportrait.convert import BACKBONE_FILE, FACEID_FILE, ROUTER_FILE
    from uniportrait.models.adapter import ADAPTER_CONFIG, is_adapter_folder

    wanted = [
        (base_model, "unet/config.json"),
        (base_model, "text_encoder/config.json"),
        (base_model, "tokenizer/vocab.json"),
        (vae, "config.json"),
        (image_encoder, "config.json"),
    ]
    if Path(uniportrait).is_dir() and is_adapter_folder(Path(uniportrait)):  # its files are there
        wanted += [(uniportrait, ADAPTER_CONFIG)]
    else:
        wanted += [(uniportrait, FACEID_FILE), (uniportrait, ROUTER_FILE), (uniportrait, BACKBONE_FILE)]
    if isinstance(face_backbone, str):
        wanted.append((face_backbone, BACKBONE_FILE))
    if isinstance(safety_checker, str):
        wanted.append((safety_checker, "config.json"))
    if ip_adapter:
        wanted.append((ip_adapter, None))
    return wanted


def missing_files(wanted: list[tuple[str, str | None]]) -> list[tuple[str, str | None]]:
    """The entries of ``wanted`` that are neither local files nor in the Hub cache (instant)."""
    from uniportrait.loading import resolve_file

    missing = []
    for spec, filename in wanted:
        try:
            resolve_file(spec, filename, "sd15", download=False)
        except WeightsNotFoundError:
            missing.append((spec, filename))
    return missing


def preflight_sd15(
    base_model, vae, uniportrait, image_encoder, ip_adapter, face_backbone=None, safety_checker=None
) -> None:
    """Check that every file of the published setup is at hand; one error listing what is not."""
    missing = missing_files(
        sd15_files(base_model, vae, uniportrait, image_encoder, ip_adapter, face_backbone, safety_checker)
    )
    if not missing:
        return
    from uniportrait.loading import _cache_dir, hub_offline, hub_reachable

    if not hub_offline() and hub_reachable():
        return  # the loaders download what is missing (with progress bars)
    names = ", ".join(f"{spec}{'/' + f if f else ''}" for spec, f in missing)
    why = "HF_HUB_OFFLINE is set" if hub_offline() else "the Hub cannot be reached"
    raise WeightsNotFoundError(
        f"the sd15 preset needs the published weights; missing: {names}. {why}, so nothing was "
        f"downloaded. Fetch them into the cache {_cache_dir()} on a connected machine with "
        "`uniportrait download`, or: "
        + "; ".join(download_commands(missing))
        + " — or pass local paths (Python: build_sd15_pipeline(base_model=..., vae=..., ...))."
    )


def download_plan(missing: list[tuple[str, str | None]]) -> dict[str, list[str] | None]:
    """Per Hub repository, the file patterns that fetch exactly ``missing`` (None: its top level).

    A folder (named by its ``config.json`` / ``vocab.json``) is fetched whole; local paths are
    skipped (nothing to download).
    """
    from pathlib import Path

    from uniportrait.loading import split_hub_spec

    plan: dict[str, list[str] | None] = {}
    for spec, filename in missing:
        if Path(spec).exists() or spec.startswith(("/", ".")):
            continue
        repo, sub = split_hub_spec(spec)
        if filename is None and sub is None:
            plan[repo] = None
            continue
        if filename is None:
            pattern = sub
        elif filename.endswith(("config.json", "vocab.json")):  # a diffusers/transformers folder
            folder = "/".join(p for p in (sub, filename.rpartition("/")[0]) if p)
            pattern = f"{folder}/*" if folder else "*"
        else:
            pattern = "/".join(p for p in (sub, filename) if p)
        if repo in plan and plan[repo] is None:
            continue
        plan.setdefault(repo, [])
        if pattern not in plan[repo]:
            plan[repo].append(pattern)
    return {repo: None if pats is None or "*" in pats else sorted(pats) for repo, pats in plan.items()}


def download_commands(missing: list[tuple[str, str | None]]) -> list[str]:
    """``hf download`` commands (huggingface_hub's CLI) that fetch exactly what is missing."""
    commands = []
    for repo, patterns in download_plan(missing).items():
        if patterns is None:
            commands.append(f"hf download {repo}")
            continue
        plain = [p for p in patterns if not p.endswith("*")]
        folders = [p for p in patterns if p.endswith("*")]
        if plain:
            commands.append(f"hf download {repo} {' '.join(plain)}")
        if folders:
            commands.append(f"hf download {repo} --include {' '.join(repr(f) for f in folders)}")
    return commands


def download_sd15(wanted: list[tuple[str, str | None]] | None = None) -> list[str]:
    """Fetch what the published setup lacks into the Hub cache the loaders read.

    huggingface_hub's ``snapshot_download`` does the work: progress bars, and an interrupted
    download resumes. Returns the repositories fetched.

    Raises:
        WeightsNotFoundError: offline (``HF_HUB_OFFLINE``), a failed download, or files still
            missing afterwards.
    """
    from uniportrait.loading import _cache_dir, hub_offline

    wanted = sd15_files() if wanted is None else wanted
    missing = missing_files(wanted)
    plan = download_plan(missing)
    if not plan:
        return []
    if hub_offline():
        raise WeightsNotFoundError(
            "HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it, or on a connected "
            f"machine run: {'; '.join(download_commands(missing))} (cache: {_cache_dir()})"
        )
    from huggingface_hub import snapshot_download

    for repo, patterns in plan.items():
        logger.info("downloading %s%s", repo, f" ({', '.join(patterns)})" if patterns else "")
        try:
            snapshot_download(repo, allow_patterns=patterns)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsNotFoundError(f"could not download {repo}: {first}") from None
    still = missing_files(wanted)
    if still:
        names = ", ".join(f"{spec}{'/' + f if f else ''}" for spec, f in still)
        raise WeightsNotFoundError(f"downloaded, but still missing: {names}")
    return list(plan)


def load_preset(name: str = "tiny", **kwargs):
    """Build a named preset pipeline (see :mod:`uniportrait.presets.registry`).

    Every preset takes ``device`` and ``torch_dtype``; the others are the preset's own. Each
    builder sets the pipeline's call defaults (image side, steps) from the registry.
    """
    return get_preset(name).build_function()(**kwargs)
