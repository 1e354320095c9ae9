# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mixllm-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo serve bench-serve test assets rankers rankers-eval rankers-ablations rankers-user caption caption-eval caption-pooled clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch only if none is importable: torch==2.13.0 resolves to the local CPU wheel here.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(VENV)/bin/mixllm assets fetch

# The main job: start the service on the defaults, send example requests, keep serving (DEMO_ONESHOT=1 stops).
demo: setup
	$(VENV)/bin/mixllm demo

serve: setup
	$(VENV)/bin/mixllm serve

# The service's latency and throughput at concurrency 1, 8 and 32 (student, teacher, /v1/recommend) next to
# the bare scorer in one run, and /v1/chat/completions' time to first token and tokens/s when an image QA
# model is served -> reports/serving.json and BENCHMARKS.md; about 5 min on a 2-core CPU.
bench-serve: setup
	$(PY) -m serving.bench

test: setup
	$(PY) -m pytest -q -ra tests

# The Mix-LLM pipeline behind checkpoints/ and reports/ml100k_rankers.*: teacher (LoRA, 2 epochs),
# teacher scores stored once, distilled student, labels-only student, the report, then the two
# item-feature ablations (kept in runs/, not committed). About 2.5 h of 2-core CPU time in all (see
# the README); on a GPU set accelerator: gpu in the recipes.
rankers: setup
	$(VENV)/bin/mixllm train teacher --config training/configs/teacher.yaml
	$(VENV)/bin/mixllm train student --config training/configs/student.yaml
	$(VENV)/bin/mixllm train student --config training/configs/student_labels.yaml
	rm -rf checkpoints/teacher checkpoints/student checkpoints/student_labels
	mkdir -p checkpoints
	cp -r runs/teacher/ranker checkpoints/teacher
	cp -r runs/student/ranker checkpoints/student
	cp -r runs/student_labels/ranker checkpoints/student_labels
	$(MAKE) rankers-eval
	$(MAKE) rankers-ablations

# LLaVA's two stages on the built-in scenes -> checkpoints/scenes_qa (projector + LoRA adapters), then the
# held-out report reports/scenes_qa.{json,md}. About 100 min of 2-core CPU time (see the README).
caption: setup
	rm -rf runs/caption_stage1 runs/caption_stage2
	$(VENV)/bin/mixllm train caption --config training/configs/caption_stage1.yaml
	$(VENV)/bin/mixllm train caption --config training/configs/caption_stage2.yaml
	rm -rf checkpoints/scenes_qa
	mkdir -p checkpoints
	cp -r runs/caption_stage2/model checkpoints/scenes_qa
	mkdir -p checkpoints/scenes_qa/logs
	cp runs/caption_stage1/model/training_run.json checkpoints/scenes_qa/logs/stage1_training_run.json
	cp runs/caption_stage1/logs/version_0/metrics.csv checkpoints/scenes_qa/logs/stage1_metrics.csv
	cp runs/caption_stage2/logs/version_0/metrics.csv checkpoints/scenes_qa/logs/stage2_metrics.csv
	$(MAKE) caption-eval

caption-eval: setup
	$(VENV)/bin/mixllm eval caption --model checkpoints/scenes_qa --speed

# The pooling ablation: stage 2 as above from the same stage-1 projector, the 7x7 grid pooled to 4x4
# (16 image tokens) -> reports/scenes_qa_pool4.{json,md} (not committed as a checkpoint). Needs runs/caption_stage1.
caption-pooled: setup
	$(VENV)/bin/mixllm train caption --config training/configs/caption_stage2.yaml --set model.image.pooled_grid=4 output_dir=runs/caption_stage2_pool4
	$(VENV)/bin/mixllm eval caption --model runs/caption_stage2_pool4/model --speed --output reports/scenes_qa_pool4.json

# Item-feature ablations of the distilled student (same stored teacher scores) and the labels-only
# twin of the MiniLM-only one, scored on sampled-20 -> reports/ml100k_ablations.{json,md}.
rankers-ablations: setup
	$(VENV)/bin/mixllm train student --config training/configs/student.yaml --set item_features=minilm output_dir=runs/student_minilm
	$(VENV)/bin/mixllm train student --config training/configs/student.yaml --set item_features=sasrec output_dir=runs/student_sasrec
	$(VENV)/bin/mixllm train student --config training/configs/student_labels.yaml --set item_features=minilm output_dir=runs/student_labels_minilm
	$(VENV)/bin/mixllm eval ranker --protocols sampled-20 --output reports/ml100k_ablations.json \
		--speed-requests 16 --checkpoint "student (distilled, MiniLM only)=runs/student_minilm/ranker" \
		"student (labels only, MiniLM only)=runs/student_labels_minilm/ranker" \
		"student (distilled, SASRec only)=runs/student_sasrec/ranker"

# Issue 11's first CPU experiment (not the served default yet): the user-token student of
# training/configs/student_user.yaml (~30 min on the 2-core CPU), its SASRec fusion gate fitted on the
# validation lists, and both scored beside Popularity and SASRec on the first 300 test users
# (sampled-20 on candidate seeds 0/1/2, full ranking reranking SASRec's top 20 and 50)
# -> reports/ml100k_student_user.{json,md}.
rankers-user: setup
	$(VENV)/bin/mixllm train student --config training/configs/student_user.yaml
	$(VENV)/bin/python -m training.fit_fusion --checkpoint runs/student_user/ranker --output runs/student_user_fused/ranker
	$(VENV)/bin/mixllm eval ranker --protocols sampled-20 full --max-users 300 --retrieve 20 50 --speed-requests 16 \
		--output reports/ml100k_student_user.json --checkpoint "student (user tokens)=runs/student_user/ranker" \
		"student (user tokens) + SASRec, fused=runs/student_user_fused/ranker" --student "student (user tokens) + SASRec, fused"

rankers-eval: setup
	$(VENV)/bin/mixllm eval ranker --checkpoint teacher=checkpoints/teacher "student (distilled)=checkpoints/student" \
		"student (labels only)=checkpoints/student_labels" --teacher-users-20 300 --teacher-users-100 50

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
