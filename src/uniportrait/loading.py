"""Assembling a :class:`UniPortraitPipeline` from Hub ids, local files, or in-memory objects.

Real weights are looked up only here, and only when asked for: first on disk and in the
Hugging Face cache, then (unless ``HF_HUB_OFFLINE`` is set) on the Hub. What cannot be found
is reported in one :class:`~uniportrait.errors.WeightsNotFoundError` naming what to download
and where it was looked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uniportrait.convert import (
    BACKBONE_FILE,
    FACEID_FILE,
    ROUTER_FILE,
    load_published_adapter,
    load_published_backbone,
    read_bin,
)
from uniportrait.errors import CheckpointError, UniPortraitError, WeightsNotFoundError
from uniportrait.models.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    UniPortraitAdapter,
    is_adapter_folder,
    read_adapter_files,
)
from uniportrait.models.face_backbone import IRBackbone, IRBackboneConfig
from uniportrait.models.qformer import QFormerConfig

logger = logging.getLogger(__name__)

#: Where :meth:`UniPortraitPipeline.save_pretrained` puts the adapter inside its folder.
SAVED_ADAPTER = "uniportrait"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def split_hub_spec(spec: str) -> tuple[str, str | None]:
    """``"org/repo/sub/folder"`` → ``("org/repo", "sub/folder")``; ``"org/repo"`` → ``(…, None)``."""
    parts = spec.strip("/").split("/")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def _cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return str(HF_HUB_CACHE)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One bounded attempt to open a connection to the Hub (``$HF_ENDPOINT``)."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub.constants import ENDPOINT

    parts = urlsplit(ENDPOINT)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_file(spec: str | os.PathLike, filename: str | None, what: str, download: bool = True) -> Path:
    """A local path for ``filename`` inside ``spec`` (folder, file, or Hub id [+ subfolder]);
    ``download=False``: local files and the cache only."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        candidate = path / filename if filename else path
        if candidate.is_file():
            return candidate
        raise WeightsNotFoundError(f"{what}: {candidate} not found")
    from huggingface_hub import hf_hub_download

    repo, sub = split_hub_spec(str(spec))
    if filename is None and sub:
        sub, _, filename = sub.rpartition("/")
        sub = sub or None
    if filename is None:
        raise WeightsNotFoundError(f"{what}: {spec} is neither a local file nor a Hub file")
    try:
        return Path(hf_hub_download(repo, filename, subfolder=sub, local_files_only=True))
    except Exception:  # not cached: fall through to the Hub
        pass
    where = f"{repo}/{sub + '/' if sub else ''}{filename}"
    if download and not hub_offline():
        try:
            return Path(hf_hub_download(repo, filename, subfolder=sub))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsNotFoundError(
                f"{what}: could not get {where} (not a local path, not in the cache {_cache_dir()}, "
                f"and the Hub said: {first})"
            ) from None
    raise WeightsNotFoundError(f"{what}: {where} is not a local path nor in the cache {_cache_dir()}")


def load_model(cls, spec: Any, what: str, subfolder: str | None = None, **kwargs: Any):
    """``cls.from_pretrained`` on a module, local folder, or Hub id, with our error on failure."""
    if isinstance(spec, nn.Module) or spec is None:
        return spec
    path = Path(spec)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise WeightsNotFoundError(f"{what}: {folder} not found")
        try:
            return cls.from_pretrained(folder, **kwargs)
        except (OSError, ValueError) as exc:
            raise WeightsNotFoundError(f"{what}: cannot load {folder}: {str(exc).splitlines()[0]}") from None
    repo, sub = split_hub_spec(str(spec))
    sub = "/".join(s for s in (sub, subfolder) if s) or None
    attempts = [True] if hub_offline() else [True, False]
    error = ""
    for local_only in attempts:
        try:
            options = {"subfolder": sub} if sub else {}
            return cls.from_pretrained(repo, local_files_only=local_only, **options, **kwargs)
        except Exception as exc:  # diffusers/transformers raise OSError, ValueError, EnvironmentError…
            error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"{repo}" + (f" (subfolder {sub})" if sub else "")
    raise WeightsNotFoundError(
        f"{what}: {where} is not a local folder and could not be loaded from the cache {_cache_dir()}"
        f"{'' if hub_offline() else ' or the Hub'}: {error}"
    )


