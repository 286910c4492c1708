# Rules shared by the diffusion pipelines (pipelines/fig1a, fig1b, fig1c, fig6): one grammar, a
# sweep of training-set sizes P and seeds, trained with `cgtools sweep`, sampled and measured.
#
#   $(OUT)/data/grammar.safetensors, val.parquet   cgtools rhm-gen: the grammar and VAL validation
#                                                  sentences (seed 0)
#   $(OUT)/data/train_P<P>_s<S>.parquet            P training sentences, disjoint from val (one
#                                                  draw per (P, seed))
#   $(OUT)/runs.csv, $(OUT)/runs/P<P>_s<S>/        cgtools sweep --resume: one run directory per
#                                                  (P, seed), the files of cgtools train
#   $(OUT)/samples/P<P>_s<S>.parquet               cgtools sample (NSAMPLES, seed 1)
#   $(OUT)/tables/acc_P<P>_s<S>.parquet            measure-accuracy, kind accuracy, tags P, m, L, seed
#   $(OUT)/tables/corr_P<P>_s<S>.parquet           correlate of the samples, tags P, seed
#   $(OUT)/tables/corr_exact.parquet               correlate --exact (the infinite-data curve)
#   $(OUT)/tables/novelcorr_P<P>_s<S>.parquet      correlate of the novel samples only (--exclude the
#                                                  training set), tags P, seed
#   $(OUT)/tables/sens_P<P>_s<S>.parquet           sensitivity, tags P, seed
#   $(OUT)/online/                                 cgtools train --online with sample checks (fig1b)
#
# The figure Makefiles share OUT (../diffusion-out by default), so fig1a, fig1c and fig6 draw from
# the same trained models: run them one after another (or `make -C pipelines/fig1a all-figures`),
# not as concurrent makes on one OUT. Every file is written atomically; an interrupted `make`
# resumes (the sweep with --resume continues every run from its last checkpoint, finished runs
# are not retrained).
SHELL := /bin/bash
COMMON := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
VENV := $(abspath $(COMMON)/../.venv/bin)
CGTOOLS ?= $(if $(wildcard $(VENV)/cgtools),$(VENV)/cgtools,cgtools)
PYTHON ?= $(if $(wildcard $(VENV)/python),$(VENV)/python,python3)

# The grammar (a departure from the paper's L = 3, s = 2, v = 32, m = 8 at width 8192, out of reach
# of 2 CPU cores): L = 3, s = 2, v = 8, m = 2. P_l = v m^(l+1) / (1 - m/v) = 43, 85, 171; the
# language holds 1024 sentences, 6 P_3, so P* sits inside it and the levels separate by 2x each.
L ?= 3
S ?= 2
V ?= 8
M ?= 2
PS ?= 32 64 128 256 512
SEEDS ?= 0 1
VAL ?= 128
STEPS ?= 6000
WIDTH ?= 256
PRESET ?= cpu
EVAL_EVERY ?= 500
# Early stopping as in the paper (App. C): the model kept is the one of the lowest validation loss;
# validations also at 4 log-spaced steps per decade before EVAL_EVERY (1, 2, 3, 6, ..., 316), since
# at small P the validation loss bottoms out within the first few hundred steps (P = 32 at batch
# 64: 2 epochs per step), and a model kept at step 500 has memorised its training set.
EARLY_EVALS ?= 4
# and training stops after PATIENCE validations without a new best (empty: train all STEPS).
# 8 (4000 steps at EVAL_EVERY 500): the validation loss of 128 sentences wanders by ~2 % between
# validations before the cosine decay (from step 3000) brings the last gains; with 4, one P = 512
# run stopped at step 3500 on a best of step 1500 (A_3 = 0.70 against 0.94 for its twin).
PATIENCE ?= 8
# P* = the last upward crossing of A_L = 1/2 (cgtools sample-complexity --crossing): a model that
# memorised a small training set samples copies, which are grammatical, and can lift A_L above 1/2
# at the smallest P; the last crossing is the onset of generalisation that the paper's P* means.
CROSSING ?= last
# 4096 samples: their correlations' noise floor 1/(v sqrt(N)) = 0.0020 lies below the grammar's
# exact correlations at every distance (0.0045 at t >= 4), which 512 samples (0.0055) could not resolve.
NSAMPLES ?= 4096
NPERTURB ?= 256
# Two stacks (one per core) of at most MAX_STACK runs each.
MAX_STACK ?= 5
JOBS ?= 2
SWEEP_FLAGS ?=
# fig1b: online training (fresh sentences every step) with SAMPLE_CHECK samples per validation.
ONLINE_STEPS ?= $(STEPS)
ONLINE_EVAL ?= 250
SAMPLE_CHECK ?= 256
OUT ?= ../diffusion-out

