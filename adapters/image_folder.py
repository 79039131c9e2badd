"""``ImageSource`` over folders of DICOM files (the embedded default; PACS comes via DICOMweb)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from adapters.dicom_rules import SeriesRules
from adapters.dicom_series import DEFAULT_RULES, load_study
from core.errors import NoSeriesFoundError
from core.types import Volume

__all__ = ["FolderImageSource"]


class FolderImageSource:
    """Loads a study from a folder path; finds prior studies by StudyInstanceUID under ``search_roots``.

    The index of ``search_roots`` is built on first use by reading one header per folder. ``rules`` choose the
    series of a study (``Settings.series_rules()``).
    """

    def __init__(self, search_roots: list[Path] | None = None, rules: SeriesRules = DEFAULT_RULES) -> None:
        self.search_roots = list(search_roots or [])
        self.rules = rules
        self._index: dict[str, Path] | None = None

    def load_study(self, ref: str) -> Volume:
        """``ref`` is a folder, or the StudyInstanceUID of a study under ``search_roots``."""
        if Path(ref).is_dir() or not self.search_roots:
            return load_study(Path(ref), self.rules)
        folder = self.folder_of(ref, refresh=True)
        if folder is None:
            raise NoSeriesFoundError(
                f"study {ref} is not in the configured image folders ({len(self.search_roots)} searched)",
                study_uid=ref,
            )
        return load_study(folder, self.rules)

    def folder_of(self, study_uid: str, refresh: bool = False) -> Path | None:
        """The folder holding ``study_uid``; with ``refresh`` the index is rebuilt when it is not in it
        (a study that arrived since the last scan)."""
        if self._index is None or (refresh and study_uid not in self._index):
            self._index = self._build_index()
        return self._index.get(study_uid)

    def _build_index(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for root in self.search_roots:
            folders = {p.parent for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()
            for folder in sorted(folders):
                for f in sorted(folder.iterdir()):
                    if not f.is_file():
                        continue
                    try:
                        ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                    except (InvalidDicomError, EOFError, OSError, ValueError):
                        continue
                    uid = str(ds.get("StudyInstanceUID", ""))
                    if uid:
                        index.setdefault(uid, folder)
                    break
        return index

    def find_study(self, study_uid: str) -> Volume | None:
        folder = self.folder_of(study_uid)
        return load_study(folder, self.rules) if folder is not None else None