def load_base_components(base_model: Any, torch_dtype=None) -> dict[str, Any]:
    """vae, text_encoder, tokenizer, unet, scheduler from a diffusers SD folder / Hub id / dict."""
    if isinstance(base_model, Mapping):
        required = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
        missing = [k for k in required if k not in base_model]
        if missing:
            raise UniPortraitError(f"base_model dict is missing components: {', '.join(missing)}")
        return {k: base_model[k] for k in required}
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    what = f"base model {base_model}"
    return {
        "unet": load_model(UNet2DConditionModel, base_model, what, "unet"),
        "vae": load_model(AutoencoderKL, base_model, what, "vae"),
        "text_encoder": load_model(CLIPTextModel, base_model, what, "text_encoder"),
        "tokenizer": load_model(CLIPTokenizer, base_model, what, "tokenizer"),
        "scheduler": load_model(DDIMScheduler, base_model, what, "scheduler"),
    }


def _published_contents(uniportrait: Any) -> dict[str, Any] | None:
    """File name → loaded contents for the published layout, or None if ``uniportrait`` is ours."""
    if isinstance(uniportrait, Mapping):
        if ADAPTER_CONFIG in uniportrait:
            return None
        if FACEID_FILE not in uniportrait:
            raise CheckpointError(
                f"an in-memory uniportrait dict must mirror a folder: keys {FACEID_FILE!r} (+ {ROUTER_FILE!r}, "
                f"{BACKBONE_FILE!r}) or {ADAPTER_CONFIG!r} + {ADAPTER_WEIGHTS!r}"
            )
        return dict(uniportrait)
    path = Path(uniportrait)
    if path.is_dir() and is_adapter_folder(path):
        return None
    if path.is_file():
        folder, faceid_path = path.parent, path
    elif path.is_dir():
        folder, faceid_path = path, path / FACEID_FILE
    else:  # a Hub id: ours if it has config.json, else the published files
        try:
            resolve_file(uniportrait, ADAPTER_CONFIG, "uniportrait")
            return None
        except WeightsNotFoundError:
            pass
        contents = {FACEID_FILE: read_bin(resolve_file(uniportrait, FACEID_FILE, "UniPortrait weights"))}
        for name in (ROUTER_FILE, BACKBONE_FILE):
            try:
                contents[name] = read_bin(resolve_file(uniportrait, name, "UniPortrait weights"))
            except WeightsNotFoundError:
                logger.warning("%s not found in %s", name, uniportrait)
        return contents
    contents = {FACEID_FILE: read_bin(faceid_path)}
    for name in (ROUTER_FILE, BACKBONE_FILE):
        if (folder / name).is_file():
            contents[name] = read_bin(folder / name)
    return contents


def _our_files(uniportrait: Any) -> Any:
    """A local folder (or the in-memory dict) of our adapter format; Hub files are fetched first."""
    if isinstance(uniportrait, Mapping) or Path(uniportrait).is_dir():
        return uniportrait
    from uniportrait.models.adapter import BACKBONE_FOLDER, BACKBONE_WEIGHTS, MODEL_WEIGHTS

    config = resolve_file(uniportrait, ADAPTER_CONFIG, "uniportrait")
    optional = [f"{BACKBONE_FOLDER}/{ADAPTER_CONFIG}", f"{BACKBONE_FOLDER}/{MODEL_WEIGHTS}"]
    try:
        resolve_file(uniportrait, MODEL_WEIGHTS, "uniportrait")
    except WeightsNotFoundError:  # the first round's layout
        resolve_file(uniportrait, ADAPTER_WEIGHTS, "uniportrait")
        optional = [BACKBONE_WEIGHTS]
    for name in optional:
        try:
            resolve_file(uniportrait, name, "uniportrait")
        except WeightsNotFoundError:
            pass
    return config.parent


