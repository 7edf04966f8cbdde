"""Checkpoints: the published layout (built by hand here), our format, conversion both ways, strictness."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_differ, assert_same, random_crop, random_pil, run_pipe
from safetensors.torch import load_file, save_file

from uniportrait.cli import main
from uniportrait.convert import (
    BACKBONE_FILE,
    FACEID_FILE,
    IP_ADAPTER_FILE,
    ROUTER_FILE,
    read_bin,
)
from uniportrait.errors import CheckpointError, IdentityError, WeightsNotFoundError
from uniportrait.identity import Identity
from uniportrait.models.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BACKBONE_FOLDER,
    BACKBONE_WEIGHTS,
    MODEL_WEIGHTS,
    AdapterConfig,
    UniPortraitAdapter,
    read_adapter_files,
)
from uniportrait.models.qformer import QFormerConfig
from uniportrait.pipeline import UniPortraitPipeline
from uniportrait.presets import build_tiny_base
from uniportrait.presets.pipelines import tiny_adapter_config, tiny_backbone_config

PROJ = ("q", "k", "v", "out")

# -- the published layout, written out by hand from DESIGN §7 ------------------------------------------


def _published_by_hand(pipe) -> dict[str, dict]:
    """File name → contents of the published files, built from ``pipe``'s modules."""
    faceid_procs: dict[str, torch.Tensor] = {}
    router_procs: dict[str, torch.Tensor] = {}
    ip_procs: dict[str, torch.Tensor] = {}
    for i, (name, handle) in enumerate(pipe.unet.attn_processors.items()):
        proc = handle.processor
        for p in PROJ:
            single, multi = getattr(proc, f"to_{p}_lora"), getattr(proc, f"to_{p}_multi_id_lora")
            for part in ("down", "up"):
                faceid_procs[f"{i}.to_{p}_lora.{part}.weight"] = getattr(single, part).weight
                # The router file keeps the multi-ID LoRA under the single-ID names.
                router_procs[f"{i}.to_{p}_lora.{part}.weight"] = getattr(multi, part).weight
        if not name.endswith("attn2.processor"):
            continue
        faceid_procs[f"{i}.to_k_faceid.weight"] = proc.to_k_faceid.weight
        faceid_procs[f"{i}.to_v_faceid.weight"] = proc.to_v_faceid.weight
        ip_procs[f"{i}.to_k_ip.weight"] = proc.to_k_ip.weight
        ip_procs[f"{i}.to_v_ip.weight"] = proc.to_v_ip.weight
        for router in ("to_q_router", "to_k_router"):
            seq = getattr(proc, router)
            router_procs[f"{i}.{router}.0.weight"] = seq[0].weight
            router_procs[f"{i}.{router}.0.bias"] = seq[0].bias
            router_procs[f"{i}.{router}.2.weight"] = seq[2].weight
        router_procs[f"{i}.aggr_router.weight"] = proc.aggr_router.weight
        router_procs[f"{i}.aggr_router.bias"] = proc.aggr_router.bias
    proj = pipe.adapter.image_proj
    detach = lambda d: {k: v.detach().clone() for k, v in d.items()}  # noqa: E731
    return {
        FACEID_FILE: {
            "faceid_proj": detach(pipe.adapter.qformer.state_dict()),
            "faceid_adapter": detach(faceid_procs),
        },
        ROUTER_FILE: {"faceid_adapter": detach(router_procs)},
        BACKBONE_FILE: detach(pipe.face_backbone.state_dict()),  # TFace keys: input_layer/body/output_layer
        IP_ADAPTER_FILE: {
            "image_proj": {
                "proj.weight": proj.proj.weight.detach().clone(),
                "proj.bias": proj.proj.bias.detach().clone(),
                "norm.weight": proj.norm.weight.detach().clone(),
                "norm.bias": proj.norm.bias.detach().clone(),
            },
            "ip_adapter": detach(ip_procs),
        },
    }


