"""CDAN training data as Hugging Face `datasets` builders: IU X-Ray, MIMIC-CXR and the embedded demo (docs/data.md)."""

from .annotation import iter_r2gen_annotation
from .base import (
    PROBLEM_POLICIES,
    SKIPPED_FILENAME,
    SPLITS,
    CdanBuilder,
    CdanBuilderConfig,
    CdanDataError,
    ProblemLog,
    canonical_split,
    check_image_file,
    check_study,
    report_labels,
    seeded_split,
    view_from_code,
)
from .demo import DEMO_REPORTS_FILE, DemoBuilder, DemoConfig
from .export import export_to_parquet, push_to_hub
from .iu_xray import IuXrayBuilder, IuXrayConfig
from .loading import BUILDERS, get_cdan_builder, load_cdan_dataset
from .mimic_cxr import MimicCxrBuilder, MimicCxrConfig, MimicTables
from .openi import (
    OpenIReport,
    iter_openi_report_files,
    iu_views_from_dicom,
    match_r2gen_to_openi,
    parse_openi_report,
    read_iu_view_positions,
    read_openi_reports,
    select_view_indices,
)


__all__ = [
    "BUILDERS",
    "DEMO_REPORTS_FILE",
    "PROBLEM_POLICIES",
    "SKIPPED_FILENAME",
    "SPLITS",
    "CdanBuilder",
    "CdanBuilderConfig",
    "CdanDataError",
    "DemoBuilder",
    "DemoConfig",
    "IuXrayBuilder",
    "IuXrayConfig",
    "MimicCxrBuilder",
    "MimicCxrConfig",
    "MimicTables",
    "OpenIReport",
    "ProblemLog",
    "canonical_split",
    "check_image_file",
    "check_study",
    "export_to_parquet",
    "get_cdan_builder",
    "iter_openi_report_files",
    "iter_r2gen_annotation",
    "iu_views_from_dicom",
    "load_cdan_dataset",
    "match_r2gen_to_openi",
    "parse_openi_report",
    "push_to_hub",
    "read_iu_view_positions",
    "read_openi_reports",
    "report_labels",
    "seeded_split",
    "select_view_indices",
    "view_from_code",
]
