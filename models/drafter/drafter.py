"""The report drafter: a causal LM (base + LoRA adapter) writes the sections; the verifier checks them.

Generation discipline: chat template, greedy decoding constrained to the facts (``models.drafter.constrained``:
no size that is not the named lesion's, no label or claim word that contradicts the sentence; off with
``constrained=False``), a hard ``max_new_tokens``, stop at the model's end-of-turn token, one model load per
process, torch threads = 1. Whatever the model writes goes through
``core.grounding.verify_draft``: a failing sentence is replaced by the deterministic one and flagged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.draft_guide import DraftGuide
from core.grounding import VerifiedDraft, verify_draft
from core.report import ReportFacts, ReportText
from models.drafter.prompt import SYSTEM, facts_prompt, parse_sections

__all__ = ["Draft", "LlmDrafter", "build_inputs"]

ADAPTER_DIR = Path(__file__).resolve().parent.parent / "weights" / "drafter-lora"


@dataclass(frozen=True)
class Draft:
    raw: str  # what the model wrote
    verified: VerifiedDraft
    new_tokens: int
    seconds: float
    steered: int = 0  # steps where the constraint changed the model's first choice


def build_inputs(tokenizer: Any, prompt: str) -> Any:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


class LlmDrafter:
    def __init__(
        self,
        base_dir: Path | None = None,
        adapter_dir: Path | None = ADAPTER_DIR,
        max_new_tokens: int = 256,
        model: Any = None,
        tokenizer: Any = None,
        constrained: bool = True,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        if model is None or tokenizer is None:
            from models.drafter.base import base_model_dir

            base = base_dir or base_model_dir()
            tokenizer = AutoTokenizer.from_pretrained(base)
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            if adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file():
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter_dir)
                model = model.merge_and_unload()  # plain weights: generation as fast as the base model
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.constrained = constrained
        self._table: Any = None  # models.drafter.constrained.TokenTable, built on first use
        self.version = f"smollm2-135m+{adapter_dir.name if adapter_dir is not None else 'base'}"

    @torch.inference_mode()
    def generate(self, prompt: str, guide: DraftGuide | None = None) -> tuple[str, int, int]:
        """The model's text for ``prompt``, its token count, and how many steps ``guide`` steered."""
        from transformers import LogitsProcessorList

        from models.drafter.constrained import GuidedLogits, TokenTable

        inputs = build_inputs(self.tokenizer, prompt)
        processors = LogitsProcessorList()
        if guide is not None:
            if self._table is None:
                self._table = TokenTable(self.tokenizer)
            processors.append(GuidedLogits(self._table, guide, self.tokenizer, inputs["input_ids"].shape[1]))
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.eos_token_id,
            logits_processor=processors,
        )
        new = out[0, inputs["input_ids"].shape[1] :]
        steered = processors[0].steered if guide is not None else 0
        return self.tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0]), steered

    @property
    def model_version(self) -> str:
        return self.version

    def draft(self, facts: ReportFacts) -> VerifiedDraft:
        """The ``core.ports.ReportDrafter`` port: the verified draft."""
        return self.write(facts).verified

    def write(self, facts: ReportFacts) -> Draft:
        """Generate, parse and verify; with the raw text, token count and time (for evaluation)."""
        start = time.perf_counter()
        guide = DraftGuide(facts) if self.constrained else None
        raw, n, steered = self.generate(facts_prompt(facts), guide)
        sections: ReportText = parse_sections(raw)
        return Draft(raw, verify_draft(sections, facts), n, time.perf_counter() - start, steered)
