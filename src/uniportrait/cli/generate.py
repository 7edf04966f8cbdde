"""``uniportrait generate``: prompt + identities (photos or stored names) → PNG files."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from uniportrait.cli._common import (
    add_limit_args,
    add_model_args,
    check_output_folder,
    check_photos_exist,
    load_pipeline_from_args,
    new_run_folder,
    parse_mix,
    remove_empty_folders,
)
from uniportrait.errors import UniPortraitError
from uniportrait.settings import (
    FACEID_SCALE,
    GUIDANCE_SCALE,
    NUM_IMAGES,
    STEPS,
    GenerationLimits,
    check_prompt,
    check_settings,
)

logger = logging.getLogger(__name__)


class _IdentityArg(argparse.Action):
    """Keeps --id and --id-name in command-line order: ("photos", [..]) or ("name", str)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        if option_string == "--id":
            items.append(("photos", [p for p in values.split(",") if p]))
        else:
            items.append(("name", values))
        setattr(namespace, self.dest, items)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images of one or several people from a prompt",
        description="Generate images of one or several people. Identities come from photos (--id) or "
        "from the identity bank (--id-name), in the order given.",
    )
    parser.add_argument("--prompt", required=True, help="free-form text prompt")
    parser.add_argument(
        "--negative-prompt", default=None, help="what the images should not show (default: none)"
    )
    parser.add_argument("--id", dest="identities", action=_IdentityArg, metavar="PHOTO[,PHOTO...]",
                        help="photos of one person (repeat for several people)")  # fmt: skip
    parser.add_argument("--id-name", dest="identities", action=_IdentityArg, metavar="NAME",
                        help="a stored identity (see `uniportrait id`)")  # fmt: skip
    parser.add_argument("--mix", action="append", default=[], metavar="[K=]PHOTO:SCALE",
                        help="blend another face into identity K (default 1) with SCALE in [0, 1]")  # fmt: skip
    parser.add_argument("--out", required=True,
                        help="output folder; each run writes into a new run-NNN folder inside it")  # fmt: skip
    add_setting_args(parser)
    parser.add_argument("--save-routing", action="store_true", help="also write routing-map overlays")
    parser.add_argument("--check-faces", action="store_true",
                        help="check each result with the dlib face matcher; re-sample with the next seed "
                        "when an identity is missing or duplicated")  # fmt: skip
    parser.add_argument("--retries", type=int, default=2, metavar="K",
                        help="with --check-faces: re-sample at most K times (default 2)")  # fmt: skip
    parser.add_argument("--home", default=None, help="identity bank location (default: $UNIPORTRAIT_HOME)")
    add_model_args(parser)
    add_limit_args(parser)
    parser.set_defaults(func=run, identities=None)


def add_setting_args(parser: argparse.ArgumentParser) -> None:
    """--steps, --seed, --guidance-scale, ...: defaults and help from :mod:`uniportrait.settings`."""
    from uniportrait.settings import (
        FACEID_SCALE,
        GUIDANCE_SCALE,
        HEIGHT,
        IDENTITY_GUIDANCE,
        NUM_IMAGES,
        SEED,
        STEPS,
        STRUCTURE_SCALE,
        WIDTH,
    )

    def add(setting, default, help_default: str | None = None):
        kind = int if setting.integer else float
        shown = help_default or f"default {default}"
        parser.add_argument(setting.option, type=kind, default=default, help=f"{setting.help} ({shown})")

    add(STEPS, None, "default: the preset's, 10 for tiny, 25 for sd15")
    add(SEED, 0)
    add(GUIDANCE_SCALE, GUIDANCE_SCALE.default)
    add(IDENTITY_GUIDANCE, None, "default: the guidance scale, one guidance for text and people")
    add(FACEID_SCALE, FACEID_SCALE.default)
    add(STRUCTURE_SCALE, None, "default: by the number of people")
    add(WIDTH, None, "default: the preset's, 256 for tiny, 512 for sd15")
    add(HEIGHT, None, "default: the preset's")
    add(NUM_IMAGES, NUM_IMAGES.default)


