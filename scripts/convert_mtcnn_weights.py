"""Convert facenet-pytorch's MTCNN state dicts to the safetensors file shipped in the package.

The PyPI package ``facenet-pytorch`` (MIT licence) ships the P-, R- and O-Net weights as three
PyTorch state-dict files, ``facenet_pytorch/data/{pnet,rnet,onet}.pt``. This script reads them with
``weights_only=True`` and writes one file, ``src/uniportrait/assets/mtcnn/mtcnn.safetensors``, with
the keys prefixed ``pnet.``, ``rnet.``, ``onet.`` and the source files' SHA-256 in its metadata. It
checks every key and shape against :class:`uniportrait.faces.mtcnn.MTCNNNets` (strict), and that
the written file loads back identically.

Getting the source files without installing the package (it pins an old torch)::

    pip download --no-deps facenet-pytorch==2.6.0 -d /tmp/fnp
    cd /tmp/fnp && unzip -q facenet_pytorch-2.6.0-py3-none-any.whl 'facenet_pytorch/data/*'

Usage: python scripts/convert_mtcnn_weights.py /tmp/fnp/facenet_pytorch/data [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from uniportrait.faces.mtcnn import MTCNNNets, weights_path

NETS = ("pnet", "rnet", "onet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data_dir", type=Path, help="facenet_pytorch/data (with pnet.pt, rnet.pt, onet.pt)")
    parser.add_argument("--out", type=Path, default=weights_path())
    args = parser.parse_args()

    expected = MTCNNNets().state_dict()
    tensors, metadata = (
        {},
        {"origin": "facenet-pytorch 2.6.0 (PyPI), facenet_pytorch/data/*.pt", "license": "MIT"},
    )
    for net in NETS:
        source = args.data_dir / f"{net}.pt"
        metadata[f"sha256_{net}.pt"] = hashlib.sha256(source.read_bytes()).hexdigest()
        state = torch.load(source, map_location="cpu", weights_only=True)
        for key, tensor in state.items():
            tensors[f"{net}.{key}"] = tensor.detach().to(torch.float32).contiguous()
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise SystemExit(f"key mismatch: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise SystemExit(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=metadata)
    reloaded = load_file(str(args.out))
    assert all(torch.equal(reloaded[k], tensors[k]) for k in tensors)
    MTCNNNets.from_file(args.out)  # strict load
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(tensors)} tensors)")
    for key in sorted(k for k in metadata if k.startswith("sha256")):
        print(f"  {key}: {metadata[key]}")


if __name__ == "__main__":
    main()
