"""Constrained decoding: the drafter may only choose tokens that ``core.draft_guide`` allows at each step.

``TokenTable`` sorts the tokenizer's vocabulary once per process (digits, units, the first token of every
claim word); ``GuidedLogits`` is a ``transformers`` logits processor that, at each step, asks the guide about
the text generated so far and sets the scores of forbidden tokens to minus infinity. Greedy decoding then
takes the model's best allowed token. When a rule would forbid every token, the step is left unconstrained
(the verifier still checks the sentence).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import LogitsProcessor

from core.draft_guide import DraftGuide, Guidance, claim_words

__all__ = ["GuidedLogits", "TokenTable"]

_DIGITS = "0123456789"
_UNITS = {"mm": "mm", "cm": "cm", "%": "%", "x": "x", "×": "x", "by": "x"}
_WORD = re.compile(r"^([^A-Za-z0-9]*)([A-Za-z]+)")


def _says(word: str, words: tuple[str, ...]) -> bool:
    return any(word == w or (w.endswith("*") and word.startswith(w[:-1])) for w in words)


class TokenTable:
    """The vocabulary, classified once: digit tokens, unit tokens and the tokens that start claim words."""

    def __init__(self, tokenizer: Any) -> None:
        texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
        self.size = len(texts)
        self.digits = {t: i for i, t in reversed(list(enumerate(texts))) if len(t) == 1 and t in _DIGITS}
        self.dot = texts.index(".")
        self.not_digit = torch.ones(self.size, dtype=torch.bool)
        self.not_digit[list(self.digits.values())] = False
        self.units: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            if (kind := _UNITS.get(t.strip())) and t.strip() == t.lstrip():
                self.units.setdefault(kind, []).append(i)
        self.words = claim_words()
        # lower-case letters -> tokens that begin with those letters (they continue a word, or start one
        # after a non-letter), and tokens that are that word after spaces
        self._bare: dict[str, list[int]] = {}
        self._by_word: dict[str, list[int]] = {}
        starts: dict[str, list[int]] = {k: [] for k in self.words}  # tokens that start a claim word
        bare_starts: dict[str, list[int]] = {k: [] for k in self.words}  # the same, with no space before
        for i, t in enumerate(texts):
            if not (m := _WORD.match(t)):
                continue
            lead, run = m.group(1), m.group(2).lower()
            if not lead:
                self._bare.setdefault(run, []).append(i)
            if not lead.strip():
                self._by_word.setdefault(run, []).append(i)
            for key, words in self.words.items():
                if _says(run, words):
                    (starts if lead else bare_starts)[key].append(i)
        self.starts = {k: torch.tensor(v, dtype=torch.long) for k, v in starts.items()}
        self.bare_starts = {k: torch.tensor(v, dtype=torch.long) for k, v in bare_starts.items()}
        self._continuations: dict[tuple[str, str], torch.Tensor] = {}

    def continuations(self, partial: str, key: str) -> torch.Tensor:
        """Tokens that would turn the unfinished word ``partial`` into a word of claim ``key``."""
        partial = partial.lower()
        cached = self._continuations.get((partial, key))
        if cached is None:
            words = self.words[key]
            ids: list[int] = []
            if any(w.rstrip("*").startswith(partial) and len(w.rstrip("*")) > len(partial) for w in words):
                ids = [i for run, toks in self._bare.items() if _says(partial + run, words) for i in toks]
            cached = self._continuations[(partial, key)] = torch.tensor(ids, dtype=torch.long)
        return cached

    def banned(self, g: Guidance) -> tuple[list[torch.Tensor], bool]:
        """The tokens ``g`` forbids, and whether everything but the allowed digits is forbidden."""
        out: list[torch.Tensor] = []
        if g.values is not None:
            n = len(g.typed)
            nexts = {v[n] for v in g.values if len(v) > n and v.startswith(g.typed)}
            out.append(torch.tensor([i for d, i in self.digits.items() if d not in nexts], dtype=torch.long))
            if g.typed and "." not in nexts and g.typed not in g.values:
                out.append(torch.tensor([self.dot]))
        if g.units is not None:
            out += [torch.tensor(ids) for kind, ids in self.units.items() if kind not in g.units]
        out += [torch.tensor(self._by_word[w]) for w in g.banned_next if w in self._by_word]
        for key in g.banned:
            out.append(self.starts[key])
            out.append(self.continuations(g.word, key) if g.word else self.bare_starts[key])
        return out, g.must_continue


class GuidedLogits(LogitsProcessor):
    """Forbid, at each step, what ``guide`` says the text so far may not continue with (batch of one)."""

    def __init__(self, table: TokenTable, guide: DraftGuide, tokenizer: Any, prompt_length: int) -> None:
        self.table, self.guide, self.tokenizer, self.start = table, guide, tokenizer, prompt_length
        self.steered = 0  # steps where the allowed choice differed from the model's first choice

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        text = self.tokenizer.decode(input_ids[0, self.start :], skip_special_tokens=True)
        banned, only_digits = self.table.banned(self.guide.at(text))
        if not banned and not only_digits:
            return scores
        guided = scores.clone()
        if only_digits:
            guided[:, self.table.not_digit] = -torch.inf
        for ids in banned:
            if ids.numel():
                guided[:, ids] = -torch.inf
        if not torch.isfinite(guided).any():
            return scores
        self.steered += int(not torch.equal(guided.argmax(-1), scores.argmax(-1)))
        return guided  # type: ignore[return-value]