def load_adapter_and_backbone(
    uniportrait: Any,
    unet: nn.Module,
    image_encoder: nn.Module,
    ip_adapter: Any = None,
    face_backbone: Any = None,
    adapter_config: AdapterConfig | None = None,
    face_backbone_config: IRBackboneConfig | None = None,
) -> tuple[UniPortraitAdapter, IRBackbone]:
    """Read the adapter (ours or published) and the face backbone for ``unet``."""
    ip_contents = None
    if ip_adapter is not None:
        ip_contents = (
            dict(ip_adapter)
            if isinstance(ip_adapter, Mapping)
            else read_bin(resolve_file(ip_adapter, None, "IP-Adapter weights"))
        )
    published = _published_contents(uniportrait)
    if published is None:
        adapter, backbone = read_adapter_files(_our_files(uniportrait))
        if ip_contents is not None:
            adapter = _with_ip_adapter(adapter, ip_contents)
    else:
        if adapter_config is None:
            adapter_config = published_adapter_config(
                unet, image_encoder, published, face_backbone_config, with_ip=ip_contents is not None
            )
        adapter = load_published_adapter(
            adapter_config, published[FACEID_FILE], published.get(ROUTER_FILE), ip_contents
        )
        backbone = None
        if BACKBONE_FILE in published:
            backbone = load_published_backbone(published[BACKBONE_FILE], face_backbone_config)
    if face_backbone is not None:
        backbone = face_backbone if isinstance(face_backbone, nn.Module) else _load_backbone(face_backbone)
    if backbone is None:
        raise WeightsNotFoundError(
            f"no face backbone: put {BACKBONE_FILE} beside the UniPortrait weights or pass face_backbone=..."
        )
    adapter.check_unet(unet)
    return adapter, backbone


def _load_backbone(spec: Any) -> IRBackbone:
    path = Path(spec)
    if path.is_dir():
        return IRBackbone.from_pretrained(path).eval()
    return load_published_backbone(read_bin(resolve_file(spec, BACKBONE_FILE, "face backbone")))


def _with_ip_adapter(adapter: UniPortraitAdapter, ip_contents: Mapping[str, Any]) -> UniPortraitAdapter:
    """Rebuild ``adapter`` with IP-Adapter weights added (or replaced)."""
    import dataclasses

    from uniportrait.convert import IP_ADAPTER_FILE, _processor_keys
    from uniportrait.models.image_proj import ImageProjectionConfig

    proj = ip_contents.get("image_proj", {})
    if "proj.weight" not in proj:
        raise CheckpointError(f"{IP_ADAPTER_FILE}: image_proj.proj.weight is missing")
    dim = adapter.config.cross_attention_dim
    image_proj = ImageProjectionConfig(
        clip_embed_dim=proj["proj.weight"].shape[1],
        cross_attention_dim=dim,
        num_tokens=proj["proj.weight"].shape[0] // dim,
    )
    config = dataclasses.replace(adapter.sizes, ip_adapter=True, image_proj=image_proj)
    named = {
        k: v
        for k, v in adapter.named_state_dict().items()
        if "_ip." not in k and not k.startswith("image_proj.")
    }
    named.update({f"image_proj.{k}": v for k, v in proj.items()})
    named.update(_processor_keys(config, ip_contents.get("ip_adapter", {}), IP_ADAPTER_FILE))
    new = UniPortraitAdapter.from_sizes(config)
    new.load_named_state_dict(named, "adapter + IP-Adapter weights")
    return new.eval()


def published_adapter_config(
    unet: nn.Module,
    image_encoder: nn.Module,
    published: Mapping[str, Any],
    face_backbone_config: IRBackboneConfig | None,
    with_ip: bool,
) -> AdapterConfig:
    """The adapter sizes implied by the UNet, the encoders and the published files.

    The Q-Former keeps its published head layout (12 × 64); widths follow the UNet and the
    encoders; the LoRA rank is read from the first LoRA weight's shape.
    """
    backbone = face_backbone_config or IRBackboneConfig.from_variant("ir101")
    clip_hidden = image_encoder.config.hidden_size
    qformer = QFormerConfig(
        dim=unet.config.cross_attention_dim,
        id_dim=backbone.channels[-1],
        structure_dim=sum(backbone.channels[:3]) + clip_hidden,
    )
    faceid_procs = published[FACEID_FILE].get("faceid_adapter", {})
    rank_key = next((k for k in faceid_procs if k.endswith("to_q_lora.down.weight")), None)
    rank = int(faceid_procs[rank_key].shape[0]) if rank_key else 0
    return AdapterConfig.from_unet(
        unet,
        qformer=qformer,
        lora_rank=rank,
        multi_id=ROUTER_FILE in published,
        ip_adapter=with_ip,
        clip_embed_dim=getattr(image_encoder.config, "projection_dim", 1024),
    )