def _copy(contents: dict) -> dict:
    return {k: (_copy(v) if isinstance(v, dict) else v) for k, v in contents.items()}


@pytest.fixture(scope="module")
def published(tiny_pipe):
    return _published_by_hand(tiny_pipe)


@pytest.fixture(scope="module")
def published_dir(published, tmp_path_factory):
    folder = tmp_path_factory.mktemp("published")
    for name in (FACEID_FILE, ROUTER_FILE, BACKBONE_FILE):
        torch.save(published[name], folder / name)
    ip_path = tmp_path_factory.mktemp("ip") / IP_ADAPTER_FILE
    torch.save(published[IP_ADAPTER_FILE], ip_path)
    return folder, ip_path


def _load(uniportrait, ip_adapter=None, **kwargs) -> UniPortraitPipeline:
    """A pipeline on a fresh tiny base (same seed as the shared one) with the given weights."""
    base = build_tiny_base(0)
    encoder = base.pop("image_encoder")
    kwargs.setdefault(
        "adapter_config", tiny_adapter_config(base["unet"], encoder, ip_adapter=ip_adapter is not None)
    )
    kwargs.setdefault("face_backbone_config", tiny_backbone_config())
    pipe = UniPortraitPipeline.from_pretrained(
        base, uniportrait=uniportrait, image_encoder=encoder, ip_adapter=ip_adapter, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe) -> list[np.ndarray]:
    """Multi-ID with an image prompt (router, multi-ID LoRA, IP-Adapter) and single-ID (single LoRA)."""
    ids = [pipe.encode_identity(random_crop(i)) for i in (1, 2)]
    return [
        run_pipe(pipe, seed=1, identities=ids, ip_image=random_pil(5), ip_scale=0.5).images,
        run_pipe(pipe, seed=2, identities=ids[:1]).images,
    ]


@pytest.fixture(scope="module")
def reference_images(tiny_pipe):
    return _images(tiny_pipe)


def _assert_images_equal(pipe, reference) -> None:
    for got, want in zip(_images(pipe), reference):
        assert_same(got, want, atol=1e-6)


def test_published_layout_key_names(published, tiny_pipe):
    procs = published[FACEID_FILE]["faceid_adapter"]
    n_layers = len(tiny_pipe.unet.attn_processors)
    assert {int(k.split(".")[0]) for k in procs} == set(range(n_layers))
    assert "1.to_k_faceid.weight" in procs and "0.to_k_faceid.weight" not in procs  # odd = cross
    assert all(k.startswith(("input_layer.", "body.", "output_layer.")) for k in published[BACKBONE_FILE])


def test_published_folder_loads_identically(published_dir, reference_images):
    folder, ip_path = published_dir
    _assert_images_equal(_load(folder, ip_adapter=ip_path), reference_images)


def test_published_dicts_load_identically(published, reference_images):
    files = {name: published[name] for name in (FACEID_FILE, ROUTER_FILE, BACKBONE_FILE)}
    _assert_images_equal(_load(files, ip_adapter=published[IP_ADAPTER_FILE]), reference_images)


