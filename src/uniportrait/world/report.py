"""``uniportrait world report``: the numbers of ``docs/world.md``, measured on held-out identities
and captions: the oracles, the VAE, and the base model next to the renders themselves (the ceiling).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from uniportrait.evaluation.prompt_following import Read, summarize_reads
from uniportrait.world.faces import aligned_crops
from uniportrait.world.traits import (
    CONTINUOUS_TRAITS,
    DISCRETE_TRAITS,
    PERSON_ATTRIBUTES,
    SCENE_ATTRIBUTES,
    Traits,
)

logger = logging.getLogger(__name__)

#: Files of ``<work>/data`` the report reads (written by ``world build``'s render and crops stages).
REPORT_INPUTS = ("singles_val.npz", "groups_val.npz", "crops_val.npz")


# -- generic measures -------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney rank statistic; float scores, ties negligible)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    pos = labels.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def tar_at_far(scores: np.ndarray, labels: np.ndarray, far: float) -> tuple[float, float]:
    """(true accept rate, threshold) at the given false accept rate."""
    neg = np.sort(scores[~labels.astype(bool)])[::-1]
    k = max(0, int(np.floor(far * len(neg))) - 1)
    threshold = neg[k] if len(neg) else 1.0
    return float((scores[labels.astype(bool)] > threshold).mean()), float(threshold)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, 4) × (B, 4) → (A, B) IoU."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def match_faces(truth: np.ndarray, found: np.ndarray, min_iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matching of true and found boxes by IoU: [(true index, found index)]."""
    iou = box_iou(truth, found)
    pairs = []
    while iou.size and iou.max() >= min_iou:
        i, j = np.unravel_index(iou.argmax(), iou.shape)
        pairs.append((int(i), int(j)))
        iou[i, :], iou[:, j] = -1, -1
    return pairs


# -- oracles ----------------------------------------------------------------------------------------


def oracle_report(oracles, data_dir: Path) -> dict:
    from uniportrait.world.data import load_set

    out: dict = {}
    with np.load(data_dir / "crops_val.npz") as f:
        crops = {k: f[k] for k in f.files}
    desc = oracles.describe_crops(crops["crops"])
    out["recogniser"] = verification(desc["embedding"], crops["labels"])
    out["traits"] = trait_accuracy(desc["traits"], crops["traits"])
    # detector + attributes on held-out singles and groups
    det, person_true, person_pred = {}, [], []
    scene_true, scene_pred = [], []
    for name in ("singles_val", "groups_val"):
        data = load_set(data_dir / f"{name}.npz")
        found_all, matched, lm_err, fps = 0, 0, [], 0
        for k in range(len(data["images"])):
            n = int(data["num_people"][k])
            truth = data["boxes"][k, :n]
            faces = oracles.detect(data["images"][k])
            found = np.array([f.box for f in faces]).reshape(-1, 4)
            pairs = match_faces(truth, found)
            found_all += n
            matched += len(pairs)
            fps += len(faces) - len(pairs)
            for i, j in pairs:
                lm_err.append(np.linalg.norm(faces[j].landmarks - data["landmarks"][k, i], axis=-1).mean())
        lm_err = np.array(lm_err)
        det[name] = {
            "faces": found_all,
            "recall_iou_0.5": matched / found_all,
            "false_positives_per_picture": fps / len(data["images"]),
            "landmark_error_px_mean": float(lm_err.mean()) if len(lm_err) else None,
            "faces_with_landmark_error_below_1.5px": float((lm_err < 1.5).mean()) if len(lm_err) else None,
        }
        pairs = np.array(
            [(i, p) for i in range(len(data["images"])) for p in range(int(data["num_people"][i]))]
        )
        pred = oracles.person_attributes(data["images"][pairs[:, 0]], data["boxes"][pairs[:, 0], pairs[:, 1]])
        person_pred.append(np.stack([pred[a] for a in PERSON_ATTRIBUTES], 1))
        person_true.append(data["person_attrs"][pairs[:, 0], pairs[:, 1]])
        spred = oracles.scene_attributes(data["images"])
        scene_pred.append(np.stack([spred[a] for a in SCENE_ATTRIBUTES], 1))
        scene_true.append(data["scene_attrs"])
    out["detector"] = det
    pt, pp = np.concatenate(person_true), np.concatenate(person_pred)
    st, sp = np.concatenate(scene_true), np.concatenate(scene_pred)
    out["attributes"] = {
        **{a: float((pt[:, k] == pp[:, k]).mean()) for k, a in enumerate(PERSON_ATTRIBUTES)},
        **{a: float((st[:, k] == sp[:, k]).mean()) for k, a in enumerate(SCENE_ATTRIBUTES)},
    }
    return out