@dataclass
class GenerationRequest:
    """Everything one generation needs, validated before any model is loaded."""

    prompt: str
    identity_specs: list[tuple[str, object]]
    mixes: list[tuple[int, list[str], float]] = field(default_factory=list)
    negative_prompt: str | None = None
    steps: int = STEPS.default
    seed: int = 0
    guidance_scale: float = GUIDANCE_SCALE.default
    identity_guidance: float | None = None
    faceid_scale: float = FACEID_SCALE.default
    structure_scale: float | None = None
    width: int = 512
    height: int = 512
    num_images: int = NUM_IMAGES.default

    @property
    def has_photos(self) -> bool:
        """Whether any person or mix is given as photos (else only stored names)."""
        return bool(self.mixes) or any(kind == "photos" for kind, _ in self.identity_specs)

    def validate(self, limits: GenerationLimits | None = None) -> None:
        """The ranges and limits of :mod:`uniportrait.settings`, named as command-line options."""
        limits = limits or GenerationLimits()
        check_prompt(self.prompt, "--prompt", limits, style="cli")
        if self.negative_prompt is not None:
            check_prompt(self.negative_prompt, "--negative-prompt", limits, required=False, style="cli")
        check_settings(self.pipeline_settings(), limits, "cli", num_identities=len(self.identity_specs))
        n_ids = len(self.identity_specs)
        for target, _, _ in self.mixes:
            if target > n_ids:
                raise UniPortraitError(
                    f"--mix targets identity {target} but only {n_ids} identities were given"
                )
        from uniportrait.identity import check_mix_scales

        for k in range(1, n_ids + 1):
            check_mix_scales([s for t, _, s in self.mixes if t == k])
        photos = [p for kind, v in self.identity_specs if kind == "photos" for p in v]  # type: ignore[union-attr]
        check_photos_exist(photos + [p for _, ps, _ in self.mixes for p in ps])
        if any(kind == "photos" and not v for kind, v in self.identity_specs):
            raise UniPortraitError("--id needs at least one photo")

    def pipeline_settings(self) -> dict:
        """The settings by the pipeline's argument names."""
        return {
            "num_inference_steps": self.steps,
            "seed": self.seed,
            "guidance_scale": self.guidance_scale,
            "identity_guidance_scale": self.identity_guidance,
            "faceid_scale": self.faceid_scale,
            "face_structure_scale": self.structure_scale,
            "width": self.width,
            "height": self.height,
            "num_images_per_prompt": self.num_images,
        }

    def settings(self) -> dict:
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "seed": self.seed,
            "guidance_scale": self.guidance_scale,
            "identity_guidance_scale": self.identity_guidance,
            "faceid_scale": self.faceid_scale,
            "face_structure_scale": self.structure_scale,
            "width": self.width,
            "height": self.height,
        }


def read_faces(request: GenerationRequest, analyzer=None) -> dict[str, object]:
    """Every photo of the request read, checked and its face aligned: ``{path: 224×224 crop}``.

    Runs before the model loads, so a bad photo (empty, corrupt, too small, no face) costs
    nothing. A photo with several faces, or one photo given for two people, gets a warning.
    """
    from uniportrait.faces import get_face_analyzer
    from uniportrait.photos import aligned_face

    owners: dict[Path, set[int]] = {}
    for k, (kind, value) in enumerate(request.identity_specs, start=1):
        if kind == "photos":
            for p in value:  # type: ignore[union-attr]
                owners.setdefault(Path(p).resolve(), set()).add(k)
    for path, people in owners.items():
        if len(people) > 1:
            logger.warning("%s is given for people %s: they will look alike", path, sorted(people))
    paths = [p for kind, v in request.identity_specs if kind == "photos" for p in v]  # type: ignore[union-attr]
    paths += [p for _, ps, _ in request.mixes for p in ps]
    if not paths:
        return {}
    analyzer = analyzer or get_face_analyzer()
    return {p: aligned_face(p, analyzer) for p in dict.fromkeys(paths)}


def build_identities(
    pipe, request: GenerationRequest, bank, faces: dict | None = None, analyzer=None
) -> list:
    """Photos are encoded from their aligned faces (:func:`read_faces`, read now if not given,
    with ``analyzer``: default MTCNN); stored names are read from the bank (no encoding)."""
    from uniportrait.faces import DEFAULT_ANALYZER, aligner_id
    from uniportrait.identity import check_mix_scales
    from uniportrait.photos import identity_from_crops

    faces = read_faces(request, analyzer) if faces is None else faces
    aligner = aligner_id(analyzer or DEFAULT_ANALYZER)  # read_faces' analyzer
    identities = []
    for k, (kind, value) in enumerate(request.identity_specs, start=1):
        mixes = [
            (identity_from_crops(pipe, [faces[p] for p in photos], aligner=aligner), s)
            for t, photos, s in request.mixes
            if t == k
        ]
        if kind == "name":
            identity = bank.get(value)
            if mixes:
                identity.mix = identity.mix + mixes
                check_mix_scales([s for _, s in identity.mix])
        else:
            identity = identity_from_crops(pipe, [faces[p] for p in value], mixes, aligner=aligner)  # type: ignore[union-attr]
        identities.append(identity)
    return identities


def run_pipeline(pipe, request: GenerationRequest, identities: list, save_routing: bool):
    """One pipeline call for ``request`` (seeded with ``request.seed``)."""
    import torch

    generator = torch.Generator().manual_seed(request.seed)
    return pipe(
        request.prompt,
        identities=identities,
        negative_prompt=request.negative_prompt,
        faceid_scale=request.faceid_scale,
        face_structure_scale=request.structure_scale,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        identity_guidance_scale=request.identity_guidance,
        height=request.height,
        width=request.width,
        num_images_per_prompt=request.num_images,
        generator=generator,
        return_routing_maps=save_routing,
    )