def test_convert_cli_round_trip(published_dir, published, reference_images, tmp_path, capsys):
    folder, ip_path = published_dir
    ours = tmp_path / "ours"
    args = ["convert", str(folder), str(ours), "--preset", "tiny", "--ip-adapter", str(ip_path)]
    assert main(args) == 0
    assert sorted(p.name for p in ours.iterdir()) == sorted([ADAPTER_CONFIG, MODEL_WEIGHTS, BACKBONE_FOLDER])
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]  # no temporary folder left behind
    assert json.loads((ours / ADAPTER_CONFIG).read_text())["_class_name"] == "UniPortraitAdapter"

    # Our folder, the same files as an in-memory dict, and the first round's format give the same images.
    _assert_images_equal(_load(ours), reference_images)
    _assert_images_equal(_load(_as_dict(ours)), reference_images)
    adapter, backbone = read_adapter_files(ours)
    first_round = write_first_round_folder(adapter, backbone, tmp_path / "v1")
    assert not any(k[0].isdigit() for k in load_file(str(first_round / ADAPTER_WEIGHTS)))  # named keys
    _assert_images_equal(_load(first_round), reference_images)
    shutil.rmtree(tmp_path / "v1")

    # A non-empty destination is refused without --overwrite, and replaced with it.
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--overwrite"]) == 0

    # Export back to the published layout: the very tensors we wrote by hand.
    exported = tmp_path / "exported"
    assert main(["convert", "--export", str(ours), str(exported)]) == 0
    assert sorted(p.name for p in exported.iterdir()) == sorted(published)
    for name, want in published.items():
        got = read_bin(exported / name)
        flat_got, flat_want = _flatten(got), _flatten(want)
        assert flat_got.keys() == flat_want.keys(), name
        for key in flat_want:
            assert torch.equal(flat_got[key], flat_want[key]), f"{name}: {key}"


def _flatten(contents: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for k, v in contents.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_convert_cli_sd15_reads_configs_only(tmp_path):
    """--preset sd15 takes the layer list from unet/config.json and sizes from the encoder config."""
    from uniportrait.convert import named_to_published

    base = build_tiny_base(0)
    base["unet"].save_config(tmp_path / "base" / "unet")
    base["image_encoder"].config.to_json_file(tmp_path / "encoder.json")
    # An adapter with the published Q-Former layout (12 × 64 heads, IR-101 widths) on the tiny UNet.
    qformer = QFormerConfig(dim=32, id_dim=512, structure_dim=448 + base["image_encoder"].config.hidden_size)
    torch.manual_seed(0)
    adapter = UniPortraitAdapter.from_sizes(
        AdapterConfig.from_unet(base["unet"], qformer=qformer, lora_rank=4)
    )
    src = tmp_path / "src"
    src.mkdir()
    for name, contents in named_to_published(adapter).items():
        torch.save(contents, src / name)
    out = tmp_path / "out"
    args = ["convert", str(src), str(out), "--base-model", str(tmp_path / "base")]
    assert main([*args, "--image-encoder", str(tmp_path / "encoder.json")]) == 0
    converted, backbone = read_adapter_files(out)
    assert backbone is None  # no backbone file given: converted without it
    assert converted.sizes.to_dict() == adapter.sizes.to_dict()
    want = adapter.state_dict()
    assert converted.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in converted.state_dict().items())


@pytest.mark.parametrize("case", ["missing-src", "empty-src", "ours-without-export", "export-published"])
def test_convert_cli_bad_source(case, published_dir, tmp_path, tiny_pipe, capsys):
    folder, _ = published_dir
    src = {"missing-src": tmp_path / "nope", "empty-src": tmp_path / "empty", "export-published": folder}
    (tmp_path / "empty").mkdir()
    if case == "ours-without-export":
        src[case] = tiny_pipe.adapter.save_pretrained(tmp_path / "ours")
    argv = ["convert", str(src[case]), str(tmp_path / "dst"), "--preset", "tiny"]
    if case == "export-published":
        argv.insert(1, "--export")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    if case == "ours-without-export":
        assert "--export" in err
    assert not (tmp_path / "dst").exists()


# -- strictness ---------------------------------------------------------------------------------------


LAYER1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def _edit(contents, path: tuple[str, ...], value=None, delete=False) -> None:
    target = contents
    for part in path[:-1]:
        target = target[part]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value


