"""The PACS side of Interval: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) over httpx, an ``ImageSource`` that reads
studies from the PACS, and a watcher for Orthanc's "stable study" announcements.

Errors come from ``core.errors``: ``ExternalServiceError`` when the PACS is unreachable or answers 5xx after the
retries, ``ExternalRequestError`` (here ``DicomWebRequestError``, with ``status_code``) when it refuses a request
(4xx). Messages name the PACS origin, the operation and UIDs; never query values, response bodies or other data that
could identify a patient.

    client = DicomWebClient("http://pacs:8042/dicom-web", timeout=30, retries=3)
    client.search_studies({"PatientID": "..."})          # QIDO-RS: DICOM JSON objects
    client.retrieve_study(study_uid, Path("out/study"))   # WADO-RS: one .dcm file per instance
    client.store([sr_dataset, Path("seg.dcm")])           # STOW-RS

    source = DicomWebImageSource(client, cache_dir)       # core.ports.ImageSource
    source.load_study(study_uid)                          # retrieved once into cache_dir/<uid>/, then reused

    watcher = StableStudyWatcher("http://pacs:8042", since=saved_seq)
    for event in watcher.watch(interval=1.0):             # StableStudy(study_uid, orthanc_id, seq)
        ...; save(watcher.since)
"""

from __future__ import annotations

import io
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import httpx
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from adapters.dicom_rules import SeriesRules
from adapters.dicom_series import DEFAULT_RULES
from adapters.dicom_series import load_study as load_study_folder
from core.errors import ExternalRequestError, ExternalServiceError, InputError, NoSeriesFoundError
from core.types import Volume

__all__ = [
    "DicomWebClient",
    "DicomWebImageSource",
    "DicomWebRequestError",
    "StableStudy",
    "StableStudyWatcher",
    "StowResult",
    "tag_value",
]

DICOM_JSON = "application/dicom+json"
DICOM = "application/dicom"
# transfer-syntax=*: the instances as stored, no transcoding by the PACS
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
STOW_BATCH_BYTES = 64 * 1024 * 1024
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_T = TypeVar("_T")


class DicomWebRequestError(ExternalRequestError):
    """The PACS refused a request (HTTP 4xx); retrying it unchanged will not help."""

    def __init__(self, message: str, *, status_code: int, study_uid: str | None = None) -> None:
        super().__init__(message, study_uid=study_uid)
        self.status_code = status_code


class _Retryable(Exception):
    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