def generate_and_write(
    pipe,
    request: GenerationRequest,
    identities: list,
    out: Path,
    save_routing: bool,
    result=None,
    extra_metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Run the pipeline (unless ``result`` is given), then write every file; on a failure while
    writing, remove what was written."""
    from PIL import Image

    from uniportrait.faces.image_io import save_png_atomic
    from uniportrait.visualize import routing_overlay

    if result is None:
        result = run_pipeline(pipe, request, identities, save_routing)
    for k, flagged in enumerate(getattr(result, "nsfw_content_detected", None) or []):
        if flagged:
            logger.warning("image %d was flagged by the safety checker and is black", k)
    meta = {"prompt": request.prompt, "uniportrait": json.dumps(request.settings()), **(extra_metadata or {})}
    files: list[tuple[Path, Image.Image, dict | None]] = []
    for k, image in enumerate(result.images):
        files.append((out / f"image_{k:02d}.png", image, meta))
        if save_routing and result.routing_maps is not None and len(identities) >= 2:
            files.append((out / f"routing_{k:02d}.png", routing_overlay(image, result.routing_maps[k]), None))
    for i, identity in enumerate(identities, start=1):
        for j, crop in enumerate(identity.crops if identity.crops is not None else []):
            files.append((out / f"reference_{i}_{j}.png", Image.fromarray(crop.numpy()), None))
    written: list[Path] = []
    try:
        for path, image, metadata in files:
            written.append(save_png_atomic(image, path, metadata))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return written


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    from uniportrait.presets.registry import preset_defaults

    defaults = preset_defaults(args.preset)
    return GenerationRequest(
        prompt=args.prompt,
        identity_specs=list(args.identities or []),
        mixes=[parse_mix(m) for m in args.mix],
        negative_prompt=args.negative_prompt,
        steps=defaults.steps if args.steps is None else args.steps,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        identity_guidance=args.identity_guidance,
        faceid_scale=args.faceid_scale,
        structure_scale=args.structure_scale,
        width=defaults.side if args.width is None else args.width,
        height=defaults.side if args.height is None else args.height,
        num_images=args.num_images,
    )


def run(args: argparse.Namespace) -> int:
    from uniportrait.bank import IdentityBank
    from uniportrait.cli._common import limits_from_args, preset_face_analyzer

    request = request_from_args(args)
    request.validate(limits_from_args(args))
    if args.check_faces and args.retries < 0:
        raise UniPortraitError("--retries must be 0 or more")
    if args.save_routing and len(request.identity_specs) < 2:
        raise UniPortraitError(
            "--save-routing needs two or more people (routing splits the image between them)"
        )
    bank = IdentityBank(args.home)
    for kind, value in request.identity_specs:
        if kind == "name":
            bank.info(value)  # unknown names fail before any model is loaded
    out_existed = Path(args.out).is_dir()
    out = check_output_folder(args.out)
    run_folder = None
    try:
        analyzer = preset_face_analyzer(args.preset) if request.has_photos else None
        faces = read_faces(request, analyzer)  # bad photos fail before the model loads
        pipe = load_pipeline_from_args(args)
        identities = build_identities(pipe, request, bank, faces, analyzer)
        run_folder = new_run_folder(out)
        check = _generate(args, pipe, request, identities, bank, run_folder)
    except BaseException:
        remove_empty_folders(run_folder, None if out_existed else out)
        raise
    if check is not None and not check.passed:
        raise FaceCheckFailed(f"face check failed in every attempt; the best images are in {run_folder}")
    return 0


class FaceCheckFailed(UniPortraitError):
    """``--check-faces``: no attempt had every identity once (the images are still written)."""

    exit_code = 3


def _generate(args, pipe, request, identities, bank, run_folder: Path):
    """Generate (with the face check when asked), write into ``run_folder``, print the paths."""
    result, extra, check = None, None, None
    if args.check_faces:
        from dataclasses import replace

        from uniportrait.evaluation.guard import FaceChecker, sample_with_face_check

        checker = FaceChecker.for_identities(identities, "dlib", bank)
        result, check = sample_with_face_check(
            lambda seed: run_pipeline(pipe, replace(request, seed=seed), identities, args.save_routing),
            checker,
            request.seed,
            args.retries,
        )
        request = replace(request, seed=check.seed)
        extra = {"face_check": json.dumps(check.to_dict())}
    written = generate_and_write(pipe, request, identities, run_folder, args.save_routing, result, extra)
    for path in written:
        print(path)
    if check is not None:
        print(check.summary())
    return check
