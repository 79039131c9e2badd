"""The PACS (Orthanc over DICOMweb, in its own network namespace) and Redis as real services.

A small synthetic patient's two CT studies go to Orthanc by STOW-RS; QIDO-RS finds them; the DICOMweb image source
builds the same volumes as the folder reader; Orthanc's change log announces both studies as stable; a SEG sent back
is found; a stopped PACS is an ``ExternalServiceError``. Redis keeps its data across a kill -9 (AOF).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import redis as redis_lib
from pydicom.sr.codedict import codes

from adapters.dicom_series import load_study
from adapters.dicomweb import (
    DicomWebClient,
    DicomWebImageSource,
    DicomWebRequestError,
    StableStudyWatcher,
    StowResult,
    _MultipartReader,
    tag_value,
)
from core.errors import ExternalRequestError, ExternalServiceError, NoSeriesFoundError
from core.types import Volume
from fixtures.services import OrthancServer, RedisServer, free_port
from fixtures.synth.cohort import PatientTruth

pytestmark = pytest.mark.integration

STABLE_WAIT_S = 12.0  # StableAge 2 s: Orthanc announces after ~3 s


@dataclass(frozen=True)
class StoredStudy:
    time_point: str
    folder: Path
    study_uid: str
    files: tuple[Path, ...]
    result: StowResult


@dataclass(frozen=True)
class StoredPatient:
    patient_id: str
    patient_name: str
    studies: dict[str, StoredStudy]
    stored_at: float  # time.monotonic() when the last STOW returned


@pytest.fixture(scope="module")
def client(orthanc: OrthancServer) -> Iterator[DicomWebClient]:
    with DicomWebClient(orthanc.dicomweb_url, timeout=30, retries=2, backoff=0.05) as c:
        yield c


@pytest.fixture(scope="module")
def stored(client: DicomWebClient, small_patient: PatientTruth) -> StoredPatient:
    studies: dict[str, StoredStudy] = {}
    name = ""
    for tp in small_patient.time_points:
        folder = small_patient.folder / tp / "dicom"
        files = tuple(sorted(folder.glob("*.dcm")))
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        name = str(header.PatientName)
        result = client.store(files)
        studies[tp] = StoredStudy(tp, folder, str(header.StudyInstanceUID), files, result)
    return StoredPatient(small_patient.patient_id, name, studies, time.monotonic())


def _same_volume(a: Volume, b: Volume) -> None:
    assert a.voxels_hu.shape == b.voxels_hu.shape
    assert a.spacing_kji_mm == b.spacing_kji_mm
    assert a.origin_lps_mm == b.origin_lps_mm
    assert a.direction_lps == b.direction_lps
    assert np.array_equal(a.voxels_hu, b.voxels_hu)
    assert a.acquisition == b.acquisition


def _no_patient_data(message: str, patient: StoredPatient) -> None:
    assert patient.patient_id not in message
    for part in patient.patient_name.split("^"):
        if part:
            assert part not in message


# ---- STOW / QIDO ---------------------------------------------------------------------------------------


def test_stow_stores_every_instance(stored: StoredPatient) -> None:
    for study in stored.studies.values():
        assert study.result.ok
        assert len(study.result.stored) == len(study.files)
        assert len(set(study.result.stored)) == len(study.files)


def test_qido_finds_both_studies_and_their_ct_series(client: DicomWebClient, stored: StoredPatient) -> None:
    found = client.search_studies({"PatientID": stored.patient_id})
    assert {tag_value(s, "StudyInstanceUID") for s in found} == {s.study_uid for s in stored.studies.values()}
    for study in stored.studies.values():
        [hit] = client.search_studies({"StudyInstanceUID": study.study_uid})
        assert tag_value(hit, "ModalitiesInStudy") == "CT"
        series = client.search_series(study.study_uid, {"Modality": "CT"})
        assert len(series) == 1
        instances = client.search_instances(study.study_uid, str(tag_value(series[0], "SeriesInstanceUID")))
        assert len(instances) == len(study.files)
    assert client.search_studies({"StudyInstanceUID": "1.2.3.4.5.6.7"}) == []


def test_watcher_sees_stable_study_for_both(orthanc: OrthancServer, stored: StoredPatient) -> None:
    wanted = {s.study_uid for s in stored.studies.values()}
    seen: dict[str, float] = {}
    with StableStudyWatcher(orthanc.url) as watcher:
        deadline = time.monotonic() + STABLE_WAIT_S
        while set(seen) < wanted and time.monotonic() < deadline:
            for event in watcher.poll():
                seen.setdefault(event.study_uid, time.monotonic() - stored.stored_at)
                assert event.orthanc_id
                assert event.seq <= watcher.since
            time.sleep(0.1)
        assert set(seen) >= wanted, f"StableStudy not announced within {STABLE_WAIT_S} s: {seen}"
        print(f"StableStudy seen {max(seen.values()):.1f} s after the last STOW-RS")
        since = watcher.since
    assert since > 0
    with StableStudyWatcher(orthanc.url, since=since) as again:  # a restarted watcher with the saved position
        assert again.poll() == []
        assert again.since == since
    with StableStudyWatcher(orthanc.url) as fresh:
        assert fresh.skip_existing() == since


# ---- WADO-RS / ImageSource -----------------------------------------------------------------------------


def test_image_source_returns_the_folder_volume(
    client: DicomWebClient, stored: StoredPatient, tmp_path: Path
) -> None:
    source = DicomWebImageSource(client, tmp_path / "cache")
    for study in stored.studies.values():
        from_pacs = source.load_study(study.study_uid)
        _same_volume(from_pacs, load_study(study.folder))
        cached = tmp_path / "cache" / study.study_uid
        assert len(list(cached.glob("*.dcm"))) == len(study.files)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no partial folders

    # retrieved once: a source over the same cache needs no PACS any more
    with DicomWebClient(f"http://127.0.0.1:{free_port()}/dicom-web", retries=0) as dead:
        offline = DicomWebImageSource(dead, tmp_path / "cache")
        study = stored.studies["t1"]
        _same_volume(offline.load_study(study.study_uid), load_study(study.folder))


def test_find_study_and_unknown_studies(
    client: DicomWebClient, stored: StoredPatient, tmp_path: Path
) -> None:
    source = DicomWebImageSource(client, tmp_path)
    study = stored.studies["t0"]
    found = source.find_study(study.study_uid)
    assert found is not None
    assert found.acquisition is not None
    assert found.acquisition.study_uid == study.study_uid
    assert source.find_study("1.2.3.4.5.6.7") is None
    with pytest.raises(NoSeriesFoundError) as err:
        source.load_study("1.2.3.4.5.6.7")
    assert err.value.study_uid == "1.2.3.4.5.6.7"
    assert [p.name for p in tmp_path.iterdir()] == [study.study_uid]


def test_retrieve_study_writes_one_file_per_instance(
    client: DicomWebClient, stored: StoredPatient, tmp_path: Path
) -> None:
    study = stored.studies["t0"]
    out = client.retrieve_study(study.study_uid, tmp_path / "t0")
    files = sorted(out.glob("*.dcm"))
    assert len(files) == len(study.files)
    got = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert got == set(study.result.stored) == {f.stem for f in files}  # named <SOPInstanceUID>.dcm
    client.retrieve_study(study.study_uid, out)  # again: the same files, replaced
    assert sorted(p.name for p in out.iterdir()) == [f.name for f in files]
    original = {str(ds.SOPInstanceUID): ds.PixelData for ds in (pydicom.dcmread(f) for f in study.files[:3])}
    for f in files:
        ds = pydicom.dcmread(f)
        if str(ds.SOPInstanceUID) in original:
            assert ds.PixelData == original[str(ds.SOPInstanceUID)]


# ---- results back to the PACS --------------------------------------------------------------------------


def _small_seg(ct_files: tuple[Path, ...]) -> hd.seg.Segmentation:
    images = sorted((pydicom.dcmread(f) for f in ct_files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    mask = np.zeros((len(images), int(images[0].Rows), int(images[0].Columns)), dtype=bool)
    mid = len(images) // 2
    mask[mid - 1 : mid + 2, 28:36, 28:36] = True
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion 1",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="Interval lesion segmenter", version="test", family=codes.DCM.ArtificialIntelligence
        ),
    )
    return hd.seg.Segmentation(
        source_images=images,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=9002,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Interval",
        manufacturer_model_name="Interval",
        software_versions="test",
        device_serial_number="0",
        omit_empty_frames=True,
    )


def test_seg_sent_back_is_found_and_announced_again(
    orthanc: OrthancServer, client: DicomWebClient, stored: StoredPatient, tmp_path: Path
) -> None:
    study = stored.studies["t1"]
    seg = _small_seg(study.files)
    with StableStudyWatcher(orthanc.url) as watcher:
        watcher.skip_existing()
        result = client.store([seg], study_uid=study.study_uid)
        assert result.stored == (seg.SOPInstanceUID,)

        [series] = client.search_series(study.study_uid, {"Modality": "SEG"})
        assert tag_value(series, "SeriesInstanceUID") == seg.SeriesInstanceUID
        [instance] = client.search_instances(study.study_uid, seg.SeriesInstanceUID)
        assert tag_value(instance, "SOPInstanceUID") == seg.SOPInstanceUID
        assert tag_value(instance, "SOPClassUID") == "1.2.840.10008.5.1.4.1.1.66.4"

        # the study changed, so Orthanc announces it as stable again: the trigger must be idempotent
        deadline = time.monotonic() + STABLE_WAIT_S
        again: list[str] = []
        while not again and time.monotonic() < deadline:
            again = [e.study_uid for e in watcher.poll() if e.study_uid == study.study_uid]
            time.sleep(0.1)
        assert again == [study.study_uid]

    # the SEG in the study does not disturb the series selection
    source = DicomWebImageSource(client, tmp_path)
    _same_volume(source.load_study(study.study_uid), load_study(study.folder))


def test_pacs_refusal_is_external_request_error(client: DicomWebClient, stored: StoredPatient) -> None:
    with pytest.raises(ExternalRequestError) as err:
        client.store([b"this is not a DICOM file"])
    assert isinstance(err.value, DicomWebRequestError)
    assert err.value.status_code == 400
    _no_patient_data(str(err.value), stored)


# ---- failures ------------------------------------------------------------------------------------------


def test_stopped_pacs_is_external_service_error(
    orthanc: OrthancServer, stored: StoredPatient, tmp_path: Path
) -> None:
    study = stored.studies["t0"]
    orthanc.stop()
    try:
        assert orthanc.pid is None
        with DicomWebClient(orthanc.dicomweb_url, timeout=5, retries=2, backoff=0.05) as down:
            with pytest.raises(ExternalServiceError) as search_err:
                down.search_studies({"PatientID": stored.patient_id})
            with pytest.raises(ExternalServiceError):
                DicomWebImageSource(down, tmp_path).load_study(study.study_uid)
            with pytest.raises(ExternalServiceError):
                down.store(study.files[:1])
        with (
            StableStudyWatcher(orthanc.url, retries=1, backoff=0.05) as watcher,
            pytest.raises(ExternalServiceError),
        ):
            watcher.poll()
        assert "3 attempt(s)" in str(search_err.value)
        _no_patient_data(str(search_err.value), stored)
        assert list(tmp_path.iterdir()) == []  # nothing half-retrieved left in the cache
    finally:
        orthanc.start()
    with DicomWebClient(orthanc.dicomweb_url, retries=0) as back:  # data kept across the restart
        assert len(back.search_studies({"PatientID": stored.patient_id})) == 2


def test_orthanc_listens_only_inside_its_namespace(orthanc: OrthancServer) -> None:
    ports = {orthanc.http_port, orthanc.dicom_port}
    host = _listeners("self")
    assert [addr for addr, port in host if port in ports and addr != "127.0.0.1"] == []
    assert [(addr, port) for addr, port in host if port in ports] == [("127.0.0.1", orthanc.http_port)]
    assert orthanc.pid is not None
    inside = _listeners(str(orthanc.pid))
    assert ("0.0.0.0", orthanc.http_port) in inside  # Orthanc binds every interface ...
    assert ("0.0.0.0", orthanc.dicom_port) in inside
    interfaces = [
        line.split(":")[0].strip()
        for line in Path(f"/proc/{orthanc.pid}/net/dev").read_text().splitlines()[2:]
    ]
    assert interfaces == ["lo"]  # ... and its namespace has only loopback


def _listeners(pid: str) -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket in the network namespace of ``pid`` (IPv4 and IPv6)."""
    found: list[tuple[str, int]] = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc prints the address as host-order 32-bit words
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            if len(words) == 4:
                addr = ".".join(str(b) for b in words)
            elif words == bytes(16):
                addr = "::"
            elif words[:12] == bytes(10) + b"\xff\xff":
                addr = ".".join(str(b) for b in words[12:])
            else:
                addr = ":".join(words[i : i + 2].hex() for i in range(0, 16, 2))
            found.append((addr, int(port_hex, 16)))
    return found


