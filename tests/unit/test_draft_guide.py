"""The draft guide says what a sentence may say next; it must agree with the verifier, both ways."""

from __future__ import annotations

import random

import pytest

from core.draft_guide import DraftGuide, claim_words, current_sentence
from core.grounding import claim_problems
from core.report import Change, ReportFacts
from models.drafter.corpus import random_facts


def _facts(seed: int) -> ReportFacts:
    return random_facts(random.Random(seed))


def _number_problems(sentence: str, facts: ReportFacts) -> list[str]:
    by_label = {f.label: f for f in facts.lesions}
    return [p for p in claim_problems(sentence, facts, by_label) if " mm is not " in p]


@pytest.mark.parametrize("seed", range(12))
def test_a_size_may_be_followed_by_mm_exactly_when_the_verifier_accepts_it(seed: int) -> None:
    facts = _facts(seed)
    guide = DraftGuide(facts)
    for f in facts.lesions:
        for k in range(0, 120):
            head = f"{f.label} measures {k}"
            g = guide.at(head)
            assert g.units is not None and g.typed == str(k)
            accepted = not _number_problems(f"{head} mm.", facts)
            assert ("mm" in g.units) is accepted, (f.label, k, g.units)
            if accepted:  # and the digits that lead to it were allowed on the way
                assert str(k) in g.values if g.values is not None else False
                for n in range(len(str(k))):
                    partial = guide.at(f"{f.label} measures {str(k)[:n]}")
                    assert partial.values is not None
                    assert any(v.startswith(str(k)[: n + 1]) for v in partial.values)


def test_a_sentence_that_names_no_lesion_may_use_the_target_sums() -> None:
    facts = next(f for f in map(_facts, range(50)) if f.recist and f.recist.current_sum_mm)
    assert facts.recist is not None and facts.recist.current_sum_mm is not None
    total = str(round(facts.recist.current_sum_mm))
    g = DraftGuide(facts).at(f"IMPRESSION: Sum of target diameters {total}")
    assert g.units is not None and "mm" in g.units
    assert not _number_problems(f"Sum of target diameters {total} mm.", facts)


def test_centimetres_and_percent_follow_the_verifier() -> None:
    facts = next(f for f in map(_facts, range(50)) if f.recist and f.recist.change_from_baseline_pct)
    assert facts.recist is not None and facts.recist.change_from_baseline_pct is not None
    guide = DraftGuide(facts)
    pct = str(round(abs(facts.recist.change_from_baseline_pct)))
    g = guide.at(f"Target sum changed by -{pct}")
    assert g.units is not None and "%" in g.units
    lesion = next(f for f in facts.lesions if f.long_axis_mm)
    assert lesion.long_axis_mm is not None
    cm = f"{lesion.long_axis_mm / 10:.1f}"
    g = guide.at(f"{lesion.label} measures {cm}")
    assert g.units is not None and "cm" in g.units and "mm" not in g.units


def test_labels_that_exist_and_fit_what_the_sentence_already_says() -> None:
    facts = next(
        f
        for f in map(_facts, range(200))
        if any(x.change is Change.NEW for x in f.lesions)
        and any(x.change is Change.STABLE for x in f.lesions)
    )
    guide = DraftGuide(facts)
    new = {f.label[1:] for f in facts.lesions if f.change is Change.NEW}
    g = guide.at("FINDINGS: A new lesion L")
    assert g.values == new
    g = guide.at("FINDINGS: The lesion L")  # nothing claimed yet: any existing lesion
    assert g.values == {f.label[1:] for f in facts.lesions if f.label.startswith("L")}
    label = sorted(new)[0]
    assert not guide.at(f"FINDINGS: A new lesion L{label}").must_continue
    assert guide.at("FINDINGS: A new lesion L9").must_continue  # no such label: a digit must follow


@pytest.mark.parametrize("seed", range(8))
def test_a_banned_claim_word_is_one_the_verifier_rejects(seed: int) -> None:
    facts = _facts(seed)
    guide = DraftGuide(facts)
    by_label = {f.label: f for f in facts.lesions}
    for f in facts.lesions:
        banned = guide.at(f"{f.label} in the study is ").banned
        for key, words in claim_words().items():
            for word in words:
                sentence = f"{f.label} in the study is {word.rstrip('*')}ed."
                if not word.endswith("*"):
                    sentence = f"{f.label} in the study is {word}."
                rejected = bool(claim_problems(sentence, facts, by_label))
                assert (key in banned) is rejected, (f.label, f.change, f.organ, key, word)


def test_a_phrase_that_would_claim_resolution_cannot_be_finished() -> None:
    facts = next(f for f in map(_facts, range(50)) if any(x.change is not Change.RESOLVED for x in f.lesions))
    lesion = next(x for x in facts.lesions if x.change is not Change.RESOLVED)
    g = DraftGuide(facts).at(f"FINDINGS: {lesion.label} is no longer")
    assert {"seen", "visible", "identified"} <= g.banned_next
    assert not DraftGuide(facts).at("FINDINGS: The study is no longer").banned_next  # no lesion named


def test_dates_are_left_to_the_verifier_and_sentences_split_like_it() -> None:
    facts = _facts(1)
    assert DraftGuide(facts).at("Compared with the CT of 2024-0").values is None
    assert current_sentence("FINDINGS: L1 is stable. L2 measures 2.3") == "L2 measures 2.3"
    assert current_sentence("COMPARISON: CT of 2024-01-02.\nFINDINGS: L1") == " L1"
    assert current_sentence("IMPRESSION: Stable. ") == ""


def test_a_stated_direction_narrows_the_organs_before_a_lesion_is_named() -> None:
    facts = next(
        f
        for f in map(_facts, range(300))
        if len({x.organ for x in f.lesions if x.change is Change.NEW}) == 1
        and len({x.organ for x in f.lesions}) > 1
    )
    organ = next(x.organ for x in facts.lesions if x.change is Change.NEW)
    banned = DraftGuide(facts).at("FINDINGS: New").banned
    assert f"site:{organ.value}" not in banned
    assert {f"site:{x.organ.value}" for x in facts.lesions if x.organ is not organ} <= banned
    assert not DraftGuide(facts).at("FINDINGS: There is a").banned  # nothing stated, nothing narrowed