def trait_accuracy(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Per discrete trait: accuracy; per continuous trait: mean absolute error (traits in [0, 1])."""
    n = len(CONTINUOUS_TRAITS)
    out = {
        f"{name} (MAE)": float(np.abs(pred[:, k] - truth[:, k]).mean())
        for k, name in enumerate(CONTINUOUS_TRAITS)
    }
    start = n
    for name, values in DISCRETE_TRAITS.items():
        sl = slice(start, start + len(values))
        out[f"{name} (accuracy)"] = float((pred[:, sl].argmax(1) == truth[:, sl].argmax(1)).mean())
        start += len(values)
    return out


@torch.no_grad()
def verification(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """ROC AUC and TAR at FAR 1e-3 of all pairs of (N, E) L2-normalised embeddings."""
    sim = embeddings @ embeddings.T
    iu = np.triu_indices(len(labels), 1)
    scores, same = sim[iu], (labels[:, None] == labels[None, :])[iu]
    tar, thr = tar_at_far(scores, same, 1e-3)
    return {
        "faces": int(len(labels)),
        "identities": int(len(np.unique(labels))),
        "pairs": int(len(scores)),
        "roc_auc": roc_auc(scores, same),
        "tar_at_far_1e-3": tar,
        "threshold_at_far_1e-3": thr,
        "mean_sim_same": float(scores[same].mean()),
        "mean_sim_different": float(scores[~same].mean()),
    }


@torch.no_grad()
def backbone_report(backbone, data_dir: Path) -> dict:
    """The world's face backbone (UniPortrait's, not an oracle) as a recogniser on held-out faces."""
    import torch.nn.functional as F

    from uniportrait.world.train_base import to_pixels

    with np.load(data_dir / "crops_val.npz") as f:
        crops, labels = f["crops"], f["labels"]
    emb = torch.cat([backbone(to_pixels(crops[k : k + 256])).embedding for k in range(0, len(crops), 256)])
    return verification(F.normalize(emb.float(), dim=-1).numpy(), labels)


# -- VAE --------------------------------------------------------------------------------------------


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 200) -> np.ndarray:
    """(N, H, W, 3) uint8 pictures encoded (posterior mean) and decoded by ``vae``, as uint8: the
    most a base model on that VAE's latents can show of them (the base table's "through the VAE")."""
    from uniportrait.world.train_base import from_pixels, to_pixels

    param = next(vae.parameters())
    out = []
    for k in range(0, len(images), batch):
        x = to_pixels(images[k : k + batch]).to(param.device, param.dtype)
        out.append(from_pixels(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


@torch.no_grad()
def vae_report(vae, oracles, data_dir: Path, count: int = 600) -> dict:
    from uniportrait.world.data import load_set
    from uniportrait.world.identity_report import trait_agreement_shares
    from uniportrait.world.train_base import from_pixels, to_pixels

    data = load_set(data_dir / "singles_val.npz")
    count = min(count, len(data["images"]))
    images = data["images"][:count]
    x = to_pixels(images)
    dist = vae.encode(x).latent_dist
    scale = vae.config.scaling_factor
    rec = vae.decode(dist.mean).sample.clamp(-1, 1)
    mse = ((rec - x) ** 2).mean(dim=(1, 2, 3))
    psnr = (10 * torch.log10(4.0 / mse)).numpy()
    z1, z2 = dist.sample(), dist.sample()
    corr = float(torch.corrcoef(torch.stack([z1.flatten(), z2.flatten()]))[0, 1])
    rec_u8 = from_pixels(rec)
    # Face Sim against another render of the same identity, for the render and its reconstruction
    idents = data["identities"][:count, 0]
    refs = reference_index(data["identities"][:, 0], np.arange(count))

    def describe(imgs: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
        return oracles.describe_crops(aligned_crops(imgs, data["landmarks"][idx, 0]))

    ref_emb = describe(data["images"][refs], refs)["embedding"]
    seen_render, seen_rec = describe(images, np.arange(count)), describe(rec_u8, np.arange(count))
    sim_render = (seen_render["embedding"] * ref_emb).sum(1)
    sim_rec = (seen_rec["embedding"] * ref_emb).sum(1)
    people = [Traits.of(int(i)).vector() for i in idents]
    return {
        "pictures": int(count),
        "identities": int(len(np.unique(idents))),
        "psnr_db_mean": float(psnr.mean()),
        "psnr_db_min": float(psnr.min()),
        "posterior_std_scaled_mean": float((dist.std * scale).mean()),
        "latent_sample_correlation": corr,
        "face_sim_render_to_reference": float(sim_render.mean()),
        "face_sim_reconstruction_to_reference": float(sim_rec.mean()),
        "face_sim_ratio": float(sim_rec.mean() / sim_render.mean()),
        # per trait, the share of faces the trait regressor reads as their person's (what any
        # picture through this VAE can show at most; the identity report's trait agreement)
        "trait_agreement_render": trait_agreement_shares(seen_render["traits"], people),
        "trait_agreement_reconstruction": trait_agreement_shares(seen_rec["traits"], people),
    }


def reference_index(identities: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """For each row, another row showing the same identity (the next one, cyclically)."""
    out = np.zeros(len(rows), np.int64)
    for k, r in enumerate(rows):
        same = np.flatnonzero(identities == identities[r])
        others = same[same != r]
        out[k] = others[0] if len(others) else r
    return out


# -- base model -------------------------------------------------------------------------------------


def held_out_specs(
    count: int,
    num_people: int,
    seed: int,
    identities: int = 200,
    framing: str = "wide",
    held_out: bool = True,
):
    """Scenes of the first ``identities`` held-out identities with fresh captions, faces drawn at
    ``framing``. ``held_out=False``: of the first training identities instead (the same scenes and
    captions), to ask how well a model draws people it trained on."""
    from uniportrait.world.scenes import caption, identity_number, sample_spec

    rng = np.random.default_rng([seed, num_people, 7])
    specs, captions = [], []
    for _ in range(count):
        picked = rng.choice(identities, num_people, replace=False)
        idents = [identity_number(int(i), held_out) for i in picked]
        spec = sample_spec(rng, idents, seed=int(rng.integers(1 << 31)), framing=framing)
        specs.append(spec)
        captions.append(caption(spec, rng))
    return specs, captions


def read_asked(oracles, image: np.ndarray, asked: dict, faces, scene_pred: dict | None = None) -> list[Read]:
    """``(attribute, asked value, read value)`` for every attribute ``asked`` names (the layout of
    :meth:`~uniportrait.world.scenes.SceneSpec.requested`), read by the oracles in one picture:
    the scene's always; a person's on the n best ``faces`` left to right (people left to right),
    where at least n (the people asked about) are found. ``scene_pred``: the scene classifier's
    reads of this picture, when the caller has them already."""
    if scene_pred is None:
        scene_pred = {name: int(v[0]) for name, v in oracles.scene_attributes(image[None]).items()}
    reads = [(name, value, int(scene_pred[name])) for name, value in asked["scene"].items()]
    n = len(asked["people"])
    faces_lr = sorted(faces[:n], key=lambda f: f.box[0])
    if len(faces_lr) == n and any(asked["people"]):
        pred = oracles.person_attributes(np.repeat(image[None], n, 0), np.array([f.box for f in faces_lr]))
        for i in range(n):
            reads.extend((name, value, int(pred[name][i])) for name, value in asked["people"][i].items())
    return reads


def attribute_reads(oracles, images: np.ndarray, specs, detections) -> list[Read]:
    """:func:`read_asked` for every picture and what the caption of its spec asks for.
    ``detections``: the oracle's faces in each picture."""
    scene_pred = oracles.scene_attributes(images)
    reads = []
    for k, (image, spec, faces) in enumerate(zip(images, specs, detections)):
        mine = {name: int(v[k]) for name, v in scene_pred.items()}
        reads.extend(read_asked(oracles, image, spec.requested(), faces, mine))
    return reads