# ---- the client without a PACS (mock transport) --------------------------------------------------------


def test_retries_5xx_then_succeeds_and_gives_up_as_external_service_error(tmp_path: Path) -> None:
    calls: list[int] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= 2:
            return httpx.Response(503, headers={"Retry-After": "0"})
        return httpx.Response(200, json=[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}])

    with DicomWebClient(
        "http://pacs.invalid/dicom-web", retries=2, transport=httpx.MockTransport(flaky)
    ) as c:
        assert [tag_value(s, "0020000D") for s in c.search_studies()] == ["1.2.3"]
    assert len(calls) == 3

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with DicomWebClient(
        "http://pacs.invalid/dicom-web", retries=1, backoff=0.01, transport=httpx.MockTransport(down)
    ) as c:
        with pytest.raises(ExternalServiceError, match="2 attempt"):
            c.search_studies({"PatientName": "DOE^JANE"})
        with pytest.raises(ExternalServiceError) as err:
            c.retrieve_study("1.2.3", tmp_path / "study")
    assert "DOE" not in str(err.value)


def test_4xx_is_not_retried() -> None:
    calls: list[int] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(404, json={"Details": "no such study DOE^JANE"})

    with (
        DicomWebClient(
            "http://pacs.invalid/dicom-web", retries=3, transport=httpx.MockTransport(refuse)
        ) as c,
        pytest.raises(DicomWebRequestError) as err,
    ):
        c.search_series("1.2.3")
    assert len(calls) == 1
    assert err.value.status_code == 404
    assert "DOE" not in str(err.value)