G := -L $(L) -s $(S) -v $(V) -m $(M)
TAGS = --tag m=$(M) --tag L=$(L) --tag s=$(S) --tag v=$(V)
NAMES := $(foreach p,$(PS),$(foreach s,$(SEEDS),P$(p)_s$(s)))
field = $(word $1,$(subst _, ,$2))
P_of = $(patsubst P%,%,$(call field,1,$1))
S_of = $(patsubst s%,%,$(call field,2,$1))
GRAMMAR := $(OUT)/data/grammar.safetensors
MODELS := $(foreach n,$(NAMES),$(OUT)/runs/$(n)/model.safetensors)
ACC := $(foreach n,$(NAMES),$(OUT)/tables/acc_$(n).parquet)
CORR := $(foreach n,$(NAMES),$(OUT)/tables/corr_$(n).parquet)
NOVEL_CORR := $(foreach n,$(NAMES),$(OUT)/tables/novelcorr_$(n).parquet)
SENS := $(foreach n,$(NAMES),$(OUT)/tables/sens_$(n).parquet)
PERTURBED := $(foreach l,$(shell seq 1 $(L)),$(OUT)/data/perturbed_l$(l).parquet)
GRAMMAR_TEXT := L=$(L) s=$(S) v=$(V) m=$(M), width $(WIDTH), $(STEPS) steps, $(words $(SEEDS)) seed(s)

.PHONY: all all-figures tiny clean runs demo demo-results
# Kept files made by pattern rules only (not redone when missing while what they feed is current);
# the tables are named targets, so a lost table is rebuilt with what depends on it.
SAMPLES := $(foreach n,$(NAMES),$(OUT)/samples/$(n).parquet)
TRAIN := $(foreach n,$(NAMES),$(OUT)/data/train_$(n).parquet)
.SECONDARY: $(SAMPLES) $(TRAIN) $(PERTURBED)
.DELETE_ON_ERROR:

runs: $(MODELS)

$(OUT)/data $(OUT)/tables $(OUT)/samples:
	mkdir -p $@

$(GRAMMAR): | $(OUT)/data
	$(CGTOOLS) rhm-gen $(G) -n $(VAL) --seed 0 --grammar-out $@ -o $(OUT)/data/val.parquet --force
$(OUT)/data/val.parquet: $(GRAMMAR)

$(OUT)/data/train_%.parquet: $(OUT)/data/val.parquet
	$(CGTOOLS) rhm-gen --grammar $(GRAMMAR) --exclude $< -n $(call P_of,$*) \
	  --seed $$(( 1000 * ($(call S_of,$*) + 1) + $(call P_of,$*) )) -o $@ --force

$(OUT)/data/perturbed_l%.parquet: $(GRAMMAR)
	$(CGTOOLS) rhm-gen --grammar $< -n $(NPERTURB) --seed $$(( 500 + $* )) --perturb $* -o $@ --force

# The manifest names every run; the sweep trains those not finished (resuming interrupted ones).
$(OUT)/runs.csv: $(foreach n,$(NAMES),$(OUT)/data/train_$(n).parquet)
	{ echo "data,val,out,seed"; $(foreach n,$(NAMES),echo "data/train_$(n).parquet,data/val.parquet,runs/$(n),$(call S_of,$(n))";) } > $@.tmp && mv $@.tmp $@

$(OUT)/runs.done: $(OUT)/runs.csv
	$(CGTOOLS) sweep $< --resume --preset $(PRESET) --width $(WIDTH) --steps $(STEPS) \
	  --eval-every $(EVAL_EVERY) --early-evals $(EARLY_EVALS) $(if $(PATIENCE),--patience $(PATIENCE)) --sample-check 0 --max-stack $(MAX_STACK) --jobs $(JOBS) $(SWEEP_FLAGS)
	touch $@
$(MODELS): $(OUT)/runs.done

$(OUT)/samples/%.parquet: $(OUT)/runs/%/model.safetensors | $(OUT)/samples
	$(CGTOOLS) sample $< -n $(NSAMPLES) --seed 1 --threads 1 -o $@ --force

$(OUT)/tables/acc_%.parquet: $(OUT)/samples/%.parquet $(OUT)/data/train_%.parquet | $(OUT)/tables
	$(CGTOOLS) measure-accuracy $< --train $(word 2,$^) -o $@ --force \
	  --tag P=$(call P_of,$*) --tag seed=$(call S_of,$*) $(TAGS)

$(OUT)/tables/corr_%.parquet: $(OUT)/samples/%.parquet | $(OUT)/tables
	$(CGTOOLS) correlate $< -o $@ --force --tag P=$(call P_of,$*) --tag seed=$(call S_of,$*)

# The samples that copy no training sentence: what the model creates (at small P most samples are
# copies, whose correlations are the training set's own and reach every distance).
$(OUT)/tables/novelcorr_%.parquet: $(OUT)/samples/%.parquet $(OUT)/data/train_%.parquet | $(OUT)/tables
	$(CGTOOLS) correlate $< --exclude $(word 2,$^) -o $@ --force --tag P=$(call P_of,$*) --tag seed=$(call S_of,$*)

