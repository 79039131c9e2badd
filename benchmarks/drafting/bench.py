"""Drafting speed: one report through ``LlmDrafter.write`` (prompt, generate constrained to the facts, parse,
verify) against the same model's raw, unconstrained ``generate`` of the same number of tokens from the same
input, alternating in one process.

    OMP_NUM_THREADS=1 python -m benchmarks.drafting.bench --n 12 --out benchmarks/drafting/result.json

Reports the ratio of total times (target <= 1.1) and tokens per second of both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.drafter.corpus import make_examples
from models.drafter.drafter import LlmDrafter, build_inputs
from models.drafter.evaluate import HELD_OUT_SEED
from models.drafter.prompt import facts_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    drafter = LlmDrafter()
    _, facts_list = make_examples(args.n + 1, HELD_OUT_SEED + 1)
    drafter.write(facts_list[0])  # warm-up, not counted
    t_ours = t_raw = 0.0
    tokens = 0
    for facts in facts_list[1:]:
        d = drafter.write(facts)
        inputs = build_inputs(drafter.tokenizer, facts_prompt(facts))
        start = time.perf_counter()
        with torch.inference_mode():
            drafter.model.generate(
                **inputs,
                max_new_tokens=d.new_tokens,
                min_new_tokens=d.new_tokens,
                do_sample=False,
                pad_token_id=drafter.tokenizer.eos_token_id,
            )
        t_raw += time.perf_counter() - start
        t_ours += d.seconds
        tokens += d.new_tokens
    result = {
        "reports": args.n,
        "tokens": tokens,
        "interval_s": round(t_ours, 2),
        "raw_generate_s": round(t_raw, 2),
        "ratio": round(t_ours / t_raw, 3),
        "interval_tokens_per_s": round(tokens / t_ours, 2),
        "raw_tokens_per_s": round(tokens / t_raw, 2),
        "model": drafter.version,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