BAD_PUBLISHED = {
    "missing-faceid-proj": (
        (FACEID_FILE, "faceid_adapter", "1.to_k_faceid.weight"),
        None,
        "to_k_faceid.weight",
    ),
    "missing-router": ((ROUTER_FILE, "faceid_adapter", "3.to_q_router.0.bias"), None, "to_q_router.0.bias"),
    "missing-qformer": ((FACEID_FILE, "faceid_proj", "proj_out.weight"), None, "qformer.proj_out.weight"),
    "missing-backbone": ((BACKBONE_FILE, "body.0.res_layer.1.weight"), None, "body.0.res_layer.1.weight"),
    "unexpected-param": (
        (FACEID_FILE, "faceid_adapter", "1.to_x_faceid.weight"),
        torch.zeros(2, 2),
        "to_x_faceid.weight",
    ),
    "unexpected-index": (
        (FACEID_FILE, "faceid_adapter", "99.to_k_faceid.weight"),
        torch.zeros(2, 2),
        "99.to_k_faceid.weight",
    ),
    "unexpected-group": ((FACEID_FILE, "extra_group"), {}, "extra_group"),
    "unexpected-backbone": ((BACKBONE_FILE, "body.99.weight"), torch.zeros(1), "body.99.weight"),
    "shape-processor": (
        (FACEID_FILE, "faceid_adapter", "1.to_v_faceid.weight"),
        torch.zeros(3, 5),
        "to_v_faceid.weight",
    ),
    "shape-qformer": ((FACEID_FILE, "faceid_proj", "latents"), torch.zeros(1, 16, 7), "latents"),
    "shape-ip": ((IP_ADAPTER_FILE, "image_proj", "proj.weight"), torch.zeros(4, 4), "proj.weight"),
    "shape-backbone": ((BACKBONE_FILE, "input_layer.0.weight"), torch.zeros(1), "input_layer.0.weight"),
}


@pytest.mark.parametrize("case", list(BAD_PUBLISHED))
def test_published_strict(case, published):
    path, value, named = BAD_PUBLISHED[case]
    contents = _copy(published)
    _edit(contents, path, value, delete=value is None)
    ip = contents.pop(IP_ADAPTER_FILE)
    with pytest.raises(CheckpointError) as err:
        _load(contents, ip_adapter=ip)
    assert named in str(err.value)
    if case in ("missing-faceid-proj", "shape-processor"):
        assert LAYER1 in str(err.value)  # the layer is named, not only its index


def _as_dict(folder):
    """A folder of our format as the in-memory dict that mirrors it."""
    return {
        ADAPTER_CONFIG: json.loads((folder / ADAPTER_CONFIG).read_text()),
        MODEL_WEIGHTS: load_file(str(folder / MODEL_WEIGHTS)),
        BACKBONE_FOLDER: {
            ADAPTER_CONFIG: json.loads((folder / BACKBONE_FOLDER / ADAPTER_CONFIG).read_text()),
            MODEL_WEIGHTS: load_file(str(folder / BACKBONE_FOLDER / MODEL_WEIGHTS)),
        },
    }


def write_first_round_folder(adapter, backbone, folder):
    """The first round's adapter folder: format/version config, named keys, backbone beside."""
    folder.mkdir(parents=True)
    config = {
        "format": "uniportrait-adapter",
        "version": 1,
        "adapter": adapter.sizes.to_dict(),
        "face_backbone": backbone.sizes.to_dict(),
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in adapter.named_state_dict().items()}, str(folder / ADAPTER_WEIGHTS)
    )
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(folder / BACKBONE_WEIGHTS))
    return folder


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_our_format_strict(case, tiny_pipe, tmp_path):
    folder = tiny_pipe.adapter.save_pretrained(tmp_path / "ours", face_backbone=tiny_pipe.face_backbone)
    files = _as_dict(folder)
    weights = files[MODEL_WEIGHTS]
    index = [spec.name for spec in tiny_pipe.adapter.layers].index(f"{LAYER1}.processor")
    key = f"processors.{index}.to_k_faceid.weight"
    if case == "missing":
        del weights[key]
    elif case == "unexpected":
        weights[key.replace("to_k_faceid", "to_z_faceid")] = torch.zeros(2)
        key = key.replace("to_k_faceid", "to_z_faceid")
    else:
        weights[key] = torch.zeros(1, 1)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as err:
        _load(files)
    assert LAYER1 in str(err.value)  # the layer is named, not only its index
    save_file(weights, str(folder / MODEL_WEIGHTS))  # the same file on disk
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        _load(folder)


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_first_round_format_strict(case, tiny_pipe, tmp_path):
    folder = write_first_round_folder(tiny_pipe.adapter, tiny_pipe.face_backbone, tmp_path / "v1")
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    key = f"attn_processors.{LAYER1}.to_k_faceid.weight"
    if case == "missing":
        del weights[key]
    elif case == "unexpected":
        weights[key.replace("to_k_faceid", "to_z_faceid")] = torch.zeros(2)
        key = key.replace("to_k_faceid", "to_z_faceid")
    else:
        weights[key] = torch.zeros(1, 1)
    files = {
        ADAPTER_CONFIG: json.loads((folder / ADAPTER_CONFIG).read_text()),
        ADAPTER_WEIGHTS: weights,
        BACKBONE_WEIGHTS: load_file(str(folder / BACKBONE_WEIGHTS)),
    }
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        _load(files)


