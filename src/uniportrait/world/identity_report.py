"""UniPortrait measured in the identity world: the single-ID, fidelity/editability and multi-ID
tables of ``docs/world.md``, on held-out identities and captions.

Every person of a held-out caption gets two *other* renders of themselves: one is the photo the
pipeline is conditioned on, the other is the reference the generated face is compared with (so
Face Sim never rewards copying the conditioning photo). The oracles (never part of generation)
read the pictures:

- **Face Sim**: cosine of the oracle recogniser between a generated face and the person's
  reference; faces are matched to people one-to-one (:func:`~uniportrait.evaluation.matching.match_faces`),
  the picture's value is the lowest matched one (the paper's multi-ID value).
- **Identification** (single-ID): the share of pictures whose face is nearer (oracle cosine) to
  a reference of its own person than to every other person's of the same row (chance: one over the
  number of people in the row's captions); a picture without a face is a miss. Where Face Sim says how much a face
  resembles its person, this says whether it would be picked out among the others. **Pairwise
  identification**: over the pictures with a face, the share of the row's other people whose
  reference the face is less similar to than its own (chance 50%); unlike the first, one
  reference that happens to resemble every generated face (a hub) costs it little.
- **Trait agreement** (single-ID, :func:`trait_agreement`): per facial trait, the share of
  matched faces whose trait, read by the trait regressor, is their person's: which parts of an
  identity come through. The base model's row is the agreement by chance.
- **Prompt following**: the share of caption-mentioned attributes the oracles read back.
- **Copy rate**: among the attributes a caption asks for that *differ* from the conditioning
  photo's (expression, tilt, hat, sunglasses, lighting), the share where the picture shows the
  photo's value instead: copying the photo rather than following the prompt.
- **Blending by trait attribution** (:func:`trait_shares`): a face's traits, read by the trait
  regressor, are attributed trait by trait to the two people it is closest to; it *blends* when
  each of them explains a good share of the traits that tell them apart (:func:`blends`). The
  measure is validated on renders (:func:`blend_controls`): pure faces, faces drawn with half of
  each person's traits, and strangers.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from uniportrait.world.faces import aligned_crops
from uniportrait.world.traits import CONTINUOUS_TRAITS, DISCRETE_TRAITS

logger = logging.getLogger(__name__)

#: Attributes whose value a conditioning photo has and a caption may ask to change.
COPYABLE_PERSON = ("expression", "tilt", "hat", "sunglasses")
COPYABLE_SCENE = ("lighting",)
#: The traits attribution reads: those the trait regressor reads well on held-out renders
#: (docs/world.md: discrete accuracy ≥ 0.68, continuous mean error ≤ 0.15); eye colour, and the
#: continuous traits it reads at little better than no information, would only add noise.
ATTRIBUTION_TRAITS = (
    "skin",
    "nose_length",
    "eye_spacing",
    "head_width",
    "facial_hair",
    "mole",
    "hair_colour",
    "hair_style",
)
#: A continuous trait tells two people apart when their values differ by this much (traits in [0, 1]).
TRAIT_GAP = 0.3
#: A face blends two people when each explains at least ``BLEND_SHARE`` of the traits that tell
#: them apart and together at least ``BLEND_TOTAL`` (a stranger shares some traits with each by
#: chance, but fewer in all). Chosen on 150 control pairs (seed 3 of :func:`control_shares`):
#: pure faces 4.7%, true blends 61%, strangers 15%; the report re-measures them on other pairs.
BLEND_SHARE = 0.25
BLEND_TOTAL = 0.75


@dataclass
class IdentityCase:
    """One held-out caption with, per person, a conditioning scene and a reference embedding."""

    spec: object  # SceneSpec of the caption
    caption: str
    conditioning: list  # per person: the SceneSpec of the photo the pipeline is given
    reference: np.ndarray  # (P, E) oracle embeddings of a third render of each person


def identity_cases(
    oracles,
    count: int,
    num_people: int,
    seed: int = 5,
    identities: int = 200,
    framing: str = "wide",
    held_out: bool = True,
) -> list[IdentityCase]:
    """Held-out captions (as :func:`~uniportrait.world.report.held_out_specs`) with their photos,
    of the first ``identities`` held-out people (training people with ``held_out=False``); every
    picture framed at ``framing``."""
    from uniportrait.world.report import held_out_specs, reference_embeddings
    from uniportrait.world.scenes import sample_spec

    specs, captions = held_out_specs(
        count, num_people, seed=seed, identities=identities, framing=framing, held_out=held_out
    )
    refs = reference_embeddings(oracles, specs, framing=framing)  # third renders (seed 99)
    rng = np.random.default_rng([seed, num_people, 77])
    cases = []
    for spec, text, ref in zip(specs, captions, refs):
        cond = [
            sample_spec(rng, [p.identity], seed=int(rng.integers(1 << 31)), framing=framing)
            for p in spec.people
        ]
        cases.append(IdentityCase(spec, text, cond, ref))
    return cases


def conditioning_crops(case: IdentityCase) -> list[np.ndarray]:
    """Per person, the aligned 224 px crop of their conditioning photo (ground-truth landmarks)."""
    from uniportrait.faces.align import ALIGNED_SIZE

    crops = []
    for spec in case.conditioning:
        r = spec.render()
        crops.append(aligned_crops(r.image[None], r.landmarks[:1], size=ALIGNED_SIZE)[0])
    return crops


def layout_masks(spec, grow: float = 1.6) -> np.ndarray:
    """(P, H, W) float masks: each person's face box in the caption's own render, grown by ``grow``
    (a user drawing where each person goes; the "user masks" row of the multi-ID table)."""
    boxes = spec.render().boxes
    masks = np.zeros((len(boxes), spec.height, spec.width), np.float32)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * grow / 2, (y1 - y0) * grow / 2
        masks[
            k, max(0, int(cy - hh)) : int(np.ceil(cy + hh)), max(0, int(cx - hw)) : int(np.ceil(cx + hw))
        ] = 1
    return masks


@torch.no_grad()
def generate_cases(
    pipe,
    cases: list[IdentityCase],
    seeds=(0, 1, 2),
    masks: str | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    **call,
) -> tuple[np.ndarray, list]:
    """Pictures of every case for every seed: ((S, N, H, W, 3) uint8, routing maps [seed][case]
    ((P, H, W) arrays, or None where the router did not run).

    ``masks``: None (the router), ``"everywhere"`` (every identity attends everywhere, equally:
    no routing), or ``"layout"`` (:func:`layout_masks`). ``call``: more pipeline arguments
    (``faceid_scale``, ``face_structure_scale``, ...). ``identities=None`` in ``call`` generates
    without identities (the base model's row).
    """
    no_identity = "identities" in call and call.pop("identities") is None
    images = [[] for _ in seeds]
    routing = [[] for _ in seeds]
    for case in cases:
        kwargs = dict(call)
        spec = case.spec
        if not no_identity:
            kwargs["identities"] = [pipe.encode_identity(c) for c in conditioning_crops(case)]
            n = len(kwargs["identities"])
            if masks == "everywhere" and n > 1:
                kwargs["faceid_masks"] = torch.ones(n, spec.height, spec.width)
            elif masks == "layout" and n > 1:
                kwargs["faceid_masks"] = torch.from_numpy(layout_masks(spec))
            kwargs["return_routing_maps"] = n > 1 and masks is None
        out = pipe(
            case.caption,
            height=spec.height,
            width=spec.width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=len(seeds),
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
            output_type="np",
            **kwargs,
        )
        pics = (np.asarray(out.images) * 255).round().clip(0, 255).astype(np.uint8)
        maps = out.routing_maps
        for k in range(len(seeds)):
            images[k].append(pics[k])
            routing[k].append(None if maps is None else maps[k].float().cpu().numpy())
    return np.stack([np.stack(s) for s in images]), routing


# -- trait attribution ---------------------------------------------------------------------------


def _split_traits(vector: np.ndarray) -> dict[str, float | int]:
    """A trait vector (continuous values, then one block per discrete trait) → {name: value}."""
    out: dict[str, float | int] = dict(zip(CONTINUOUS_TRAITS, (float(v) for v in vector)))
    at = len(CONTINUOUS_TRAITS)
    for name, values in DISCRETE_TRAITS.items():
        out[name] = int(np.argmax(vector[at : at + len(values)]))
        at += len(values)
    return out


def trait_shares(face: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Shares of the traits telling people ``a`` and ``b`` apart that ``face`` shares with each.

    All three are trait vectors (:meth:`~uniportrait.world.traits.Traits.vector` layout; the face's
    from the trait regressor); only :data:`ATTRIBUTION_TRAITS` are read. A continuous trait telling them apart (gap ≥ :data:`TRAIT_GAP`)
    counts for a person when the face's value is within half the gap of theirs; a discrete one
    counts for the person whose value it has (or for neither). Returns (share of a, share of b);
    (0, 0) when nothing tells them apart.
    """
    f, x, y = _split_traits(face), _split_traits(a), _split_traits(b)
    n_a = n_b = total = 0
    for name in ATTRIBUTION_TRAITS:
        if name in DISCRETE_TRAITS:
            if x[name] == y[name]:
                continue
            total += 1
            n_a += f[name] == x[name]
            n_b += f[name] == y[name]
            continue
        gap = abs(x[name] - y[name])
        if gap < TRAIT_GAP:
            continue
        total += 1
        n_a += abs(f[name] - x[name]) < gap / 2
        n_b += abs(f[name] - y[name]) < gap / 2
    return (n_a / total, n_b / total) if total else (0.0, 0.0)


def trait_agreement(face: np.ndarray, person: np.ndarray) -> dict[str, bool]:
    """Per :data:`ATTRIBUTION_TRAITS` trait, whether ``face`` (trait vector, from the trait
    regressor) shows ``person``'s value (ground-truth trait vector): the same class for a discrete
    trait, within half of :data:`TRAIT_GAP` for a continuous one (as :func:`trait_shares` counts)."""
    f, x = _split_traits(face), _split_traits(person)
    return {
        name: bool(f[name] == x[name])
        if name in DISCRETE_TRAITS
        else bool(abs(f[name] - x[name]) < TRAIT_GAP / 2)
        for name in ATTRIBUTION_TRAITS
    }


def trait_agreement_shares(faces: np.ndarray, people: list[np.ndarray] | np.ndarray) -> dict[str, float]:
    """Per :data:`ATTRIBUTION_TRAITS` trait, the share of ``faces`` (trait vectors read by the trait
    regressor, (N, T)) that show their own person's value (``people``, (N, T) ground truth)."""
    agree: dict[str, list[bool]] = {name: [] for name in ATTRIBUTION_TRAITS}
    for face, person in zip(faces, people):
        for name, same in trait_agreement(face, person).items():
            agree[name].append(same)
    return {name: float(np.mean(v)) if v else float("nan") for name, v in agree.items()}


def blends(face: np.ndarray, references: np.ndarray, closest: list[int]) -> bool:
    """Whether ``face`` (trait vector) blends the two references ``closest`` names (indices into
    ``references``, (P, T) ground-truth trait vectors): see :func:`trait_shares`."""
    return _is_blend(*trait_shares(face, references[closest[0]], references[closest[1]]))


def _is_blend(share_a: float, share_b: float) -> bool:
    return min(share_a, share_b) >= BLEND_SHARE and share_a + share_b >= BLEND_TOTAL


def control_shares(oracles, pairs: int = 200, seed: int = 3) -> dict[str, np.ndarray]:
    """:func:`trait_shares` of rendered faces against held-out pairs (a, b): faces of a alone
    (``pure``), faces drawn with each trait taken from a or b at random (``mixed``: true blends),
    and faces of a stranger c (``stranger``). Returns, per kind, (pairs, 2) shares."""
    from uniportrait.world.scenes import identity_number, sample_spec
    from uniportrait.world.traits import Traits

    rng = np.random.default_rng(seed)
    shares: dict[str, list] = {"pure": [], "mixed": [], "stranger": []}
    for _ in range(pairs):
        ia, ib, ic = (identity_number(int(i), True) for i in rng.choice(5000, 3, replace=False))
        ta, tb = Traits.of(ia), Traits.of(ib)
        take = rng.random(len(CONTINUOUS_TRAITS) + len(DISCRETE_TRAITS)) < 0.5
        cont = tuple(y if t else x for x, y, t in zip(ta.cont, tb.cont, take))
        disc = {
            name: getattr(tb if take[len(CONTINUOUS_TRAITS) + k] else ta, name)
            for k, name in enumerate(DISCRETE_TRAITS)
        }
        looks = {"pure": (ta, ia), "mixed": (Traits(cont=cont, **disc), ia), "stranger": (Traits.of(ic), ic)}
        for kind, (traits, ident) in looks.items():
            spec = sample_spec(rng, [ident], seed=int(rng.integers(1 << 31)))
            person = dataclasses.replace(spec.people[0], traits=traits)
            r = dataclasses.replace(spec, people=(person,)).render()
            pred = oracles.describe_crops(aligned_crops(r.image[None], r.landmarks[:1]))["traits"][0]
            shares[kind].append(trait_shares(pred, ta.vector(), tb.vector()))
    return {kind: np.array(v) for kind, v in shares.items()}


def blend_controls(oracles, pairs: int = 200, seed: int = 4) -> dict:
    """The blend rule's rate on the renders of :func:`control_shares` (the measure's validation)."""
    shares = control_shares(oracles, pairs, seed)
    rates = {f"{kind}_blend_rate": float(np.mean([_is_blend(*s) for s in v])) for kind, v in shares.items()}
    return rates | {"pairs": pairs}


# -- measuring pictures --------------------------------------------------------------------------


def measure_identity_pictures(
    oracles, images: np.ndarray, cases: list[IdentityCase], detections=None
) -> dict:
    """Oracle measures of one seed's pictures of ``cases`` (see the module docstring).

    ``detections``: the oracle's faces in each picture, when the caller has them already."""
    from uniportrait.evaluation.backends import DEFAULT_THRESHOLDS
    from uniportrait.evaluation.matching import match_faces
    from uniportrait.world.report import measure_pictures
    from uniportrait.world.traits import Traits

    specs = [c.spec for c in cases]
    if detections is None:
        detections = [oracles.detect(image) for image in images]
    out = measure_pictures(oracles, images, specs, [c.reference for c in cases], detections)
    scene_pred = oracles.scene_attributes(images)
    sims, blend, dup, missing, faces_total = [], 0, 0, 0, 0
    copy_hits, copy_total = 0, 0
    singles = all(len(c.spec.people) == 1 for c in cases)
    everyone = np.concatenate([c.reference for c in cases]) if singles else None  # (C, E)
    who = np.array([c.spec.people[0].identity for c in cases]) if singles else None  # (C,)
    identified, pairwise = 0, []
    seen_traits, true_traits = [], []  # singles: the matched face's traits read, and its person's
    for k, (image, case, faces) in enumerate(zip(images, cases, detections)):
        n = len(case.spec.people)
        described = oracles.describe(image, faces) if faces else None
        emb = described["embedding"] if faces else np.zeros((0, case.reference.shape[1]), np.float32)
        result = match_faces(emb @ case.reference.T, DEFAULT_THRESHOLDS["world"])
        sims.append(result.face_sim_min if len(result.missing) < n else 0.0)
        dup += bool(result.duplicated)
        missing += len(result.missing)
        matched = result.face_of_reference[0]  # the person's face, or None
        if singles and matched is not None:
            to_all = everyone @ emb[matched]  # (C,)
            # among the cases' people (a person captioned twice counts once, by identity)
            identified += int(who[np.argmax(to_all)] == who[k])
            pairwise.append(float((to_all[who != who[k]] < to_all[k]).mean()))
            seen_traits.append(described["traits"][matched])
            true_traits.append(Traits.of(case.spec.people[0].identity).vector())
        if n > 1 and faces:
            truth = np.stack([Traits.of(p.identity).vector() for p in case.spec.people])
            for f in range(len(faces)):
                closest = list(np.argsort(-result.similarities[f])[:2])
                blend += blends(described["traits"][f], truth, closest)
                faces_total += 1
        # copy rate: asked-for values that differ from the conditioning photo's
        want = case.spec.requested()
        cond_looks = [c.people[0].look for c in case.conditioning]
        for name in COPYABLE_SCENE:
            if name in want["scene"]:
                photo = {case.conditioning[i].scene.attribute(name) for i in range(n)}
                if want["scene"][name] not in photo and len(photo) == 1:
                    copy_total += 1
                    copy_hits += int(scene_pred[name][k] in photo)
        if n == 1 and faces:
            box = np.array([faces[0].box])
            pred = oracles.person_attributes(image[None], box)
            for name in COPYABLE_PERSON:
                if name in want["people"][0] and want["people"][0][name] != cond_looks[0].attribute(name):
                    copy_total += 1
                    copy_hits += int(pred[name][0] == cond_looks[0].attribute(name))
    out.update(
        face_sim=float(np.mean(sims)),
        duplication_rate=dup / len(cases),
        missing_rate=missing / sum(len(c.spec.people) for c in cases),
        copy_rate=copy_hits / copy_total if copy_total else None,
        copy_opportunities=copy_total,
    )
    if faces_total:
        out["blend_rate"] = blend / faces_total
    if singles:
        out.update(identification=identified / len(cases), identification_chance=1 / len(set(who)))
        if pairwise:
            out["pairwise_identification"] = float(np.mean(pairwise))
            out["trait_agreement"] = trait_agreement_shares(seen_traits, true_traits)
    return out


def routing_accuracy(
    oracles, images: np.ndarray, routing: list, cases: list[IdentityCase], detections: list
) -> float | None:
    """Share of generated face pixels (oracle boxes) routed to the identity the face was matched to.

    ``images``, ``routing``: one seed's pictures and their (P, H, W) routing maps (or None);
    ``detections``: the oracle's faces in each picture."""
    from uniportrait.evaluation.backends import DEFAULT_THRESHOLDS
    from uniportrait.evaluation.matching import match_faces

    right = total = 0
    for image, maps, case, faces in zip(images, routing, cases, detections):
        if maps is None:
            continue
        if not faces:
            continue
        emb = oracles.describe(image, faces)["embedding"]
        result = match_faces(emb @ case.reference.T, DEFAULT_THRESHOLDS["world"])
        winner = maps.argmax(0)
        for ref, f in enumerate(result.face_of_reference):
            if f is None:
                continue
            x0, y0, x1, y1 = (int(round(v)) for v in faces[f].box)
            region = winner[max(0, y0) : y1, max(0, x0) : x1]
            right += int((region == ref).sum())
            total += region.size
    return right / total if total else None


# -- the report ----------------------------------------------------------------------------------

#: The identity guidance of the report's guided rows (the pipeline's ``identity_guidance_scale``,
#: at the report's guidance 7.5; docs/world.md, "Guiding identity apart from the text").
IDENTITY_GUIDANCE_ROW = 10.0
#: Single-ID rows: pipeline arguments (``identities=None``: the base model, no identity).
SINGLE_ROWS: dict[str, dict] = {
    "base model (no identity)": {"identities": None},
    "UniPortrait stage I": {},
    "structure branch off (face_structure_scale 0)": {"face_structure_scale": 0.0},
    f"UniPortrait stage I, identity guidance {IDENTITY_GUIDANCE_ROW:g}": {
        "identity_guidance_scale": IDENTITY_GUIDANCE_ROW
    },
}
#: The fidelity/editability curve: (faceid_scale, face_structure_scale) pairs.
CURVE = tuple((f, 0.1) for f in (0.25, 0.5, 1.0, 1.5, 2.0)) + tuple((1.0, s) for s in (0.0, 0.3, 0.6, 1.0))
#: Multi-ID rows: how identities are placed (see :func:`generate_cases`).
MULTI_ROWS: dict[str, dict] = {
    "no routing (every identity everywhere)": {"masks": "everywhere"},
    "user masks (layout boxes)": {"masks": "layout"},
    "router": {},
    f"router, identity guidance {IDENTITY_GUIDANCE_ROW:g}": {
        "identity_guidance_scale": IDENTITY_GUIDANCE_ROW
    },
}


def _measure_row(pipe, oracles, cases, seeds, guidance, routed: bool, **call) -> dict:
    from uniportrait.world.report import summarise_runs

    images, routing = generate_cases(pipe, cases, seeds, guidance=guidance, **call)
    runs = []
    for k in range(len(seeds)):
        detections = [oracles.detect(image) for image in images[k]]  # once per picture
        m = measure_identity_pictures(oracles, images[k], cases, detections)
        if routed:
            m["routing_accuracy"] = routing_accuracy(oracles, images[k], routing[k], cases, detections)
        runs.append(m)
    return summarise_runs(runs) | {"images": images}


def run_identity_report(
    pipe,
    oracles,
    out,
    singles: int = 100,
    groups: int = 40,
    seeds=(0, 1, 2),
    guidance: float = 7.5,
    sections=("single", "curve", "multi", "controls"),
    framing: str = "wide",
) -> dict:
    """Measure ``pipe`` (a world UniPortrait pipeline) and write ``out/identity_report.json``.

    ``sections``: any of ``single``, ``curve``, ``multi`` (all multi-ID rows), ``router`` (the
    router's multi-ID rows only) and ``controls`` (the blend measure on renders). ``framing``: how
    large the held-out pictures draw faces (a base trained at that framing). Rows already in
    the file are kept (the report resumes); contact sheets go next to it. The
    curve's points use the first 60% of the single-ID captions and one seed.
    """
    import json
    from pathlib import Path

    from uniportrait.evaluation.report import write_text_atomic
    from uniportrait.world.report import contact_sheet

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "identity_report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}

    def save() -> None:
        write_text_atomic(path, json.dumps(report, indent=2))
        write_text_atomic(out / "identity_report.md", markdown_tables(report))

    def row(
        section: str,
        name: str,
        cases,
        routed: bool = False,
        sheet: str | None = None,
        row_seeds=seeds,
        **call,
    ) -> None:
        if name in report.setdefault(section, {}):
            return
        logger.info("%s: %s", section, name)
        result = _measure_row(pipe, oracles, cases, row_seeds, guidance, routed, **call)
        images = result.pop("images")
        if sheet:
            count = 24 if len(cases[0].spec.people) == 1 else 12
            contact_sheet(
                images[0][:count],
                [c.caption for c in cases[:count]],
                out / sheet,
                columns=6 if count == 24 else 4,
            )
        report[section][name] = result
        save()

    curve = max(2, singles * 3 // 5)  # the curve: the first 60% of the captions, one seed per point
    report["setup"] = {"singles": singles, "groups": groups, "seeds": list(seeds), "guidance": guidance,
                       "curve_captions": curve, "curve_seeds": 1, "framing": framing}  # fmt: skip
    if "controls" in sections and "blend_controls" not in report:
        report["blend_controls"] = blend_controls(oracles)
        save()
    if "single" in sections or "curve" in sections:
        cases = identity_cases(oracles, singles, 1, framing=framing)
        if "single" in sections:
            for name, call in SINGLE_ROWS.items():
                sheet = "single_stage1.png" if name == "UniPortrait stage I" else None
                row("single", name, cases, sheet=sheet, **call)
        if "curve" in sections:
            for faceid, structure in CURVE:
                name = f"faceid {faceid:g}, structure {structure:g}"
                row(
                    "curve",
                    name,
                    cases[:curve],
                    row_seeds=seeds[:1],
                    faceid_scale=faceid,
                    face_structure_scale=structure,
                )
    if "multi" in sections or "router" in sections:
        names = MULTI_ROWS if "multi" in sections else ["router"]
        for people in (2, 3):
            cases = identity_cases(oracles, groups, people, framing=framing)
            for name in names:
                call = MULTI_ROWS[name]
                sheet = f"multi_{people}_router.png" if name == "router" else None
                routed = call.get("masks") is None  # the router places the people
                row(f"multi_{people}", name, cases, routed=routed, sheet=sheet, **call)
    return report


def _cell(row: dict, key: str, digits: int = 3, percent: bool = False) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if isinstance(value, dict):
        mean, std = value["mean"], value.get("std", 0.0)
        if percent:
            return f"{100 * mean:.1f}% ± {100 * std:.1f}" if std else f"{100 * mean:.1f}%"
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def markdown_tables(report: dict) -> str:
    """The report's tables in Markdown (mean ± standard deviation over seeds), as in docs/world.md."""
    lines = []
    if "blend_controls" in report:
        c = report["blend_controls"]
        lines += [
            f"Blend measure on renders ({c['pairs']} held-out pairs): pure faces "
            f"{100 * c['pure_blend_rate']:.1f}%, true blends {100 * c['mixed_blend_rate']:.1f}%, "
            f"strangers {100 * c['stranger_blend_rate']:.1f}%.",
            "",
        ]
    single_cols = (
        ("Face Sim", "face_sim", False), ("identification", "identification", True),
        ("pairwise identification", "pairwise_identification", True),
        ("one face", "exact_face_count_rate", True),
        ("prompt following", "prompt_following", True),
        ("balanced", "prompt_following_balanced", True), ("copy rate", "copy_rate", True),
    )  # fmt: skip
    multi_cols = (
        ("min Face Sim", "face_sim", False), ("blending", "blend_rate", True),
        ("duplication", "duplication_rate", True), ("missing", "missing_rate", True),
        ("prompt following", "prompt_following", True),
        ("balanced", "prompt_following_balanced", True), ("routing accuracy", "routing_accuracy", True),
    )  # fmt: skip
    tables = [("single", "Single-ID", single_cols), ("curve", "Fidelity vs editability", single_cols)]
    tables += [(f"multi_{n}", f"Multi-ID, {n} people", multi_cols) for n in (2, 3)]
    for section, title, cols in tables:
        rows = report.get(section)
        if not rows:
            continue
        lines += [
            f"**{title}**",
            "",
            "| | " + " | ".join(c[0] for c in cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(_cell(row, k, percent=p) for _, k, p in cols) + " |")
        lines.append("")
    agreeing = {name: row["trait_agreement"] for name, row in report.get("single", {}).items()
                if "trait_agreement" in row}  # fmt: skip
    if agreeing:
        lines += [
            "**Trait agreement, single-ID** (a matched face's traits, read by the trait regressor, "
            "against its person's; the base model's row is agreement by chance)",
            "",
            "| | " + " | ".join(n.replace("_", " ") for n in ATTRIBUTION_TRAITS) + " |",
            "|---|" + "---|" * len(ATTRIBUTION_TRAITS),
        ]
        for name, rates in agreeing.items():
            lines.append(
                f"| {name} | " + " | ".join(f"{100 * rates[t]:.0f}%" for t in ATTRIBUTION_TRAITS) + " |"
            )
        lines.append("")
    return "\n".join(lines)