class _Http:
    """httpx with retries (exponential backoff) on transport errors, 429 and 5xx, and Interval's errors."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        retries: int,
        backoff: float,
        max_backoff: float,
        headers: Mapping[str, str] | None,
        transport: httpx.BaseTransport | None,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.origin = f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}"  # no credentials in messages
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.client = httpx.Client(timeout=timeout, headers=dict(headers or {}), transport=transport)

    def close(self) -> None:
        self.client.close()

    def check(self, response: httpx.Response, what: str, study_uid: str | None) -> None:
        """Raise ``_Retryable`` on 429/5xx and ``DicomWebRequestError`` on other 4xx."""
        status = response.status_code
        if status in _RETRY_STATUS or status >= 500:
            raise _Retryable(f"HTTP {status}", _retry_after(response))
        if status >= 400:
            raise DicomWebRequestError(
                f"the PACS at {self.origin} refused {what}: HTTP {status}",
                status_code=status,
                study_uid=study_uid,
            )

    def attempt(self, what: str, study_uid: str | None, call: Callable[[], _T]) -> _T:
        """Run ``call`` up to ``1 + retries`` times; ``call`` raises ``_Retryable`` for what may pass."""
        detail = ""
        for attempt in range(self.retries + 1):
            try:
                return call()
            except _Retryable as exc:
                detail, wait = exc.detail, exc.retry_after
            except httpx.TransportError as exc:
                detail, wait = type(exc).__name__, None
            if attempt < self.retries:
                delay = self.backoff * 2**attempt if wait is None else wait
                time.sleep(min(delay, self.max_backoff))
        raise ExternalServiceError(
            f"the PACS at {self.origin} did not complete {what} after {self.retries + 1} attempt(s) "
            f"({detail}); check that it is running and reachable",
            study_uid=study_uid,
        )

    def request(
        self,
        method: str,
        url: str,
        what: str,
        *,
        study_uid: str | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        def call() -> httpx.Response:
            response = self.client.request(method, url, **kwargs)
            self.check(response, what, study_uid)
            return response

        return self.attempt(what, study_uid, call)


def tag_value(obj: Mapping[str, Any], keyword_or_tag: str) -> Any | None:
    """The first value of an attribute in a DICOM JSON object (``"StudyInstanceUID"`` or ``"0020000D"``)."""
    tag = keyword_or_tag
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
        found = tag_for_keyword(keyword_or_tag)
        if found is None:
            raise KeyError(f"unknown DICOM keyword {keyword_or_tag!r}")
        tag = f"{found:08X}"
    values = obj.get(tag.upper(), {}).get("Value")
    return values[0] if values else None


@dataclass(frozen=True, slots=True)
class StowResult:
    """What a STOW-RS request stored: SOP Instance UIDs, and (UID, failure reason) for refused instances."""

    stored: tuple[str, ...]
    failed: tuple[tuple[str, int], ...]
    retrieve_urls: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failed

    def __add__(self, other: StowResult) -> StowResult:
        return StowResult(
            self.stored + other.stored, self.failed + other.failed, self.retrieve_urls + other.retrieve_urls
        )


def _stow_result(body: Any) -> StowResult:
    stored: list[str] = []
    failed: list[tuple[str, int]] = []
    urls: list[str] = []
    if isinstance(body, Mapping):
        for item in body.get("00081199", {}).get("Value", []) or []:
            uid = tag_value(item, "00081155")
            if uid:
                stored.append(str(uid))
        for item in body.get("00081198", {}).get("Value", []) or []:
            reason = tag_value(item, "00081197")
            failed.append((str(tag_value(item, "00081155") or ""), int(reason) if reason is not None else 0))
        url = tag_value(body, "00081190")
        if url:
            urls.append(str(url))
    return StowResult(tuple(stored), tuple(failed), tuple(urls))


def _as_part10(obj: Dataset | Path | str | bytes) -> bytes:
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, Dataset):
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, obj, enforce_file_format=True)
        return buffer.getvalue()
    return Path(obj).read_bytes()


class _MultipartReader:
    """Incremental ``multipart/related`` parser: ``feed()`` bytes as they arrive; each part's body is written to
    the file object that ``open_part(headers)`` returns. Memory stays at one network chunk."""

    MAX_HEADER_BYTES = 64 * 1024

    def __init__(self, boundary: bytes, open_part: Callable[[dict[str, str]], IO[bytes]]) -> None:
        self._delim = b"\r\n--" + boundary
        self._buf = b"\r\n"  # the first delimiter may open the body: make it look like the others
        self._state = "preamble"
        self._open_part = open_part
        self._out: IO[bytes] | None = None
        self.parts = 0

    @property
    def complete(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            if self._state in ("preamble", "body"):
                idx = self._buf.find(self._delim)
                if idx < 0:
                    keep = len(self._delim) - 1
                    if len(self._buf) > keep:
                        if self._out is not None:
                            self._out.write(self._buf[:-keep])
                        self._buf = self._buf[-keep:]
                    return
                if self._out is not None:
                    self._out.write(self._buf[:idx])
                    self._out.close()
                    self._out = None
                self._buf = self._buf[idx + len(self._delim) :]
                self._state = "delimiter"
            if self._state == "delimiter":
                if len(self._buf) < 2:
                    return
                if self._buf.startswith(b"--"):
                    self._state, self._buf = "done", b""
                    return
                self._state = "headers"
            if self._state == "headers":
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > self.MAX_HEADER_BYTES:
                        raise ValueError("multipart part headers too long")
                    return
                headers: dict[str, str] = {}
                for line in self._buf[:end].decode("latin-1").split("\r\n"):
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                self._buf = self._buf[end + 4 :]
                self._out = self._open_part(headers)
                self.parts += 1
                self._state = "body"
            if self._state == "done":
                return

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _boundary(content_type: str) -> bytes | None:
    match = re.search(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', content_type, flags=re.IGNORECASE)
    if not match:
        return None
    return (match.group(1) or match.group(2)).encode("latin-1")


class DicomWebClient:
    """QIDO-RS, WADO-RS and STOW-RS against ``base_url`` (e.g. ``http://127.0.0.1:8042/dicom-web``).

    Every request is retried ``retries`` times with exponential backoff (``backoff`` s, doubling, at most
    ``max_backoff`` s; ``Retry-After`` is honoured) on transport errors, 429 and 5xx. STOW-RS is safe to repeat:
    storing the same SOP instance again is not an error for a PACS.
    """

    def __init__(
        self,
        base_url: str,
        timeout: float = 30.0,
        retries: int = 3,
        *,
        backoff: float = 0.25,
        max_backoff: float = 5.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = _Http(
            base_url,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=max_backoff,
            headers=headers,
            transport=transport,
        )

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- QIDO-RS ---------------------------------------------------------------------------------------------

    def _search(
        self,
        path: str,
        what: str,
        filters: Mapping[str, str] | None,
        include_fields: Sequence[str],
        limit: int | None,
        offset: int | None,
        study_uid: str | None,
    ) -> list[dict[str, Any]]:
        params: list[tuple[str, str]] = [(k, str(v)) for k, v in (filters or {}).items()]
        params += [("includefield", field) for field in include_fields]
        if limit is not None:
            params.append(("limit", str(limit)))
        if offset is not None:
            params.append(("offset", str(offset)))
        response = self._http.request(
            "GET",
            f"{self.base_url}{path}",
            what,
            study_uid=study_uid,
            params=params,
            headers={"Accept": DICOM_JSON},
        )
        if response.status_code == 204 or not response.content.strip():
            return []
        try:
            body = response.json()
        except ValueError:
            raise ExternalServiceError(
                f"the PACS at {self._http.origin} answered {what} with a body that is not DICOM JSON",
                study_uid=study_uid,
            ) from None
        if not isinstance(body, list):
            raise ExternalServiceError(
                f"the PACS at {self._http.origin} answered {what} with a JSON {type(body).__name__}, not a list",
                study_uid=study_uid,
            )
        return body

    def search_studies(
        self,
        filters: Mapping[str, str] | None = None,
        *,
        include_fields: Sequence[str] = (),
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[dict[str, Any]]:
        """QIDO-RS ``GET /studies``: matching studies as DICOM JSON objects (``tag_value`` reads them)."""
        study_uid = (filters or {}).get("StudyInstanceUID")
        return self._search(
            "/studies", "a QIDO-RS study search", filters, include_fields, limit, offset, study_uid
        )

    def search_series(
        self,
        study_uid: str | None = None,
        filters: Mapping[str, str] | None = None,
        *,
        include_fields: Sequence[str] = (),
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[dict[str, Any]]:
        """QIDO-RS ``GET /studies/{uid}/series`` (or ``GET /series`` across studies)."""
        path = f"/studies/{_checked_uid(study_uid)}/series" if study_uid else "/series"
        return self._search(
            path, "a QIDO-RS series search", filters, include_fields, limit, offset, study_uid
        )

    def search_instances(
        self,
        study_uid: str,
        series_uid: str | None = None,
        filters: Mapping[str, str] | None = None,
        *,
        include_fields: Sequence[str] = (),
        limit: int | None = None,
        offset: int | None = None,
    ) -> list[dict[str, Any]]:
        """QIDO-RS ``GET /studies/{uid}[/series/{uid}]/instances``."""
        path = f"/studies/{_checked_uid(study_uid)}"
        if series_uid:
            path += f"/series/{_checked_uid(series_uid)}"
        return self._search(
            path + "/instances",
            "a QIDO-RS instance search",
            filters,
            include_fields,
            limit,
            offset,
            study_uid,
        )

    # -- WADO-RS ---------------------------------------------------------------------------------------------

    def retrieve_study(self, study_uid: str, dest_dir: Path) -> Path:
        """WADO-RS ``GET /studies/{uid}``: write every instance, as stored, to ``dest_dir/<SOPInstanceUID>.dcm``.

        ``dest_dir`` is created; an instance already there is replaced. A transfer that breaks off is retried from
        the start; the files of the broken attempt are removed. Returns ``dest_dir``.
        """
        return self._retrieve(
            f"/studies/{_checked_uid(study_uid)}", "a WADO-RS study retrieve", study_uid, dest_dir
        )

    def retrieve_series(self, study_uid: str, series_uid: str, dest_dir: Path) -> Path:
        """WADO-RS ``GET /studies/{uid}/series/{uid}`` into ``dest_dir`` (as ``retrieve_study``)."""
        path = f"/studies/{_checked_uid(study_uid)}/series/{_checked_uid(series_uid)}"
        return self._retrieve(path, "a WADO-RS series retrieve", study_uid, dest_dir)

    def _retrieve(self, path: str, what: str, study_uid: str, dest_dir: Path) -> Path:
        dest_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:8]
        written: list[Path] = []

        def open_part(headers: dict[str, str]) -> IO[bytes]:
            media = headers.get("content-type", DICOM).split(";", 1)[0].strip().lower()
            if media != DICOM:
                raise _BadPayload(f"a part of type {media!r} instead of {DICOM}")
            target = dest_dir / f".wado-{token}-{len(written):05d}.part"  # hidden until complete
            written.append(target)
            return target.open("wb")

        def call() -> Path:
            for stale in written:  # an earlier attempt broke off
                stale.unlink(missing_ok=True)
            written.clear()
            with self._http.client.stream(
                "GET", f"{self.base_url}{path}", headers={"Accept": WADO_ACCEPT}
            ) as resp:
                self._http.check(resp, what, study_uid)
                boundary = _boundary(resp.headers.get("Content-Type", ""))
                if (
                    not resp.headers.get("Content-Type", "").lower().startswith("multipart/related")
                    or not boundary
                ):
                    raise ExternalServiceError(
                        f"the PACS at {self._http.origin} answered {what} without a multipart/related body",
                        study_uid=study_uid,
                    )
                reader = _MultipartReader(boundary, open_part)
                try:
                    for chunk in resp.iter_bytes():
                        reader.feed(chunk)
                except _BadPayload as exc:
                    raise ExternalServiceError(
                        f"the PACS at {self._http.origin} answered {what} with {exc}", study_uid=study_uid
                    ) from None
                except ValueError as exc:
                    raise _Retryable(f"malformed multipart body ({exc})") from None
                finally:
                    reader.abort()
                if not reader.complete:
                    raise _Retryable("the multipart body ended early")
            if not written:
                raise ExternalServiceError(
                    f"the PACS at {self._http.origin} answered {what} with no instances", study_uid=study_uid
                )
            for index, part in enumerate(written):
                part.rename(dest_dir / _instance_file_name(part, f"{token}-{index:05d}"))
            written.clear()
            return dest_dir

        try:
            return self._http.attempt(what, study_uid, call)
        except BaseException:
            for stale in written:
                stale.unlink(missing_ok=True)
            raise

    # -- STOW-RS ---------------------------------------------------------------------------------------------

    def store(
        self,
        objects: Iterable[Dataset | Path | str | bytes],
        *,
        study_uid: str | None = None,
        check: bool = True,
        batch_bytes: int = STOW_BATCH_BYTES,
    ) -> StowResult:
        """STOW-RS ``POST /studies[/{uid}]``: datasets, Part 10 files or their bytes, in requests of at most
        ``batch_bytes`` (one object larger than that goes alone). With ``check`` an instance the PACS refuses
        raises ``DicomWebRequestError``; otherwise the refusals are in ``StowResult.failed``."""
        path = f"/studies/{_checked_uid(study_uid)}" if study_uid else "/studies"
        result = StowResult((), (), ())
        batch: list[bytes] = []
        size = 0
        for obj in objects:
            data = _as_part10(obj)
            if batch and size + len(data) > batch_bytes:
                result += self._store_batch(path, batch, study_uid)
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        if batch:
            result += self._store_batch(path, batch, study_uid)
        if check and result.failed:
            uids = ", ".join(uid for uid, _ in result.failed[:3])
            raise DicomWebRequestError(
                f"the PACS at {self._http.origin} refused {len(result.failed)} of "
                f"{len(result.failed) + len(result.stored)} instance(s) sent by STOW-RS ({uids})",
                status_code=409,
                study_uid=study_uid,
            )
        return result

    def _store_batch(self, path: str, parts: list[bytes], study_uid: str | None) -> StowResult:
        boundary = f"interval-{uuid.uuid4().hex}"
        head = f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode()
        body = b"".join(head + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()
        response = self._http.request(
            "POST",
            f"{self.base_url}{path}",
            "a STOW-RS store",
            study_uid=study_uid,
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="{DICOM}"; boundary={boundary}',
                "Accept": DICOM_JSON,
            },
        )
        try:
            return _stow_result(response.json()) if response.content.strip() else StowResult((), (), ())
        except ValueError:
            raise ExternalServiceError(
                f"the PACS at {self._http.origin} answered a STOW-RS store with a body that is not DICOM JSON",
                study_uid=study_uid,
            ) from None


class _BadPayload(Exception):
    pass


def _instance_file_name(path: Path, fallback: str) -> str:
    """``<SOPInstanceUID>.dcm``; ``<fallback>.dcm`` when the header cannot be read (the reader reports it)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        uid = str(ds.get("SOPInstanceUID", ""))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError):
        uid = ""
    return f"{uid if _UID.fullmatch(uid) and len(uid) <= 64 else fallback}.dcm"