_CALLS: list[str] = []


def _record(text: str) -> str:
    _CALLS.append(text)
    return text


class _Payload:
    """Unpickling this would call ``_record``: a stand-in for arbitrary code in a pickle."""

    def __reduce__(self):
        return (_record, ("executed",))


class _Custom:
    pass


@pytest.mark.parametrize("payload", [_Payload(), _Custom()], ids=["reduce", "custom-class"])
def test_read_bin_refuses_non_weights_pickles(payload, tmp_path):
    path = tmp_path / FACEID_FILE
    torch.save({"faceid_proj": {"x": torch.zeros(1)}, "evil": payload}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_bin(path)
    assert _CALLS == []
    with pytest.raises(CheckpointError):  # also when found inside a folder being loaded
        _load(tmp_path)


def test_read_bin_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError):
        read_bin(tmp_path / "absent.bin")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="dict"):
        read_bin(tmp_path / "list.bin")
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        read_bin(tmp_path / "garbage.bin")


# -- our format and identities: exact round trips -----------------------------------------------------------


def test_adapter_save_load_bit_identical(tiny_pipe, tmp_path):
    folder = tmp_path / "adapter"
    tiny_pipe.adapter.save_pretrained(folder, face_backbone=tiny_pipe.face_backbone)
    tiny_pipe.adapter.save_pretrained(folder, face_backbone=tiny_pipe.face_backbone)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    adapter, backbone = read_adapter_files(folder)
    assert adapter.sizes.to_dict() == tiny_pipe.adapter.sizes.to_dict()
    assert UniPortraitAdapter.from_pretrained(folder).sizes == adapter.sizes  # diffusers' entry point
    for loaded, original in ((adapter, tiny_pipe.adapter), (backbone, tiny_pipe.face_backbone)):
        want = original.state_dict()
        got = loaded.state_dict()
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert backbone.sizes.to_dict() == tiny_pipe.face_backbone.sizes.to_dict()


