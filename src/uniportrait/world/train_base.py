"""Training the world's base components: VAE, tokenizer + CLIP (text and vision), text-to-image
UNet, and the face-recognition backbone. Each writes the format of its real counterpart.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from uniportrait.training.losses import face_share, min_snr_weights, weighted_mse
from uniportrait.world.build import UNET_LR
from uniportrait.world.data import load_set
from uniportrait.world.loop import run_loop
from uniportrait.world.models import WorldSizes, clip_configs, make_backbone, make_unet, make_vae

logger = logging.getLogger(__name__)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float32 in [-1, 1]."""
    if not images.flags.writeable:  # torch warns on read-only arrays (memory maps, PIL views)
        images = images.copy()
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def from_pixels(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] (clamped) → (B, H, W, 3) uint8; the inverse of :func:`to_pixels`."""
    x = x.detach().float().clamp(-1, 1).permute(0, 2, 3, 1).cpu().numpy()
    return ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)


def _square_crops(groups: np.ndarray, gen: torch.Generator, count: int) -> np.ndarray:
    """Random 64×64 windows of 128×64 group pictures."""
    idx = torch.randint(len(groups), (count,), generator=gen).numpy()
    xs = torch.randint(0, groups.shape[2] - 63, (count,), generator=gen).numpy()
    return np.stack([groups[i, :, x : x + 64] for i, x in zip(idx, xs)])


# -- VAE ------------------------------------------------------------------------------------------


def train_vae(
    data_dir: Path,
    out: Path,
    steps: int = 3000,
    batch: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    sizes: WorldSizes = WorldSizes(),
):
    """Train the world's KL VAE (``sizes``: its levels and latent channels) from scratch."""
    singles = load_set(data_dir / "singles_train.npz")["images"]
    groups = load_set(data_dir / "groups_train.npz")["images"]
    torch.manual_seed(seed)
    vae = make_vae(sizes)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def step(i: int) -> dict[str, float]:
        k = batch // 4
        idx = torch.randint(len(singles), (batch - k,), generator=gen).numpy()
        x = to_pixels(np.concatenate([singles[idx], _square_crops(groups, gen, k)]))
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = posterior.kl().mean()
        loss = l1 + mse + 1e-7 * kl
        loss.backward()
        return {"l1": l1.item(), "psnr": (10 * torch.log10(4.0 / mse)).item(), "kl": kl.item()}

    run_loop(out / "run", {"vae": vae}, opt, step, steps, lr, "VAE", warmup=100)
    # the scaling factor that gives latents unit variance, as SD's 0.18215 does for its VAE
    with torch.no_grad():
        x = to_pixels(singles[:512])
        dist = vae.encode(x).latent_dist
        scale = 1.0 / float(dist.mean.std())
        noise = float((dist.std * scale).mean())
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(out / "vae")
    (out / "vae_stats.json").write_text(json.dumps({"scaling_factor": scale, "posterior_std_scaled": noise}))
    logger.info("VAE: scaling factor %.4f, posterior std (scaled) %.4f", scale, noise)
    return vae


