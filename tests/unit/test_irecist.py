"""iRECIST: the first progression is unconfirmed (iUPD) until the next assessment confirms it."""

from __future__ import annotations

import datetime as dt

from core.history import assess_history
from core.irecist import IResponse, irecist_step
from core.recist import CurrentStatus, TrackObservation, assess_response
from core.types import Organ, PriorFinding, PriorTimePoint, RecistRole

BASE = [PriorFinding("a", Organ.LIVER, 30.0, 20.0), PriorFinding("b", Organ.LUNG, 20.0, 15.0)]  # 50 mm
ROLES = {"a": RecistRole.TARGET, "b": RecistRole.TARGET}


def assess(a: float, b: float, previous=(), new=()):
    cur = {
        "a": TrackObservation(CurrentStatus.MEASURED, a, a * 0.7),
        "b": TrackObservation(CurrentStatus.MEASURED, b, b * 0.7),
    }
    return assess_response(BASE, ROLES, cur, list(previous), list(new))


def test_first_progression_is_iupd_and_a_further_5_mm_confirms_it():
    pd = assess(40.0, 22.0)  # 62 mm: +24%, +12 mm
    s1 = irecist_step(None, pd, {})
    assert s1.response is IResponse.IUPD and s1.iupd_sum_mm == 62.0
    s2 = irecist_step(s1, assess(44.0, 23.0, previous=[62.0]), {})  # 67 mm: +5 mm over iUPD
    assert s2.response is IResponse.ICPD
    assert "+5.0 mm" in s2.trace[0]
    assert irecist_step(s2, assess(10.0, 10.0, previous=[62.0, 67.0]), {}).response is IResponse.ICPD  # final


def test_iupd_without_further_growth_stays_then_resets_when_disease_shrinks():
    s1 = irecist_step(None, assess(40.0, 22.0), {})
    s2 = irecist_step(s1, assess(41.0, 23.0, previous=[62.0]), {})  # 64 mm: still PD vs nadir 50, +2 mm only
    assert s2.response is IResponse.IUPD
    s3 = irecist_step(s2, assess(20.0, 14.0, previous=[62.0, 64.0]), {})  # 34 mm: -32% from baseline
    assert s3.response is IResponse.IPR
    assert "resets" in s3.trace[0]


def test_new_lesion_iupd_is_confirmed_by_growth_or_more_new_lesions():
    s1 = irecist_step(None, assess(30.0, 20.0, new=["n1"]), {"n1": 12.0})
    assert s1.response is IResponse.IUPD and s1.iupd_reasons == {"new"}
    grown = irecist_step(s1, assess(30.0, 20.0, previous=[50.0], new=["n1"]), {"n1": 18.0})
    assert grown.response is IResponse.ICPD
    more = irecist_step(s1, assess(30.0, 20.0, previous=[50.0], new=["n1", "n2"]), {"n1": 12.0, "n2": 10.0})
    assert more.response is IResponse.ICPD
    same = irecist_step(s1, assess(30.0, 20.0, previous=[50.0], new=["n1"]), {"n1": 13.0})
    assert same.response is IResponse.IUPD


def test_history_reassesses_every_prior_follow_up_with_running_nadir():
    d = [dt.date(2025, 1, 1) + dt.timedelta(days=60 * n) for n in range(4)]
    base = (
        PriorFinding("a", Organ.LIVER, 30.0, 20.0, role=RecistRole.TARGET),
        PriorFinding("b", Organ.LUNG, 20.0, 15.0, role=RecistRole.TARGET),
    )
    tps = [
        PriorTimePoint(d[0], "s0", base),
        PriorTimePoint(
            d[1], "s1", (PriorFinding("a", Organ.LIVER, 20.0, 14.0), PriorFinding("b", Organ.LUNG, 12.0, 9.0))
        ),
        PriorTimePoint(
            d[2],
            "s2",
            (PriorFinding("a", Organ.LIVER, 26.0, 18.0), PriorFinding("b", Organ.LUNG, 14.0, 10.0)),
        ),
        PriorTimePoint(d[3], "s3", (PriorFinding("a", Organ.LIVER, 26.0, 18.0),)),  # b not reported: absent
    ]
    h = assess_history(tps)
    assert [a.target_sum_mm for a in h] == [50.0, 32.0, 40.0, 26.0]
    assert [a.recist.category.value for a in h[1:]] == ["PR", "PD", "PR"]  # 40 vs nadir 32: +25%, +8 mm
    assert [a.irecist.response.value for a in h[1:]] == ["iPR", "iUPD", "iPR"]
