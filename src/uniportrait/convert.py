"""The one place that reads and writes the *published* checkpoint layout (DESIGN §7).

Published files are pickles: they are read only here, with ``torch.load(weights_only=True)``.
Their processor keys are ``"{i}.{param}"`` with ``i`` the index in ``unet.attn_processors``;
ours name the layer (``attn_processors.<layer>.<param>``). Every key is accounted for: a
missing or unexpected one is an error that names it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from uniportrait.errors import CheckpointError, WeightsNotFoundError
from uniportrait.models.adapter import PROCESSOR_SUFFIX, AdapterConfig, UniPortraitAdapter
from uniportrait.models.face_backbone import IRBackbone, IRBackboneConfig, load_tface_state_dict

logger = logging.getLogger(__name__)

FACEID_FILE = "uniportrait-faceid_sd15.bin"
ROUTER_FILE = "uniportrait-router_sd15.bin"
BACKBONE_FILE = "glint360k_curricular_face_r101_backbone.bin"
IP_ADAPTER_FILE = "ip-adapter_sd15.bin"
PUBLISHED_FILES = (FACEID_FILE, ROUTER_FILE, BACKBONE_FILE)

State = Mapping[str, torch.Tensor]


def read_bin(path: str | Path) -> dict[str, Any]:
    """``torch.load`` a published ``.bin`` safely (``weights_only=True``), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return data


def _groups(data: Mapping[str, Any], expected: tuple[str, ...], optional: tuple[str, ...], what: str) -> None:
    keys = set(data)
    missing = [k for k in expected if k not in keys]
    unexpected = sorted(keys - set(expected) - set(optional))
    if missing or unexpected:
        raise CheckpointError(
            f"{what}: expected top-level keys {list(expected)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {unexpected}" if unexpected else "")
        )


def _processor_keys(
    config: AdapterConfig, state: State, what: str, rename=lambda param: param
) -> dict[str, torch.Tensor]:
    """``"{i}.{param}"`` → ``"attn_processors.<layer>.{rename(param)}"``."""
    out = {}
    bad = []
    for key, value in state.items():
        index, _, param = key.partition(".")
        if not index.isdigit() or int(index) >= len(config.layers) or not param:
            bad.append(key)
            continue
        layer = config.layers[int(index)].name.removesuffix(PROCESSOR_SUFFIX)
        out[f"attn_processors.{layer}.{rename(param)}"] = value
    if bad:
        raise CheckpointError(
            f"{what}: {len(bad)} keys are not '<layer index < {len(config.layers)}>.<name>': {bad[:5]}"
        )
    return out


def _multi_id_name(param: str) -> str:
    """The router file stores the multi-ID LoRA under the single-ID names (``to_q_lora.…``)."""
    if "_multi_id_lora." in param or "router" in param:
        return param
    return param.replace("_lora.", "_multi_id_lora.")


