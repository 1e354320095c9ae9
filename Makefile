# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
CAPTION_PRECISION ?= auto
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mixllm-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo serve bench-serve test assets rankers rankers-default rankers-eval rankers-ablations rankers-distill rankers-users rankers-cold caption caption-eval caption-pooled clean

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

# The Mix-LLM pipeline behind checkpoints/ and reports/ml100k_rankers.*: the textual teacher (LoRA,
# 2 epochs) -> checkpoints/teacher, the served default student (rankers-default), the report
# (rankers-eval), then the ablations (rankers-ablations: kept in runs/, not committed). The two GPU-arm
# students want a GPU (the recipes' accelerator: auto takes one; 812 s each side by side on one H100, ~12 h each on
# the 2-core CPU); the rest is ~5 h of 2-core CPU time (see the README).
rankers: setup
	$(VENV)/bin/mixllm train teacher --config training/configs/teacher.yaml
	rm -rf checkpoints/teacher
	mkdir -p checkpoints
	cp -r runs/teacher/ranker checkpoints/teacher
	$(MAKE) rankers-default
	$(MAKE) rankers-eval
	$(MAKE) rankers-ablations
	$(MAKE) rankers-distill
	$(MAKE) rankers-users

# The served default -> checkpoints/student: training/configs/student_gpu.yaml (user tokens, every sliding
# window: 97,171 lists, batch 64, 3,983 steps = 2.6 epochs; 812 s on one H100, ~12 h on the 2-core CPU),
# fused with SASRec by python -m training.fit_fusion (the student's score scale and the gate, fitted on the
# validation lists; ~3 min on the CPU). Then the hard-negative arm (student_gpu_hard.yaml) fused likewise;
# the default is the arm with the lower fused validation cross-entropy (1.3594 vs 1.3934; see the README).
# Last, the CPU-budget student (student_user.yaml: 9,430 lists, 1 epoch, ~55 min on the CPU), the previous
# default, fused likewise: the report's comparison row.
rankers-default: setup
	$(VENV)/bin/mixllm train student --config training/configs/student_gpu.yaml
	$(VENV)/bin/python -m training.fit_fusion --checkpoint runs/student_gpu/ranker --output runs/student_gpu_fused/ranker
	rm -rf checkpoints/student
	mkdir -p checkpoints
	cp -r runs/student_gpu_fused/ranker checkpoints/student
	$(VENV)/bin/mixllm train student --config training/configs/student_gpu_hard.yaml
	$(VENV)/bin/python -m training.fit_fusion --checkpoint runs/student_gpu_hard/ranker --output runs/student_gpu_hard_fused/ranker
	$(VENV)/bin/mixllm train student --config training/configs/student_user.yaml
	$(VENV)/bin/python -m training.fit_fusion --checkpoint runs/student_user/ranker --output runs/student_user_fused/ranker

# The committed report: Popularity, SASRec, the teacher (first 60 users for sampled-20, 20 for full
# ranking: it is ~15x slower), the default student, its hard-negative arm and the CPU-budget student, each
# fused and alone (the fusion-off row comes from the same forward), all 943 test users, candidate seeds
# 0/1/2, full ranking reranking SASRec's top 20 and 50. sampled-100 is left out to fit the CPU budget.
rankers-eval: setup
	$(VENV)/bin/mixllm eval ranker --protocols sampled-20 full --retrieve 20 50 --teacher-users-20 60 \
		--teacher-users-100 20 --checkpoint teacher=checkpoints/teacher "student (all windows, GPU) + SASRec=checkpoints/student" \
		"student (all windows, hard negatives) + SASRec=runs/student_gpu_hard_fused/ranker" \
		"student (user tokens, CPU budget) + SASRec=runs/student_user_fused/ranker" --student "student (all windows, GPU) + SASRec"

# LLaVA's two stages on the built-in scenes -> checkpoints/scenes_qa (projector + LoRA adapters), then the
# held-out report reports/scenes_qa.{json,md}. Stage 1 (by cells, no LLM forward) takes ~1 min; stage 2 (600 steps)
# took 151 s on one H100 in fp32 (the committed default: CAPTION_PRECISION=32-true; auto is bf16-mixed on a GPU)
# and ~2.6 h on the 2-core CPU (~16 s a step in fp32). CAPTION_PRECISION=bf16-mixed (bfloat16 autocast) is
# faster on a CPU only with AMX (the Xeon: ~8.6 s a step). Then the report, ~16 min on the CPU.
caption: setup
	rm -rf runs/caption_stage1 runs/caption_stage2
	$(VENV)/bin/mixllm train caption --config training/configs/caption_stage1.yaml
	$(VENV)/bin/mixllm train caption --config training/configs/caption_stage2.yaml --set precision=$(CAPTION_PRECISION)
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