def finetune_vae_decoder(
    data_dir: Path,
    vae_dir: Path,
    out: Path,
    steps: int = 2000,
    batch: int = 16,
    lr: float = 3e-4,
    face_weight: float = 4.0,
    seed: int = 0,
    identity_weight: float = 0.0,
    backbone_dir: Path | None = None,
    vae=None,
    warmup: int = 50,
):
    """Fine-tune the VAE's decoder only, with the reconstruction loss weighted up on heads.

    The encoder (and so the latent space, its scaling factor and every latent the UNet was
    trained on) stays as it is: this is SD's "ft-MSE" decoder fine-tuning, aimed at identity
    detail — pixels inside the ground-truth head masks count ``1 + face_weight`` times.
    Portraits and whole group pictures alternate (the decoder is fully convolutional).

    ``identity_weight`` > 0 adds an identity loss, ``identity_weight · (1 − cos)`` between the
    face backbone's embeddings (``backbone_dir``: the generator side's backbone, never an oracle)
    of one aligned face of each reconstruction and of its picture, as a perceptual loss
    (LPIPS for SD's decoder) aimed at what a recogniser reads instead of the blur MSE prefers.

    ``vae``: the model whose decoder to train (e.g. a wider ``AsymmetricAutoencoderKL`` holding
    the same encoder; ``scripts/world_wide_decoder.py``); default the VAE in ``vae_dir``.
    """
    from diffusers import AutoencoderKL

    s, g = load_set(data_dir / "singles_train.npz"), load_set(data_dir / "groups_train.npz")
    sets = [(s["images"], s["masks"].any(1)), (g["images"], g["masks"].any(1))]
    faces = [(s["landmarks"], s["num_people"]), (g["landmarks"], g["num_people"])]
    backbone = None
    if identity_weight > 0:
        from uniportrait.models.face_backbone import IRBackbone

        if backbone_dir is None:
            raise ValueError("identity_weight > 0 needs backbone_dir (the face backbone)")
        backbone = IRBackbone.from_pretrained(backbone_dir).float().eval().requires_grad_(False)
    vae = vae if vae is not None else AutoencoderKL.from_pretrained(vae_dir / "vae")
    vae.requires_grad_(False)
    decoder = [vae.decoder, vae.post_quant_conv]
    for part in decoder:
        part.requires_grad_(True)
    params = [p for part in decoder for p in part.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def step(i: int) -> dict[str, float]:
        images, masks = sets[i % 2]
        n = batch if i % 2 == 0 else batch // 2  # group pictures are twice as wide
        idx = torch.randint(len(images), (n,), generator=gen).numpy()
        x = to_pixels(images[idx])
        weight = 1.0 + face_weight * torch.from_numpy(masks[idx]).float()[:, None]  # (n, 1, H, W)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=gen)
        rec = vae.decode(z).sample
        err = rec - x
        loss = ((err.abs() + err.pow(2)) * weight).mean() / weight.mean()
        row = {}
        if backbone is not None:
            landmarks, people = faces[i % 2]
            who = (torch.rand(n, generator=gen) * torch.from_numpy(people[idx])).long().numpy()
            grid = aligned_face_grid(landmarks[idx, who], x.shape[-2:], backbone.config.input_size)
            cos = face_identity_cosine(backbone, rec, x, grid)  # (n,)
            loss = loss + identity_weight * (1.0 - cos).mean()
            row["face_cos"] = cos.mean().item()
        loss.backward()
        mse = err.detach().pow(2).mean()
        return {"loss": loss.item(), "psnr": (10 * torch.log10(4.0 / mse)).item(), **row}

    run_loop(out / "run", {"vae": vae}, opt, step, steps, lr, "VAE decoder", warmup=warmup)
    vae.save_pretrained(out / "vae")
    return vae


def aligned_face_grid(landmarks: np.ndarray, image_size: tuple[int, int], size: int) -> torch.Tensor:
    """(B, 5, 2) landmarks → the (B, size, size, 2) ``grid_sample`` grid of each face's aligned
    crop: the ArcFace-template similarity ``faces.aligned_crops`` warps with, made
    differentiable (bilinear, straight to ``size``)."""
    from uniportrait.faces.align import alignment_matrix

    h, w = image_size
    inverse = []
    for points in landmarks:
        m = np.vstack([alignment_matrix(points, size), [0.0, 0.0, 1.0]])  # image px → crop px
        inverse.append(np.linalg.inv(m)[:2])
    inverse = torch.from_numpy(np.stack(inverse)).float()  # (B, 2, 3) crop px → image px
    v, u = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    crop = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)  # (S*S, 3), pixel centres
    src = torch.einsum("bij,pj->bpi", inverse, crop)  # (B, S*S, 2) image px
    norm = (2.0 * src + 1.0) / torch.tensor([w, h]).float() - 1.0  # align_corners=False
    return norm.reshape(len(landmarks), size, size, 2)