def published_to_named(
    config: AdapterConfig,
    faceid: Mapping[str, Any],
    router: Mapping[str, Any] | None = None,
    ip_adapter: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge the published files' contents into one named state dict for ``config``.

    Args:
        faceid: contents of ``uniportrait-faceid_sd15.bin`` (``faceid_proj``, ``faceid_adapter``).
        router: contents of ``uniportrait-router_sd15.bin`` (``faceid_adapter``), or None.
        ip_adapter: contents of ``ip-adapter_sd15.bin`` (``image_proj``, ``ip_adapter``), or None.
    """
    _groups(faceid, ("faceid_proj", "faceid_adapter"), (), FACEID_FILE)
    named = {f"qformer.{k}": v for k, v in faceid["faceid_proj"].items()}
    named.update(_processor_keys(config, faceid["faceid_adapter"], FACEID_FILE))
    if router is not None:
        _groups(router, ("faceid_adapter",), (), ROUTER_FILE)
        named.update(_processor_keys(config, router["faceid_adapter"], ROUTER_FILE, _multi_id_name))
    if ip_adapter is not None:
        _groups(ip_adapter, ("image_proj", "ip_adapter"), (), IP_ADAPTER_FILE)
        named.update({f"image_proj.{k}": v for k, v in ip_adapter["image_proj"].items()})
        named.update(_processor_keys(config, ip_adapter["ip_adapter"], IP_ADAPTER_FILE))
    return named


def named_to_published(adapter: UniPortraitAdapter) -> dict[str, dict[str, Any]]:
    """Export an adapter to the published layout: file name → contents (for ``torch.save``)."""
    faceid_proc: dict[str, torch.Tensor] = {}
    router_proc: dict[str, torch.Tensor] = {}
    ip_proc: dict[str, torch.Tensor] = {}
    for index, proc in enumerate(adapter.processors):
        for param, value in proc.state_dict().items():
            key = f"{index}.{param}"
            if "_multi_id_lora." in param:
                router_proc[key.replace("_multi_id_lora.", "_lora.")] = value
            elif "router" in param:
                router_proc[key] = value
            elif "_ip." in param:
                ip_proc[key] = value
            else:
                faceid_proc[key] = value
    files: dict[str, dict[str, Any]] = {
        FACEID_FILE: {"faceid_proj": dict(adapter.qformer.state_dict()), "faceid_adapter": faceid_proc}
    }
    if adapter.config.multi_id:
        files[ROUTER_FILE] = {"faceid_adapter": router_proc}
    if adapter.image_proj is not None:
        files[IP_ADAPTER_FILE] = {"image_proj": dict(adapter.image_proj.state_dict()), "ip_adapter": ip_proc}
    return files


def load_published_adapter(
    config: AdapterConfig,
    faceid: Mapping[str, Any],
    router: Mapping[str, Any] | None,
    ip_adapter: Mapping[str, Any] | None,
) -> UniPortraitAdapter:
    """Build an adapter for ``config`` and fill it strictly from published contents."""
    named = published_to_named(config, faceid, router, ip_adapter)
    adapter = UniPortraitAdapter.from_sizes(config)
    adapter.load_named_state_dict(named, "published UniPortrait weights")
    return adapter.eval()


def load_published_backbone(state: State, config: IRBackboneConfig | None = None) -> IRBackbone:
    backbone = IRBackbone.from_sizes(config or IRBackboneConfig.from_variant("ir101"))
    load_tface_state_dict(backbone, state)
    return backbone.eval()


def is_published_folder(folder: str | Path) -> bool:
    """A folder holding the published ``uniportrait-faceid_sd15.bin`` (and maybe the others)."""
    return (Path(folder) / FACEID_FILE).is_file()


def read_published_folder(folder: str | Path, configs_for, ip_adapter=None, folder_ip: bool = True):
    """(adapter, backbone or None) from a folder of the published ``.bin`` files.

    ``configs_for(published, with_ip)`` gives the (:class:`AdapterConfig`, backbone config or
    None) to read them with (the layer list of the UNet they are for). ``ip_adapter``:
    ``ip-adapter_sd15.bin`` contents; without it, the folder's own copy when ``folder_ip``.
    """
    folder = Path(folder)
    published = {FACEID_FILE: read_bin(folder / FACEID_FILE)}
    for name in (ROUTER_FILE, BACKBONE_FILE):
        if (folder / name).is_file():
            published[name] = read_bin(folder / name)
        else:
            logger.warning("%s not found in %s: reading without it", name, folder)
    if ip_adapter is None and folder_ip and (folder / IP_ADAPTER_FILE).is_file():
        ip_adapter = read_bin(folder / IP_ADAPTER_FILE)
    adapter_config, backbone_config = configs_for(published, ip_adapter is not None)
    adapter = load_published_adapter(
        adapter_config, published[FACEID_FILE], published.get(ROUTER_FILE), ip_adapter
    )
    backbone = None
    if BACKBONE_FILE in published:
        backbone = load_published_backbone(published[BACKBONE_FILE], backbone_config)
    return adapter, backbone