# The pooling ablation: session 12's recipe (no position input, 300 steps), the 7x7 grid pooled to 4x4
# (16 image tokens) in stage 2, from its own stage 1 -> reports/scenes_qa_pool4.{json,md} (not committed as
# a checkpoint). Its 49-token twin is the same two commands without pooled_grid (README, "Fewer image tokens").
caption-pooled: setup
	$(VENV)/bin/mixllm train caption --config training/configs/caption_stage1.yaml --set model.image.position_input=false output_dir=runs/caption_stage1_plain
	$(VENV)/bin/mixllm train caption --config training/configs/caption_stage2.yaml --set precision=$(CAPTION_PRECISION) \
		model.image.position_input=false model.image.pooled_grid=4 max_steps=300 max_epochs=2 \
		init_from=runs/caption_stage1_plain/model output_dir=runs/caption_stage2_pool4
	$(VENV)/bin/mixllm eval caption --model runs/caption_stage2_pool4/model --speed --output reports/scenes_qa_pool4.json

# Ablations, kept in runs/ (not committed) -> reports/ml100k_ablations.{json,md}: the earlier issue's
# distilled student (student.yaml: no user tokens, 2 lists per user, distilled from the teacher's stored
# scores) and its labels-only twin; its item-feature ablations (MiniLM only, SASRec only); and the
# default student's fusion with the gate alone (score scale held at 1). Sampled-20 only.
rankers-ablations: setup
	$(VENV)/bin/mixllm train student --config training/configs/student.yaml
	$(VENV)/bin/mixllm train student --config training/configs/student_labels.yaml
	$(VENV)/bin/mixllm train student --config training/configs/student.yaml --set item_features=minilm output_dir=runs/student_minilm
	$(VENV)/bin/mixllm train student --config training/configs/student.yaml --set item_features=sasrec output_dir=runs/student_sasrec
	$(VENV)/bin/mixllm train student --config training/configs/student_labels.yaml --set item_features=minilm output_dir=runs/student_labels_minilm
	$(VENV)/bin/python -m training.fit_fusion --gate-only --checkpoint runs/student_user/ranker --output runs/student_user_gate_only/ranker
	$(VENV)/bin/mixllm eval ranker --protocols sampled-20 --output reports/ml100k_ablations.json \
		--speed-requests 16 --checkpoint "student (distilled)=runs/student/ranker" \
		"student (labels only)=runs/student_labels/ranker" \
		"student (distilled, MiniLM only)=runs/student_minilm/ranker" \
		"student (labels only, MiniLM only)=runs/student_labels_minilm/ranker" \
		"student (distilled, SASRec only)=runs/student_sasrec/ranker" \
		"student (user tokens) + SASRec, gate only=runs/student_user_gate_only/ranker"

# Distillation vs labels only, paired: the CPU-budget student (student_user.yaml, labels only) and its twin
# distilled from SASRec's scores of the same 9,430 lists (alpha 0.5, T 2; no LLM teacher scoring, which
# would cost ~1 h of CPU), each fused likewise, scored fused and alone on all test users, sampled-20
# seeds 0/1/2 -> reports/ml100k_distillation.{json,md}. The twin: 1,710 s on the 2-core CPU (session 9); the
# evaluation ~10 min. Needs rankers-default's runs/.
rankers-distill: setup
	$(VENV)/bin/mixllm train student --config training/configs/student_user.yaml --set alpha=0.5 teacher=sasrec \
		output_dir=runs/student_user_sasrec_kd
	$(VENV)/bin/python -m training.fit_fusion --checkpoint runs/student_user_sasrec_kd/ranker \
		--output runs/student_user_sasrec_kd_fused/ranker
	$(VENV)/bin/mixllm eval ranker --protocols sampled-20 --output reports/ml100k_distillation.json --speed-requests 16 \
		--checkpoint "student (CPU budget, distilled from SASRec) + SASRec=runs/student_user_sasrec_kd_fused/ranker" \
		"student (CPU budget, labels only) + SASRec=runs/student_user_fused/ranker" \
		--student "student (CPU budget, distilled from SASRec) + SASRec"

