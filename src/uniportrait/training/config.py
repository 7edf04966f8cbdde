"""Training configuration: nested dataclasses read from YAML, with ``key=value`` overrides.

A config file mirrors :class:`TrainConfig` (sections ``model``, ``data``, ``train``,
``checkpoint``, ``validation``, ``logging``); every key is optional. Unknown keys are errors
that name the key and list the known ones, so a typo never trains with a silent default.

Values the paper publishes are the defaults (DESIGN §3, §5, §6); where it is silent the default
is our choice, marked "(ours)" below and discussed in ``docs/training.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniportrait.errors import ConfigError
from uniportrait.settings import GUIDANCE_SCALE, STEPS

#: ``train.timestep_sampling`` values (see :func:`uniportrait.training.model.sample_timesteps`).
TIMESTEP_SAMPLING = ("uniform", "cubic")

__all__ = ["ConfigError"]  # re-exported: training configs raise the library's ConfigError


@dataclass
class ModelConfig:
    """Which networks to train on.

    Attributes:
        preset: ``"tiny"`` builds every component offline with random weights (tests, CPU smoke
            runs); ``"tiny-sdxl"`` the same with an SDXL-style UNet (two text encoders,
            ``text_time`` conditioning). ``None``: load ``pretrained_model``.
        pretrained_model: a diffusers Stable Diffusion folder or Hub id (SD1.5, SD2 or SDXL
            layout: ``unet``, ``vae``, ``text_encoder`` [+ ``text_encoder_2``], ``tokenizer``
            [+ ``tokenizer_2``], ``scheduler``).
        vae: replace the base model's VAE (folder or Hub id).
        image_encoder: CLIP vision model (folder or Hub spec ``org/repo/subfolder``).
        face_backbone: face-recognition backbone: our folder (``config.json`` +
            ``model.safetensors``) or the published TFace ``.bin``.
        init_adapter: start from these adapter weights (our folder or the published files).
            Required for stage II (the stage-I result); optional for stage I (fine-tuning).
        lora_rank: rank of both LoRA sets (published: 128).
        qformer: overrides of :class:`~uniportrait.models.qformer.QFormerConfig` sizes for a
            new adapter (e.g. ``{depth: 2}``); widths always follow the UNet and the encoders.
            ``{intrinsic: embedding}`` feeds the backbone's recognition embedding (one token)
            instead of its last stage: the global-embedding ablation of docs/world.md.
        init_faceid_from_unet: initialise a new adapter's ``to_k_faceid``/``to_v_faceid`` from
            the UNet's ``to_k``/``to_v`` (ours, as IP-Adapter does).
        zero_faceid_values: start a new adapter's ``to_v_faceid`` at zero, so the identity
            attention adds nothing at step 0 and grows from there (ours; docs/world.md measures
            it with the identity warm-up).
        init_multi_lora_from_single: at the start of stage II, copy the single-ID LoRA into the
            multi-ID set if the latter is still untrained (all-zero ``up``) (ours).
    """

    preset: str | None = None
    pretrained_model: str | None = None
    vae: str | None = None
    image_encoder: str | None = None
    face_backbone: str | None = None
    init_adapter: str | None = None
    lora_rank: int = 128
    qformer: dict[str, Any] = field(default_factory=dict)
    init_faceid_from_unet: bool = True
    zero_faceid_values: bool = False
    init_multi_lora_from_single: bool = True


@dataclass
class DataConfig:
    """The dataset written by ``uniportrait prepare-data`` and the per-sample conditioning.

    Attributes:
        path: the dataset folder (with ``index.jsonl``).
        resolution: training image height, and width unless ``width`` is set; images are
            resized to cover the size and cropped where the crop keeps the most faces whole
            (see :func:`uniportrait.training.data.make_item`).
        width: training image width (None: ``resolution``, square), e.g. 128 with resolution
            64 for the identity world's group pictures.
        min_faces, max_faces: which images a stage uses, by number of faces; None → stage
            default (stage I: exactly 1; stage II: 2–4).
        num_workers: DataLoader worker processes.
        id_drop: probability of replacing a sample's identities by the unconditional ones
            (published: 0.05).
        text_drop: probability of an empty caption (ours: 0.05, independent of ``id_drop``).
        id_augment: probability of feeding another photo of the same labelled identity to the
            intrinsic branch (published: 0.1; stage I only).
        structure_drop_all, structure_drop_tokens: the structure-branch schedule (published:
            drop all 0.33, drop tokens 0.33, keep all 0.34).
        token_drop_ratio: fraction of structure tokens dropped in the "drop tokens" case (ours).
        drop_path_rate: DropPath on the structure attention output of each Q-Former layer (ours).
        single_path: stage II with ``train.unet_learning_rate`` only: a single-ID dataset folder
            (e.g. stage I's) mixed in. Every micro-batch adds ``batch_size`` of its portraits,
            square at ``resolution``, through the single-ID path (single-ID LoRA, frozen), so the
            shared UNet keeps learning portraits while it learns groups (ours; docs/world.md).
    """

    path: str | None = None
    resolution: int = 512
    width: int | None = None
    min_faces: int | None = None
    max_faces: int | None = None
    num_workers: int = 2
    id_drop: float = 0.05
    text_drop: float = 0.05
    id_augment: float = 0.1
    structure_drop_all: float = 0.33
    structure_drop_tokens: float = 0.33
    token_drop_ratio: float = 0.5
    drop_path_rate: float = 0.1
    single_path: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of training images."""
        return (self.resolution if self.width is None else self.width), self.resolution


@dataclass
class OptimConfig:
    """Optimisation.

    Attributes:
        batch_size: samples per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_steps: optimizer steps in total (published: 300k stage I, 150k stage II).
        stop_after_steps: end this run after this many optimizer steps (a checkpoint is written)
            even if ``max_steps`` is not reached: for preemptible jobs and tests.
        learning_rate: published 1e-5 (at batch 128).
        lora_lr_scale: stage II multiplies the multi-ID LoRA's learning rate by this (published 0.1).
        unet_learning_rate: also train the base UNet's own weights at this learning rate (full
            fine-tuning; None, the paper's recipe: the UNet stays frozen). The trained UNet is
            written with the rest of the base model as a diffusers pipeline folder,
            ``<output_dir>/base``, which the adapter then needs (docs/training.md).
        weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW (ours: 0.01, 0.9, 0.999, 1e-8).
        max_grad_norm: gradient clipping (ours: 1.0; 0 disables).
        lr_scheduler, lr_warmup_steps: a diffusers schedule name ("constant",
            "constant_with_warmup", "cosine", "linear", ...) and its warm-up.
        mixed_precision: "no", "fp16" or "bf16"; None → what ``accelerate launch`` was given.
            The frozen networks are stored in that dtype, the trained parameters in float32.
        gradient_checkpointing: recompute UNet activations in the backward pass.
        use_8bit_adam: bitsandbytes' 8-bit AdamW (an error if bitsandbytes is not installed).
        ema_decay: keep an exponential moving average of the trained weights (None: off);
            checkpoints and validation then use the averaged weights.
        gumbel_tau: temperature of the straight-through Gumbel-softmax routing (ours: 1.0).
        routing_loss_weight: λ of the routing loss (published 0.1).
        face_loss_weight: weight of face pixels (the union of the face masks, at latent size) in
            the diffusion loss, other pixels weighing 1; the loss is normalised by the mean
            weight. 1.0 is the paper's plain MSE (docs/world.md measures what more does).
        timestep_sampling: how training timesteps are drawn: ``"uniform"`` (the paper's, SD's) or
            ``"cubic"`` (t = (1 − u³)·T, u uniform: 79% of the steps in the noisier half, where a
            picture's layout and colours are decided; T2I-Adapter's choice for its conditions).
        id_warmup_steps: stage I only: before the first step, train the Q-Former alone this
            many steps to give two photos of one person the same tokens
            (:mod:`uniportrait.training.warmup`; ours, not in the paper; 0: off). Needs
            identity labels with two or more photos per person in the dataset.
        id_warmup_lr: the warm-up's learning rate (ours: 1e-3).
        single_loss_weight: weight of the loss on ``data.single_path``'s portraits, added to the
            group loss of the same micro-batch (ours: 1.0).
        overfit_batch: debugging: repeat the first batch with the same noise every step.
        seed: seeds data order, noise, dropouts and the routing noise.
    """

    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = 300_000
    stop_after_steps: int | None = None
    learning_rate: float = 1e-5
    lora_lr_scale: float = 0.1
    unet_learning_rate: float | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    ema_decay: float | None = None
    gumbel_tau: float = 1.0
    routing_loss_weight: float = 0.1
    face_loss_weight: float = 1.0
    timestep_sampling: str = "uniform"
    id_warmup_steps: int = 0
    id_warmup_lr: float = 1e-3
    single_loss_weight: float = 1.0
    overfit_batch: bool = False
    seed: int = 0


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<output_dir>/checkpoints/checkpoint-<step>/``.

    Attributes:
        every: write one every this many optimizer steps (and at the end).
        keep_last: keep only the newest K checkpoints (None: keep all).
        save_face_backbone: put the face backbone beside the adapter, so a checkpoint loads
            in :class:`~uniportrait.pipeline.UniPortraitPipeline` on its own.
        export_published: at the end, also write the published ``.bin`` layout.
    """

    every: int = 5000
    keep_last: int | None = 3
    save_face_backbone: bool = True
    export_published: bool = False


@dataclass
class ValidationConfig:
    """Images generated every ``every`` steps with fixed prompts, identities and seeds.

    Attributes:
        every: steps between validations (0: only at the end; None: never).
        prompts: prompts (default: the captions of the validation samples).
        num_samples: identities (single-ID) or identity groups (multi-ID) taken from the
            first rows of the dataset that the stage uses.
        num_inference_steps, guidance_scale, seed: sampling settings.
    """

    every: int | None = 5000
    prompts: list[str] = field(default_factory=list)
    num_samples: int = 2
    num_inference_steps: int = STEPS.default
    guidance_scale: float = GUIDANCE_SCALE.default
    seed: int = 0


@dataclass
class LoggingConfig:
    """Metrics every ``every`` steps to the log, ``metrics.jsonl`` and the trackers.

    Attributes:
        report_to: "tensorboard" (default, if installed), "wandb", "all" or "none".
        project: tracker project / run name.
    """

    every: int = 10
    report_to: str = "tensorboard"
    project: str = "uniportrait"


@dataclass
class TrainConfig:
    """Everything one training run needs."""

    stage: int = 1
    output_dir: str = "outputs/train"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # -- derived ------------------------------------------------------------------------------

    @property
    def face_range(self) -> tuple[int, int]:
        """(min, max) faces per image used by this stage."""
        lo, hi = (1, 1) if self.stage == 1 else (2, 4)
        return (self.data.min_faces or lo, self.data.max_faces or hi)

    def validate(self) -> None:
        """Check values that the dataclass types cannot express."""
        if self.stage not in (1, 2):
            raise ConfigError(f"stage must be 1 or 2, got {self.stage}")
        lo, hi = self.face_range
        if self.stage == 1 and (lo, hi) != (1, 1):
            raise ConfigError("stage I trains on single-ID images: data.min_faces/max_faces must be 1")
        if self.stage == 2 and not 2 <= lo <= hi:
            raise ConfigError(f"stage II needs 2 <= data.min_faces <= data.max_faces, got {lo}, {hi}")
        if self.model.preset is None and self.model.pretrained_model is None:
            raise ConfigError("set model.preset (tiny) or model.pretrained_model (a diffusers model)")
        if self.stage == 2 and self.model.init_adapter is None and self.model.preset is None:
            raise ConfigError("stage II starts from the stage-I adapter: set model.init_adapter")
        if self.data.path is None:
            raise ConfigError("set data.path (a folder written by `uniportrait prepare-data`)")
        probs = {
            "data.id_drop": self.data.id_drop,
            "data.text_drop": self.data.text_drop,
            "data.id_augment": self.data.id_augment,
            "data.token_drop_ratio": self.data.token_drop_ratio,
            "data.structure_drop_all": self.data.structure_drop_all,
            "data.structure_drop_tokens": self.data.structure_drop_tokens,
        }
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {p}")
        if self.data.structure_drop_all + self.data.structure_drop_tokens > 1.0:
            raise ConfigError("data.structure_drop_all + data.structure_drop_tokens must be at most 1")
        if not 0.0 <= self.data.drop_path_rate < 1.0:
            raise ConfigError(f"data.drop_path_rate must be in [0, 1), got {self.data.drop_path_rate}")
        t = self.train
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1")
        if t.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ConfigError(f"train.mixed_precision must be no, fp16 or bf16, got {t.mixed_precision!r}")
        if t.unet_learning_rate is not None and t.unet_learning_rate <= 0:
            raise ConfigError("train.unet_learning_rate must be positive (or null: the UNet stays frozen)")
        if t.gumbel_tau <= 0:
            raise ConfigError("train.gumbel_tau must be positive")
        if t.face_loss_weight <= 0:
            raise ConfigError("train.face_loss_weight must be positive")
        if t.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ConfigError(
                f"train.timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, got {t.timestep_sampling!r}"
            )
        if t.id_warmup_steps < 0 or t.id_warmup_lr <= 0:
            raise ConfigError("train.id_warmup_steps must be at least 0 and train.id_warmup_lr positive")
        if t.id_warmup_steps and self.stage != 1:
            raise ConfigError("train.id_warmup_steps warms up the Q-Former, which only stage I trains")
        if self.data.single_path is not None and (self.stage != 2 or t.unet_learning_rate is None):
            raise ConfigError(
                "data.single_path mixes portraits into stage II to keep the trained UNet's single-ID "
                "path: it needs stage 2 and train.unet_learning_rate (nothing else it reaches trains)"
            )
        if t.single_loss_weight <= 0:
            raise ConfigError("train.single_loss_weight must be positive")
        if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
            raise ConfigError("train.ema_decay must be in (0, 1)")
        if self.data.resolution % 8 or (self.data.width or 8) % 8:
            raise ConfigError("data.resolution and data.width must be multiples of 8")
        if self.checkpoint.every < 1:
            raise ConfigError("checkpoint.every must be at least 1")
        if self.checkpoint.keep_last is not None and self.checkpoint.keep_last < 1:
            raise ConfigError("checkpoint.keep_last must be at least 1 (or null to keep all)")
        if self.logging.report_to not in ("tensorboard", "wandb", "all", "none"):
            raise ConfigError("logging.report_to must be tensorboard, wandb, all or none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- reading and overriding -----------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a YAML value to the annotated type (int → float is allowed)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[]") for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping, got {type(data).__name__}")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        where = f"in {prefix.rstrip('.')}" if prefix else "at the top level"
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)} {where} (known: {', '.join(types)})")
    kwargs = {}
    for name, value in data.items():
        hint = types[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{key}.")
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.learning_rate=1e-4"`` → (["train", "learning_rate"], 1e-4); values are YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.learning_rate=1e-4), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse {raw!r}: {exc}") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    return key.strip().split("."), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numbers_from_yaml(data: Any) -> Any:
    """PyYAML reads ``1e-5`` (no dot) as a string: turn such strings into floats."""
    if isinstance(data, dict):
        return {k: _numbers_from_yaml(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_numbers_from_yaml(v) for v in data]
    if isinstance(data, str) and _looks_numeric(data) and data.strip().lower() not in ("nan", "inf", "-inf"):
        return float(data)
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    stage: int | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """Read a YAML config, apply ``KEY=VALUE`` overrides and an explicit stage, and validate.

    Args:
        path: YAML file (None: defaults only).
        overrides: ``["train.learning_rate=1e-4", ...]`` (dotted keys; YAML values).
        stage: 1 or 2; wins over the file's ``stage``.
        base: a dict applied before the file (used by ``--preset tiny``).
    """
    import yaml

    data: dict[str, Any] = {}
    _merge(data, base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config sections")
        _merge(data, _numbers_from_yaml(loaded))
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {k} is not a section")
        node[keys[-1]] = value
    if stage is not None:
        data["stage"] = stage
    config = _build(TrainConfig, data, "")
    config.validate()
    return config


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "qformer":
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


#: The ``--preset tiny`` base: offline random networks, 64 px images, a few fast steps on a CPU.
TINY_BASE: dict[str, Any] = {
    "model": {"preset": "tiny", "lora_rank": 4},
    "data": {"resolution": 64, "num_workers": 0},
    "train": {"batch_size": 2, "max_steps": 20, "learning_rate": 1e-4},
    "checkpoint": {"every": 10, "keep_last": 2},
    "validation": {"every": None, "num_samples": 1, "num_inference_steps": 2},
    "logging": {"every": 1, "report_to": "none"},
}
