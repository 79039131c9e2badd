"""Train the lesion + organ segmenter on a synthetic cohort (CPU friendly, resumable, seeded).

    python -m models.segmentation.train --cohort data/train --out models/weights --minutes 20

``--leave-out ATTRIBUTE=VALUE`` (repeatable) trains without the patients whose ``patient.json`` has that value
(e.g. ``body_size=large``): the subgroup audit's demonstration model (``models/weights/subgroup_demo``).

The shipped model is trained in two legs (``make weights``): 3000 steps on 28 patients
(``models/weights/stage1``), then ``--init-from`` that checkpoint with a fresh optimizer and schedule on
twice the patients (``--cohort`` is repeatable), lesion patches centred on a uniformly drawn lesion
(``--lesion-sampling instance``: small lesions are drawn as often as large ones) and a random in-plane
blur of some patches (``--blur-augment``: reconstruction kernels differ by vendor).

Writes ``segmenter.pt`` (weights + network config + preprocessing id), ``train_config.json`` and
``train_log.jsonl``; a checkpoint (``checkpoint.pt``: model, optimizer, step, RNG states) is saved
every ``--save-every`` steps, and a rerun with the same ``--out`` resumes from it. Training stops at
``--steps`` or after ``--minutes`` of wall time, whichever comes first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses.dice import DiceCELoss
from scipy import ndimage

from adapters.dicom_series import load_study
from core.types import LabelId
from models.segmentation.mining import LESION_FLOOR, lesion_weights
from models.segmentation.network import NetConfig, build_network, encode_hu

PATCH = (48, 96, 96)


def _leave_out(specs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"--leave-out {spec!r}: expected ATTRIBUTE=VALUE, e.g. body_size=large")
        out[key] = value
    return out


def _patients(cohort: Path, leave_out: dict[str, str]) -> list[Path]:
    """The cohort's patient folders, less those whose patient.json matches any ``leave_out`` attribute."""
    kept = []
    for folder in sorted(p.parent for p in cohort.glob("*/patient.json")):
        meta = json.loads((folder / "patient.json").read_text())
        unknown = [k for k in leave_out if k not in meta]
        if unknown:
            raise SystemExit(f"--leave-out: {folder.name}/patient.json has no attribute {unknown[0]!r}")
        if not any(str(meta[k]) == v for k, v in leave_out.items()):
            kept.append(folder)
    return kept


@dataclass(frozen=True, slots=True)
class Case:
    image: np.ndarray  # encoded channels, float16
    labels: np.ndarray  # uint8 label map
    lesions: list[np.ndarray]  # flat voxel indices of each lesion instance
    key: str = ""  # "PATIENT/tN": the hard examples' name for it


def _load_cases(patients: list[Path]) -> list[Case]:
    cases = []
    for tp_dir in (t for p in patients for t in sorted(p.glob("t*"))):
        if not (tp_dir / "dicom").is_dir():
            continue
        vol = load_study(tp_dir / "dicom")
        truth = np.load(tp_dir / "truth_labels.npz")
        image = encode_hu(vol.voxels_hu).astype(np.float16)
        labels = truth["labels"].astype(np.uint8)
        cases.append(
            Case(image, labels, lesion_voxels(truth["instances"]), f"{tp_dir.parent.name}/{tp_dir.name}")
        )
    return cases


def lesion_voxels(instances: np.ndarray) -> list[np.ndarray]:
    """The flat voxel indices of each lesion of an instance map (0: no lesion), by instance number."""
    inside = np.flatnonzero(instances)
    ids = instances.ravel()[inside]
    return [inside[ids == i] for i in np.unique(ids)]


def _merged_cohort_meta(cohorts: list[Path]) -> dict[str, object]:
    """One cohort description for cohorts generated with the same options (e.g. patients 0-27 and 28-55)."""
    metas = [json.loads((c / "cohort.json").read_text()) for c in cohorts]
    if any(m["options"] != metas[0]["options"] for m in metas[1:]):
        raise SystemExit("--cohort: the cohorts were generated with different options; train on one recipe")
    return {**metas[0], "patients": sorted({p for m in metas for p in m["patients"]})}