def load_pipeline(
    base_model: Any,
    uniportrait: Any = None,
    image_encoder: Any = None,
    ip_adapter: Any = None,
    controlnet: Any = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    vae: Any = None,
    scheduler: Any = None,
    face_backbone: Any = None,
    adapter_config: AdapterConfig | None = None,
    face_backbone_config: IRBackboneConfig | None = None,
    safety_checker: Any = None,
):
    """Build a :class:`~uniportrait.pipeline.UniPortraitPipeline`.

    Args:
        base_model: a diffusers SD folder or Hub id, or a dict with ``vae``, ``text_encoder``,
            ``tokenizer``, ``unet``, ``scheduler``.
        uniportrait: our format (a folder written by ``UniPortraitAdapter.save_pretrained``), the
            published files (a folder or Hub repo holding ``uniportrait-faceid_sd15.bin``,
            ``uniportrait-router_sd15.bin``, ``glint360k_curricular_face_r101_backbone.bin``), or
            a dict mirroring either folder (file name → contents).
        image_encoder: CLIP vision model: module, folder, or Hub spec ``org/repo[/subfolder]``.
        ip_adapter: optional ``ip-adapter_sd15.bin``: path, Hub spec, or its contents.
        controlnet: optional ControlNet: module, folder, or Hub id.
        torch_dtype, device: where to put everything (default: float32, CPU).
        vae, scheduler: replace the base model's (module/folder/Hub id, or a scheduler object).
        face_backbone: replace the backbone shipped with the weights.
        adapter_config, face_backbone_config: sizes for reading the published layout when they
            differ from the published SD1.5 ones (e.g. tiny test models).
        safety_checker: optional diffusers ``StableDiffusionSafetyChecker``: module, folder or
            Hub id (e.g. ``CompVis/stable-diffusion-safety-checker``); flagged images come back black.
    """
    from diffusers import AutoencoderKL, ControlNetModel
    from transformers import CLIPVisionModelWithProjection

    from uniportrait.pipeline import UniPortraitPipeline

    saved = Path(base_model) if isinstance(base_model, (str, os.PathLike)) else None
    if saved is not None and saved.is_dir():  # a folder written by UniPortraitPipeline.save_pretrained
        if uniportrait is None and is_adapter_folder(saved / SAVED_ADAPTER):
            uniportrait = saved / SAVED_ADAPTER
        if image_encoder is None and (saved / "image_encoder").is_dir():
            image_encoder = saved / "image_encoder"
        if controlnet is None and (saved / "controlnet").is_dir():
            controlnet = saved / "controlnet"
    if uniportrait is None:
        raise UniPortraitError("uniportrait=... is required (our adapter folder or the published files)")
    if image_encoder is None:
        raise UniPortraitError(
            "image_encoder=... is required (CLIP ViT-H/14 vision, e.g. h94/IP-Adapter/models/image_encoder)"
        )
    components = load_base_components(base_model)
    if vae is not None:
        components["vae"] = load_model(AutoencoderKL, vae, f"VAE {vae}")
    if scheduler is not None:
        components["scheduler"] = scheduler
    encoder = load_model(CLIPVisionModelWithProjection, image_encoder, f"image encoder {image_encoder}")
    adapter, backbone = load_adapter_and_backbone(
        uniportrait,
        components["unet"],
        encoder,
        ip_adapter,
        face_backbone,
        adapter_config,
        face_backbone_config,
    )
    control = (
        load_model(ControlNetModel, controlnet, f"ControlNet {controlnet}")
        if controlnet is not None
        else None
    )
    checker = None
    if safety_checker is not None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        checker = load_model(StableDiffusionSafetyChecker, safety_checker, f"safety checker {safety_checker}")
    pipe = UniPortraitPipeline(
        **components,
        safety_checker=checker,
        image_encoder=encoder.eval(),
        face_backbone=backbone.eval(),
        adapter=adapter.eval(),
        controlnet=control,
    )
    if device is not None or torch_dtype is not None:
        pipe.to(device=device, dtype=torch_dtype)
    return pipe
