"""Interval's settings: one pydantic-settings class, read once at the edge and passed inward.

Environment variables use the prefix ``INTERVAL_`` (``INTERVAL_SEGMENTER_WEIGHTS=/path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.dicom_rules import SeriesRules
from core.lesions import LesionFilter
from core.pipeline import AnalysisSettings

__all__ = ["DEV_TOKEN_SECRET", "Settings"]

_LESIONS = LesionFilter()
_ANALYSIS = AnalysisSettings()
_SERIES = SeriesRules()
_DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "segmenter.pt"
# Signs development tokens only; refused when ``environment`` is production.
DEV_TOKEN_SECRET = "interval-development-token-secret-not-for-production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTERVAL_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    # The segmentation model (models/segmentation/contract.py): the built-in UNet from ``segmenter_weights``, a
    # MONAI bundle directory or a TorchScript file (``segmenter_model``). Only point it at models you trust: a
    # bundle config and a TorchScript file are code.
    segmenter_kind: Literal["builtin", "bundle", "torchscript"] = "builtin"
    segmenter_weights: Path = _DEFAULT_WEIGHTS
    # per-scanner recalibrations written by `interval calibrate` (models/segmentation/calibration.py); applied
    # to every study whose Manufacturer / model / station they name
    calibration_dir: Path = Path("calibrations")
    segmenter_model: Path | None = None
    # What a user's model expects and returns, when its metadata.json does not say (or to override it):
    # input windows in HU (one channel each), one Interval class per output channel (background, liver, lung,
    # lesion, other), the grid it was trained on (slice, row, column mm), its sliding-window patch, and whether
    # it outputs logits or probabilities. JSON in the environment: INTERVAL_SEGMENTER_ROI_KJI='[64, 96, 96]'
    segmenter_input_windows_hu: list[tuple[float, float]] | None = None
    segmenter_output_classes: list[Literal["background", "liver", "lung", "lesion", "other"]] | None = None
    segmenter_spacing_kji_mm: tuple[float, float, float] | None = None
    segmenter_roi_kji: tuple[int, int, int] | None = None
    segmenter_output: Literal["logits", "probabilities"] | None = None
    # Test-time augmentation: each detected lesion's window is run again flipped (lr: left-right, ap:
    # anterior-posterior, si: head-feet, which the built-in model was not trained for) and the spread of its
    # probability, long axis and volume is reported. ~0.35 s per lesion for three flips on one CPU thread;
    # '[]' turns it off. The segmentation itself (and the model version) does not change.
    segmenter_tta: list[Literal["lr", "ap", "lr+ap", "si"]] = ["lr", "ap", "lr+ap"]
    # Clear-contrast lesion edges (a lung nodule in air: many times the noise) placed at half the lesion's contrast,
    # within two voxels of the model's edge (core.edges); off: the model's argmax edge as it is.
    segmenter_edge_refinement: bool = True
    database_url: str = "sqlite:///interval.db"
    # defaults are the core's own, so that the CLI and a direct caller of analyze_study agree
    min_lesion_long_axis_mm: float = _LESIONS.min_long_axis_mm
    min_lesion_volume_ml: float = _LESIONS.min_volume_ml
    min_lesion_probability: float = _LESIONS.min_probability
    match_gate_mm: float = _ANALYSIS.gate_mm
    new_lesion_min_mm: float = _ANALYSIS.new_lesion_min_mm
    new_lesion_min_probability: float = _ANALYSIS.new_lesion_min_probability
    new_lesion_min_axis_ratio: float = _ANALYSIS.new_lesion_min_axis_ratio
    guided_search: bool = _ANALYSIS.guided_search
    contrast_search: bool = _ANALYSIS.contrast_search
    faint_search: bool = _ANALYSIS.faint_search
    retrospective_check: bool = _ANALYSIS.retrospective_check
    irecist: bool = _ANALYSIS.irecist
    remeasure_priors: bool = _ANALYSIS.remeasure_priors
    # FHIR API: bearer JWTs signed HS256 with the secret, or RS256/RS384 verified with the public key (PEM)
    api_token_secret: str = DEV_TOKEN_SECRET
    api_token_issuer: str = "interval"
    api_token_public_key: Path | None = None
    # the SMART token endpoint that issues those JWTs, advertised in the CapabilityStatement when set
    api_token_url: str | None = None
    public_base_url: str = "http://127.0.0.1:8000"
    # The EHR (FHIR R4) that holds the priors and receives the reports; unset: no priors, nothing published
    ehr_base_url: str | None = None
    # SMART Backend Services, when the EHR requires it: client id + private key (PEM) that signs the assertion
    ehr_client_id: str | None = None
    ehr_private_key: Path | None = None
    ehr_scope: str = "system/Patient.rs system/DiagnosticReport.crus system/Observation.crs system/ImagingStudy.crs system/BodyStructure.crs system/Condition.rs system/Device.crs system/Provenance.cr"
    ehr_token_url: str | None = None  # discovered from .well-known/smart-configuration when unset
    ehr_retry_attempts: int = 4
    ehr_backoff_s: float = 0.5
    ehr_timeout_s: float = 30.0
    # Where CT studies are found by StudyInstanceUID (until a PACS is configured): folders searched
    image_roots: list[Path] = []
    # --- DICOM ingest: which series of a study is analysed, what is tolerated in it (adapters/dicom_rules.py) ---
    # among the usable axial CT series: the thinnest slices first, or the most slices first
    series_prefer: Literal["thinnest", "most_slices"] = _SERIES.prefer
    series_max_obliquity_deg: float = _SERIES.max_obliquity_deg  # slice normal vs the head-feet axis
    series_min_slices: int = _SERIES.min_slices
    series_exclude_derived: bool = _SERIES.exclude_derived_secondary  # DERIVED\SECONDARY: reformats, MIP
    # a step between slices may differ from the median by this fraction; more is missing slices (refused)
    slice_spacing_tolerance: float = _SERIES.spacing_tolerance
    # a tilted gantry's sheared slices: refused, or shifted in-plane onto an orthogonal grid
    gantry_tilt: Literal["refuse", "resample"] = _SERIES.gantry_tilt
    # Per-study results and label maps kept for evidence images (adapters/artifacts.py)
    artifacts_dir: Path = Path("artifacts")
    # Who writes the report text: the fine-tuned language model (verified sentence by sentence) or the
    # deterministic wording alone
    report_drafter: Literal["model", "deterministic"] = "deterministic"
    # The model's decoding is kept to the facts (no size that is not the named lesion's, no contradicting
    # label or claim word; models/drafter/constrained.py); off: plain greedy, still verified afterwards
    report_drafter_constrained: bool = True
    # Where Tasks posted to the API are analysed: in the API process, or by Celery workers (`interval worker`)
    pipeline: Literal["in-process", "celery"] = "in-process"
    # --- distributed pipeline: Celery workers (`interval worker`), Redis broker (workers/celery_app.py) ---
    broker_url: str = "redis://127.0.0.1:6379/0"
    # a task delivered to a worker and not acknowledged within this time is delivered again (Redis); it must
    # exceed the longest task (task_time_limit_s) and the longest retry delay (task_retry_backoff_max_s)
    visibility_timeout_s: float = 3600.0
    # hard limit of one task; the soft limit, which records "took too long" on the Task, comes 10% earlier
    task_time_limit_s: float = 1800.0
    # retries of a step that met an unreachable EHR, PACS or database: exponential backoff, then `failed`
    task_max_retries: int = 5
    task_retry_backoff_s: float = 2.0
    task_retry_backoff_max_s: float = 300.0
    # how often each worker returns unacknowledged deliveries older than visibility_timeout_s to their queue
    # (a worker killed mid-task); kombu 5.6 alone does it at worker start and then every ~100 s
    unacked_restore_interval_s: float = 30.0
    unacked_restore_limit: int = 100  # at most this many per pass
    # workers publish task events (started, succeeded, failed, retried) so that Flower (`interval flower`)
    # shows every task; the events carry task ids and Celery arguments, which are ids and URIs, never PHI
    task_events: bool = True
    # "user:password" that Flower asks for (its HTTP API refuses unauthenticated calls); unset: Flower refuses
    # to start unless given --no-auth for a loopback-only address
    flower_basic_auth: str | None = None
    # Where studies are retrieved from when the image source is a PACS (DICOMweb); unset: image_roots
    pacs_dicomweb_url: str | None = None
    image_cache_dir: Path = Path("cache/studies")
    # The model version the API keys Tasks with when the analysis runs on workers (it loads no model);
    # unset: derived from segmenter_weights exactly as the workers' segmenter does
    model_version: str | None = None
    # Test hooks, refused in production: "truth:<folder>" replaces the model by the synthetic cohort's
    # ground-truth label maps (fixtures.synth.evaluation.TruthSegmenter; a patient folder or a folder of
    # patients); the delay is slept before and again after each analysis, so that a test can kill a worker
    # before or after its report reached the EHR.
    test_segmenter: str | None = None
    test_analysis_delay_s: float = 0.0

    @model_validator(mode="after")
    def _queue_sane(self) -> Settings:
        if self.task_time_limit_s <= 0 or self.task_max_retries < 0 or self.task_retry_backoff_s < 0:
            raise ValueError(
                "INTERVAL_TASK_TIME_LIMIT_S must be > 0, INTERVAL_TASK_MAX_RETRIES and "
                "INTERVAL_TASK_RETRY_BACKOFF_S >= 0"
            )
        longest = max(self.task_time_limit_s, self.task_retry_backoff_max_s)
        if self.visibility_timeout_s <= longest:
            raise ValueError(
                f"INTERVAL_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s:g} s) must exceed the longest task "
                f"(INTERVAL_TASK_TIME_LIMIT_S) and retry delay (INTERVAL_TASK_RETRY_BACKOFF_MAX_S), here "
                f"{longest:g} s: a task still running would otherwise be delivered a second time"
            )
        if self.unacked_restore_interval_s <= 0 or self.unacked_restore_limit < 1:
            raise ValueError("INTERVAL_UNACKED_RESTORE_INTERVAL_S must be > 0 and _LIMIT >= 1")
        if self.test_segmenter is not None and not self.test_segmenter.startswith("truth:"):
            raise ValueError("INTERVAL_TEST_SEGMENTER must be truth:<folder of synthetic patients>")
        if self.environment == "production" and (
            self.test_segmenter is not None or self.test_analysis_delay_s
        ):
            raise ValueError(
                "INTERVAL_TEST_SEGMENTER and INTERVAL_TEST_ANALYSIS_DELAY_S are test hooks; unset them in "
                "production"
            )
        if self.test_analysis_delay_s < 0:
            raise ValueError("INTERVAL_TEST_ANALYSIS_DELAY_S must be >= 0")
        return self

    @model_validator(mode="after")
    def _segmenter_sane(self) -> Settings:
        if self.segmenter_kind != "builtin" and self.segmenter_model is None:
            raise ValueError(
                f"INTERVAL_SEGMENTER_KIND={self.segmenter_kind} needs INTERVAL_SEGMENTER_MODEL: the MONAI bundle "
                "directory or the TorchScript file"
            )
        return self

    def segmenter_declared(self) -> dict[str, object]:
        """The parts of a user's model contract set here (``models.segmentation.contract``)."""
        declared = {
            "input_windows_hu": self.segmenter_input_windows_hu,
            "output_classes": self.segmenter_output_classes,
            "spacing_kji_mm": self.segmenter_spacing_kji_mm,
            "roi_kji": self.segmenter_roi_kji,
            "output": self.segmenter_output,
        }
        return {k: v for k, v in declared.items() if v is not None}

    @model_validator(mode="after")
    def _sane(self) -> Settings:
        if self.min_lesion_long_axis_mm < 0 or self.match_gate_mm <= 0:
            raise ValueError("lesion size floor must be >= 0 mm and the match gate > 0 mm")
        if self.environment == "production" and self.api_token_secret == DEV_TOKEN_SECRET:
            raise ValueError(
                "INTERVAL_API_TOKEN_SECRET is the development default; set a random secret of at least "
                "32 characters in production"
            )
        if len(self.api_token_secret.encode()) < 32:
            raise ValueError("INTERVAL_API_TOKEN_SECRET must be at least 32 bytes (HS256 key length)")
        if self.api_token_public_key is not None and not self.api_token_public_key.is_file():
            raise ValueError(
                f"INTERVAL_API_TOKEN_PUBLIC_KEY {self.api_token_public_key} is not a file; "
                "give the path of a PEM public key or leave it unset"
            )
        if not self.public_base_url.startswith(("http://", "https://")):
            raise ValueError(
                "INTERVAL_PUBLIC_BASE_URL must be an http(s) URL such as https://interval.example.org"
            )
        self.public_base_url = self.public_base_url.rstrip("/")
        if (self.ehr_client_id is None) != (self.ehr_private_key is None):
            raise ValueError(
                "INTERVAL_EHR_CLIENT_ID and INTERVAL_EHR_PRIVATE_KEY go together (SMART Backend Services)"
            )
        if self.ehr_private_key is not None and not self.ehr_private_key.is_file():
            raise ValueError(f"INTERVAL_EHR_PRIVATE_KEY {self.ehr_private_key} is not a file")
        try:
            self.series_rules()
        except ValueError as exc:
            raise ValueError(
                f"DICOM ingest settings (INTERVAL_SERIES_*, INTERVAL_SLICE_SPACING_TOLERANCE): {exc}"
            ) from None
        if self.ehr_retry_attempts < 1 or self.ehr_backoff_s < 0:
            raise ValueError("INTERVAL_EHR_RETRY_ATTEMPTS must be >= 1 and INTERVAL_EHR_BACKOFF_S >= 0")
        return self

    def series_rules(self) -> SeriesRules:
        """The DICOM ingest rules (raises ValueError, naming the setting, when one is out of range)."""
        return SeriesRules(
            prefer=self.series_prefer,
            max_obliquity_deg=self.series_max_obliquity_deg,
            min_slices=self.series_min_slices,
            exclude_derived_secondary=self.series_exclude_derived,
            spacing_tolerance=self.slice_spacing_tolerance,
            gantry_tilt=self.gantry_tilt,
        )

    def analysis(self) -> AnalysisSettings:
        return AnalysisSettings(
            lesion_filter=LesionFilter(
                min_long_axis_mm=self.min_lesion_long_axis_mm,
                min_volume_ml=self.min_lesion_volume_ml,
                min_probability=self.min_lesion_probability,
            ),
            gate_mm=self.match_gate_mm,
            new_lesion_min_mm=self.new_lesion_min_mm,
            new_lesion_min_probability=self.new_lesion_min_probability,
            new_lesion_min_axis_ratio=self.new_lesion_min_axis_ratio,
            guided_search=self.guided_search,
            contrast_search=self.contrast_search,
            faint_search=self.faint_search,
            retrospective_check=self.retrospective_check,
            irecist=self.irecist,
            remeasure_priors=self.remeasure_priors,
        )

    # --- web pages (service/web.py) --- declared last, after the methods, to keep them together
    # the session cookie's Secure flag: pages served over https need it; refused off in production
    web_cookie_secure: bool = False
    web_session_ttl_h: float = 12.0  # a login lasts this long (absolute, not sliding)
    # The site of a study is what the analysis recorded in the report's acquisition-site extension (the DICOM
    # StationName until Interval reads InstitutionName): this maps recorded names to site names; unmapped names
    # are their own site. JSON in the environment: INTERVAL_WEB_STATION_SITES='{"GECT02": "north"}'. The
    # analysis uses the same map to find a study's site in the AI switch: give workers the same value.
    web_station_sites: dict[str, str] = {}

    # --- results back to the PACS and the stable-study trigger (workers/analysis.py, workers/pacs_trigger.py) ---
    # with INTERVAL_PACS_DICOMWEB_URL set, each analysis sends its DICOM SEG and TID 1500 SR into the study
    pacs_publish_results: bool = True
    # Orthanc's REST root, whose /changes `interval watch-pacs` polls; unset: INTERVAL_PACS_DICOMWEB_URL without
    # its last path segment (http://pacs:8042/dicom-web -> http://pacs:8042)
    pacs_orthanc_url: str | None = None
    # where `interval watch-pacs` keeps its position in Orthanc's change log (and the series it has seen)
    pacs_watch_state: Path = Path("cache/pacs-watch.json")
    pacs_watch_interval_s: float = 1.0

    # --- drift monitoring (core/drift.py, adapters/drift_store.py) ---
    # every analysed study records its input and output signals and steps its scanner's drift monitor (same
    # database); sites come from web_station_sites
    drift_monitor: bool = True
