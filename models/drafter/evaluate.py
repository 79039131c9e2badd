"""How grounded the drafter is, on held-out generated fact sets (a seed never used in training).

    python -m models.drafter.evaluate --n 200 --out models/weights/drafter-lora/metrics.json
    python -m models.drafter.evaluate --adapter none --n 40      # the base model, before fine-tuning
    python -m models.drafter.evaluate --unconstrained --out .../metrics_unconstrained.json  # plain greedy

Reports: raw acceptance (sentences the verifier accepted unchanged, over all sentences checked or added),
the share of drafts accepted whole, final drafts grounded (the verified text re-checked: no flag), every
new lesion and the RECIST category mentioned in the final text, tokens per second and seconds per report,
and how many decoding steps the constraint steered (its choice differed from the model's first choice).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from core.grounding import verify_draft
from core.report import Change
from models.drafter.corpus import make_examples
from models.drafter.drafter import ADAPTER_DIR, LlmDrafter

__all__ = ["evaluate"]

HELD_OUT_SEED = 424242


def evaluate(drafter: LlmDrafter, n: int, seed: int = HELD_OUT_SEED) -> dict[str, Any]:
    _, facts_list = make_examples(n, seed)
    sentences = accepted = whole = grounded = mentioned = 0
    tokens, seconds, steered = 0, 0.0, 0
    failures: dict[str, int] = {}
    for facts in facts_list:
        d = drafter.write(facts)
        tokens += d.new_tokens
        seconds += d.seconds
        steered += d.steered
        sentences += len(d.verified.sentences)
        accepted += sum(s.origin.value == "model" for s in d.verified.sentences)
        whole += not d.verified.flagged
        for s in d.verified.flagged:
            for p in s.problems or (s.origin.value,):
                key = re.sub(r"[\d.]+", "#", p.split(" but ")[0])[:60]
                failures[key] = failures.get(key, 0) + 1
        final = d.verified.text
        grounded += not verify_draft(final, facts).flagged
        text = final.as_text()
        new_ok = all(
            re.search(rf"\b{f.label}\b", text)
            for f in facts.lesions
            if f.change is Change.NEW and not f.equivocal
        )
        category_ok = (
            facts.recist is None
            or f"({facts.recist.category.value})" in text
            or facts.recist.category.label in text
        )
        mentioned += bool(new_ok and category_ok)
    return {
        "fact_sets": n,
        "seed": seed,
        "model": drafter.version,
        "decoding": "greedy, constrained to the facts" if drafter.constrained else "greedy, unconstrained",
        "steered_steps": steered,
        "raw_acceptance": round(accepted / max(sentences, 1), 4),
        "drafts_accepted_whole": round(whole / n, 4),
        "final_grounded": round(grounded / n, 4),
        "new_lesions_and_category_mentioned": round(mentioned / n, 4),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 2),
        "seconds_per_report": round(seconds / n, 2),
        "top_failures": dict(sorted(failures.items(), key=lambda kv: -kv[1])[:10]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--adapter", default=str(ADAPTER_DIR), help="adapter folder, or 'none' for the base model"
    )
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    ap.add_argument("--max-new-tokens", type=int, default=224)
    ap.add_argument("--unconstrained", action="store_true", help="plain greedy decoding, no constraint")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    adapter = None if args.adapter == "none" else Path(args.adapter)
    start = time.monotonic()
    drafter = LlmDrafter(
        adapter_dir=adapter, max_new_tokens=args.max_new_tokens, constrained=not args.unconstrained
    )
    result = evaluate(drafter, args.n, args.seed)
    result["wall_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
