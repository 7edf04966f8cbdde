"""Benchmark specs: a prompt × identity grid, generated, then evaluated (``uniportrait eval --generate``).

A spec is YAML or JSON. Paths are relative to the spec's folder::

    name: sample-benchmark
    identities:                       # name → photos, or a stored identity
      anna: [photos/anna.jpg]
      ben: {photos: [photos/ben.jpg, photos/ben2.jpg]}
      carl: {id: carl}                # `uniportrait id add carl ...`
    single:                           # each identity alone, with each prompt
      identities: [anna, ben, carl]   # default: all
      prompts: ["a photo of a person reading in a library"]
    multi:                            # groups of identities together
      groups: pairs                   # every pair of `identities` (or a list: [[anna, ben], ...])
      identities: [anna, ben, carl]   # default: all
      prompts: ["two people walking on a beach"]
    seeds: [0, 1, 2, 3]               # one image per seed (a section may set its own `seeds`)
    settings:                         # generation settings; leave any out for its default
      steps: 20                       # (defaults and ranges: uniportrait.settings)
      guidance_scale: 5.0
      identity_guidance: null         # null: the guidance scale (one guidance for text and people)
      faceid_scale: 0.8
      structure_scale: null           # null: 0.1 single-ID, 0.3 multi-ID
      width: 512                      # default: the preset's (256 tiny, 512 sd15)
      height: 512
      negative_prompt: null

The paper's protocol (DESIGN §8) is 15 identities × 40 prompts × 4 seeds single-ID and all 105
pairs × 21 prompts multi-ID, 20 DDIM steps, CFG 7.5.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from uniportrait.evaluation.manifest import (
    IdentitySpec,
    ManifestError,
    ManifestRow,
    parse_identity,
    stored_identity_problem,
)
from uniportrait.settings import FACEID_SCALE, GUIDANCE_SCALE, STEPS

logger = logging.getLogger(__name__)

SETTINGS_DEFAULTS: dict[str, Any] = {
    "steps": STEPS.default,
    "guidance_scale": GUIDANCE_SCALE.default,
    "identity_guidance": None,
    "faceid_scale": FACEID_SCALE.default,
    "structure_scale": None,
    "width": None,
    "height": None,
    "negative_prompt": None,
}
TOP_KEYS = {"name", "identities", "single", "multi", "seeds", "settings"}
SECTION_KEYS = {
    "single": {"identities", "prompts", "seeds"},
    "multi": {"groups", "identities", "prompts", "seeds"},
}


@dataclass
class GridJob:
    """One image to generate."""

    section: str
    identities: tuple[str, ...]
    prompt: str
    seed: int


@dataclass
class BenchmarkSpec:
    name: str
    identities: dict[str, IdentitySpec]
    jobs: list[GridJob]
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = "spec"


def _load(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path.name} line {err.lineno}: not valid JSON ({err.msg})") from None
    try:
        import yaml
    except ImportError:
        raise ManifestError(
            "YAML specs need PyYAML: pip install uniportrait[eval] (or use a .json spec)"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ManifestError(f"{path.name}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None


def read_spec(path: str | os.PathLike, bank=None) -> BenchmarkSpec:
    """Read and check a benchmark spec; every photo and stored name is checked up front.

    Raises:
        ManifestError: naming the spec and what is wrong in it.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"benchmark spec {path} not found")
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ManifestError(f"benchmark spec {path}: use a .yaml, .yml or .json file")
    data = _load(path)
    where = path.name

    def fail(message: str) -> ManifestError:
        return ManifestError(f"{where}: {message}")

    if not isinstance(data, dict):
        raise fail("the spec must be a mapping with identities, single/multi sections, seeds, settings")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    raw_ids = data.get("identities")
    if not isinstance(raw_ids, dict) or not raw_ids:
        raise fail("'identities' must map names to photos or {id: NAME}")
    identities: dict[str, IdentitySpec] = {}
    for name, value in raw_ids.items():
        try:
            spec = parse_identity(value, path.parent)
        except ValueError as err:
            raise fail(f"identity {name!r}: {err}") from None
        for photo in spec.photos:
            if not photo.is_file():
                raise fail(f"identity {name!r}: photo {photo} not found")
        if spec.name is not None:
            problem = stored_identity_problem(spec.name, bank)
            if problem:
                raise fail(f"identity {name!r}: {problem}")
        identities[str(name)] = IdentitySpec(spec.photos, spec.name, label=str(name))

    seeds = _seeds(data.get("seeds", [0]), fail, "seeds")
    jobs: list[GridJob] = []
    for section in ("single", "multi"):
        body = data.get(section)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise fail(f"'{section}' must be a mapping")
        unknown = sorted(set(body) - SECTION_KEYS[section])
        if unknown:
            raise fail(f"'{section}': unknown key(s) {unknown}; known: {sorted(SECTION_KEYS[section])}")
        prompts = body.get("prompts")
        if (
            not isinstance(prompts, list)
            or not prompts
            or not all(isinstance(p, str) and p.strip() for p in prompts)
        ):
            raise fail(f"'{section}.prompts' must be a non-empty list of prompts")
        names = body.get("identities", list(identities))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise fail(f"'{section}.identities' must be a list of identity names")
        for n in names:
            if n not in identities:
                raise fail(f"'{section}' uses identity {n!r}, not defined under 'identities'")
        section_seeds = _seeds(body["seeds"], fail, f"{section}.seeds") if "seeds" in body else seeds
        if section == "single":
            groups = [(n,) for n in names]
        else:
            groups = _groups(body.get("groups", "pairs"), names, identities, fail)
        for group, prompt, seed in itertools.product(groups, prompts, section_seeds):
            jobs.append(GridJob(section, group, prompt, seed))
    if not jobs:
        raise fail("nothing to generate: add a 'single' and/or 'multi' section")
    settings = dict(SETTINGS_DEFAULTS)
    given = data.get("settings") or {}
    if not isinstance(given, dict):
        raise fail("'settings' must be a mapping")
    unknown = sorted(set(given) - set(SETTINGS_DEFAULTS))
    if unknown:
        raise fail(f"unknown setting(s) {unknown}; known: {sorted(SETTINGS_DEFAULTS)}")
    settings.update(given)
    from uniportrait.settings import SETTINGS, SettingError

    by_field = {s.field: s for s in SETTINGS.values()}
    for key, value in settings.items():
        if key in by_field and value is not None:
            try:
                by_field[key].check(value, style="api")
            except SettingError as err:
                raise fail(f"settings: {err}") from None
    return BenchmarkSpec(str(data.get("name") or path.stem), identities, jobs, settings, where)