def test_multipart_reader_any_chunking(tmp_path: Path) -> None:
    parts = [b"first\r\n--not-the-boundary", b"", bytes(range(256)) * 40]
    body = (
        b"preamble\r\n"
        + b"".join(b"--bnd\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
        + b"--bnd--\r\nepilogue"
    )
    for chunk in (1, 2, 7, 64, len(body)):
        out: list[Path] = []

        def open_part(headers: dict[str, str], out: list[Path] = out, chunk: int = chunk) -> IO[bytes]:
            assert headers["content-type"] == "application/dicom"
            out.append(tmp_path / f"{chunk}-{len(out)}")
            return out[-1].open("wb")

        reader = _MultipartReader(b"bnd", open_part)
        for i in range(0, len(body), chunk):
            reader.feed(body[i : i + chunk])
        assert reader.complete
        assert [p.read_bytes() for p in out] == parts


# ---- Redis ---------------------------------------------------------------------------------------------


def test_redis_set_get(redis: RedisServer) -> None:
    with redis_lib.Redis.from_url(redis.db_url(1)) as r:
        assert r.ping()
        r.set("interval:test", "42")
        assert r.get("interval:test") == b"42"


def test_redis_keeps_queued_data_after_kill_9(redis: RedisServer) -> None:
    url = redis.db_url(2)
    with redis_lib.Redis.from_url(url) as r:
        r.set("interval:job", "queued")
        r.rpush("interval:queue", "a", "b", "c")
    old_pid = redis.pid
    redis.kill()
    assert redis.pid is None
    with (
        redis_lib.Redis.from_url(url, socket_connect_timeout=1) as r,
        pytest.raises(redis_lib.ConnectionError),
    ):
        r.ping()
    redis.start()
    assert redis.pid not in (None, old_pid)
    with redis_lib.Redis.from_url(url) as r:
        assert r.get("interval:job") == b"queued"
        assert r.lrange("interval:queue", 0, -1) == [b"a", b"b", b"c"]
    assert (redis.root / "appendonlydir").is_dir()