def face_identity_cosine(backbone, rec: torch.Tensor, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Cosine between the backbone's embeddings of the aligned faces of ``rec`` and of ``x``
    ((B, 3, H, W) in [-1, 1]; outside the picture is black, as ``cv2.warpAffine`` pads)."""

    def crops(images: torch.Tensor) -> torch.Tensor:
        return F.grid_sample(images + 1.0, grid, mode="bilinear", align_corners=False) - 1.0

    with torch.no_grad():
        target = F.normalize(backbone(crops(x)).embedding, dim=-1)
    return (F.normalize(backbone(crops(rec)).embedding, dim=-1) * target).sum(-1)


# -- tokenizer + CLIP -----------------------------------------------------------------------------


def clip_normalise(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] → CLIP-normalised, as the pipeline feeds the image encoder."""
    from uniportrait.identity import clip_pixels

    return clip_pixels((x + 1.0) / 2.0, x.shape[-1])


def tokenize(tokenizer, captions) -> torch.Tensor:
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_clip(
    data_dir: Path, out: Path, steps: int = 1500, batch: int = 128, lr: float = 5e-4, seed: int = 0
):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from uniportrait.world.scenes import vocabulary
    from uniportrait.world.tokenizer import write_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer(out / "tokenizer", vocabulary())))
    s, g = load_set(data_dir / "singles_train.npz"), load_set(data_dir / "groups_train.npz")
    ids = torch.cat([tokenize(tokenizer, s["captions"]), tokenize(tokenizer, g["captions"])])
    n_single = len(s["images"])
    text_config, vision_config = clip_configs(len(tokenizer))
    torch.manual_seed(seed)
    model = CLIPModel(
        CLIPConfig(
            text_config=text_config.to_dict(),
            vision_config=vision_config.to_dict(),
            projection_dim=vision_config.projection_dim,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    size = vision_config.image_size

    def step(i: int) -> dict[str, float]:
        idx = torch.randint(len(ids), (batch,), generator=gen)
        singles_idx = idx[idx < n_single].numpy()
        groups_idx = (idx[idx >= n_single] - n_single).numpy()
        pix = [to_pixels(s["images"][singles_idx])]
        if len(groups_idx):  # whole group pictures, squeezed to the tower's square input
            pix.append(
                F.interpolate(
                    to_pixels(g["images"][groups_idx]), size=(size, size), mode="bilinear", antialias=True
                )
            )
        x = clip_normalise(torch.cat(pix))
        order = torch.cat([idx[idx < n_single], idx[idx >= n_single]])
        out_ = model(input_ids=ids[order], pixel_values=x, return_loss=True)
        out_.loss.backward()
        with torch.no_grad():
            acc = (out_.logits_per_image.argmax(1) == torch.arange(batch)).float().mean()
        return {"loss": out_.loss.item(), "i2t_acc": acc.item()}

    run_loop(out / "run", {"clip": model}, opt, step, steps, lr, "CLIP", warmup=100)
    save_clip_parts(model, tokenizer, out)
    return model


def save_clip_parts(model, tokenizer, out: Path) -> None:
    """Split a trained ``CLIPModel`` into SD's ``text_encoder`` + ``tokenizer`` and an ``image_encoder``."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    state = model.state_dict()
    text = CLIPTextModel(model.config.text_config)
    text.load_state_dict(_with_prefix(state, "text_model.", text.state_dict()), strict=True)
    vision = CLIPVisionModelWithProjection(model.config.vision_config)
    vision.load_state_dict(_with_prefix(state, "", vision.state_dict()), strict=True)
    text.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    vision.save_pretrained(out / "image_encoder")


def _with_prefix(state: dict, prefix: str, target: dict) -> dict:
    """The entries of ``state`` that ``target`` names, found with or without ``prefix``."""
    out = {}
    for key in target:
        for candidate in (prefix + key, key, "text_model." + key):
            if candidate in state:
                out[key] = state[candidate]
                break
    return out


# -- UNet -----------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means × scaling factor: (N, latent channels, H / f, W / f), f the VAE's downsampling."""
    parts = []
    for k in range(0, len(images), batch):
        parts.append(
            vae.encode(to_pixels(images[k : k + batch])).latent_dist.mean * vae.config.scaling_factor
        )
    return torch.cat(parts)


@torch.no_grad()
def encode_text(text_encoder, tokenizer, captions, batch: int = 512) -> torch.Tensor:
    parts = []
    for k in range(0, len(captions), batch):
        parts.append(text_encoder(tokenize(tokenizer, captions[k : k + batch]))[0].half())
    return torch.cat(parts)


def denoising_step(
    unet,
    schedule,
    z0: torch.Tensor,
    cond: torch.Tensor,
    gen: torch.Generator,
    offset_noise: float = 0.0,
    weight: torch.Tensor | None = None,
    snr_gamma: float = 0.0,
) -> float:
    """One ε-prediction step on latents ``z0`` (B, 4, h, w) with text states ``cond``: noise, a
    random timestep, MSE, backward and gradient clipping to 1 (the optimiser steps outside).
    ``offset_noise``: add that much of one random value per picture and channel to the noise (offset
    noise), so the noisiest steps no longer give away a picture's mean colour (docs/world.md).
    ``weight`` (B, 1, h, w): each latent pixel's weight in the MSE (normalised by its mean, so the
    loss keeps its scale), e.g. :func:`face_weights`. ``snr_gamma`` > 0: weight each picture's loss
    by :func:`~uniportrait.training.losses.min_snr_weights` (min-SNR-γ)."""
    noise = torch.randn(z0.shape, generator=gen)
    if offset_noise:
        noise = noise + offset_noise * torch.randn((*z0.shape[:2], 1, 1), generator=gen)
    t = torch.randint(0, schedule.config.num_train_timesteps, (len(z0),), generator=gen)
    pred = unet(schedule.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample
    if snr_gamma:
        err = (pred.float() - noise).square()  # (B, 4, h, w)
        if weight is not None:
            err = err * weight / weight.mean()
        loss = (err.mean((1, 2, 3)) * min_snr_weights(schedule, t, snr_gamma)).mean()
    else:
        loss = F.mse_loss(pred, noise) if weight is None else weighted_mse(pred, noise, weight)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    return loss.item()


def latent_head_masks(masks: np.ndarray, latent_side: int) -> torch.Tensor:
    """Ground-truth head masks (N, P, H, W) bool → the share of each latent pixel inside any head,
    (N, 1, h, w) float16 (``h = latent_side``; the picture's aspect is kept)."""
    union = torch.from_numpy(masks.any(1, keepdims=True))  # (N, 1, H, W)
    size = (latent_side, masks.shape[-1] * latent_side // masks.shape[-2])
    return face_share(union, size).half()


def face_weights(head_share: torch.Tensor, face_weight: float) -> torch.Tensor:
    """Per latent pixel loss weights: ``1 + face_weight · share of the pixel inside a head``."""
    return 1.0 + face_weight * head_share.float()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - decay)


def check_unet_init(folder: Path, sizes: WorldSizes):
    """The fp32 UNet saved in ``folder`` (a diffusers UNet folder, e.g. a base's ``unet/``), if it
    has the layout ``sizes`` gives; else a one-line :class:`UniPortraitError`."""
    from diffusers import UNet2DConditionModel

    from uniportrait.errors import UniPortraitError

    if not (Path(folder) / "config.json").is_file():
        raise UniPortraitError(f"{folder} is not a UNet folder (no config.json)")
    unet = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32)
    expected = make_unet(sizes).config
    keys = ("block_out_channels", "down_block_types", "cross_attention_dim", "in_channels", "sample_size")
    if any(tuple(np.ravel(unet.config[k])) != tuple(np.ravel(expected[k])) for k in keys):
        raise UniPortraitError(f"{folder} holds a UNet of another layout than the build's")
    return unet


def train_unet(
    data_dir: Path,
    vae_dir: Path,
    clip_dir: Path,
    out: Path,
    steps: int = 8000,
    batch: int = 32,
    lr: float = UNET_LR,
    seed: int = 0,
    group_every: int = 3,
    uncond_p: float = 0.1,
    sizes: WorldSizes = WorldSizes(),
    offset_noise: float = 0.0,
    init: Path | None = None,
    face_weight: float = 0.0,
    bf16: bool = False,
    snr_gamma: float = 0.0,
):
    """Train the base UNet on the VAE's latents of the build's pictures and their captions; the EMA
    weights are saved to ``out/unet``. With ``init`` (a UNet folder, see :func:`check_unet_init`)
    training continues from those weights with a fresh optimizer, warm-up and cosine schedule.
    ``face_weight`` > 0 weights the denoising loss on latent pixels inside the ground-truth head
    masks ``1 + face_weight`` times (as the VAE decoder's fine-tuning weights its pixels).
    ``bf16``: run each step (forward, loss, backward) under CPU bf16 autocast; the weights, the
    optimizer, the EMA and the loss stay fp32 (the shipped UNet's continuations trained so, about
    a quarter faster per step on a CPU with bf16 instructions; docs/world.md). ``snr_gamma`` > 0
    weights each picture's loss min-SNR-γ (:func:`denoising_step`; 0: off)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from uniportrait.presets.tiny import published_ddim_scheduler

    vae = AutoencoderKL.from_pretrained(vae_dir / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(clip_dir / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir / "tokenizer")
    cache = out / "cache.pt"
    if cache.is_file():
        tensors = torch.load(cache, weights_only=True)
    else:
        s, g = load_set(data_dir / "singles_train.npz"), load_set(data_dir / "groups_train.npz")
        tensors = {
            "z1": encode_latents(vae, s["images"]),
            "zg": encode_latents(vae, g["images"]),
            "c1": encode_text(text_encoder, tokenizer, s["captions"]),
            "cg": encode_text(text_encoder, tokenizer, g["captions"]),
            "null": encode_text(text_encoder, tokenizer, [""]),
        }
        out.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, cache)
    heads = None
    if face_weight:  # cached apart: caches written before face weights stay valid
        head_cache = out / "head_masks.pt"
        if head_cache.is_file():
            heads = torch.load(head_cache, weights_only=True)
        else:
            side = tensors["z1"].shape[-2]
            s, g = load_set(data_dir / "singles_train.npz"), load_set(data_dir / "groups_train.npz")
            heads = {"1": latent_head_masks(s["masks"], side), "g": latent_head_masks(g["masks"], side)}
            torch.save(heads, head_cache)
    schedule = DDPMScheduler.from_config(published_ddim_scheduler().config)
    torch.manual_seed(seed)
    unet = make_unet(sizes)
    if init is not None:
        unet.load_state_dict(check_unet_init(init, sizes).state_dict())  # strict
    ema = make_unet(sizes)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    null = tensors["null"].float()

    def step(i: int) -> dict[str, float]:
        key = "g" if i % group_every == group_every - 1 else "1"
        z_all, c_all = tensors["z" + key], tensors["c" + key]
        idx = torch.randint(len(z_all), (batch,), generator=gen)
        z0, cond = z_all[idx], c_all[idx].float()
        drop = torch.rand(batch, generator=gen) < uncond_p
        cond = torch.where(drop[:, None, None], null.expand_as(cond), cond)
        weight = face_weights(heads[key][idx], face_weight) if heads is not None else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return {
                "loss" + key: denoising_step(unet, schedule, z0, cond, gen, offset_noise, weight, snr_gamma)
            }

    def update_ema() -> None:
        ema_update(ema, unet, 0.999)

    run_loop(
        out / "run",
        {"unet": unet, "ema": ema},
        opt,
        step,
        steps,
        lr,
        "UNet",
        warmup=300,
        after_step=update_ema,
    )
    ema.save_pretrained(out / "unet")
    return ema


# -- identity losses ------------------------------------------------------------------------------


class IdentityBatches:
    """Batches of ``per_batch`` identities × ``per_identity`` faces each (with replacement for
    identities that have fewer faces), for the supervised contrastive loss."""

    def __init__(self, labels: np.ndarray, per_batch: int, per_identity: int, gen: torch.Generator) -> None:
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        self.groups = np.split(order, bounds)
        self.per_batch, self.per_identity, self.gen = per_batch, per_identity, gen

    def __call__(self) -> np.ndarray:
        picks = torch.randperm(len(self.groups), generator=self.gen)[: self.per_batch].numpy()
        rows = []
        for g in picks:
            members = self.groups[g]
            rows.append(
                members[torch.randint(len(members), (self.per_identity,), generator=self.gen).numpy()]
            )
        return np.concatenate(rows)


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss of (B, E) L2-normalised embeddings (Khosla et al., 2020)."""
    sim = embeddings @ embeddings.T / temperature
    eye = torch.eye(len(labels), dtype=torch.bool)
    sim = sim.masked_fill(eye, -1e4)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = torch.log_softmax(sim, dim=1)
    return -(log_prob * positives).sum(1).div(positives.sum(1).clamp(min=1)).mean()


# -- face-recognition backbone --------------------------------------------------------------------


def train_backbone(
    crops_path: Path,
    out: Path,
    steps: int = 500,
    batch: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    per_identity: int = 4,
):
    """IR backbone trained to tell world identities apart (the world's CurricularFace).

    The loss is supervised contrastive on batches of identities × 4 faces: with a few thousand
    identities and a few hundred CPU steps it learns far faster than a margin softmax over every
    identity (CosFace did not leave chance in 500 steps here, see docs/world.md).
    """
    from uniportrait.world.faces import load_crops

    crops, labels = load_crops(crops_path)
    torch.manual_seed(seed)
    backbone = make_backbone()
    opt = torch.optim.AdamW(backbone.parameters(), lr=lr, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    batches = IdentityBatches(labels, batch // per_identity, per_identity, gen)

    def step(i: int) -> dict[str, float]:
        idx = batches()
        x = augment_faces(to_pixels(crops[idx]), gen)
        emb = F.normalize(backbone(x).embedding, dim=-1)
        loss = supcon_loss(emb, torch.from_numpy(labels[idx]))
        loss.backward()
        return {"loss": loss.item()}

    run_loop(out / "run", {"backbone": backbone}, opt, step, steps, lr, "face backbone", warmup=50)
    backbone.eval().save_pretrained(out / "face_backbone")
    return backbone


def augment_faces(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Brightness/contrast jitter and occasional blur, (B, 3, S, S) in [-1, 1]."""
    b = x.shape[0]
    gain = 1.0 + 0.2 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    bias = 0.2 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    x = x * gain + bias
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16.0).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=3)
    return x.clamp(-1, 1)