def _seeds(value: Any, fail, what: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
    ):
        raise fail(f"'{what}' must be an integer or a non-empty list of integers")
    return value


def _groups(value: Any, names: list[str], identities: dict, fail) -> list[tuple[str, ...]]:
    if value == "pairs":
        groups = list(itertools.combinations(names, 2))
        if not groups:
            raise fail("'multi.groups: pairs' needs at least two identities")
        return groups
    if not isinstance(value, list) or not value:
        raise fail("'multi.groups' must be 'pairs' or a list of identity-name lists")
    groups = []
    for group in value:
        if not isinstance(group, list) or len(group) < 2 or not all(isinstance(n, str) for n in group):
            raise fail(f"'multi.groups': {group!r} is not a list of two or more identity names")
        for n in group:
            if n not in identities:
                raise fail(f"'multi.groups' uses identity {n!r}, not defined under 'identities'")
        groups.append(tuple(group))
    return groups


def job_image(out: str | os.PathLike, job: GridJob, index: int) -> Path:
    """Where the image of job ``index`` of a grid goes."""
    return Path(out).resolve() / "images" / f"{job.section}-{index:05d}.png"


def _record(job: GridJob, settings: dict[str, Any], size: tuple[int, int], model: dict | None) -> dict:
    """What a grid image is: stored in the PNG, compared before an existing image is reused."""
    return {
        "section": job.section,
        "identities": list(job.identities),
        "prompt": job.prompt,
        "seed": job.seed,
        "settings": settings,
        "size": list(size),
        "model": model or {},
    }