def _sample(
    rng: np.random.Generator, case: Case, by_instance: bool, blur_p: float
) -> tuple[np.ndarray, np.ndarray]:
    lab = case.labels
    r = rng.random()
    want = LabelId.LESION if r < 0.6 else (LabelId.LIVER if r < 0.75 else None)
    center: tuple[Any, ...] | None = None
    if want == LabelId.LESION and by_instance and case.lesions:
        voxels = case.lesions[int(rng.integers(0, len(case.lesions)))]
        center = np.unravel_index(int(voxels[rng.integers(0, voxels.size)]), lab.shape)
    elif want is not None:
        center = _voxel_of(rng, case, want)
    return _crop(rng, case, center, blur_p)


def _voxel_of(rng: np.random.Generator, case: Case, label: LabelId) -> tuple[int, ...] | None:
    idx = np.flatnonzero(case.labels.ravel() == label)
    if not idx.size:
        return None
    return tuple(int(c) for c in np.unravel_index(int(idx[rng.integers(0, idx.size)]), case.labels.shape))


def _crop(
    rng: np.random.Generator, case: Case, center: tuple[Any, ...] | None, blur_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """The patch around ``center`` (a uniformly drawn voxel when None), jittered by up to a quarter patch,
    with the recipe's augmentation."""
    img, lab = case.image, case.labels
    _, nz, ny, nx = img.shape
    pz, py, px = (min(p, s) for p, s in zip(PATCH, (nz, ny, nx), strict=True))
    if center is None:
        center = (rng.integers(0, nz), rng.integers(0, ny), rng.integers(0, nx))
    starts = [
        int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
        for c, p, s in zip(center, (pz, py, px), (nz, ny, nx), strict=True)
    ]
    sl = tuple(slice(s, s + p) for s, p in zip(starts, (pz, py, px), strict=True))
    x = img[(slice(None), *sl)].astype(np.float32)
    y = lab[sl]
    # a softer reconstruction kernel than the patient's scanner; no draw without it, so that the first leg's
    # random stream (and its weights) are those of the recipe before this option
    if blur_p > 0 and rng.random() < blur_p:
        x = ndimage.gaussian_filter(x, sigma=(0, 0, *([float(rng.uniform(0.3, 1.0))] * 2)))
    # intensity augmentation: calibration offset, contrast, noise, as vendors differ
    x = x * rng.uniform(0.93, 1.07) + rng.uniform(-0.03, 0.03)
    x = x + rng.normal(0, rng.uniform(0.0, 0.04), x.shape).astype(np.float32)
    return x, y


# Patch shares with hard examples: lesions drawn by their error, hard negatives, liver, uniform.
HARD_SHARES = (0.55, 0.10, 0.15, 0.20)


@dataclass(frozen=True, slots=True)
class HardExamples:
    """The mined errors (``models.segmentation.mining``) laid over the loaded cases."""

    lesion_case: np.ndarray  # case index of every lesion of every case
    lesion_index: np.ndarray  # its index in that case's ``lesions``
    lesion_p: np.ndarray  # draw probability: LESION_FLOOR + (1 - Dice), normalised
    negatives: list[tuple[int, tuple[int, int, int]]]  # (case index, voxel) of each false positive

    @classmethod
    def from_record(cls, record: dict[str, Any], cases: list[Case]) -> HardExamples:
        mined = record["cases"]
        missing = [c.key for c in cases if c.key not in mined]
        if missing:
            raise SystemExit(f"--hard-examples: no mined errors for {missing[0]} (mine the same cohorts)")
        lesion_case, lesion_index, dice = [], [], []
        negatives: list[tuple[int, tuple[int, int, int]]] = []
        for ci, case in enumerate(cases):
            entry = mined[case.key]
            if len(entry["lesions"]) != len(case.lesions):
                raise SystemExit(
                    f"--hard-examples: {case.key} has {len(case.lesions)} lesions, mined {len(entry['lesions'])}"
                )
            for li, lesion in enumerate(entry["lesions"]):
                lesion_case.append(ci)
                lesion_index.append(li)
                dice.append(float(lesion["dice"]))
            negatives += [(ci, (int(k), int(j), int(i))) for k, j, i in entry["false_positives"]]
        w = lesion_weights(dice)
        return cls(np.asarray(lesion_case), np.asarray(lesion_index), w / w.sum(), negatives)

    def sample(
        self, rng: np.random.Generator, cases: list[Case], blur_p: float
    ) -> tuple[np.ndarray, np.ndarray]:
        r = rng.random()
        lesion, negative, liver, _ = np.cumsum(HARD_SHARES)
        center: tuple[Any, ...] | None = None
        if r < lesion and self.lesion_p.size:
            g = int(rng.choice(self.lesion_p.size, p=self.lesion_p))
            case = cases[int(self.lesion_case[g])]
            voxels = case.lesions[int(self.lesion_index[g])]
            center = np.unravel_index(int(voxels[rng.integers(0, voxels.size)]), case.labels.shape)
        elif lesion <= r < negative and self.negatives:
            ci, center = self.negatives[int(rng.integers(0, len(self.negatives)))]
            case = cases[ci]
        else:  # uniform, or liver-centred in its share (an empty lesion or negative share falls to uniform)
            case = cases[int(rng.integers(0, len(cases)))]
            if negative <= r < liver:
                center = _voxel_of(rng, case, LabelId.LIVER)
        return _crop(rng, case, center, blur_p)


def _pad(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pads = [(0, max(0, p - s)) for p, s in zip(PATCH, y.shape, strict=True)]
    return np.pad(x, [(0, 0), *pads]), np.pad(y, pads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, action="append", required=True, help="repeatable")
    ap.add_argument("--out", type=Path, default=Path("models/weights"))
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument(
        "--init-from",
        type=Path,
        help="start from these weights (a checkpoint.pt) with a new optimizer and schedule, "
        "unless --out holds a checkpoint to resume",
    )
    ap.add_argument("--lesion-sampling", choices=("voxel", "instance"), default="voxel")
    ap.add_argument("--blur-augment", type=float, default=0.0, metavar="P", help="share of blurred patches")
    ap.add_argument(
        "--hard-examples",
        type=Path,
        metavar="FILE",
        help="mined errors (models.segmentation.mining): lesions drawn by their error, false positives as "
        "hard negatives",
    )
    ap.add_argument(
        "--leave-out",
        action="append",
        default=[],
        metavar="ATTRIBUTE=VALUE",
        help="train without these patients",
    )
    args = ap.parse_args()
    leave_out = _leave_out(args.leave_out)
    patients = [p for c in args.cohort for p in _patients(c, leave_out)]
    if not patients:
        raise SystemExit(f"no patients left in {args.cohort} after --leave-out {leave_out}")
    lesion_share = (
        "lesion-centred (a uniformly drawn lesion)"
        if args.lesion_sampling == "instance"
        else ("lesion-centred")
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = NetConfig()
    config = {
        "net": cfg.to_dict(),
        "patch": PATCH,
        "batch": args.batch,
        "lr": args.lr,
        "seed": args.seed,
        "cohort": " + ".join(str(c) for c in args.cohort),
        "cohort_meta": _merged_cohort_meta(args.cohort),
        "loss": "DiceCE(softmax, include_background=False)",
        "optimizer": "AdamW(wd=1e-4), cosine",
        "sampling": f"60% {lesion_share}, 15% liver-centred, 25% uniform",
        "encoding": "encode_hu/v1",
    }
    if args.blur_augment:
        config["augment"] = (
            f"in-plane Gaussian blur (sigma 0.3-1.0 voxel) on {args.blur_augment:.0%} of patches"
        )
    if args.hard_examples:
        mined = json.loads(args.hard_examples.read_text())
        shares = ", ".join(f"{v:.0%}" for v in HARD_SHARES)
        config["sampling"] = (
            f"{shares}: lesion-centred (a lesion drawn with weight {LESION_FLOOR} + (1 - Dice of the model "
            "mined with)), centred on that model's false positives, liver-centred, uniform"
        )
        config["hard_examples"] = {
            "path": str(args.hard_examples),
            "mined_with": mined["weights"],
            "mined_with_sha256": mined["weights_sha256"],
            "summary": mined["summary"],
        }
    if leave_out:
        config["left_out"] = leave_out
        config["patients_used"] = [p.name for p in patients]
    cfg_path = args.out / "train_config.json"
    previous = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    runs = previous.get("runs", [])
    if "init_from" in previous:  # a resumed second leg keeps the record of where it started
        config["init_from"] = previous["init_from"]
    runs.append(
        {"max_steps": args.steps, "max_minutes": args.minutes, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    )
    config["runs"] = runs  # one entry per invocation: a resumed training shows each leg
    cfg_path.write_text(json.dumps(config, indent=1))

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    net = build_network(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr * 0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    step = 0
    ckpt = args.out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = int(state["step"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step}", flush=True)
    elif args.init_from is not None:
        start = torch.load(args.init_from, weights_only=False)
        net.load_state_dict(start["model"])
        digest = hashlib.sha256(args.init_from.read_bytes()).hexdigest()[:12]
        config["init_from"] = {"path": str(args.init_from), "sha256": digest, "step": int(start["step"])}
        cfg_path.write_text(json.dumps(config, indent=1))
        print(f"initialised from {args.init_from} (step {start['step']})", flush=True)
    t_load = time.time()
    cases = _load_cases(patients)
    print(f"{len(cases)} volumes loaded in {time.time() - t_load:.0f} s", flush=True)
    hard = HardExamples.from_record(mined, cases) if args.hard_examples else None
    t0 = time.time()
    log = (args.out / "train_log.jsonl").open("a")

    def save() -> None:
        torch.save(
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
            },
            ckpt,
        )
        torch.save(
            {
                "model": {k: v.half() for k, v in net.state_dict().items()},
                "net": cfg.to_dict(),
                "encoding": "encode_hu/v1",
                "step": step,
            },
            args.out / "segmenter.pt",
        )

    net.train()
    running = 0.0
    while step < args.steps and (time.time() - t0) < args.minutes * 60:
        xs, ys = [], []
        for _ in range(args.batch):
            if hard is not None:
                x, y = _pad(*hard.sample(rng, cases, args.blur_augment))
            else:
                case = cases[int(rng.integers(0, len(cases)))]
                x, y = _pad(*_sample(rng, case, args.lesion_sampling == "instance", args.blur_augment))
            xs.append(x)
            ys.append(y[None])
        x_t = torch.from_numpy(np.stack(xs))
        y_t = torch.from_numpy(np.stack(ys).astype(np.int64))
        opt.zero_grad()
        loss = loss_fn(net(x_t), y_t)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        value = float(loss.detach())
        running = 0.9 * running + 0.1 * value if step > 1 else value
        if step % 10 == 0:
            rec = {
                "step": step,
                "loss": round(running, 4),
                "lr": sched.get_last_lr()[0],
                "elapsed_s": round(time.time() - t0, 1),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(rec, flush=True)
        if step % args.save_every == 0:
            save()
    save()
    elapsed = time.time() - t0
    runs[-1] |= {"stopped_at_step": step, "elapsed_s": round(elapsed), "loaded_volumes": len(cases)}
    config["hardware"] = (
        f"torch on {torch.get_num_threads()} CPU thread(s), {os.cpu_count()} cores in the machine"
    )
    cfg_path.write_text(json.dumps(config, indent=1))
    print(f"stopped at step {step} after {elapsed:.0f} s", flush=True)


if __name__ == "__main__":
    main()