class _StudyNotInPacs(NoSeriesFoundError):
    pass


def _checked_uid(uid: str | None) -> str:
    """A DICOM UID (digits and dots, at most 64 characters): safe in a URL path and as a folder name."""
    if uid is None or len(uid) > 64 or not _UID.fullmatch(uid):
        length = 0 if uid is None else len(uid)
        raise InputError(
            f"expected a DICOM UID (digits and dots, at most 64 characters), got {length} other character(s)"
        )
    return uid


class DicomWebImageSource:
    """``core.ports.ImageSource`` over a PACS: a study is retrieved once into ``cache_dir/<StudyInstanceUID>/``
    (atomically: a half-retrieved study never appears there) and then read like a folder, with the same series
    selection and checks (``adapters.dicom_series.load_study``)."""

    def __init__(self, client: DicomWebClient, cache_dir: Path, rules: SeriesRules = DEFAULT_RULES) -> None:
        self.client = client
        self.cache_dir = cache_dir
        self.rules = rules
        self._lock = threading.Lock()

    def study_dir(self, study_uid: str) -> Path:
        return self.cache_dir / _checked_uid(study_uid)

    def fetch(self, study_uid: str) -> Path:
        """The study's folder in the cache, retrieving it from the PACS when it is not there yet."""
        final = self.study_dir(study_uid)
        if final.is_dir():
            return final
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        partial = self.cache_dir / f".{study_uid}.partial-{uuid.uuid4().hex[:8]}"
        try:
            self.client.retrieve_study(study_uid, partial)
        except DicomWebRequestError as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if exc.status_code == 404:
                raise _StudyNotInPacs(
                    f"study {study_uid} is not in the PACS at {self.client.base_url}", study_uid=study_uid
                ) from None
            raise
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        with self._lock:
            try:
                partial.rename(final)
            except OSError:  # another thread or process got there first
                shutil.rmtree(partial, ignore_errors=True)
                if not final.is_dir():
                    raise
        return final

    def evict(self, study_uid: str) -> None:
        """Forget the cached copy (the study changed in the PACS)."""
        shutil.rmtree(self.study_dir(study_uid), ignore_errors=True)

    def load_study(self, ref: str) -> Volume:
        """The CT volume of StudyInstanceUID ``ref``."""
        return load_study_folder(self.fetch(ref), self.rules)

    def find_study(self, study_uid: str) -> Volume | None:
        """The study's volume, or None when the PACS does not hold it."""
        cached = self.study_dir(study_uid).is_dir()
        if not cached and not self.client.search_studies({"StudyInstanceUID": study_uid}, limit=1):
            return None
        try:
            return self.load_study(study_uid)
        except _StudyNotInPacs:
            return None  # deleted between the search and the retrieve