def _made_as(path: Path, record: dict) -> bool:
    """Whether ``path`` is a complete PNG made for exactly ``record``."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            return json.loads(image.text.get("uniportrait", "null")) == record
    except (OSError, ValueError, SyntaxError):
        return False


def run_grid(
    pipe,
    spec: BenchmarkSpec,
    out: str | os.PathLike,
    bank=None,
    default_size: int = 512,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
    model: dict[str, Any] | None = None,
    analyzer: Any = None,
) -> list[ManifestRow]:
    """Generate the jobs of ``spec`` into ``out/images`` and write ``out/manifest.jsonl``.

    ``analyzer`` reads the identities' photos (default: MTCNN; the world preset's own detector
    for world pictures).

    ``default_size`` is the image side when the spec's settings give none. ``shard=(i, n)``:
    generate only jobs ``i, i + n, i + 2n, ...`` (one process of ``n``) and write no manifest.
    An image already in ``out/images`` that was made for the same job, settings and ``model``
    (a description of the weights, stored in the PNG) is kept, so an interrupted grid resumes
    and a grid generated in parts is evaluated by running the whole command once more.

    Returns the manifest rows of the generated jobs (ready for
    :func:`~uniportrait.evaluation.evaluate.evaluate_rows`).
    """
    import torch

    from uniportrait.bank import IdentityBank
    from uniportrait.evaluation.manifest import write_manifest
    from uniportrait.faces import get_face_analyzer
    from uniportrait.faces.image_io import save_png_atomic
    from uniportrait.photos import identity_from_photos

    index, count = shard
    out = Path(out).resolve()
    bank = bank or IdentityBank()
    settings = dict(spec.settings)
    size = (int(settings["width"] or default_size), int(settings["height"] or default_size))
    mine = [(k, job) for k, job in enumerate(spec.jobs) if k % count == index]
    todo = [
        (k, job)
        for k, job in mine
        if not _made_as(job_image(out, job, k), _record(job, settings, size, model))
    ]
    logger.info(
        "grid part %d/%d: %d of %d job(s), %d already generated",
        index,
        count,
        len(mine),
        len(spec.jobs),
        len(mine) - len(todo),
    )
    encoded = {}
    if todo:
        analyzer = analyzer or get_face_analyzer()
        for name in sorted({n for _, job in todo for n in job.identities}):  # each identity encoded once
            ident = spec.identities[name]
            encoded[name] = (
                bank.get(ident.name)
                if ident.name
                else identity_from_photos(pipe, ident.photos, analyzer, name=name)
            )
    for k, job in tqdm(todo, desc="generating", disable=not progress):
        result = pipe(
            job.prompt,
            identities=[encoded[n] for n in job.identities],
            negative_prompt=settings["negative_prompt"],
            faceid_scale=float(settings["faceid_scale"]),
            face_structure_scale=settings["structure_scale"],
            num_inference_steps=int(settings["steps"]),
            guidance_scale=float(settings["guidance_scale"]),
            identity_guidance_scale=settings["identity_guidance"],  # checked by load_spec: a number or None
            width=size[0],
            height=size[1],
            generator=torch.Generator().manual_seed(job.seed),
        )
        record = _record(job, settings, size, model)
        save_png_atomic(result.images[0], job_image(out, job, k), {"uniportrait": json.dumps(record)})
    rows = [_row(spec, job, k, job_image(out, job, k)) for k, job in mine]
    if count == 1:
        write_manifest(rows, out / "manifest.jsonl")
    return rows


def _row(spec: BenchmarkSpec, job: GridJob, k: int, path: Path) -> ManifestRow:
    return ManifestRow(
        line=k + 1,
        image=path,
        prompt=job.prompt,
        identities=tuple(spec.identities[n] for n in job.identities),
        extra={"section": job.section, "seed": job.seed},
        source="manifest.jsonl",
    )
