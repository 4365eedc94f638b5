# Two commands do all the setup on a fresh clone: `make demo` and `make test`.
# Both create .venv and install relreg (with the pinned, tested dependency set) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.relreg-installed
OUT ?= runs/demo

.PHONY: venv test test-all test-numerics demo evaluate compare study study-baselines study-scenes study-scenes-2026 study-scenes-masks study-scenes-groups mask-quality study-scenes-steps study-scenes-same-task bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# the peers the tests compare with, without their dependency lists (LXT's pulls bitsandbytes
	# and open_clip, which a pip extra could not drop): pinned in constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt lxt zennit
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# the numerical tests under two of ATen's CPU kernel sets (other machines' rounding, see
# tests/numerics.py): a tolerance that holds only on this machine's kernels fails here
NUMERICS_TESTS := tests/explain tests/metrics tests/losses
test-numerics: $(STAMP)
	ATEN_CPU_CAPABILITY=default $(PY) -m pytest -x -q -p no:cacheprovider $(NUMERICS_TESTS)
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -x -q -p no:cacheprovider $(NUMERICS_TESTS)

demo: $(STAMP)
	$(VENV)/bin/relreg demo --out $(OUT)

# after `make demo`: the baseline against the relreg arm (seed 0), on the OOD split with its masks
evaluate: $(STAMP)
	$(VENV)/bin/relreg evaluate --checkpoint $(OUT)/bias/final.ckpt $(OUT)/relreg-seed0/final.ckpt \
		--labels baseline relreg --data shapes:ood --ood ood=shapes:ood test=shapes:test \
		--methods chefer transformer_attribution rollout gradcam --out $(OUT)/evaluate --overwrite

# after `make demo`: every explainer, in the shape of the CVPR 2021 tables, on the stage-1 model
# (trained on unbiased data) and on the biased baseline
compare: $(STAMP)
	$(PY) experiments/compare_explainers.py --checkpoint $(OUT)/pretrain/final.ckpt \
		--out experiments/results/compare_explainers.json
	$(PY) experiments/compare_explainers.py --checkpoint $(OUT)/bias/final.ckpt \
		--out experiments/results/compare_explainers_biased.json

# the robustness study (about 13 minutes on 2 CPU cores): when does relevance fine-tuning help?
study: $(STAMP)
	$(PY) experiments/robustness_study.py --out experiments/results/robustness_study.json --overwrite

# after `make study`: its main comparison on three more baselines (about 22 minutes on 2 CPU cores)
study-baselines: $(STAMP)
	$(PY) experiments/robustness_baselines.py --baseline-seeds 0 1 2 3 \
		--from-study experiments/results/robustness_study.json \
		--out experiments/results/robustness_baselines.json --overwrite

# the study on real images (digits on photographs): every arm, 4 baselines x 3 fine-tuning seeds
study-scenes: $(STAMP)
	$(PY) experiments/robustness_baselines.py --config configs/study/scenes.yaml \
		--baseline-seeds 0 1 2 3 --methods relreg_label relreg_teacher energy rrr counterfactual \
		relreg_cf faithful faithful_cf --out experiments/results/robustness_scenes.json --overwrite

# the 2024-2026 arms on the same protocol: AttnLRP maps, CFT's loss, with and without the
# counterfactual term (about 38 minutes on 2 CPU cores)
study-scenes-2026: $(STAMP)
	$(PY) experiments/robustness_baselines.py --config configs/study/scenes.yaml \
		--baseline-seeds 0 1 2 3 --methods counterfactual relreg_label robustvit_attnlrp \
		robustvit_attnlrp_cf cft cft_cf cft_attnlrp cft_attnlrp_cf \
		--out experiments/results/robustness_scenes_2026.json --overwrite

# TokenCut's masks against the true masks of both benchmarks (about 2 minutes after make demo)
mask-quality: $(STAMP)
	$(PY) experiments/mask_quality.py --out experiments/results/mask_quality.json

# the recipe without human masks: the counterfactual and RobustViT-loss arms on TokenCut masks
# (relreg masks) against the same arms on the true masks (about 30 minutes on 2 CPU cores)
study-scenes-masks: $(STAMP)
	$(PY) experiments/robustness_baselines.py --config configs/study/scenes.yaml \
		--baseline-seeds 0 1 2 3 --methods counterfactual relreg_label counterfactual_tokencut \
		relreg_label_tokencut counterfactual_tokencut_refined \
		--out experiments/results/robustness_scenes_masks.json --overwrite

# the field's question: the recipes against DFR, GroupDRO and a data oracle on the same image
# budget, with worst-group accuracy (about 25 minutes on 2 CPU cores)
study-scenes-groups: $(STAMP)
	$(PY) experiments/robustness_baselines.py --config configs/study/scenes.yaml \
		--baseline-seeds 0 1 2 3 --methods counterfactual relreg_label dfr group_dro oracle \
		--out experiments/results/robustness_scenes_groups.json --overwrite

# after or instead of study-scenes: its two best arms and the control fine-tuned 300 steps (about 30 minutes)
study-scenes-steps: $(STAMP)
	$(PY) experiments/robustness_baselines.py --config configs/study/scenes.yaml --steps 300 \
		--baseline-seeds 0 1 2 3 --methods counterfactual faithful_cf \
		--out experiments/results/robustness_scenes_steps300.json --overwrite

# the real-image study's main arms when the baseline is pre-trained on the task's own 4 digits (about 25 minutes)
study-scenes-same-task: $(STAMP)
	$(PY) experiments/robustness_baselines.py --config configs/study/scenes.yaml --no-source-task \
		--baseline-seeds 0 1 2 3 --methods relreg_label counterfactual faithful faithful_cf \
		--out experiments/results/robustness_scenes_same_task.json --overwrite

bench: $(STAMP)
	$(PY) experiments/bench_explain.py --out experiments/results/bench_explain.json
	$(PY) experiments/bench_explain.py --method transformer_attribution \
		--out experiments/results/bench_explain_transformer_attribution.json
	$(PY) experiments/bench_train.py --out experiments/results/bench_train.json
	$(PY) experiments/bench_train.py --sweep --repeats 3 --out experiments/results/bench_train.json

lint: $(STAMP)
	$(VENV)/bin/ruff check relreg tests experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
