"""``uniportrait convert``: the published ``.bin`` files ⇄ our ``config.json`` + safetensors format.

    uniportrait convert PUBLISHED_DIR OUT_DIR [--ip-adapter ip-adapter_sd15.bin]   # → ours
    uniportrait convert --export OUR_DIR OUT_DIR                                  # → published

The published layout keys processors by their index in ``unet.attn_processors``, so reading it
needs the UNet's layer list: ``--preset sd15`` takes it from the base model's UNet *config* (no
weights are loaded), ``--preset tiny`` from the offline tiny components. The image encoder's
config gives the Q-Former's structure width. Outputs are written into a temporary folder and
moved into place, so a failed conversion leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from uniportrait.errors import UniPortraitError

logger = logging.getLogger(__name__)

# Kept here (not imported from the presets) so that `--help` stays cheap.
DEFAULT_BASE_MODEL = "SG161222/Realistic_Vision_V5.1_noVAE"
DEFAULT_IMAGE_ENCODER = "h94/IP-Adapter/models/image_encoder"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert the published UniPortrait .bin files to our format (or back, with --export)",
        description="Convert a folder holding the published files (uniportrait-faceid_sd15.bin, "
        "uniportrait-router_sd15.bin, glint360k_curricular_face_r101_backbone.bin) into our format "
        "(diffusers' config.json + diffusion_pytorch_model.safetensors + face_backbone/). With --export, convert our "
        "format back into the published .bin files.",
    )
    parser.add_argument("src", metavar="SRC", help="folder to read")
    parser.add_argument("dst", metavar="DST", help="folder to write (must not exist or be empty)")
    parser.add_argument(
        "--export", action="store_true", help="SRC is our format; write the published .bin layout to DST"
    )
    parser.add_argument(
        "--ip-adapter",
        default=None,
        metavar="FILE",
        help="also merge IP-Adapter weights (ip-adapter_sd15.bin)",
    )
    parser.add_argument(
        "--preset",
        choices=("tiny", "sd15"),  # the families convert knows the layer lists of
        default="sd15",
        help="model family the weights belong to: its UNet layer list and encoder sizes (default: sd15)",
    )
    parser.add_argument(
        "--base-model",
        default=DEFAULT_BASE_MODEL,
        metavar="ID_OR_PATH",
        help=f"sd15: base model whose unet/config.json gives the layer list (default: {DEFAULT_BASE_MODEL})",
    )
    parser.add_argument(
        "--image-encoder",
        default=DEFAULT_IMAGE_ENCODER,
        metavar="SPEC",
        help=f"sd15: CLIP vision model whose config.json gives its sizes (default: {DEFAULT_IMAGE_ENCODER})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise UniPortraitError(f"SRC {src} is not a folder")
    check_destination(src, dst, args.overwrite)
    if args.export:
        if args.ip_adapter:
            raise UniPortraitError("--ip-adapter only applies when converting to our format (not --export)")
        written = export_published(src, dst)
    else:
        written = import_published(src, dst, args)
    print(f"wrote {dst}: {', '.join(written)}")
    return 0


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve():
        raise UniPortraitError("SRC and DST must be different folders")
    if dst.exists() and not dst.is_dir():
        raise UniPortraitError(f"DST {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise UniPortraitError(f"DST {dst} exists and is not empty (use --overwrite to replace it)")


# -- published → ours ---------------------------------------------------------------------------


def import_published(src: Path, dst: Path, args: argparse.Namespace) -> list[str]:
    from uniportrait.convert import FACEID_FILE, is_published_folder, read_bin, read_published_folder
    from uniportrait.models.adapter import is_adapter_folder

    if not is_published_folder(src):
        hint = " (it is in our format already: use --export to write the published layout)"
        raise UniPortraitError(f"SRC {src} has no {FACEID_FILE}" + (hint if is_adapter_folder(src) else ""))
    ip_contents = read_bin(args.ip_adapter) if args.ip_adapter else None
    adapter, backbone = read_published_folder(
        src, lambda published, with_ip: _configs(args, published, with_ip), ip_contents, folder_ip=False
    )
    adapter.save_pretrained(dst, face_backbone=backbone)  # atomic
    return sorted(p.name for p in dst.iterdir())


def _configs(args: argparse.Namespace, published: dict, with_ip: bool):
    """The adapter and backbone configs the published files are read with."""
    import dataclasses

    from uniportrait.convert import ROUTER_FILE

    if args.preset == "tiny":
        from uniportrait.presets.pipelines import tiny_adapter_config, tiny_backbone_config
        from uniportrait.presets.tiny import build_tiny_base

        base = build_tiny_base(0)
        config = tiny_adapter_config(base["unet"], base["image_encoder"], ip_adapter=with_ip)
        config = dataclasses.replace(config, multi_id=ROUTER_FILE in published)
        return config, tiny_backbone_config()

    from uniportrait.loading import published_adapter_config

    unet = _unet_skeleton(args.base_model)
    encoder = _image_encoder_skeleton(args.image_encoder)
    return published_adapter_config(unet, encoder, published, None, with_ip=with_ip), None


def _unet_skeleton(base_model: str):
    """The base model's UNet built from its config on the meta device (no weights read)."""
    import torch
    from diffusers import UNet2DConditionModel

    from uniportrait.loading import resolve_file

    path = Path(base_model)
    config_file = (
        path if path.is_file() else resolve_file(base_model, "unet/config.json", "base model UNet config")
    )
    config = UNet2DConditionModel.load_config(str(config_file))
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _image_encoder_skeleton(spec: str):
    """An object with the CLIP vision ``config`` (all the conversion needs of the encoder)."""
    import json
    from types import SimpleNamespace

    from transformers import CLIPVisionConfig

    from uniportrait.loading import resolve_file

    path = Path(spec)
    config_file = path if path.is_file() else resolve_file(spec, "config.json", "image encoder config")
    data = json.loads(Path(config_file).read_text())
    data = data.get("vision_config", data)  # a full CLIP config nests the vision part
    return SimpleNamespace(config=CLIPVisionConfig.from_dict(data))


# -- ours → published ---------------------------------------------------------------------------


def export_published(src: Path, dst: Path) -> list[str]:
    import torch

    from uniportrait.atomic import atomic_directory
    from uniportrait.convert import BACKBONE_FILE, named_to_published
    from uniportrait.models.adapter import read_adapter_files

    adapter, backbone = read_adapter_files(src)
    files = named_to_published(adapter)
    if backbone is not None:
        files[BACKBONE_FILE] = dict(backbone.state_dict())
    with atomic_directory(dst) as tmp:
        for name, contents in files.items():
            torch.save(_to_cpu(contents), tmp / name)
    return sorted(files)


def _to_cpu(value):
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value.detach().cpu().contiguous()
