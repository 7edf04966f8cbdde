"""Evaluation: the paper's Face Sim / CLIP-T protocol for single- and multi-ID images (DESIGN §8),
the multi-ID failure flags (missing, duplicated, blending identities), and the generation guard.

    from uniportrait.evaluation import evaluate_rows, get_backend, read_manifest, write_report

    report = evaluate_rows(read_manifest("manifest.jsonl"), get_backend("dlib"))
    write_report(report, "eval_out")      # results.json, results.md, contact_sheet.png

See ``docs/evaluation.md`` for the protocol, the backends and the file formats.
"""

from uniportrait.evaluation.backends import (
    BACKENDS,
    DEFAULT_THRESHOLDS,
    CurricularBackend,
    DlibBackend,
    FaceSimilarityBackend,
    InsightFaceBackend,
    get_backend,
)
from uniportrait.evaluation.benchmark import BenchmarkSpec, read_spec, run_grid
from uniportrait.evaluation.clip_score import ClipScorer, load_clip_scorer
from uniportrait.evaluation.evaluate import (
    EvaluationReport,
    ImageResult,
    evaluate_image,
    evaluate_rows,
    summarize,
)
from uniportrait.evaluation.guard import (
    FaceCheck,
    FaceChecker,
    FaceCheckReport,
    generate_with_face_check,
    sample_with_face_check,
)
from uniportrait.evaluation.manifest import (
    IdentitySpec,
    ManifestError,
    ManifestRow,
    read_manifest,
    write_manifest,
)
from uniportrait.evaluation.matching import MatchResult, Thresholds, assign, match_faces
from uniportrait.evaluation.references import Reference, reference_from_crops, reference_from_photos
from uniportrait.evaluation.report import to_markdown, write_report

__all__ = [
    "BACKENDS",
    "DEFAULT_THRESHOLDS",
    "BenchmarkSpec",
    "ClipScorer",
    "CurricularBackend",
    "DlibBackend",
    "EvaluationReport",
    "FaceCheck",
    "FaceCheckReport",
    "FaceChecker",
    "FaceSimilarityBackend",
    "IdentitySpec",
    "ImageResult",
    "InsightFaceBackend",
    "ManifestError",
    "ManifestRow",
    "MatchResult",
    "Reference",
    "Thresholds",
    "assign",
    "evaluate_image",
    "evaluate_rows",
    "generate_with_face_check",
    "get_backend",
    "load_clip_scorer",
    "match_faces",
    "read_manifest",
    "read_spec",
    "reference_from_crops",
    "reference_from_photos",
    "run_grid",
    "sample_with_face_check",
    "summarize",
    "to_markdown",
    "write_manifest",
    "write_report",
]