def measure_pictures(oracles, images: np.ndarray, specs, reference_embeddings, detections=None) -> dict:
    """Face count, prompt following and identity similarity of pictures made for ``specs``.

    ``reference_embeddings[k]`` is the (P, E) embedding of each person's reference render: the
    "own identity" similarity compares a face with its own person's reference (meaningful for
    renders, chance for an unconditioned model); "random" compares with another picture's people.
    ``detections``: the oracle's faces in each picture, when the caller has them already.

    Prompt following is the share of asked attributes read as asked (every ask counts once), and
    its balanced form the mean over attributes of :func:`~uniportrait.evaluation.prompt_following.balanced_accuracy`, which a model cannot
    raise by drawing each attribute's most common value (e.g. "no sunglasses", 80% of asks).
    """
    n_right = 0
    own, rand = [], []
    rng = np.random.default_rng(0)
    if detections is None:
        detections = [oracles.detect(image) for image in images]
    following = summarize_reads(attribute_reads(oracles, images, specs, detections))
    for k, (image, spec, faces) in enumerate(zip(images, specs, detections)):
        n = len(spec.people)
        n_right += len(faces) == n
        faces_lr = sorted(faces[:n], key=lambda f: f.box[0])  # as read_asked pairs them
        if len(faces_lr) == n:
            emb = oracles.describe(image, faces_lr)["embedding"]
            own.extend((emb * reference_embeddings[k]).sum(1))
            other = reference_embeddings[(k + 1 + rng.integers(len(specs) - 1)) % len(specs)]
            rand.extend(emb @ other[rng.integers(len(other))])
    return {
        "pictures": len(specs),
        "exact_face_count_rate": n_right / len(specs),
        # how many faces the pictures show: {"0": share, "1": share, ...} (the misses' kind)
        "face_count_shares": {
            str(c): float(np.mean([len(f) == c for f in detections]))
            for c in sorted({len(f) for f in detections})
        },
        "prompt_following": following["prompt_following"] or 0.0,
        "prompt_following_by_attribute": following["prompt_following_by_attribute"],
        "prompt_following_balanced": following["prompt_following_balanced"] or 0.0,
        "prompt_following_balanced_by_attribute": following["prompt_following_balanced_by_attribute"],
        "face_sim_own_reference": float(np.mean(own)) if own else None,
        "face_sim_random_reference": float(np.mean(rand)) if rand else None,
    }


