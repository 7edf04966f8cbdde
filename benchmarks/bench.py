"""Benchmark: what identity conditioning costs per denoising step, and the rest of a generation.

    python benchmarks/bench.py --out outputs/bench          # a few minutes on 2 CPU cores
    python benchmarks/bench.py --out outputs/bench --quick  # fewer rounds, no unfused rows
    python benchmarks/bench.py --device cuda                # on a GPU, float16 by default

Everything is built from configs with random weights (nothing is downloaded):

1. UNet step: the SD1.5 UNet at 256×256 (32×32 latents), batch 2 (the two halves of CFG),
   with diffusers' plain ``AttnProcessor2_0`` and with the UniPortrait adapter (rank-128 LoRA,
   published sizes) for 0/1/2/4 identities, and (unless ``--quick``) the adapter with its LoRA
   applied as separate low-rank products, i.e. what fusing buys. Configurations are
   interleaved round by round, after a warm-up step each; medians of wall-clock and process
   CPU time are reported, and ratios to the plain step of the same run.
2. Memory: UNet weights, adapter weights, the fused LoRA set (extra memory of fusing), peak RSS.
3. Identity encoding: IR-101 + a ViT-H/14-sized CLIP vision tower on one aligned face crop.
4. End to end: a tiny-preset generation (256×256, 25 steps, CFG) with 0/1/2 identities.

Writes ``bench.json`` and ``bench.md`` to ``--out``, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
VIT_H = {
    "hidden_size": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "intermediate_size": 5120,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
LORA_SETS = {0: "none", 1: "single", 2: "multi", 4: "multi"}
ID_COUNTS = (0, 1, 2, 4)


# -- timing -----------------------------------------------------------------------------------------


class Timer:
    """Wall-clock and process CPU seconds of ``fn()``, synchronising CUDA when needed."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn: Callable[[], object]) -> tuple[float, float]:
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.sync()
        return time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak RSS, and on CUDA the peak of allocated device memory (MiB)."""
    out = {"peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


# -- 1. UNet step ---------------------------------------------------------------------------------------


def build_unet_and_adapter(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The SD1.5 UNet architecture and a published-size adapter, random weights."""
    from diffusers import UNet2DConditionModel

    from uniportrait.models.adapter import AdapterConfig, UniPortraitAdapter
    from uniportrait.models.qformer import QFormerConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(SD15_UNET).eval()
        adapter = UniPortraitAdapter.from_sizes(
            AdapterConfig.from_unet(unet, QFormerConfig(dim=768), lora_rank=128)
        )
        for name, param in adapter.named_parameters():
            if name.endswith("up.weight"):  # zero-initialised; a trained LoRA is not
                torch.nn.init.normal_(param, std=1e-3)
    if dtype != torch.float32:  # diffusers warns about any dtype cast, even a no-op
        unet = unet.to(dtype=dtype)
    return unet.to(device), adapter.to(device, dtype).eval()


def id_tokens(n_ids: int, device, dtype, seed: int = 1) -> torch.Tensor | None:
    """(2, N, 16, 768) as the pipeline lays them out: the unconditional half (row 0) gives every
    identity the same 'no identity' tokens, the conditional half one set per identity."""
    if n_ids == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    uncond = torch.randn(1, 1, 16, 768, generator=g).expand(1, n_ids, -1, -1)
    cond = torch.randn(1, n_ids, 16, 768, generator=g)
    return torch.cat([uncond, cond]).to(device, dtype)


