"""The drafter's plumbing with a tiny randomly initialised model (no download, no training)."""

from __future__ import annotations

import random

import pytest
import torch

from core.draft_guide import DraftGuide
from core.grounding import Origin, verify_draft
from core.report import Change
from models.drafter.base import base_model_dir
from models.drafter.corpus import make_examples, random_facts, styled_report
from models.drafter.drafter import LlmDrafter, build_inputs
from models.drafter.prompt import facts_prompt, parse_sections
from models.drafter.train import _encode


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir())


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def test_random_model_output_is_verified_and_the_final_draft_is_grounded(tokenizer, tiny):
    drafter = LlmDrafter(model=tiny, tokenizer=tokenizer, max_new_tokens=24)
    facts = random_facts(random.Random(3))
    draft = drafter.write(facts)
    assert draft.new_tokens <= 24
    assert not verify_draft(draft.verified.text, facts).flagged  # whatever the model wrote
    assert any(s.origin is Origin.ADDED for s in draft.verified.sentences)  # category at least


def test_training_targets_pass_the_verifier_and_mask_the_prompt(tokenizer):
    examples, facts = make_examples(20, seed=5)
    for ex, f in zip(examples, facts, strict=True):
        assert not verify_draft(parse_sections(ex.target), f).flagged
    ids, labels = _encode(tokenizer, examples[0].prompt, examples[0].target, 2048)
    n_prompt = len(build_inputs(tokenizer, examples[0].prompt)["input_ids"][0])
    assert all(v == -100 for v in labels[:n_prompt]) and all(v != -100 for v in labels[n_prompt:])
    assert tokenizer.decode(ids[n_prompt:], skip_special_tokens=True).strip() == examples[0].target


def test_prompt_states_every_lesion_and_the_category():
    facts = random_facts(random.Random(11))
    prompt = facts_prompt(facts)
    assert all(f.label in prompt for f in facts.lesions)
    assert facts.recist is not None and f"RECIST 1.1: {facts.recist.category.value}" in prompt
    text = styled_report(random.Random(1), facts)
    assert parse_sections(text.as_text()) == text


def test_pipeline_uses_the_drafter_and_keeps_only_grounded_text(tokenizer, tiny, small_patient):
    from adapters.image_folder import FolderImageSource
    from adapters.prior_bundle import BundlePriorStore
    from core.pipeline import analyze_study
    from fixtures.synth.evaluation import TruthSegmenter

    folder = small_patient.folder
    result = analyze_study(
        str(folder / small_patient.time_points[-1] / "dicom"),
        images=FolderImageSource([folder]),
        priors=BundlePriorStore(folder / "priors.json"),
        segmenter=TruthSegmenter(folder),
        drafter=LlmDrafter(model=tiny, tokenizer=tokenizer, max_new_tokens=16),
    )
    assert result.draft is not None and result.report == result.draft.text
    assert not verify_draft(result.report, result.facts).flagged


@pytest.fixture(scope="module")
def table(tokenizer):
    from models.drafter.constrained import TokenTable

    return TokenTable(tokenizer)


def _step(tokenizer, table, facts, text: str, favour: str, then: str = "") -> str:
    """One constrained step after ``text`` with scores that favour ``favour`` most, then each token of
    ``then``, then every other token."""
    from core.draft_guide import DraftGuide
    from models.drafter.constrained import GuidedLogits

    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    scores = torch.linspace(0.0, 1.0, table.size).unsqueeze(0)  # a fixed order over the whole vocabulary
    for n, token in enumerate(then):
        scores[0, tokenizer(token, add_special_tokens=False)["input_ids"][0]] = 5.0 + n / 10
    scores[0, tokenizer(favour, add_special_tokens=False)["input_ids"][0]] = 10.0
    guided = GuidedLogits(table, DraftGuide(facts), tokenizer, prompt_length=0)(ids, scores.clone())
    return tokenizer.decode([int(guided.argmax(-1))])


def test_constrained_step_steers_digits_units_labels_and_claim_words(tokenizer, table):
    facts = next(
        f
        for f in (random_facts(random.Random(s)) for s in range(200))
        if any(x.change is Change.NEW for x in f.lesions)
        and any(x.change is Change.STABLE for x in f.lesions)
    )
    stable = next(x for x in facts.lesions if x.change is Change.STABLE)
    new = next(x for x in facts.lesions if x.change is Change.NEW)
    assert stable.long_axis_mm is not None
    size = str(round(stable.long_axis_mm))
    head = f"FINDINGS: {stable.label} measures {size[0]}"
    values = DraftGuide(facts).at(head).values or frozenset()
    # a digit that leads to no number the sentence may hold is refused
    wrong = next(d for d in "0123456789" if not any(v.startswith(size[0] + d) for v in values))
    chosen = _step(tokenizer, table, facts, head, wrong, then="0123456789")
    assert chosen != wrong and any(v.startswith(size[0] + chosen) for v in values)
    # the right number may be followed by mm; a number the lesion does not have may not
    assert _step(tokenizer, table, facts, f"FINDINGS: {stable.label} measures {size}", " mm") == " mm"
    assert _step(tokenizer, table, facts, f"FINDINGS: {stable.label} measures 999", " mm") != " mm"
    # 'new' is refused for a stable lesion, allowed for a new one
    assert _step(tokenizer, table, facts, f"FINDINGS: {stable.label} is", " new") != " new"
    assert _step(tokenizer, table, facts, f"FINDINGS: {new.label} is", " new") == " new"
    # after 'A new lesion L' only the new lesion's digits may follow
    first = _step(tokenizer, table, facts, "FINDINGS: A new lesion L", stable.label[1], then="0123456789")
    assert new.label[1:].startswith(first)


def test_constrained_random_model_still_yields_a_grounded_draft(tokenizer, tiny):
    facts = random_facts(random.Random(3))
    drafter = LlmDrafter(model=tiny, tokenizer=tokenizer, max_new_tokens=24)
    free = LlmDrafter(model=tiny, tokenizer=tokenizer, max_new_tokens=24, constrained=False)
    guided, plain = drafter.write(facts), free.write(facts)
    assert guided.new_tokens <= 24 and plain.steered == 0
    assert not verify_draft(guided.verified.text, facts).flagged