$(OUT)/tables/corr_exact.parquet: $(GRAMMAR) | $(OUT)/tables
	$(CGTOOLS) correlate --exact --grammar $< -o $@ --force

$(OUT)/tables/sens_%.parquet: $(OUT)/runs/%/model.safetensors $(PERTURBED) | $(OUT)/tables
	$(CGTOOLS) sensitivity $< $(PERTURBED) --threads 1 -o $@ --force \
	  --tag P=$(call P_of,$*) --tag seed=$(call S_of,$*) $(TAGS)

$(OUT)/tables/pstar.parquet: $(ACC)
	$(CGTOOLS) sample-complexity $^ --by m,L --crossing $(CROSSING) -o $@ --force

$(OUT)/online/model.safetensors: $(OUT)/data/val.parquet
	$(CGTOOLS) train $< --online --val $< -o $(OUT)/online --resume --preset $(PRESET) --width $(WIDTH) \
	  --steps $(ONLINE_STEPS) --eval-every $(ONLINE_EVAL) --sample-check $(SAMPLE_CHECK) --allow-overlap

# The figures.
$(OUT)/fig1a.png: $(ACC)
	$(CGTOOLS) plot accuracy $^ -o $@ --force --title "Fig. 1a: $(GRAMMAR_TEXT)"

$(OUT)/fig1b.png: $(OUT)/online/model.safetensors
	$(CGTOOLS) plot accuracy-online $(OUT)/online/metrics.parquet -o $@ --force \
	  --title "Fig. 1b, online: L=$(L) s=$(S) v=$(V) m=$(M), width $(WIDTH), $(ONLINE_STEPS) steps"

$(OUT)/fig1c.png: $(CORR) $(OUT)/tables/corr_exact.parquet
	$(CGTOOLS) plot correlation $^ -o $@ --force --title "Fig. 1c: samples of each P ($(GRAMMAR_TEXT))"

$(OUT)/fig1c_novel.png: $(NOVEL_CORR) $(OUT)/tables/corr_exact.parquet
	$(CGTOOLS) plot correlation $^ -o $@ --force --title "Fig. 1c, novel samples only ($(GRAMMAR_TEXT))"

$(OUT)/fig6.png: $(SENS) $(ACC)
	$(CGTOOLS) plot sensitivity $^ -o $@ --force --title "Fig. 6: sensitivity to synonym exchange ($(GRAMMAR_TEXT))"

$(OUT)/summary.txt: $(ACC) $(COMMON)diffusion.py
	$(PYTHON) $(COMMON)diffusion.py summary $(ACC) $(G) --crossing $(CROSSING) -o $@ --json $(OUT)/summary.json

all-figures: $(OUT)/fig1a.png $(OUT)/fig1b.png $(OUT)/fig1c.png $(OUT)/fig1c_novel.png $(OUT)/fig6.png \
  $(OUT)/summary.txt

# The whole chain in seconds: a width-16 network, 40 steps, two P values, one seed, into OUT when
# given on the command line (make tiny OUT=/tmp/x), else into out-tiny.
TINY_OUT := $(if $(filter command line,$(origin OUT)),$(OUT),out-tiny)
TINY_VARS ?= PS="32 128" SEEDS=0 STEPS=40 ONLINE_STEPS=40 ONLINE_EVAL=20 WIDTH=16 EVAL_EVERY=20 \
  NSAMPLES=64 NPERTURB=32 SAMPLE_CHECK=32 SWEEP_FLAGS="--T 20"
tiny:
	$(MAKE) --no-print-directory all OUT=$(TINY_OUT) $(TINY_VARS)

# `make demo` (the README's first command): the small main experiment, one seed at three P below,
# near and above P_3 = 171: training (one sweep), samples, accuracy per level, correlations, the
# figures and the summary, in about ten minutes on 2 cores; into OUT when given, else demo-out.
DEMO_OUT := $(if $(filter command line,$(origin OUT)),$(OUT),demo-out)
DEMO_VARS ?= PS="32 128 512" SEEDS=0 STEPS=4000 MAX_STACK=2 NSAMPLES=1024
demo-results: $(OUT)/theory.txt $(OUT)/fig1a.png $(OUT)/fig1c.png $(OUT)/summary.txt
	@echo; cat $(OUT)/theory.txt; echo; cat $(OUT)/summary.txt
	@echo "results in $(OUT): fig1a.png (accuracy per level vs P), fig1c.png (correlations vs distance), summary.txt, tables/, runs/"
$(OUT)/theory.txt: | $(OUT)/data
	$(CGTOOLS) theory $(G) > $@.tmp && mv $@.tmp $@
demo:
	$(MAKE) --no-print-directory demo-results OUT=$(DEMO_OUT) $(DEMO_VARS)

clean:
	rm -rf $(OUT)
