"""Training both stages on the tiny preset (offline, CPU, 64 px), data made from the sample photos.

These check the trainer's mechanics (both stages fit one fixed batch, train only their parameters,
save, resume, load). Whether training *learns* identity and routing that carry over to people it
never saw is checked on the identity world in ``test_world_learning.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uniportrait.cli import main
from uniportrait.training.config import TINY_BASE, ConfigError, load_config
from uniportrait.training.data import BatchSchedule, PortraitDataset, collate
from uniportrait.training.losses import routing_loss
from uniportrait.training.prepare import INDEX_FILE, PrepareOptions, prepare_dataset
from uniportrait.training.samples import make_sample_source
from uniportrait.training.trainer import Trainer, find_checkpoint


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    make_sample_source(root / "src")
    options = PrepareOptions(identity_from_folder=True)
    prepare_dataset(root / "src", root / "data", workers=1, options=options, progress=False)
    return root / "data"


def _config(stage: int, data, out, *overrides: str):
    return load_config(
        None, [f"data.path={data}", f"output_dir={out}", *overrides], stage=stage, base=TINY_BASE
    )


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize(
    "name",
    sorted(
        str(p.relative_to(CONFIGS)) for p in [*CONFIGS.glob("train_*.yaml"), *CONFIGS.glob("world/*.yaml")]
    ),
)
def test_shipped_configs_are_valid(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.stage == (2 if "stage2" in name else 1)
    if name == "world/stage2.yaml":
        assert cfg.data.size == (128, 64)  # group pictures keep their width


def test_train_command_reports_config_errors(tmp_path, capsys):
    assert main(["train", "--stage", "1", "--preset", "tiny", "--output-dir", str(tmp_path)]) == 2
    assert "set data.path" in capsys.readouterr().err
    assert main(["train", "--stage", "1", "--preset", "tiny", "--data", str(tmp_path)]) == 2
    assert "not a dataset folder" in capsys.readouterr().err


# -- units --------------------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key.*lerning_rate.*in train"):
        _config(1, tmp_path, tmp_path, "train.lerning_rate=1")
    with pytest.raises(ConfigError, match="must be a number"):
        _config(1, tmp_path, tmp_path, "train.learning_rate=fast")
    with pytest.raises(ConfigError, match="stage II needs"):
        _config(2, tmp_path, tmp_path, "data.max_faces=1")
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "train:\n  learning_rate: 1e-5\n  max_steps: 7\nmodel:\n  preset: tiny\ndata:\n  path: x\n"
    )
    cfg = load_config(yaml_file, ["train.max_steps=9"], stage=2)
    assert (cfg.stage, cfg.train.learning_rate, cfg.train.max_steps, cfg.face_range) == (2, 1e-5, 9, (2, 4))


def test_routing_loss_and_agreement():
    masks = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    masks[:, 0, :, :4] = True  # identity 0 on the left half, identity 1 on the right
    masks[:, 1, :, 4:] = True

    def logits(m: torch.Tensor) -> torch.Tensor:  # (B, L, N) favouring the true identity
        return m.float().flatten(2).transpose(1, 2) * 20 - 10

    right = logits(masks)
    perfect = routing_loss([(right, (8, 8)), (logits(masks[:, :, ::2, ::2]), (4, 4))], masks)
    assert perfect.loss < 1e-6 and perfect.mass > 0.999 and perfect.accuracy == 1.0
    wrong = routing_loss([(-right, (8, 8))], masks)
    assert wrong.loss > 0.99 and wrong.accuracy == 0.0
    flat = routing_loss([(torch.zeros(2, 64, 2), (8, 8))], masks)
    assert abs(flat.loss - 0.25) < 1e-6 and abs(flat.mass - 0.5) < 1e-6
    # Samples whose identities were dropped (CFG) are left out.
    mixed = routing_loss(
        [(torch.cat([right[:1], -right[1:]]), (8, 8))], masks, valid=torch.tensor([True, False])
    )
    assert mixed.loss < 1e-6


def test_batch_schedule_is_deterministic_sharded_and_resumable():
    faces = [1, 2, 2, 3, 2, 3, 2, 2, 3, 3, 2, 2]
    ranks = [BatchSchedule(faces, 2, seed=5, rank=r, world=2) for r in range(2)]
    epoch = [ranks[k % 2].batch(k // 2) for k in range(ranks[0].batches_per_epoch)]
    rows = [row for batch in epoch for row, _ in batch]
    assert len(rows) == len(set(rows))  # one epoch: no row twice
    assert all(len({faces[row] for row, _ in batch}) == 1 for batch in epoch)  # one face count per batch
    again = BatchSchedule(faces, 2, seed=5, rank=1, world=2)
    stream = again.stream(start=3)
    assert [next(stream) for _ in range(4)] == [ranks[1].batch(k) for k in range(3, 7)]
    assert BatchSchedule(faces, 2, seed=6).batch(0) != BatchSchedule(faces, 2, seed=5).batch(0)


def test_dataset_items(dataset):
    ds = PortraitDataset(dataset, resolution=(128, 64), min_faces=2, max_faces=4)  # the pairs are 2:1
    item = ds[(0, 123)]
    assert item["pixels"].shape == (3, 64, 128) and -1 <= item["pixels"].min() < item["pixels"].max() <= 1
    assert item["masks"].shape == (2, 64, 128) and item["masks"].dtype == torch.bool
    assert item["crops"].shape == (2, 224, 224, 3) and item["faces_whole"].all()
    left = item["masks"][:, :, :64].sum((1, 2)) > item["masks"][:, :, 64:].sum((1, 2))
    assert left.tolist() in ([True, False], [False, True])  # one face per half
    square = PortraitDataset(dataset, resolution=64, min_faces=2, max_faces=4)[(0, 123)]
    assert square["faces_whole"].sum() == 1  # a 64 px square holds one of the two faces whole
    always = PortraitDataset(dataset, resolution=64, id_augment=1.0)
    swapped = always[(0, 1)]
    assert not torch.equal(swapped["id_crops"], swapped["crops"])  # another photo of that person


def _two_faces_wide():
    """A 128×64 picture with a face in each outer quarter (masks (2, 64, 128))."""
    from PIL import Image

    masks = np.zeros((2, 64, 128), bool)
    masks[0, 16:48, 6:38], masks[1, 16:48, 90:122] = True, True
    image = Image.fromarray(np.where(masks.any(0)[..., None], 200, 40).astype(np.uint8).repeat(3, -1))
    crops = torch.zeros(2, 224, 224, 3, dtype=torch.uint8)
    row = {"caption": "two people", "width": 128, "height": 64}
    return image, masks, crops, row


def test_crop_keeps_faces_whole_or_drops_them():
    from uniportrait.training.data import make_item

    image, masks, crops, row = _two_faces_wide()
    # A centre square would cut both faces; the crop keeps one whole and marks the other cut.
    item = make_item(image, masks, crops, crops, row, 64, 0)
    assert item["pixels"].shape == (3, 64, 64)
    assert item["faces_whole"].tolist() in ([True, False], [False, True])
    kept = int(item["faces_whole"].int().argmax())
    assert item["masks"][kept].sum() == masks[kept].sum()  # the whole face, unscaled
    assert not item["masks"][1 - kept].any()  # the cut face's mask is cleared
    # A wide training size holds both.
    item = make_item(image, masks, crops, crops, row, (128, 64), 0)
    assert item["pixels"].shape == (3, 64, 128) and item["faces_whole"].all()
    assert torch.equal(item["masks"], torch.from_numpy(masks))


def test_trainer_blanks_the_identity_of_a_cut_face(dataset, tmp_path):
    cfg = _config(2, dataset, tmp_path, "data.id_drop=0", "data.structure_drop_all=0")
    trainer = Trainer(cfg)
    batch = collate([trainer.dataset[(0, 5)], trainer.dataset[(1, 6)]])
    batch["faces_whole"][:] = True
    full = trainer.prepare_inputs(batch, seed=3)
    batch["faces_whole"][0, 1] = False
    cut = trainer.prepare_inputs(batch, seed=3)
    blank = trainer.uncond_intrinsic.to(cut["intrinsic"].dtype)
    assert torch.equal(cut["intrinsic"][0, 1], blank.reshape(cut["intrinsic"][0, 1].shape))
    assert not torch.equal(full["intrinsic"][0, 1], cut["intrinsic"][0, 1])
    assert torch.equal(full["intrinsic"][0, 0], cut["intrinsic"][0, 0])  # the other faces keep theirs
    assert torch.equal(full["intrinsic"][1], cut["intrinsic"][1])


def test_trainer_draws_timesteps_as_configured(dataset, tmp_path, monkeypatch):
    """``train.timestep_sampling`` reaches the training step: prepare_inputs returns the
    timesteps :func:`sample_timesteps` draws with the configured sampling."""
    import uniportrait.training.trainer as trainer_module
    from uniportrait.training.model import sample_timesteps

    asked = []

    def spy(count, steps, sampling, generator, device):
        asked.append(sampling)
        out = sample_timesteps(count, steps, sampling, generator, device)
        asked.append(out)
        return out

    monkeypatch.setattr(trainer_module, "sample_timesteps", spy)
    for sampling in ("uniform", "cubic"):
        trainer = Trainer(_config(1, dataset, tmp_path / sampling, f"train.timestep_sampling={sampling}"))
        batch = collate([trainer.dataset[(0, 5)], trainer.dataset[(1, 6)]])
        timesteps = trainer.prepare_inputs(batch, seed=3)["timesteps"]
        assert asked[-2] == sampling and torch.equal(timesteps, asked[-1])


# -- the two stages ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1(dataset, tmp_path_factory):
    """Stage I overfitting one fixed batch (same noise every step)."""
    out = tmp_path_factory.mktemp("stage1")
    cfg = _config(
        1, dataset, out, "train.max_steps=30", "train.learning_rate=3e-3", "train.overfit_batch=true"
    )
    result = Trainer(cfg).train()
    return out, result


@pytest.fixture(scope="module")
def stage2(dataset, stage1, tmp_path_factory):
    """Stage II from the stage-I adapter, overfitting one fixed batch of two-person images."""
    out = tmp_path_factory.mktemp("stage2")
    cfg = _config(
        2,
        dataset,
        out,
        f"model.init_adapter={stage1[1]}",
        "data.width=128",  # the sample pairs are 2:1: both faces stay whole
        "train.max_steps=40",
        "train.learning_rate=1e-2",
        "train.overfit_batch=true",
        "validation.every=0",  # at the end only
        "checkpoint.export_published=true",
    )
    trainer = Trainer(cfg)
    result = trainer.train()
    return out, result, trainer


def test_stage1_overfits_a_fixed_batch(stage1):
    out, result = stage1
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 25  # falls almost every step
    assert result == out / "adapter" and (result / "diffusion_pytorch_model.safetensors").is_file()


def test_stage1_trains_only_its_parameters(stage1):
    from uniportrait.models.adapter import read_adapter_files

    out, result = stage1
    trained, _ = read_adapter_files(result)
    first = find_checkpoint(out)  # the last checkpoint holds the trained parameter set
    names = set(load_file(str(first / "state" / "trainable.safetensors")))
    assert any(n.startswith("qformer.") for n in names)
    assert any("to_k_faceid" in n for n in names) and any(".to_q_lora." in n for n in names)
    assert not any("router" in n or "multi_id" in n for n in names)
    # untouched: the multi-ID LoRA "up" weights are still zero
    multi_up = [p for n, p in trained.named_parameters() if "multi_id_lora.up" in n]
    assert multi_up and all(float(p.detach().abs().sum()) == 0.0 for p in multi_up)


def test_stage2_routing_fits_the_face_masks_of_a_fixed_batch(stage2):
    out, result, _ = stage2
    rows = _metrics(out)
    route = [m["routing"] for m in rows]
    mass = [m["route_mass"] for m in rows]
    # Both faces whole (128x64): measured routing loss 0.254 -> 0.202, mass on the right face
    # 0.52 -> 0.71, accuracy 0.54 -> 0.75 over the 40 steps. (A square crop keeps one face only,
    # which makes routing trivial: it reached 0.99.)
    assert np.mean(route[-3:]) < 0.9 * np.mean(route[:3])
    assert np.mean(mass[:3]) < 0.55 and np.mean(mass[-3:]) > 0.65  # from chance (1/2) to mostly right
    assert np.mean([m["route_accuracy"] for m in rows[-3:]]) > 0.68
    images = sorted((out / "validation").glob("*/*.png"))
    assert any(p.name.endswith("-routing.png") for p in images)


def test_stage2_keeps_stage1_weights_and_loads_in_the_pipeline(stage1, stage2):
    from uniportrait.convert import FACEID_FILE, ROUTER_FILE
    from uniportrait.models.adapter import read_adapter_files
    from uniportrait.pipeline import UniPortraitPipeline
    from uniportrait.presets.tiny import build_tiny_base

    out, result, trainer = stage2
    before, _ = read_adapter_files(stage1[1])
    after, backbone = read_adapter_files(result)
    b_state, a_state = before.named_state_dict(), after.named_state_dict()
    frozen = [k for k in b_state if k.startswith("qformer.") or "faceid" in k or ".to_q_lora." in k]
    assert frozen and all(torch.equal(b_state[k], a_state[k]) for k in frozen)
    assert any(not torch.equal(b_state[k], a_state[k]) for k in a_state if "router" in k)

    base = build_tiny_base(0)
    encoder = base.pop("image_encoder")
    pipe = UniPortraitPipeline.from_pretrained(base, uniportrait=result, image_encoder=encoder)
    crops = trainer.validation_samples()[0][1]
    ids = [pipe.encode_identity(c) for c in crops]
    image = pipe(
        "two people", identities=ids, num_inference_steps=2, height=64, width=64, output_type="np"
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    # The published layout: same tensors back through the conversion.
    published = {
        name: torch.load(out / "published" / name, weights_only=True) for name in (FACEID_FILE, ROUTER_FILE)
    }
    again = UniPortraitPipeline.from_pretrained(
        build_tiny_base(0) | {"image_encoder": None},
        uniportrait=published,
        image_encoder=encoder,
        face_backbone=backbone,
        adapter_config=after.sizes,
    )
    round_trip = again.adapter.named_state_dict()
    assert all(torch.equal(round_trip[k], v) for k, v in a_state.items())


# -- exact resume --------------------------------------------------------------------------------


def test_resume_is_exact(dataset, tmp_path):
    common = (
        "train.max_steps=4",
        "train.gradient_accumulation_steps=2",
        "train.lr_scheduler=constant_with_warmup",
        "train.lr_warmup_steps=3",
        "train.ema_decay=0.9",
        "train.gradient_checkpointing=true",
        "data.id_augment=0.5",
        "data.id_drop=0.3",
        "checkpoint.every=2",
    )
    straight = tmp_path / "straight"
    Trainer(_config(1, dataset, straight, *common)).train()

    parts = tmp_path / "parts"
    first = Trainer(_config(1, dataset, parts, *common, "train.stop_after_steps=2")).train()
    assert first.name == "checkpoint-00000002" and not (parts / "adapter").exists()
    resumed = Trainer(_config(1, dataset, parts, *common), resume="latest")
    assert resumed.global_step == 2 and resumed.position.micro_batches == 4
    resumed.train()

    a = load_file(str(straight / "adapter" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(parts / "adapter" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    assert [m["loss"] for m in _metrics(straight)] == pytest.approx(
        [m["loss"] for m in _metrics(parts)], abs=1e-6
    )


def test_gradient_checkpointing_recomputes_the_same_routing(dataset, tmp_path):
    """The recomputed blocks redraw the same Gumbel noise, so the step is unchanged."""
    weights = []
    for flag in ("false", "true"):
        out = tmp_path / flag
        overrides = ("train.max_steps=2", "train.learning_rate=1e-2", f"train.gradient_checkpointing={flag}")
        trainer = Trainer(_config(2, dataset, out, *overrides))
        assert trainer.components.unet.is_gradient_checkpointing == (flag == "true")
        trainer.train()
        weights.append(load_file(str(out / "adapter" / "diffusion_pytorch_model.safetensors")))
    plain, checkpointed = weights
    assert max(float((plain[k] - checkpointed[k]).abs().max()) for k in plain) <= 1e-6


# -- SDXL-style UNet and the command line ----------------------------------------------------------


def test_tiny_sdxl_unet_trains_stage1(dataset, tmp_path):
    out = tmp_path / "sdxl"
    code = main(
        ["-q", "train", "--stage", "1", "--preset", "tiny-sdxl", "--data", str(dataset), "--output-dir", str(out),
         "--set", "train.max_steps=3", "--set", "validation.every=null"]
    )  # fmt: skip
    assert code == 0
    losses = [m["loss"] for m in _metrics(out)]
    assert len(losses) == 3 and all(np.isfinite(losses))
    config = json.loads((out / "adapter" / "config.json").read_text())
    assert config["cross_attention_dim"] == 64
    names = [layer["name"] for layer in config["layers"]]
    assert any("transformer_blocks.1" in n for n in names)  # SDXL's 2 transformer layers per block


def test_identity_warmup_without_labels_is_refused_before_writing_anything(tmp_path):
    make_sample_source(tmp_path / "src")
    prepare_dataset(tmp_path / "src", tmp_path / "data", workers=1, options=PrepareOptions(), progress=False)
    index = tmp_path / "data" / INDEX_FILE
    rows = [{**json.loads(line), "identities": None} for line in index.read_text().splitlines()]
    index.write_text("".join(json.dumps(r) + "\n" for r in rows))  # no identity labels
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="identity labels"):
        Trainer(_config(1, tmp_path / "data", out, "train.id_warmup_steps=5"))
    assert not out.exists()


def test_global_embedding_adapter_trains_encodes_one_token_and_refuses_other_identities(
    dataset, stage1, tmp_path
):
    """``model.qformer.intrinsic=embedding`` (the global-embedding ablation): the trainer, the
    saved adapter and the pipeline all feed the backbone's embedding as one intrinsic token, and
    identities made for a last-stage adapter are refused (their features differ)."""
    from conftest import random_crop

    from uniportrait.errors import IdentityError
    from uniportrait.pipeline import UniPortraitPipeline
    from uniportrait.presets.tiny import build_tiny_base

    out = tmp_path / "global"
    cfg = _config(1, dataset, out, "train.max_steps=3", "model.qformer.intrinsic=embedding")
    result = Trainer(cfg).train()
    assert all(np.isfinite(m["loss"]) for m in _metrics(out))
    qformer = json.loads((result / "config.json").read_text())["qformer_config"]
    assert qformer["intrinsic"] == "embedding"

    def pipeline(adapter):
        base = build_tiny_base(0)
        encoder = base.pop("image_encoder")
        return UniPortraitPipeline.from_pretrained(base, uniportrait=adapter, image_encoder=encoder)

    pipe, stage_pipe = pipeline(result), pipeline(stage1[1])
    assert qformer["id_dim"] == pipe.face_backbone.config.embedding_dim
    ident = pipe.encode_identity(random_crop(0))
    assert ident.intrinsic.shape == (1, 1, qformer["id_dim"])  # one token per photo
    stage_ident = stage_pipe.encode_identity(random_crop(0))
    assert stage_ident.intrinsic.shape[1] > 1 and pipe.encoder_id != stage_pipe.encoder_id
    tokens = [pipe.identity_tokens(pipe.encode_identity(random_crop(s)), 0.0) for s in (0, 1)]
    assert not torch.allclose(tokens[0], tokens[1])  # the tokens follow the face
    image = pipe("a person", identities=[ident], num_inference_steps=2, height=64, width=64, output_type="np")
    assert np.isfinite(image.images).all()
    with pytest.raises(IdentityError, match="encode it again"):
        pipe("a person", identities=[stage_ident], num_inference_steps=2, height=64, width=64)


def test_qformer_intrinsic_source_is_checked():
    from uniportrait.models.qformer import QFormerConfig

    with pytest.raises(ConfigError, match="intrinsic must be one of stage, embedding"):
        QFormerConfig(intrinsic="pooled")


def test_a_run_imports_up_front_what_it_imports_later(dataset, tmp_path):
    """Validation and checkpoints import modules lazily; the trainer imports them at set-up, so
    editing an editable install's source during a long run cannot break the run midway."""
    import subprocess
    import sys

    later = ["uniportrait.pipeline", "uniportrait.visualize", "uniportrait.convert"]
    code = f"""
import sys
from uniportrait.training.config import TINY_BASE, load_config
from uniportrait.training.trainer import Trainer
later = {later!r}
assert not [m for m in later if m in sys.modules], [m for m in later if m in sys.modules]
Trainer(load_config(None, ["data.path={dataset}", "output_dir={tmp_path / "run"}"], stage=1, base=TINY_BASE))
missing = [m for m in later if m not in sys.modules]
assert not missing, missing
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_unet_learning_rate_fine_tunes_the_base_resumes_and_writes_it_as_a_pipeline(dataset, tmp_path):
    """``train.unet_learning_rate``: the base UNet's own weights train with the adapter, are
    checkpointed and resumed with it, and end up, without the adapter's processors, in a
    pipeline folder that loads with the adapter; by default the UNet stays frozen."""
    from diffusers import StableDiffusionPipeline

    from uniportrait.pipeline import UniPortraitPipeline
    from uniportrait.presets.tiny import build_tiny_base

    with pytest.raises(ConfigError, match="unet_learning_rate must be positive"):
        _config(1, dataset, tmp_path / "bad", "train.unet_learning_rate=0")
    frozen = tmp_path / "frozen"
    Trainer(_config(1, dataset, frozen, "train.max_steps=1", "validation.every=null")).train()
    assert not (frozen / "base").exists()
    names = load_file(str(find_checkpoint(frozen) / "state" / "trainable.safetensors"))
    assert not any(n.startswith("base_unet.") for n in names)

    common = (
        "train.max_steps=2",
        "train.unet_learning_rate=1e-3",
        "train.ema_decay=0.5",
        "validation.every=null",
    )
    straight = tmp_path / "straight"
    Trainer(_config(1, dataset, straight, *common)).train()
    parts = tmp_path / "parts"
    Trainer(_config(1, dataset, parts, *common, "train.stop_after_steps=1", "checkpoint.every=1")).train()
    assert not (parts / "base").exists()
    Trainer(_config(1, dataset, parts, *common), resume="latest").train()

    start = build_tiny_base(0)["unet"].state_dict()
    units = [
        StableDiffusionPipeline.from_pretrained(run / "base").unet.state_dict() for run in (straight, parts)
    ]
    assert units[0].keys() == start.keys()  # the UNet's own weights, no processor
    assert max(float((units[0][k] - units[1][k]).abs().max()) for k in start) <= 1e-6  # resumed exactly
    moved = [k for k in start if not torch.equal(units[0][k], start[k])]
    assert len(moved) > len(start) // 2  # trained, not only copied

    base = tmp_path / "straight" / "base"
    encoder = build_tiny_base(0)["image_encoder"]
    pipe = UniPortraitPipeline.from_pretrained(base, uniportrait=straight / "adapter", image_encoder=encoder)
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], units[0]["conv_in.weight"])


def test_export_writes_a_checkpoints_adapter_and_base_without_training(dataset, tmp_path, capsys):
    """``uniportrait train --resume [CHECKPOINT] --export DIR``: a run's checkpoint, written as the
    finished run writes its weights (adapter/, and base/ when the UNet trains), the run untouched;
    without a checkpoint it is a one-line error that writes nothing."""
    from diffusers import StableDiffusionPipeline

    from uniportrait.models.adapter import UniPortraitAdapter

    run = tmp_path / "run"
    args = ["train", "--stage", "1", "--preset", "tiny", "--data", str(dataset), "--output-dir", str(run)]
    sets = [
        "train.max_steps=3",
        "train.stop_after_steps=2",
        "checkpoint.every=1",
        "train.unet_learning_rate=1e-3",
    ]
    sets += ["validation.every=null"]
    out = tmp_path / "export"
    assert main([*args, *[f"--set={o}" for o in sets], "--export", str(out)]) == 2  # no --resume
    assert "give --resume" in capsys.readouterr().err
    assert main([*args, *[f"--set={o}" for o in sets], "--resume", "--export", str(out)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not run.exists() and not out.exists()

    assert main([*args, *[f"--set={o}" for o in sets]]) == 0  # stops after step 2, checkpoints 1 and 2
    rows = [r for r in _metrics(run) if "diffusion" in r]
    adapter_lr = _config(1, dataset, run).train.learning_rate  # the UNet's is set apart (1e-3)
    assert rows and all(r["lr"] == pytest.approx(adapter_lr) for r in rows), rows
    assert all(r["unet_lr"] == pytest.approx(1e-3) for r in rows) and adapter_lr != 1e-3
    first = find_checkpoint(run, str(run / "checkpoints" / "checkpoint-00000001"))
    (tmp_path / "a-file").write_text("")
    assert main([*args, *[f"--set={o}" for o in sets], "--resume", "--export", str(tmp_path / "a-file")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err
    assert main([*args, *[f"--set={o}" for o in sets], "--resume", str(first), "--export", str(out)]) == 0
    assert "step 1 of" in capsys.readouterr().out
    assert not (run / "adapter").exists() and not (run / "base").exists()  # the run did not go on
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-00000001",
        "checkpoint-00000002",
    ]

    state = load_file(str(first / "state" / "trainable.safetensors"))
    unet = StableDiffusionPipeline.from_pretrained(out / "base").unet.state_dict()
    assert unet.keys() == {k.removeprefix("base_unet.") for k in state if k.startswith("base_unet.")}
    assert all(
        torch.equal(unet[k.removeprefix("base_unet.")], v)
        for k, v in state.items()
        if k.startswith("base_unet.")
    )
    exported = UniPortraitAdapter.from_pretrained(out / "adapter").named_state_dict()
    saved = UniPortraitAdapter.from_pretrained(first / "adapter").named_state_dict()
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    second = UniPortraitAdapter.from_pretrained(run / "checkpoints" / "checkpoint-00000002" / "adapter")
    assert any(
        not torch.equal(second.named_state_dict()[k], saved[k]) for k in saved
    )  # step 1's, not the latest


def test_single_path_mixes_portraits_into_stage2_and_trains_the_unet_on_them(dataset, tmp_path):
    """``data.single_path``: stage II with the UNet trained adds a batch of portraits to every
    micro-batch, through the single-ID path. Their loss is logged and reaches the UNet, the parts
    stage II freezes stay frozen, and a resumed run continues both data streams exactly. Without
    a trained UNet the option is refused, since nothing it reaches would train."""
    with pytest.raises(ConfigError, match="needs stage 2 and train.unet_learning_rate"):
        _config(2, dataset, tmp_path / "bad", f"data.single_path={dataset}")
    with pytest.raises(ConfigError, match="needs stage 2"):
        _config(1, dataset, tmp_path / "bad", f"data.single_path={dataset}", "train.unet_learning_rate=1e-3")
    with pytest.raises(ConfigError, match="single_loss_weight must be positive"):
        _config(2, dataset, tmp_path / "bad", "train.single_loss_weight=0")

    common = ("train.max_steps=2", "train.unet_learning_rate=1e-3", "data.width=128", "validation.every=null")
    mixed = (f"data.single_path={dataset}", "data.id_augment=0.5")
    runs = {name: tmp_path / name for name in ("groups", "straight", "parts")}
    Trainer(_config(2, dataset, runs["groups"], *common)).train()
    Trainer(_config(2, dataset, runs["straight"], *common, *mixed)).train()
    first = Trainer(_config(2, dataset, runs["parts"], *common, *mixed, "train.stop_after_steps=1"))
    assert "single_diffusion" not in _metrics(runs["groups"])[0]
    first.train()
    Trainer(_config(2, dataset, runs["parts"], *common, *mixed), resume="latest").train()

    rows = [r for r in _metrics(runs["straight"]) if "diffusion" in r]
    assert len(rows) == 2 and all(np.isfinite(r["single_diffusion"]) for r in rows)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in _metrics(runs["parts"])], abs=1e-6)
    groups_loss = [r["loss"] for r in _metrics(runs["groups"])]
    assert rows[0]["loss"] > groups_loss[0]  # the same groups, plus the portraits' loss

    def weights(run):
        unet = load_file(str(run / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
        return unet, load_file(str(run / "adapter" / "diffusion_pytorch_model.safetensors"))

    (u_groups, a_groups), (u_straight, a_straight), (u_parts, a_parts) = map(weights, runs.values())
    assert max(float((u_straight[k] - u_parts[k]).abs().max()) for k in u_straight) <= 1e-6
    assert max(float((a_straight[k] - a_parts[k]).abs().max()) for k in a_straight) <= 1e-6
    assert sum(not torch.equal(u_straight[k], u_groups[k]) for k in u_groups) > len(u_groups) // 2
    frozen = [k for k in a_groups if k.startswith("qformer.") or ".to_q_lora." in k or "faceid" in k]
    assert frozen and all(torch.equal(a_straight[k], a_groups[k]) for k in frozen)
