"""The training loop for both stages, on 🤗 accelerate.

One code path serves a CPU, one GPU, several GPUs and several machines: start it with
``accelerate launch`` (or plainly with ``python``/``uniportrait train`` for one process).

Layout of ``output_dir``::

    config.yaml                          the resolved configuration of the run
    metrics.jsonl                        one row of averaged metrics every logging.every steps
    logs/                                tracker files (TensorBoard)
    validation/step-<step>/*.png         validation images (always written, also when logged)
    checkpoints/checkpoint-<step>/
        adapter/                         config.json + diffusion_pytorch_model.safetensors (+ face_backbone/)
        state/                           accelerate state: trained parameters, optimizer, LR
                                         schedule, RNG states, data position, EMA
        trainer_state.json               step, stage (written last: marks the checkpoint complete)
    adapter/                             the final adapter (when max_steps is reached)
    published/                           the final adapter in the published .bin layout (optional)

Exact resume: the data order, the noise, the condition dropouts and the routing noise of every
micro-batch are functions of the seed and of the micro-batch's index in the global stream
(``micro-batches consumed by each process × processes + rank``), and of the data position,
and the optimizer and LR schedule are restored from the checkpoint, so a resumed run follows
the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniportrait.errors import CheckpointError, UniPortraitError
from uniportrait.training.checkpoints import (
    load_json_state,
    newest_good,
    save_json_state,
    trim_metrics,
    verify,
    write_manifest,
)
from uniportrait.training.components import TextConditioner, load_components, set_trainable
from uniportrait.training.config import ConfigError, TrainConfig
from uniportrait.training.data import DataPosition, make_loader, open_portrait_dataset, step_seed
from uniportrait.training.model import TrainingModel, sample_timesteps

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
SINGLE_STREAM = 1  # key of data.single_path's seeds (step_seed(seed, SINGLE_STREAM)), apart from the groups'
UNET_PREFIX = "base_unet."  # the base UNet's parameters among the trained ones (train.unet_learning_rate)
EMA_FILE = "ema.safetensors"
CUSTOM_STATE_FILE = "custom_state.json"  # LR schedule, data position, EMA counters (not pickled)


class EMA:
    """Exponential moving average of the trained parameters (float32 shadows).

    The decay warms up as ``min(decay, (1 + k) / (10 + k))`` after ``k`` updates, so early
    averages are not dominated by the initial weights.
    """

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, nn.Parameter]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)

    @contextlib.contextmanager
    def applied(self, params: dict[str, nn.Parameter]) -> Iterator[None]:
        """Temporarily put the averaged weights into ``params``."""
        backup = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "shadow": {k: v.cpu() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = state["decay"], int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def find_checkpoint(output_dir: str | Path, which: str = "latest") -> Path | None:
    """A complete, intact checkpoint folder: ``which`` = "latest" (the newest under output_dir
    whose files match their manifest, or None; damaged newer ones are reported and skipped) or
    a path (which must verify)."""
    if which != "latest":
        path = Path(which)
        try:
            verify(path)
        except CheckpointError as err:
            raise CheckpointError(f"{path} is not a complete, intact training checkpoint: {err}") from None
        return path
    root = Path(output_dir) / CHECKPOINTS
    candidates = sorted(
        (
            p
            for p in root.glob(f"{CHECKPOINT_PREFIX}*")
            if p.is_dir() and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
        )
        if root.is_dir()
        else [],
        key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
    )
    good, problems = newest_good(candidates)
    for problem in problems:
        logger.warning("skipping a damaged checkpoint: %s", problem)
    return good


def _single_process_launch_warning() -> str | None:
    """Why this single process is probably not what ``accelerate launch`` was asked for, or None.

    accelerate's simple launcher (no ``--multi_gpu``/``--use_fsdp``/``--use_deepspeed``, e.g.
    ``accelerate launch --num_processes 2`` on a machine without GPUs) starts one process; it
    sets ``MASTER_ADDR`` only when more than one process or machine was asked for, and unlike
    the multi-process launchers it sets no ``WORLD_SIZE``.
    """
    import os

    env = os.environ
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        return (
            "accelerate launch started ONE process although more processes or machines were asked for: "
            "accelerate starts several processes only with --multi_gpu (also on CPUs, over gloo), "
            "--use_fsdp or --use_deepspeed (or a config file from configs/accelerate/). "
            "This run trains in 1 process; see docs/scale.md"
        )
    return None


def _env_flag(name: str) -> bool:
    import os

    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def _distributed_without_gpu() -> bool:
    """Started by a multi-process launcher (torchrun, ``accelerate launch --multi_gpu``) on a
    machine without CUDA: accelerate then needs ``cpu=True`` to set up gloo."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _trackers(report_to: str) -> list[str]:
    import importlib.util

    wanted = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}
    out = []
    for name in wanted[report_to]:
        if importlib.util.find_spec(name) is not None:
            out.append(name)
        elif name == "wandb" and report_to == "wandb":
            raise ConfigError("logging.report_to=wandb needs wandb: pip install wandb")
        else:
            logger.warning(
                "%s is not installed: metrics go to metrics.jsonl and validation images to PNG files only "
                "(pip install 'uniportrait[train]' for TensorBoard)",
                name,
            )
    return out