@dataclass(frozen=True, slots=True)
class StableStudy:
    """Orthanc announced that a study received no new instance for ``StableAge`` seconds."""

    study_uid: str
    orthanc_id: str
    seq: int


class StableStudyWatcher:
    """Polls Orthanc's change log (``GET /changes?since=N&limit=M``) for ``StableStudy`` changes.

    ``since`` is the last change sequence number handled: persist it (an int) and pass it back after a restart.
    ``poll()`` returns the events since then and moves ``since`` past them; ``watch()`` moves it after each event
    the caller has taken (at-least-once: a study seen again is the idempotency key's business). A study that gets
    more instances later (e.g. Interval's own SEG and SR) is announced as stable again.
    """

    def __init__(
        self,
        orthanc_url: str,
        *,
        since: int = 0,
        limit: int = 100,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.25,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = _Http(
            orthanc_url,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_backoff=5.0,
            headers=headers,
            transport=transport,
        )
        self.since = since
        self.limit = limit

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StableStudyWatcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def skip_existing(self) -> int:
        """Start after the newest change (ignore the history); returns the new ``since``."""
        body = self._get_json("/changes", {"last": ""}, "reading the newest change")
        self.since = int(body.get("Last", self.since))
        return self.since

    def _get_json(self, path: str, params: Mapping[str, str], what: str) -> dict[str, Any]:
        response = self._http.request("GET", f"{self._http.base_url}{path}", what, params=params)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ExternalServiceError(
                f"Orthanc at {self._http.origin} answered {what} with unexpected content"
            )
        return body

    def _pages(self) -> Iterator[tuple[list[StableStudy], int]]:
        since = self.since
        while True:
            body = self._get_json(
                "/changes", {"since": str(since), "limit": str(self.limit)}, "reading its change log"
            )
            events: list[StableStudy] = []
            for change in body.get("Changes", []):
                if change.get("ChangeType") != "StableStudy" or change.get("ResourceType") != "Study":
                    continue
                event = self._event(str(change["ID"]), int(change["Seq"]))
                if event is not None:
                    events.append(event)
            last = int(body.get("Last", since))
            yield events, last
            if body.get("Done", True) or last <= since:
                return
            since = last

    def _event(self, orthanc_id: str, seq: int) -> StableStudy | None:
        try:
            study = self._get_json(f"/studies/{orthanc_id}", {}, "reading a study's main tags")
        except DicomWebRequestError as exc:
            if exc.status_code == 404:
                return None  # deleted since it became stable
            raise
        uid = study.get("MainDicomTags", {}).get("StudyInstanceUID")
        return StableStudy(str(uid), orthanc_id, seq) if uid else None

    def poll(self) -> list[StableStudy]:
        """Every StableStudy change after ``since`` (all pages); ``since`` moves to the newest change."""
        found: list[StableStudy] = []
        for events, last in self._pages():
            found += events
            self.since = max(self.since, last)
        return found

    def watch(
        self,
        interval: float = 1.0,
        *,
        stop: threading.Event | None = None,
        on_error: Callable[[ExternalServiceError], None] | None = None,
    ) -> Iterator[StableStudy]:
        """Yield StableStudy events as they come, polling every ``interval`` seconds until ``stop`` is set.
        Without ``on_error`` an unreachable Orthanc ends the loop with ``ExternalServiceError``; with it, the
        error is reported and polling goes on."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                for events, last in self._pages():
                    for event in events:
                        yield event
                        self.since = max(self.since, event.seq)
                    self.since = max(self.since, last)
            except ExternalServiceError as exc:
                if on_error is None:
                    raise
                on_error(exc)
            stop.wait(interval)