def reference_embeddings(oracles, specs, seed: int = 99, framing: str = "wide") -> list[np.ndarray]:
    """Per spec, (P, E): each person rendered again in another random scene, embedded."""
    from uniportrait.world.scenes import sample_spec

    rng = np.random.default_rng(seed)
    out = []
    for spec in specs:
        embs = []
        for person in spec.people:
            ref = sample_spec(
                rng, [person.identity], seed=int(rng.integers(1 << 31)), framing=framing
            ).render()
            embs.append(
                oracles.describe_crops(aligned_crops(ref.image[None], ref.landmarks[:1]))["embedding"][0]
            )
        out.append(np.stack(embs))
    return out


@torch.no_grad()
def generate(
    pipe,
    captions: list[str],
    seed: int,
    steps: int = 25,
    guidance: float = 7.5,
    batch: int = 50,
    size=(64, 64),
):
    """Pictures from a diffusers text-to-image pipeline, (N, H, W, 3) uint8."""
    images = []
    for k in range(0, len(captions), batch):
        gen = torch.Generator().manual_seed(seed + k)
        out = pipe(
            captions[k : k + batch],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            height=size[1],
            width=size[0],
            output_type="np",
        )
        images.append((out.images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(images)


def base_pipeline(base_dir: Path):
    """The world's base model as diffusers' own StableDiffusionPipeline (float32, CPU)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        base_dir,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        dtype=torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_base(base_dir: Path, unet, dest: Path) -> Path:
    """A base folder at ``dest``: ``base_dir`` with ``unet`` (saved in its own dtype) in place of
    its UNet, written whole and then moved in place, so a stopped run leaves no half-written base."""
    import shutil

    from uniportrait.atomic import atomic_directory

    base_dir = Path(base_dir)
    with atomic_directory(dest) as tmp:
        skip_unet = lambda folder, names: ["unet"] if Path(folder) == base_dir else []  # noqa: E731
        shutil.copytree(base_dir, tmp, dirs_exist_ok=True, ignore=skip_unet)
        unet.save_pretrained(tmp / "unet")
    return Path(dest)


def base_report(
    pipe,
    oracles,
    singles: int = 200,
    groups: int = 60,
    seeds=(0, 1, 2),
    guidance: float = 7.5,
    framing: str = "wide",
) -> dict:
    out: dict = {"guidance": guidance}
    for n, count in ((1, singles), (2, groups)):
        specs, captions = held_out_specs(count, n, seed=5, framing=framing)
        refs = reference_embeddings(oracles, specs, framing=framing)
        renders = np.stack([s.render().image for s in specs])
        key = "single" if n == 1 else "two_people"
        out[f"renders_{key}"] = measure_pictures(oracles, renders, specs, refs)
        out[f"through_vae_{key}"] = measure_pictures(oracles, vae_round_trip(pipe.vae, renders), specs, refs)
        runs = []
        for seed in seeds:
            images = generate(pipe, captions, seed, guidance=guidance, size=(specs[0].width, specs[0].height))
            runs.append(measure_pictures(oracles, images, specs, refs))
        out[f"base_{key}"] = summarise_runs(runs)
    return out


GUIDANCE_SWEEP = (1.5, 2.0, 3.0, 4.5, 7.5)


def guidance_sweep(pipe, oracles, scales=GUIDANCE_SWEEP, singles: int = 200, seed: int = 0) -> list[dict]:
    """One-face rate and prompt following of portraits (held-out captions, one seed) per CFG scale."""
    specs, captions = held_out_specs(singles, 1, seed=5)
    refs = reference_embeddings(oracles, specs)
    rows = []
    for scale in scales:
        m = measure_pictures(oracles, generate(pipe, captions, seed, guidance=scale), specs, refs)
        rows.append({"guidance": scale, **{k: m[k] for k in ("exact_face_count_rate", "prompt_following")}})
        logger.info("guidance %.1f: %s", scale, json.dumps(rows[-1]))
    return rows


def summarise_runs(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every number in ``runs``."""
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and value is not None:
            vals = np.array([r[key] for r in runs], dtype=float)
            out[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        elif isinstance(value, dict):
            out[key] = {k: float(np.mean([r[key][k] for r in runs if k in r[key]])) for k in value}
    out["seeds"] = len(runs)
    return out


def base_contact_sheets(pipe, out: Path, seed: int = 0, guidance: float = 7.5) -> None:
    """``out/base_singles.png`` (24 held-out portraits) and ``out/base_groups.png`` (12 two-person
    pictures) of a base pipeline: the sheets the base-model section shows."""
    _, captions = held_out_specs(24, 1, seed=11)
    contact_sheet(generate(pipe, captions, seed=seed, guidance=guidance), captions, out / "base_singles.png")
    _, captions = held_out_specs(12, 2, seed=12)
    pictures = generate(pipe, captions, seed=seed, guidance=guidance, size=(128, 64))
    contact_sheet(pictures, captions, out / "base_groups.png", columns=4)


def contact_sheet(
    images: np.ndarray, captions: list[str], path: Path, columns: int = 6, scale: int = 3
) -> Path:
    """Pictures with their captions underneath (wrapped), as one PNG."""
    import textwrap

    from PIL import Image, ImageDraw

    h, w = images.shape[1:3]
    cell_w, text_h = w * scale, 64
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * (h * scale + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (image, text) in enumerate(zip(images, captions)):
        x, y = (k % columns) * cell_w, (k // columns) * (h * scale + text_h)
        sheet.paste(Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.NEAREST), (x, y))
        lines = textwrap.wrap(text, width=max(20, cell_w // 6))[:5]
        draw.multiline_text((x + 2, y + h * scale + 1), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


REPORT_SECTIONS = ("oracles", "vae", "backbone", "base")


def run_report(
    work: Path,
    assets: Path,
    out: Path,
    quick: bool = False,
    guidance: float = 7.5,
    sections: tuple[str, ...] = REPORT_SECTIONS,
    base: Path | None = None,
) -> dict:
    """Measure ``sections`` (default all); write ``out/report.json`` and the contact sheets.
    ``base``: the base-model folder to measure (default ``assets/base``)."""
    from diffusers import AutoencoderKL

    from uniportrait.world.oracles import WorldOracles

    oracles = WorldOracles(assets / "oracles")
    out.mkdir(parents=True, exist_ok=True)
    data_dir = work / "data"
    base = assets / "base" if base is None else base
    report: dict = {}
    if "oracles" in sections:
        report["oracles"] = oracle_report(oracles, data_dir)
        logger.info("oracles: %s", json.dumps(report["oracles"]["recogniser"]))
    if "vae" in sections:
        vae = AutoencoderKL.from_pretrained(base / "vae", dtype=torch.float32).eval()
        report["vae"] = vae_report(vae, oracles, data_dir)
        logger.info("vae: %s", json.dumps(report["vae"]))
    if "backbone" in sections:
        from uniportrait.models.face_backbone import IRBackbone

        report["face_backbone"] = backbone_report(
            IRBackbone.from_pretrained(assets / "face_backbone").float().eval(), data_dir
        )
    if "base" in sections:
        pipe = base_pipeline(base)
        sizes = (40, 12, (0,)) if quick else (200, 60, (0, 1, 2))
        report["base_model"] = base_report(pipe, oracles, *sizes, guidance=guidance)
        report["guidance_sweep"] = guidance_sweep(pipe, oracles, singles=min(100, sizes[0]))
        base_contact_sheets(pipe, out, guidance=guidance)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report