def bench_unet(args, device, dtype, timer: Timer) -> dict:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from uniportrait.models.attention import AttachedProcessor, AttentionCall
    from uniportrait.models.fusion import fusable_layers, fuse_lora

    t0 = time.perf_counter()
    unet, adapter = build_unet_and_adapter(device, dtype)
    print(f"built the SD1.5 UNet and adapter in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    unet_bytes = nbytes(unet.parameters())
    adapter_bytes = nbytes(adapter.parameters())

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 32, 32, generator=g).to(device, dtype)  # 256×256 px, CFG halves
    text = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    timestep = torch.tensor(500, device=device)

    # One AttentionCall per configuration, reused across its steps as the pipeline does.
    adapter.attach(unet)
    layers = fusable_layers(unet, adapter)
    fused, fuse_seconds = {}, {}
    for which in ("single", "multi"):  # what a call pays when the set or the scale changes
        t0 = time.perf_counter()
        fused[which] = fuse_lora(layers, which, 1.0)
        fuse_seconds[which] = time.perf_counter() - t0
    configs: dict[str, AttentionCall | None] = {"plain": None}
    for n in ID_COUNTS:
        configs[f"adapter-{n}"] = AttentionCall(
            id_tokens=id_tokens(n, device, dtype),
            lora=LORA_SETS[n],
            latent_hw=(32, 32),
            fused=fused.get(LORA_SETS[n]),
            shared_rows=1,  # as the pipeline says: row 0 is CFG's unconditional half
        )
    if args.unfused:
        for n in ID_COUNTS[1:]:
            configs[f"unfused-{n}"] = AttentionCall(
                id_tokens=id_tokens(n, device, dtype), lora=LORA_SETS[n], latent_hw=(32, 32), shared_rows=1
            )

    plain = AttnProcessor2_0()
    # What adapter.attach installs: handles to the adapter's processors.
    processors = {layer.name: AttachedProcessor(p) for layer, p in zip(adapter.layers, adapter.processors)}

    def step(name: str) -> Callable[[], object]:
        call = configs[name]
        unet.set_attn_processor(plain if call is None else dict(processors))  # it empties the dict
        kwargs = None if call is None else {"uniportrait": call}
        return lambda: unet(latents, timestep, encoder_hidden_states=text, cross_attention_kwargs=kwargs)

    names = list(configs)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    load = [load_average()]
    with torch.inference_mode():
        for name in names:  # warm-up (and the first-step per-call work, e.g. identity keys/values)
            timer(step(name))
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed neighbour
            for name in order:
                w, c = timer(step(name))
                wall[name].append(w)
                cpu[name].append(c)
            print(
                f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {wall[n][-1]:.2f}s" for n in names),
                file=sys.stderr,
            )
    load.append(load_average())

    fused_bytes = {which: f.nbytes for which, f in fused.items()}
    med_wall = {n: statistics.median(v) for n, v in wall.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    return {
        "resolution": "256x256 (32x32 latents), batch 2",
        "rounds": args.rounds,
        "median_wall_s": med_wall,
        "median_cpu_s": med_cpu,
        "ratio_wall": {n: med_wall[n] / med_wall["plain"] for n in names},
        "ratio_cpu": {n: med_cpu[n] / med_cpu["plain"] for n in names},
        "paired_ratio_wall": {
            n: statistics.median(a / b for a, b in zip(wall[n], wall["plain"])) for n in names
        },
        "runs_wall_s": wall,
        "runs_cpu_s": cpu,
        "load_average": load,
        "fuse_build_s": fuse_seconds,
        "memory": {
            "unet_weights_bytes": unet_bytes,
            "adapter_weights_bytes": adapter_bytes,
            "fused_set_bytes": fused_bytes,
            "fused_set_fraction_of_unet": {k: v / unet_bytes for k, v in fused_bytes.items()},
            **peak_memory(device),
        },
    }


# -- 3. identity encoding --------------------------------------------------------------------------------


def bench_identity(args, device, dtype, timer: Timer) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from uniportrait.identity import encode_face_features
    from uniportrait.models.face_backbone import IRBackbone, IRBackboneConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = IRBackbone.from_sizes(IRBackboneConfig.from_variant("ir101")).eval().to(device, dtype)
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).eval().to(device, dtype)
    crop = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    runs = [timer(lambda: encode_face_features(backbone, clip, crop)) for _ in range(1 + args.repeats)][1:]
    return {
        "backbone": "IR-101",
        "clip": "ViT-H/14-sized (hidden 1280, 32 layers)",
        "median_wall_s": statistics.median(w for w, _ in runs),
        "median_cpu_s": statistics.median(c for _, c in runs),
        "runs_wall_s": [w for w, _ in runs],
        **peak_memory(device),
    }


# -- 4. end to end ----------------------------------------------------------------------------------------


def bench_tiny_pipeline(args, device, timer: Timer) -> dict:
    from uniportrait.presets import build_tiny_pipeline

    pipe = build_tiny_pipeline(0).to(device)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    crops = [torch.rand(3, 224, 224, generator=g) for _ in range(2)]
    t0 = time.perf_counter()
    identities = [pipe.encode_identity(crop) for crop in crops]  # once; reused by every generation
    encode_s = (time.perf_counter() - t0) / len(crops)
    out = {"steps": 25, "size": "256x256", "encode_identity_s": encode_s, "generation_s": {},
           "identity_guidance_s": {}}  # fmt: skip
    # the usual guidance with 0, 1, 2 identities; then the people guided apart (a third UNet pass)
    for n, guided in ((0, None), (1, None), (2, None), (1, 10.0), (2, 10.0)):

        def generate(n: int = n, guided: float | None = guided) -> None:
            pipe("a photo of a person", identities=identities[:n], num_inference_steps=25, height=256, width=256,
                 generator=torch.Generator().manual_seed(0), output_type="np",
                 identity_guidance_scale=guided)  # fmt: skip

        runs = [timer(generate) for _ in range(1 + args.repeats)][1:]
        out["identity_guidance_s" if guided else "generation_s"][str(n)] = statistics.median(
            w for w, _ in runs
        )
    out.update(peak_memory(device))
    return out


