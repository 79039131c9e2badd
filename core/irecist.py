"""iRECIST (Seymour et al., Lancet Oncol 2017;18:e143-e152): progression must be confirmed.

The first RECIST 1.1 progression is *unconfirmed* (iUPD). At the next assessment it is confirmed
(iCPD) when the category that progressed progresses further: the sum of target diameters rises
another >= 5 mm over its value at iUPD; new lesions grow (their summed diameters rise >= 5 mm) or
more new lesions appear; non-target disease progresses unequivocally again; or progression
criteria are met in a category that had not progressed at iUPD. Without confirmation the
assessment stays iUPD while RECIST 1.1 still reads PD, and otherwise resets to iCR / iPR / iSD
(a later progression is again iUPD first). iCPD is final.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from core.recist import NonTargetResponse, RecistResult, Response

__all__ = ["IRecistState", "IResponse", "irecist_step"]

CONFIRM_MM = 5.0


class IResponse(enum.StrEnum):
    ICR = "iCR"
    IPR = "iPR"
    ISD = "iSD"
    IUPD = "iUPD"
    ICPD = "iCPD"
    NE = "NE"
    NON_ICR_NON_IUPD = "non-iCR/non-iUPD"


_FROM_RECIST = {
    Response.CR: IResponse.ICR,
    Response.PR: IResponse.IPR,
    Response.SD: IResponse.ISD,
    Response.NE: IResponse.NE,
    Response.NON_CR_NON_PD: IResponse.NON_ICR_NON_IUPD,
}


@dataclass(frozen=True, slots=True)
class IRecistState:
    """The iRECIST response at one time point and what an iUPD is to be confirmed against."""

    response: IResponse
    trace: tuple[str, ...]
    iupd_reasons: frozenset[str] = frozenset()  # subset of {"target", "non_target", "new"}
    iupd_sum_mm: float | None = None
    iupd_new_lesions: frozenset[str] = frozenset()
    iupd_new_sum_mm: float = 0.0


def _reasons(r: RecistResult) -> frozenset[str]:
    out = set()
    if r.target_response is Response.PD:
        out.add("target")
    if r.non_target_response is NonTargetResponse.PD:
        out.add("non_target")
    if r.new_lesions:
        out.add("new")
    return frozenset(out)


def irecist_step(
    previous: IRecistState | None, current: RecistResult, new_lesion_diameters_mm: Mapping[str, float]
) -> IRecistState:
    """Advance the iRECIST assessment by one time point.

    ``new_lesion_diameters_mm`` gives the current diameter of every new lesion (by id), used to
    tell whether new disease grew since iUPD.
    """
    reasons = _reasons(current)
    new_ids = frozenset(current.new_lesions)
    new_sum = float(sum(new_lesion_diameters_mm.get(i, 0.0) for i in new_ids))
    if previous is not None and previous.response is IResponse.ICPD:
        return IRecistState(IResponse.ICPD, ("iCPD was confirmed earlier and stands.",))
    if previous is not None and previous.response is IResponse.IUPD:
        why: list[str] = []
        if (
            "target" in previous.iupd_reasons
            and current.current_sum_mm is not None
            and previous.iupd_sum_mm is not None
        ):
            rise = current.current_sum_mm - previous.iupd_sum_mm
            if rise >= CONFIRM_MM:
                why.append(f"the sum of target diameters rose a further {rise:+.1f} mm (>= 5 mm) since iUPD")
        if "new" in previous.iupd_reasons:
            more = new_ids - previous.iupd_new_lesions
            if more:
                why.append(f"{len(more)} more new lesion(s) appeared since iUPD")
            if new_sum - previous.iupd_new_sum_mm >= CONFIRM_MM:
                why.append(
                    f"new lesions grew {new_sum - previous.iupd_new_sum_mm:+.1f} mm (>= 5 mm) since iUPD"
                )
        if "non_target" in previous.iupd_reasons and "non_target" in reasons:
            why.append("non-target disease progressed further")
        fresh = reasons - previous.iupd_reasons
        if fresh:
            why.append(f"progression criteria are now met for {', '.join(sorted(fresh))} as well")
        if why:
            return IRecistState(IResponse.ICPD, (f"iCPD: progression confirmed: {'; '.join(why)}.",))
        if current.category is Response.PD:
            return IRecistState(
                IResponse.IUPD,
                (
                    "iUPD persists: RECIST 1.1 still reads PD but nothing progressed further; confirm at the next assessment.",
                ),
                previous.iupd_reasons,
                previous.iupd_sum_mm,
                previous.iupd_new_lesions,
                previous.iupd_new_sum_mm,
            )
        resp = _FROM_RECIST[current.category]
        return IRecistState(resp, (f"iUPD not confirmed: the assessment resets to {resp.value}.",))
    if current.category is Response.PD:
        return IRecistState(
            IResponse.IUPD,
            (
                f"iUPD: first RECIST 1.1 progression ({', '.join(sorted(reasons)) or 'PD'}); confirm at the next assessment.",
            ),
            reasons,
            current.current_sum_mm,
            new_ids,
            new_sum,
        )
    resp = _FROM_RECIST[current.category]
    return IRecistState(resp, (f"{resp.value}: as RECIST 1.1 {current.category.value}.",))
