"""Parsers of the raw dataset files users download, into typed records with row-level problem reports.

* :func:`read_slidebench_vqa` -- SlideBench-VQA CSV, TCGA and BCNB layouts -> MultipleChoiceQuestion
* :func:`read_slidebench_caption` -- SlideBench-Caption CSV -> CaptionRecord
* :func:`read_wsi_vqa` -- WSI-VQA JSON (closed and open) -> WsiVqaRecord
* :func:`read_slide_instruction` -- SlideInstruction JSON (stage 1/2) -> InstructionRecord
* :func:`resolve_feature_file` / :class:`FeatureIndex` -- a slide's feature file under a root
* :func:`sha256_file` -- record the source file's hash with every result

Each parser returns a :class:`ParsedFile` (records, problems, sha256, layout, counts).
"""

from sparsewsi.datasets.feature_paths import FeatureIndex, resolve_feature_file
from sparsewsi.datasets.records import (
    LETTERS,
    CaptionRecord,
    DatasetFileError,
    InstructionRecord,
    MultipleChoiceQuestion,
    ParsedFile,
    RowProblem,
    WsiVqaRecord,
    sha256_file,
)
from sparsewsi.datasets.slidebench import detect_vqa_layout, read_slidebench_caption, read_slidebench_vqa
from sparsewsi.datasets.slideinstruct import IMAGE_TOKEN, read_slide_instruction, strip_image_token
from sparsewsi.datasets.wsivqa import match_choice, read_wsi_vqa

__all__ = [
    "IMAGE_TOKEN",
    "LETTERS",
    "CaptionRecord",
    "DatasetFileError",
    "FeatureIndex",
    "InstructionRecord",
    "MultipleChoiceQuestion",
    "ParsedFile",
    "RowProblem",
    "WsiVqaRecord",
    "detect_vqa_layout",
    "match_choice",
    "read_slide_instruction",
    "read_slidebench_caption",
    "read_slidebench_vqa",
    "read_wsi_vqa",
    "resolve_feature_file",
    "sha256_file",
    "strip_image_token",
]