class Trainer:
    """Sets up a run from a :class:`TrainConfig` and trains it.

    Args:
        cfg: the configuration.
        resume: "latest" (resume from the newest checkpoint in ``output_dir`` if there is
            one), a checkpoint folder, or None (start fresh).
        accelerator_kwargs: extra arguments for :class:`accelerate.Accelerator`.
    """

    def __init__(
        self, cfg: TrainConfig, resume: str | None = None, accelerator_kwargs: dict[str, Any] | None = None
    ) -> None:
        try:
            from accelerate import Accelerator
            from accelerate.utils import ProjectConfiguration
        except ImportError as exc:
            raise UniPortraitError("training needs accelerate: pip install 'uniportrait[train]'") from exc
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        kwargs = dict(accelerator_kwargs or {})
        if cfg.train.mixed_precision is not None:
            kwargs["mixed_precision"] = cfg.train.mixed_precision
        if _distributed_without_gpu():
            kwargs.setdefault("cpu", True)  # DDP over gloo between CPU processes
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            log_with=_trackers(cfg.logging.report_to) or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            **kwargs,
        )
        self.device = self.accelerator.device
        if self.accelerator.num_processes == 1 and (warning := _single_process_launch_warning()):
            logger.warning(warning)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.accelerator.mixed_precision, torch.float32
        )
        self._setup()
        self.resumed_from = self._resume(resume) if resume else None

    # -- setup ----------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        from diffusers import DDPMScheduler

        from uniportrait.identity import intrinsic_source, unconditional_features
        from uniportrait.training.shards import check_training_data

        check_training_data(cfg.data.path)  # fail before loading any network
        if cfg.data.single_path is not None:
            check_training_data(cfg.data.single_path)
        _import_what_later_steps_need()
        c = self.components = load_components(cfg)
        self.trained = set_trainable(c.adapter, cfg.stage)
        train_unet = cfg.train.unet_learning_rate is not None
        for module in c.frozen_modules():
            module.to(self.device)
            # The VAE stays float32: encoding is cheap and SDXL's VAE overflows in float16. A
            # trained UNet stays float32 too (its updates would vanish in half precision).
            if (
                self.weight_dtype != torch.float32
                and module is not c.vae
                and not (train_unet and module is c.unet)
            ):
                # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast; these frozen
                # copies are cast on purpose (none of their modules needs float32).
                nn.Module.to(module, dtype=self.weight_dtype)
        if train_unet:  # before attach: the UNet's own parameters, not the adapter's processors
            for name, param in c.unet.named_parameters():
                self.trained[UNET_PREFIX + name] = param.requires_grad_(True)
        nn.Module.to(c.adapter, self.device, dtype=torch.float32)  # ModelMixin.to warns on casts
        c.adapter.attach(c.unet)  # after the cast: the processors stay float32
        if cfg.train.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
        self.text = TextConditioner(c.tokenizers, c.text_encoders, c.unet.config)
        self.noise_scheduler = DDPMScheduler.from_config(c.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction type {self.prediction_type!r} is not supported")
        uncond = unconditional_features(c.face_backbone, c.image_encoder, intrinsic_source(c.adapter))
        self.uncond_intrinsic, self.uncond_structure = (t.to(self.device) for t in uncond)

        lo, hi = cfg.face_range
        self.dataset = open_portrait_dataset(
            cfg.data.path,
            cfg.data.size,
            lo,
            hi,
            id_augment=cfg.data.id_augment if cfg.stage == 1 else 0.0,
        )
        if cfg.stage == 1 and cfg.train.id_warmup_steps:
            from uniportrait.training.warmup import labelled_people

            labelled_people(self.dataset)  # refuse a dataset without labels before writing anything
        self.schedule = self.dataset.schedule(
            cfg.train.batch_size,
            cfg.train.seed,
            rank=acc.process_index,
            world=acc.num_processes,
            overfit=cfg.train.overfit_batch,
        )
        # data.single_path: portraits beside the groups, one batch per micro-batch, so the same
        # DataPosition resumes both streams
        self.single_dataset = self.single_schedule = None
        if cfg.data.single_path is not None:
            self.single_dataset = open_portrait_dataset(
                cfg.data.single_path, cfg.data.resolution, 1, 1, id_augment=cfg.data.id_augment
            )
            self.single_schedule = self.single_dataset.schedule(
                cfg.train.batch_size,
                step_seed(cfg.train.seed, SINGLE_STREAM),
                rank=acc.process_index,
                world=acc.num_processes,
                overfit=cfg.train.overfit_batch,
            )
        self.position = DataPosition(acc.num_processes)

        model = TrainingModel(
            c.unet, c.adapter, cfg.stage, cfg.train.gumbel_tau, cfg.train.routing_loss_weight,
            cfg.train.face_loss_weight, cfg.train.single_loss_weight,
        )  # fmt: skip
        optimizer = self._optimizer()
        engine = str(acc.distributed_type).rsplit(".", 1)[-1]
        if engine in ("FSDP", "DEEPSPEED"):
            logger.warning("%s has not been tested with this trainer (docs/scale.md); DDP has", engine)
        elif _env_flag("ACCELERATE_USE_FSDP") or _env_flag("ACCELERATE_USE_DEEPSPEED"):
            logger.warning(
                "FSDP/DeepSpeed was asked for, but accelerate enables them only on GPUs: these %d %s "
                "process(es) train with %s",
                acc.num_processes,
                self.device.type,
                "DDP over gloo" if engine == "MULTI_CPU" else engine,
            )
        if getattr(acc.state, "deepspeed_plugin", None) is not None:
            # We do not prepare a DataLoader, from which accelerate would read the batch size.
            acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
                cfg.train.batch_size
            )
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.lr_scheduler = self._lr_scheduler(self.optimizer)
        self.ema = EMA(self.trained, cfg.train.ema_decay) if cfg.train.ema_decay else None
        # The LR schedule, data position and EMA are saved by the hooks as JSON + safetensors,
        # not registered with accelerate (which would pickle them, and unpickle at resume).
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        self.global_step = 0

        if acc.is_main_process:
            import yaml

            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if acc.log_with:
            acc.init_trackers(cfg.logging.project, config=_flat(cfg.to_dict()))
        n_trained = sum(p.numel() for p in self.trained.values())
        logger.info(
            "stage %d: training %.2fM parameters (%s) on %d sample(s)%s, %d process(es), %s, weights %s",
            cfg.stage,
            n_trained / 1e6,
            ", ".join(sorted({_role(n) for n in self.trained})),
            len(self.dataset),
            "" if self.single_dataset is None else f" and {len(self.single_dataset)} single-ID one(s)",
            acc.num_processes,
            self.device,
            str(self.weight_dtype).removeprefix("torch."),
        )

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        lora_scale = t.lora_lr_scale if self.cfg.stage == 2 else 1.0
        groups: dict[float, list[nn.Parameter]] = defaultdict(list)
        for name, param in self.trained.items():
            if name.startswith(UNET_PREFIX):
                groups[t.unet_learning_rate].append(param)
            else:
                groups[t.learning_rate * (lora_scale if _role(name) == "multi_lora" else 1.0)].append(param)
        param_groups = [{"params": params, "lr": lr} for lr, params in sorted(groups.items())]
        kwargs = {
            "betas": (t.adam_beta1, t.adam_beta2),
            "eps": t.adam_epsilon,
            "weight_decay": t.weight_decay,
        }
        if t.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as exc:
                raise ConfigError("train.use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from exc
            return bnb.optim.AdamW8bit(param_groups, **kwargs)
        return torch.optim.AdamW(param_groups, **kwargs)

    def _lr_scheduler(self, optimizer):
        from diffusers.optimization import get_scheduler

        t = self.cfg.train
        try:
            return get_scheduler(
                t.lr_scheduler,
                optimizer=optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                num_warmup_steps=t.lr_warmup_steps,
                num_training_steps=t.max_steps,
            )
        except ValueError as exc:
            raise ConfigError(f"train.lr_scheduler: {exc}") from None

    # -- checkpoints ----------------------------------------------------------------------------

    def _save_hook(self, models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        """Save the trained parameters (not the frozen UNet), the LR schedule, the data position
        and the EMA, as safetensors and JSON (nothing pickled), with the accelerate state."""
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            folder = Path(output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            tensors = {name: p.detach().cpu().contiguous() for name, p in self.trained.items()}
            save_file(tensors, str(folder / TRAINABLE_FILE))
            state: dict[str, Any] = {
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "position": self.position.state_dict(),
            }
            if self.ema is not None:
                ema = self.ema.state_dict()
                state["ema"] = {"decay": ema["decay"], "updates": ema["updates"]}
                save_file({k: v.contiguous() for k, v in ema["shadow"].items()}, str(folder / EMA_FILE))
            save_json_state(folder / CUSTOM_STATE_FILE, state)
        weights.clear()  # accelerate must not write the whole model

    def _load_hook(self, models: list[nn.Module], input_dir: str) -> None:
        from safetensors.torch import load_file

        path = Path(input_dir) / TRAINABLE_FILE
        if not path.is_file():
            raise UniPortraitError(f"{input_dir} has no {TRAINABLE_FILE}: not a UniPortrait training state")
        state = load_file(str(path))
        missing = sorted(set(self.trained) - set(state))
        unexpected = sorted(set(state) - set(self.trained))
        if missing or unexpected:
            raise UniPortraitError(
                f"{path} was saved by another stage or model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for name, param in self.trained.items():
                param.copy_(state[name])
        custom = load_json_state(Path(input_dir) / CUSTOM_STATE_FILE)
        try:
            self.lr_scheduler.load_state_dict(custom["lr_scheduler"])
            self.position.load_state_dict(custom["position"])
            if self.ema is not None:
                shadow = load_file(str(Path(input_dir) / EMA_FILE))
                self.ema.load_state_dict({**custom["ema"], "shadow": shadow})
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise CheckpointError(f"{input_dir}: the saved training state is malformed: {exc}") from None
        models.clear()  # loaded: accelerate must not try

    def _resume(self, which: str) -> Path | None:
        path = find_checkpoint(self.output_dir, which)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.output_dir / CHECKPOINTS)
            return None
        info = load_json_state(path / TRAINER_STATE)
        if info.get("stage") != self.cfg.stage:
            raise UniPortraitError(
                f"{path} is a stage-{info.get('stage')} checkpoint; this run is stage {self.cfg.stage}"
            )
        self.accelerator.load_state(str(path / "state"))
        self.global_step = int(info["step"])
        if self.accelerator.is_main_process:  # rows logged after this checkpoint come again
            dropped = trim_metrics(self.output_dir / "metrics.jsonl", self.global_step)
            if dropped:
                logger.info(
                    "metrics.jsonl: dropped %d row(s) logged after step %d", dropped, self.global_step
                )
        logger.info(
            "resumed from %s (step %d, micro-batch %d)", path, self.global_step, self.position.micro_batches
        )
        return path

    def unwrapped(self) -> TrainingModel:
        return self.accelerator.unwrap_model(self.model)

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """The EMA weights in place (if EMA is on), e.g. for saving and validation."""
        if self.ema is None:
            yield
        else:
            with self.ema.applied(self.trained):
                yield

    def save_adapter(self, directory: Path) -> Path:
        """Write the adapter (EMA weights if enabled) as ``config.json`` + ``diffusion_pytorch_model.safetensors``."""
        c = self.components
        backbone = c.face_backbone if self.cfg.checkpoint.save_face_backbone else None
        with self.averaged_weights():
            saved_backbone = None
            if backbone is not None:
                saved_backbone = _float32_copy(backbone)
            return c.adapter.save_pretrained(directory, face_backbone=saved_backbone)

    def save_base(self, directory: Path) -> Path:
        """Write the base model with the trained UNet (EMA weights if enabled, without the
        adapter's processors) as a diffusers pipeline folder, atomically."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        from uniportrait.atomic import atomic_directory

        c = self.components
        unet = type(c.unet).from_config(c.unet.config)
        with self.averaged_weights():
            own = {
                n.removeprefix(UNET_PREFIX): p.detach()
                for n, p in self.trained.items()
                if n.startswith(UNET_PREFIX)
            }
            unet.load_state_dict(own, strict=True)
        parts = dict(vae=c.vae, unet=unet, scheduler=c.scheduler)  # unet: float32, from its config
        if len(c.text_encoders) == 1:
            pipe = StableDiffusionPipeline(
                **parts, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )  # fmt: skip
        else:
            pipe = StableDiffusionXLPipeline(
                **parts, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
                tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1],
            )  # fmt: skip
        with atomic_directory(directory) as folder:
            pipe.save_pretrained(folder)
        logger.info("the base model with the trained UNet is in %s", directory)
        return directory

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` (every process must call this)."""
        acc = self.accelerator
        path = self.output_dir / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{self.global_step:08d}"
        acc.wait_for_everyone()
        if acc.is_main_process and path.exists():
            shutil.rmtree(path)
        acc.wait_for_everyone()
        acc.save_state(str(path / "state"))
        if acc.is_main_process:
            self.save_adapter(path / "adapter")
            state = {
                "step": self.global_step,
                "stage": self.cfg.stage,
                "micro_batches": self.position.micro_batches,
            }
            save_json_state(path / TRAINER_STATE, state)
            write_manifest(
                path, {"step": self.global_step, "stage": self.cfg.stage}
            )  # last: marks it complete
            self._rotate_checkpoints()
            logger.info("saved checkpoint %s", path)
        acc.wait_for_everyone()
        return path

    def _rotate_checkpoints(self) -> None:
        keep = self.cfg.checkpoint.keep_last
        if keep is None:
            return
        root = self.output_dir / CHECKPOINTS
        done = sorted(
            (p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / TRAINER_STATE).is_file()),
            key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
        )
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old, ignore_errors=True)

    # -- one step -------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_inputs(
        self, batch: dict[str, Any], seed: int, size: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """Encode a collated batch with the frozen networks and draw this micro-batch's randomness
        (``size``: the batch's (width, height), default ``data.size``)."""
        from uniportrait.identity import encode_face_features, intrinsic_source
        from uniportrait.models.qformer import drop_structure_tokens

        cfg, c, dev = self.cfg, self.components, self.device
        cpu = torch.Generator().manual_seed(seed)  # per-sample decisions
        gen = torch.Generator(device=dev).manual_seed(seed)  # noise
        crops = batch["crops"]  # (B, N, 224, 224, 3) uint8
        b, n = crops.shape[:2]
        id_drop = torch.rand(b, generator=cpu) < cfg.data.id_drop
        text_drop = torch.rand(b, generator=cpu) < cfg.data.text_drop
        u = torch.rand(b, n, generator=cpu)
        drop_all = u < cfg.data.structure_drop_all
        drop_tokens = ~drop_all & (u < cfg.data.structure_drop_all + cfg.data.structure_drop_tokens)

        # Latents
        pixels = batch["pixels"].to(dev, c.vae.dtype)
        latents = c.vae.encode(pixels).latent_dist.sample(generator=gen)
        shift = getattr(c.vae.config, "shift_factor", None) or 0.0
        latents = ((latents - shift) * c.vae.config.scaling_factor).float()

        # Text
        captions = ["" if drop else caption for caption, drop in zip(batch["caption"], text_drop.tolist())]
        text_states, pooled = self.text(captions, dev)
        added = self.text.added_cond(
            pooled, batch["original_size"], batch["crop_top_left"], size or cfg.data.size
        )

        # Identities: structure from the target face, intrinsic possibly from another photo
        def to01(x: torch.Tensor) -> torch.Tensor:  # (R, 224, 224, 3) uint8 → (R, 3, 224, 224)
            return x.permute(0, 3, 1, 2).float() / 255.0

        source = intrinsic_source(c.adapter)
        flat = crops.flatten(0, 1)
        intrinsic, structure = encode_face_features(c.face_backbone, c.image_encoder, to01(flat), source)
        id_flat = batch["id_crops"].flatten(0, 1)
        other = (id_flat != flat).flatten(1).any(dim=1)  # (B*N,)
        if other.any():
            intrinsic[other] = encode_face_features(
                c.face_backbone, c.image_encoder, to01(id_flat[other]), source
            )[0]
        intrinsic = intrinsic.to(dev).view(b, n, *intrinsic.shape[1:])
        structure = structure.to(dev).view(b, n, *structure.shape[1:])
        # a sample's identities dropped (CFG), or a face the crop cut: the unconditional features
        dropped = id_drop.to(dev)
        blank = dropped[:, None] | ~batch["faces_whole"].to(dev)  # (B, N)
        intrinsic[blank] = self.uncond_intrinsic.to(intrinsic.dtype)
        structure[blank] = self.uncond_structure.to(structure.dtype)
        scale = (~drop_all).float().to(dev)  # (B, N)
        keep = None
        if drop_tokens.any():
            keep = drop_structure_tokens(structure.flatten(0, 1), cfg.data.token_drop_ratio, generator=cpu)
            keep = keep.view(b, n, -1) | ~drop_tokens.to(keep.device)[:, :, None]
            keep = keep.to(dev)

        # Noise
        noise = torch.randn(latents.shape, generator=gen, device=dev, dtype=latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = sample_timesteps(b, steps, cfg.train.timestep_sampling, gen, dev)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise
            if self.prediction_type == "epsilon"
            else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        )
        return {
            "noisy_latents": noisy.to(self.weight_dtype),
            "timesteps": timesteps,
            "text_states": text_states,
            "intrinsic": intrinsic,
            "structure": structure,
            "structure_scale": scale,
            "structure_keep": keep,
            "target": target,
            "rng_seed": int(torch.randint(0, 2**62, (1,), generator=cpu)),
            "masks": batch["masks"].to(dev) if n >= 2 or cfg.train.face_loss_weight != 1.0 else None,
            "route_valid": ~dropped if n >= 2 else None,
            "added_cond": added,
        }

    # -- the loop -------------------------------------------------------------------------------

    def train(self) -> Path:
        """Train until ``max_steps`` (or ``stop_after_steps`` in this run); returns the last
        checkpoint folder, or the final adapter folder when training is complete."""
        cfg, acc = self.cfg, self.accelerator
        t = cfg.train
        loader = make_loader(self.dataset, self.schedule, self.position.micro_batches, cfg.data.num_workers)
        batches = iter(loader)
        singles = None
        if self.single_dataset is not None:
            singles = iter(
                make_loader(
                    self.single_dataset,
                    self.single_schedule,
                    self.position.micro_batches,
                    cfg.data.num_workers,
                )
            )
        square = (cfg.data.resolution, cfg.data.resolution)
        stop_at = (
            t.max_steps
            if t.stop_after_steps is None
            else min(t.max_steps, self.global_step + t.stop_after_steps)
        )
        sums: dict[str, torch.Tensor] = {}
        counted = 0
        last_saved = -1
        if cfg.stage == 1 and t.id_warmup_steps and self.position.micro_batches == 0:
            self.warm_up_identity()
        started, started_step = time.perf_counter(), self.global_step
        self.model.train()
        while self.global_step < stop_at:
            for _ in range(t.gradient_accumulation_steps):
                batch = next(batches)
                # The batch's index in the global stream: the same data and randomness for
                # N processes × A accumulation steps as for one process × N·A steps.
                global_batch = self.position.micro_batches * acc.num_processes + acc.process_index
                seed = step_seed(t.seed, global_batch)
                inputs = self.prepare_inputs(batch, 0 if t.overfit_batch else seed)
                if singles is not None:
                    single_seed = step_seed(0 if t.overfit_batch else seed, SINGLE_STREAM)
                    inputs["single"] = self.prepare_inputs(next(singles), single_seed, square)
                with acc.accumulate(self.model):
                    out = self.model(**inputs)
                    acc.backward(out["loss"])
                    if acc.sync_gradients and t.max_grad_norm > 0:
                        acc.clip_grad_norm_(list(self.trained.values()), t.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.position.micro_batches += 1
                for key, value in out.items():  # summed on the device: no sync per step
                    if value.ndim == 0:  # scalars are logged; per-sample values are for probes
                        sums[key] = sums.get(key, 0.0) + value.detach().float()
                counted += 1
            if not acc.sync_gradients:
                raise RuntimeError("gradient accumulation went out of step with the micro-batches")
            self.lr_scheduler.step()
            self.global_step += 1
            if self.ema is not None:
                self.ema.update(self.trained)

            if self.global_step % cfg.logging.every == 0 or self.global_step == stop_at:
                self._log(sums, counted, started, started_step)
                sums, counted = {}, 0
            if self.global_step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
                last_saved = self.global_step
            every = cfg.validation.every
            if every and self.global_step % every == 0 and self.global_step < t.max_steps:
                self.validate()
        if last_saved != self.global_step and self.global_step > started_step:
            self.save_checkpoint()
        result = find_checkpoint(self.output_dir) or self.output_dir
        if self.global_step >= t.max_steps:
            result = self.finish()
        acc.end_training()
        return result

    def warm_up_identity(self) -> None:
        """The Q-Former's identity warm-up (``train.id_warmup_steps``) before the first step;
        its rows go to ``metrics.jsonl`` at step 0. A run killed before its first checkpoint
        repeats it, with the same result."""
        from uniportrait.training.warmup import warm_up_identity

        for row in warm_up_identity(self):
            self._append_metrics({"step": 0, **row})

    def _append_metrics(self, row: dict[str, Any]) -> None:
        """One row of ``metrics.jsonl`` (main process only)."""
        if self.accelerator.is_main_process:
            with (self.output_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def _log(self, sums: dict[str, torch.Tensor], counted: int, started: float, started_step: int) -> None:
        acc = self.accelerator
        keys = sorted(sums)
        local = torch.stack([sums[k] for k in keys]).to(self.device) / max(counted, 1)
        metrics = dict(zip(keys, acc.reduce(local, reduction="mean").tolist()))
        metrics.update(self._learning_rates())
        elapsed = time.perf_counter() - started
        metrics["steps_per_s"] = (self.global_step - started_step) / max(elapsed, 1e-9)
        metrics["epoch"] = self.schedule.epoch_of(max(self.position.micro_batches - 1, 0))
        if not all(math.isfinite(v) for v in metrics.values()):
            logger.warning("step %d: non-finite metrics %s", self.global_step, metrics)
        self._append_metrics({"step": self.global_step, **metrics})
        if acc.is_main_process:
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            logger.info("step %d/%d %s", self.global_step, self.cfg.train.max_steps, shown)
        acc.log(metrics, step=self.global_step)

    def export(self, directory: str | Path) -> Path:
        """Write the weights this trainer holds (a resumed checkpoint's, EMA if enabled) as a finished
        run writes them: ``directory/adapter`` and, with ``train.unet_learning_rate``,
        ``directory/base``, so a checkpoint can be measured without finishing the run."""
        directory = Path(directory)
        if self.accelerator.is_main_process:
            self.save_adapter(directory / "adapter")
            if self.cfg.train.unet_learning_rate is not None:
                self.save_base(directory / "base")
            logger.info("step %d exported to %s", self.global_step, directory)
        self.accelerator.wait_for_everyone()
        return directory

    def _learning_rates(self) -> dict[str, float]:
        """``lr`` (the adapter's, ``train.learning_rate``) and, when the UNet trains, ``unet_lr``, now
        (one schedule scales every parameter group alike)."""
        group = self.optimizer.param_groups[0]
        factor = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
        t = self.cfg.train
        rates = {"lr": t.learning_rate * factor}
        if t.unet_learning_rate is not None:
            rates["unet_lr"] = t.unet_learning_rate * factor
        return rates

    def finish(self) -> Path:
        """After the last step: final adapter (+ published layout) and a last validation."""
        acc, cfg = self.accelerator, self.cfg
        final = self.output_dir / "adapter"
        if acc.is_main_process:
            self.save_adapter(final)
            if cfg.train.unet_learning_rate is not None:
                self.save_base(self.output_dir / "base")
            if cfg.checkpoint.export_published:
                export_published(
                    self.components.adapter, self.output_dir / "published", self.averaged_weights
                )
            logger.info("training finished: adapter in %s", final)
        acc.wait_for_everyone()
        if cfg.validation.every is not None:
            self.validate()
        return final

    # -- validation -----------------------------------------------------------------------------

    def validation_samples(self) -> list[tuple[str, list[np.ndarray]]]:
        """(prompt, [aligned face crop (224, 224, 3) uint8 per identity]) for the first rows."""
        v = self.cfg.validation
        out = []
        for index, (caption, crops) in enumerate(self.dataset.validation_samples(v.num_samples)):
            prompt = v.prompts[index % len(v.prompts)] if v.prompts else (caption or "a photo of a person")
            out.append((prompt, crops))
        return out

    def validate(self) -> Path | None:
        """Generate the validation images with the current (averaged) weights on the main process."""
        acc = self.accelerator
        folder = self.output_dir / "validation" / f"step-{self.global_step:08d}"
        if acc.is_main_process:
            if len(self.components.text_encoders) != 1:
                logger.warning("validation images need an SD1.5/SD2-style pipeline; skipped for this UNet")
            else:
                images = self._generate(folder)
                logger.info("validation: %d image(s) in %s", len(images), folder)
                for tracker in acc.trackers:
                    if hasattr(tracker, "log_images"):
                        tracker.log_images(
                            {"validation": np.stack([np.asarray(i) for i in images])}, step=self.global_step
                        )
        acc.wait_for_everyone()
        return folder

    def _generate(self, folder: Path) -> list[Any]:
        from uniportrait.pipeline import UniPortraitPipeline
        from uniportrait.visualize import routing_overlay

        c, v, acc = self.components, self.cfg.validation, self.accelerator
        model = self.unwrapped()
        scheduler = c.scheduler.__class__.from_config(c.scheduler.config)
        folder.mkdir(parents=True, exist_ok=True)
        images = []
        was_training = model.training
        model.eval()
        try:
            with self.averaged_weights(), acc.autocast():
                pipe = UniPortraitPipeline(
                    vae=c.vae,
                    text_encoder=c.text_encoders[0],
                    tokenizer=c.tokenizers[0],
                    unet=c.unet,
                    scheduler=scheduler,
                    image_encoder=c.image_encoder,
                    face_backbone=c.face_backbone,
                    adapter=c.adapter,
                    encoder_id="training",
                )
                pipe.set_progress_bar_config(disable=True)
                for index, (prompt, crops) in enumerate(self.validation_samples()):
                    identities = [pipe.encode_identity(crop) for crop in crops]
                    generator = torch.Generator(self.device).manual_seed(v.seed + index)
                    out = pipe(
                        prompt,
                        identities=identities,
                        num_inference_steps=v.num_inference_steps,
                        guidance_scale=v.guidance_scale,
                        height=self.cfg.data.size[1],
                        width=self.cfg.data.size[0],
                        generator=generator,
                        return_routing_maps=len(identities) >= 2,
                    )
                    image = out.images[0]
                    image.save(folder / f"{index:02d}.png")
                    if out.routing_maps is not None and len(identities) >= 2:
                        routing_overlay(image, out.routing_maps[0]).save(folder / f"{index:02d}-routing.png")
                    images.append(image)
        finally:
            model.train(was_training)
        (folder / "prompts.json").write_text(json.dumps([p for p, _ in self.validation_samples()], indent=2))
        return images


def _import_what_later_steps_need() -> None:
    """Import now the modules that validation, checkpoints and the published export import
    lazily, so a run keeps the code it started with: with an editable install, an edit to the
    source tree during a long run would otherwise meet a half-edited module at the first
    validation (docs/training.md)."""
    import uniportrait.convert  # noqa: F401
    import uniportrait.pipeline  # noqa: F401
    import uniportrait.training.warmup  # noqa: F401
    import uniportrait.visualize  # noqa: F401


def export_published(adapter, folder: Path, weights_context=contextlib.nullcontext) -> Path:
    """Write the adapter in the published ``.bin`` layout (``uniportrait-faceid_sd15.bin``, ...)."""
    from uniportrait.convert import named_to_published

    folder.mkdir(parents=True, exist_ok=True)
    with weights_context():
        files = named_to_published(adapter)
        for name, content in files.items():
            torch.save(_to_cpu(content), folder / name)
    logger.info("exported the published layout to %s (%s)", folder, ", ".join(files))
    return folder


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _float32_copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module).float().cpu()


def _role(name: str) -> str:
    from uniportrait.training.components import parameter_role

    return "unet" if name.startswith(UNET_PREFIX) else (parameter_role(name) or "other")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → flat {"train.learning_rate": ...} with tracker-friendly values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