# User-history tokens, ablated on the CPU budget (issue 11): student_user.yaml's 9,430 lists, seed and
# schedule with m = 4 user tokens (the recipe), m = 1, and none (only the 10 item tokens), all three trained
# here in fp32 (bf16 is slow on a CPU without AMX; 21-27 min each on the 2-core AMD EPYC), each fused likewise,
# and scored in one run, fused and alone, with the arms compared paired per user (--compare)
# -> reports/ml100k_user_tokens.{json,md}. Sampled-20 only (14 min). ~100 min in all (session 15).
USERS_RECIPE = --config training/configs/student_user.yaml --set precision=32-true
rankers-users: setup
	$(VENV)/bin/mixllm train student $(USERS_RECIPE) output_dir=runs/student_user_m4
	$(VENV)/bin/mixllm train student $(USERS_RECIPE) user.num_tokens=1 output_dir=runs/student_user_m1
	$(VENV)/bin/mixllm train student $(USERS_RECIPE) user=null output_dir=runs/student_user_m0
	for m in 4 1 0; do $(VENV)/bin/python -m training.fit_fusion --checkpoint runs/student_user_m$$m/ranker \
		--output runs/student_user_m$${m}_fused/ranker || exit 1; done
	$(VENV)/bin/mixllm eval ranker --protocols sampled-20 --batch-size 32 --speed-requests 16 --output reports/ml100k_user_tokens.json \
		--checkpoint "m = 4 user tokens + SASRec=runs/student_user_m4_fused/ranker" \
		"m = 1 user token + SASRec=runs/student_user_m1_fused/ranker" \
		"no user tokens + SASRec=runs/student_user_m0_fused/ranker" --student "m = 4 user tokens + SASRec" \
		--compare "m = 4 user tokens + SASRec [alone: fusion off]" "no user tokens + SASRec [alone: fusion off]" \
		--compare "m = 4 user tokens + SASRec [alone: fusion off]" "m = 1 user token + SASRec [alone: fusion off]" \
		--compare "m = 4 user tokens + SASRec" "no user tokens + SASRec" \
		--compare "m = 4 user tokens + SASRec" "m = 1 user token + SASRec"

# Cold items: the CPU-budget student's second epoch, plain (the control) and with the SASRec part of 30% of
# its item tokens zeroed (cold_item_rate, as the service reads new items), each fused likewise; then
# students scored with each test target made cold (300 test users spread over the ids, sampled-20): the
# default, the CPU student's control and cold-trained epochs, and the default with a neutral retriever
# score -> reports/cold_items_{default,two_epochs,cold_trained,default_neutral}.{json,md}. Needs
# rankers-default's runs/.
rankers-cold: setup
	rm -rf runs/student_user_e2 runs/student_user_cold
	cp -r runs/student_user runs/student_user_e2
	$(VENV)/bin/mixllm train student --config training/configs/student_user.yaml --set max_epochs=2 \
		output_dir=runs/student_user_e2 --resume runs/student_user_e2/checkpoints/last.ckpt
	$(VENV)/bin/python -m training.fit_fusion --checkpoint runs/student_user_e2/ranker --output runs/student_user_e2_fused/ranker
	cp -r runs/student_user runs/student_user_cold
	$(VENV)/bin/mixllm train student --config training/configs/student_user.yaml --set cold_item_rate=0.3 max_epochs=2 \
		output_dir=runs/student_user_cold --resume runs/student_user_cold/checkpoints/last.ckpt
	$(VENV)/bin/python -m training.fit_fusion --checkpoint runs/student_user_cold/ranker --output runs/student_user_cold_fused/ranker
	$(VENV)/bin/python -m training.cold_items --users 300 --rules warm zeros --checkpoint checkpoints/student \
		--output reports/cold_items_default.json
	$(VENV)/bin/python -m training.cold_items --users 300 --rules warm zeros --checkpoint runs/student_user_e2_fused/ranker \
		--output reports/cold_items_two_epochs.json
	$(VENV)/bin/python -m training.cold_items --users 300 --rules warm zeros --checkpoint runs/student_user_cold_fused/ranker \
		--output reports/cold_items_cold_trained.json
	$(VENV)/bin/python -m training.cold_items --users 300 --rules warm zeros --retriever-cold neutral \
		--checkpoint checkpoints/student --output reports/cold_items_default_neutral.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