# -- report -----------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['nproc']} cores (torch threads {m['torch_threads']}), torch {m['torch']}, "
        f"diffusers {m['diffusers']}, device {result['device']}, {result['dtype']}.",
    ]
    if "unet_step" in result:
        lines += unet_markdown(result["unet_step"])
    if "identity" in result:
        i = result["identity"]
        lines += ["", f"Identity encoding ({i['backbone']} + {i['clip']}, one crop): {i['median_wall_s']:.2f} s "
                  f"(CPU {i['median_cpu_s']:.2f} s); peak RSS {i['peak_rss_mib']:.0f} MiB."]  # fmt: skip
    if "tiny_pipeline" in result:
        t = result["tiny_pipeline"]

        def times(key: str) -> str:
            return ", ".join(f"{n} identities {s:.2f} s" for n, s in t.get(key, {}).items())

        gens, guided = times("generation_s"), times("identity_guidance_s")
        lines += ["", f"Tiny preset end to end ({t['size']}, {t['steps']} steps, CFG): encode an identity "
                  f"{t['encode_identity_s']:.3f} s; generate: {gens}; with the people guided apart "
                  f"(identity_guidance_scale, a third UNet pass): {guided}; peak RSS {t['peak_rss_mib']:.0f} MiB."]  # fmt: skip
    return "\n".join(lines) + "\n"


def unet_markdown(u: dict) -> list[str]:
    labels = {
        "plain": "plain AttnProcessor2_0",
        "adapter": "UniPortrait, LoRA fused",
        "unfused": "UniPortrait, LoRA unfused",
    }
    lines = [
        "",
        f"UNet step, SD1.5 architecture, {u['resolution']}, median of {u['rounds']} interleaved rounds "
        f"(load average {u['load_average'][0]} → {u['load_average'][1]}):",
        "",
        "| attention | identities | wall s | ratio | CPU s | CPU ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name in u["median_wall_s"]:
        kind, _, n = name.partition("-")
        lines.append(
            f"| {labels[kind]} | {n or '-'} | {u['median_wall_s'][name]:.3f} | {u['ratio_wall'][name]:.3f} | "
            f"{u['median_cpu_s'][name]:.3f} | {u['ratio_cpu'][name]:.3f} |"
        )
    mem, gib = u["memory"], 1024**3
    fused = "; ".join(
        f"fused {k} set {v / gib:.2f} GiB ({100 * mem['fused_set_fraction_of_unet'][k]:.1f}% of the UNet)"
        for k, v in mem["fused_set_bytes"].items()
    )
    build = ", ".join(f"{k} {v:.2f} s" for k, v in u["fuse_build_s"].items())
    lines += [
        "",
        f"Memory: UNet weights {mem['unet_weights_bytes'] / gib:.2f} GiB, adapter "
        f"{mem['adapter_weights_bytes'] / gib:.2f} GiB; {fused}. Building a fused set (once per set and "
        f"scale): {build}. Peak RSS after the UNet part: {mem['peak_rss_mib']:.0f} MiB.",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1 repeat, no unfused rows")
    parser.add_argument("--rounds", type=int, default=None, help="UNet-step rounds (default 7; quick 3)")
    parser.add_argument("--repeats", type=int, default=None, help="encoding / end-to-end repeats (default 3)")
    parser.add_argument("--unfused", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the adapter with unfused LoRA (default: on unless --quick)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    parser.add_argument(
        "--only", choices=("unet", "identity", "tiny"), action="append", help="run only these parts"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.unfused = (not args.quick) if args.unfused is None else args.unfused
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    parts = set(args.only or ("unet", "identity", "tiny"))
    timer = Timer(device)

    result: dict = {"machine": machine(), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                    "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])])}  # fmt: skip
    started = time.perf_counter()
    if "unet" in parts:
        result["unet_step"] = bench_unet(args, device, dtype, timer)
    if "identity" in parts:
        result["identity"] = bench_identity(args, device, dtype, timer)
    if "tiny" in parts:
        result["tiny_pipeline"] = bench_tiny_pipeline(args, device, timer)
    result["total_s"] = time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (args.out / "bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