def test_identity_save_load_exact(tiny_pipe, crops, tmp_path):
    ident = tiny_pipe.encode_identity(
        torch.stack(crops[:2]), mix=[(crops[2], 0.25), (crops[3], 0.5)], name="Ada"
    )
    ident.crops = (torch.stack(crops[:2]) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    loaded = Identity.load(ident.save(tmp_path / "ada.safetensors"))
    assert loaded.name == "Ada" and loaded.encoder == ident.encoder
    assert torch.equal(loaded.intrinsic, ident.intrinsic) and torch.equal(loaded.structure, ident.structure)
    assert torch.equal(loaded.crops, ident.crops)
    assert [s for _, s in loaded.mix] == [0.25, 0.5]
    for (got, _), (want, _) in zip(loaded.mix, ident.mix):
        assert torch.equal(got.intrinsic, want.intrinsic) and torch.equal(got.structure, want.structure)
    torch.testing.assert_close(
        tiny_pipe.identity_tokens(loaded, 0.1), tiny_pipe.identity_tokens(ident, 0.1), atol=0, rtol=0
    )
    assert_differ(
        tiny_pipe.identity_tokens(loaded, 0.1).detach().numpy(),
        tiny_pipe.identity_tokens(loaded.mix[0][0], 0.1).detach().numpy(),
        min_diff=1e-4,
    )


def test_identity_from_another_encoder_refused(tiny_pipe, crops, tmp_path):
    from uniportrait.presets import build_tiny_pipeline

    path = tiny_pipe.encode_identity(crops[0], name="Bo").save(tmp_path / "bo.safetensors")
    run_pipe(tiny_pipe, identities=[Identity.load(path)])  # fine with its own encoder
    other = build_tiny_pipeline(1, ip_adapter=False)
    with pytest.raises(IdentityError, match="'Bo' was encoded by another face encoder"):
        run_pipe(other, identities=[Identity.load(path)])


def test_pipeline_save_pretrained_round_trip(tmp_path):
    """model_index.json: diffusers' DiffusionPipeline reads the folder; a swapped scheduler comes back."""
    from diffusers import DiffusionPipeline, EulerAncestralDiscreteScheduler

    from uniportrait import UniPortraitPipeline
    from uniportrait.errors import UniPortraitError
    from uniportrait.presets import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=5)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter", "face_backbone", "image_encoder", "model_index.json", "scheduler", "text_encoder",
        "tokenizer", "unet", "uniportrait_pipeline.py", "vae",
    ]  # fmt: skip
    index = json.loads((folder / "model_index.json").read_text())
    assert index["adapter"] == ["uniportrait.models.adapter", "UniPortraitAdapter"]
    assert index["scheduler"] == ["diffusers", "EulerAncestralDiscreteScheduler"]
    unet_keys = set(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")))
    assert unet_keys == set(build_tiny_base(5)["unet"].state_dict())  # the UNet's own weights only
    crops = [random_crop(1), random_crop(2)]
    ids = [pipe.encode_identity(c) for c in crops]
    want = run_pipe(pipe, identities=ids).images
    for loaded in (
        UniPortraitPipeline.from_pretrained(folder),
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True),
    ):
        assert type(loaded) is UniPortraitPipeline
        assert type(loaded.scheduler) is EulerAncestralDiscreteScheduler
        assert loaded.encoder_id == pipe.encoder_id  # identities encoded before saving still apply
        loaded.set_progress_bar_config(disable=True)
        assert_same(want, run_pipe(loaded, identities=ids).images, atol=1e-6)
    # the original keeps working, and a non-empty target is refused
    assert_same(want, run_pipe(pipe, identities=ids).images)
    with pytest.raises(UniPortraitError, match="not empty"):
        pipe.save_pretrained(folder)
    # only the module we write is trusted
    (folder / "uniportrait_pipeline.py").write_text("import os\n")
    with pytest.raises(UniPortraitError, match="refusing"):
        UniPortraitPipeline.from_pretrained(folder)


def test_first_round_pipeline_folder_still_loads(tiny_pipe, tmp_path):
    """The first round's save_pretrained layout: SD components + image_encoder + uniportrait/ (v1)."""
    folder = tmp_path / "v1-pipeline"
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "image_encoder"):
        getattr(tiny_pipe, name).save_pretrained(folder / name)
    write_first_round_folder(tiny_pipe.adapter, tiny_pipe.face_backbone, folder / "uniportrait")
    loaded = UniPortraitPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    crops = [random_crop(1), random_crop(2)]
    want = run_pipe(tiny_pipe, identities=[tiny_pipe.encode_identity(c) for c in crops]).images
    assert_same(
        want, run_pipe(loaded, identities=[loaded.encode_identity(c) for c in crops]).images, atol=1e-6
    )
