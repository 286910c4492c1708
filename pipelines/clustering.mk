# Rules shared by the clustering sample-complexity pipelines (pipelines/fig2, pipelines/fig7).
#
# The including Makefile sets FIG (a name), L, S, V, MS, SEEDS, CONTEXTS, ALGOS, the sweep ranges
# (HIER_LO_LEVEL, HIER_LO, ORACLE_LO, HI, STEP), TINY_VARS, and includes this file. The chain:
#
#   data/m<M>_seed<S>_n<N>.parquet     cgtools rhm-gen: seed S draws the grammar and N sentences
#   runs/m<M>_seed<S>_<ctx>_<algo>_P<P>.parquet
#                                      cgtools cluster on the first P sentences; one results table
#                                      (kind 'cluster') per run, tagged P, m, L, seed (context
#                                      and oracle are columns of the table)
#   pstar_level<l>.parquet             cgtools sample-complexity: P* per (m, context[, oracle]) and
#                                      the fit of log P* against log m
#   <FIG>_ari.png, <FIG>_pstar*.png    cgtools plot cluster / sample-complexity
#   summary.json, summary.txt          exponents vs theory, the P* table (clustering.py summary)
#
# Every file is a make target written atomically (cgtools writes to a temporary name and
# renames), so an interrupted `make` leaves no partial target and the next `make` resumes; a
# finished run is never redone unless its data changes.
SHELL := /bin/bash
COMMON := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
VENV := $(abspath $(COMMON)/../.venv/bin)
CGTOOLS ?= $(if $(wildcard $(VENV)/cgtools),$(VENV)/cgtools,cgtools)
PYTHON ?= $(if $(wildcard $(VENV)/python),$(VENV)/python,python3)
HELPER := $(COMMON)clustering.py
# One thread per job (k-means, BLAS): the matrices are small and make -j uses the cores better.
export OMP_NUM_THREADS := 1
export OPENBLAS_NUM_THREADS := 1
export MKL_NUM_THREADS := 1

OUT ?= out
THRESHOLD ?= 0.5
N_INIT ?= 10
# P_LIST (optional): the same P values for every m instead of the theory-derived grid.
P_LIST ?=
# Extra 'sample-complexity' tables drawn in the P* figure (e.g. the diffusion models' P*).
DIFFUSION ?=

comma := ,
TOP := $(shell echo $$(( $(L) - 1 )))
# The grid: one word m<M>:<algo>:P1,P2,... per (m, algorithm) and m<M>:nmax:N.
GRID := $(if $(P_LIST),,$(shell $(PYTHON) $(HELPER) grid -L $(L) -s $(S) -v $(V) $(if $(N_CLASSES),--n-classes $(N_CLASSES)) \
  --ms $(MS) $(foreach a,$(ALGOS),--algo $a:$(if $(filter oracle,$a),$(L):$(ORACLE_LO),$(HIER_LO_LEVEL):$(HIER_LO))) \
  --hi $(HI) --step $(STEP) \
  || echo GRID-FAILED))
ifneq ($(filter GRID-FAILED,$(GRID)),)
$(error the P grid could not be computed (see the message above))
endif
grid_of = $(subst $(comma), ,$(patsubst m$1:$2:%,%,$(filter m$1:$2:%,$(GRID))))
sizes = $(if $(P_LIST),$(P_LIST),$(call grid_of,$1,$2))
nmax = $(if $(P_LIST),$(lastword $(P_LIST)),$(call grid_of,$1,nmax))

run_file = $(OUT)/runs/m$1_seed$2_$3_$4_P$5.parquet
RUNS := $(foreach m,$(MS),$(foreach s,$(SEEDS),$(foreach c,$(CONTEXTS),$(foreach a,$(ALGOS),\
  $(foreach p,$(call sizes,$m,$a),$(call run_file,$m,$s,$c,$a,$p))))))
HIER_RUNS := $(foreach r,$(RUNS),$(if $(findstring _hier_P,$r),$r))
# The sentences of (m, seed): the first P rows of one file serve every run (nested subsets of
# one uniform draw); its name holds the number of rows, so a longer sweep draws a new file.
data_file = $(OUT)/data/m$1_seed$2_n$(call nmax,$1).parquet
DATA := $(foreach m,$(MS),$(foreach s,$(SEEDS),$(call data_file,$m,$s)))
# Fields of a run's stem m<M>_seed<S>_<ctx>_<algo>_P<P>.
field = $(word $1,$(subst _, ,$2))
# The data file of a run (a function: a literal % in a pattern rule's prerequisites is the stem).
run_data = $(call data_file,$(patsubst m%,%,$(call field,1,$1)),$(patsubst seed%,%,$(call field,2,$1)))
level_flags = $(if $(filter oracle,$1),--level $(TOP) --oracle,--level all)

# The figure's level (TOP = L - 1, whose ARI needs P_L) and, for L > 2, level 1 too.
PSTAR := $(OUT)/pstar_level$(TOP).parquet $(if $(filter-out 1,$(TOP)),$(OUT)/pstar_level1.parquet)
FIGURES := $(OUT)/$(FIG)_ari.png $(OUT)/$(FIG)_pstar.png $(if $(filter-out 1,$(TOP)),$(OUT)/$(FIG)_pstar_level1.png)
GRAMMAR_TEXT := L = $(L), s = $(S), v = $(V)$(if $(N_CLASSES),$(comma) n_classes = $(N_CLASSES))

.PHONY: all runs tiny clean grid
# The sentences are kept (not intermediate) but a missing one alone redoes nothing; a missing run
# table is redone with everything downstream of it.
.SECONDARY: $(DATA)
.DELETE_ON_ERROR:

all: $(FIGURES) $(OUT)/summary.json

runs: $(RUNS)

grid:
	@echo "$(GRID)" | tr ' ' '\n'
	@echo "$(words $(RUNS)) runs, $(words $(DATA)) data files in $(OUT)"

$(OUT)/data $(OUT)/runs:
	mkdir -p $@

$(OUT)/data/m%.parquet: | $(OUT)/data
	$(CGTOOLS) rhm-gen -L $(L) -s $(S) -v $(V) -m $(call field,1,$*) $(if $(N_CLASSES),--n-classes $(N_CLASSES)) \
	  -n $(patsubst n%,%,$(call field,3,$*)) --seed $(patsubst seed%,%,$(call field,2,$*)) -o $@ --force

.SECONDEXPANSION:
$(OUT)/runs/%.parquet: $$(call run_data,$$*) | $(OUT)/runs
	$(CGTOOLS) cluster $< $(call level_flags,$(call field,4,$*)) --context $(call field,3,$*) \
	  --limit $(patsubst P%,%,$(call field,5,$*)) --seed $(patsubst seed%,%,$(call field,2,$*)) --n-init $(N_INIT) \
	  --tag P=$(patsubst P%,%,$(call field,5,$*)) --tag m=$(patsubst m%,%,$(call field,1,$*)) --tag L=$(L) \
	  --tag seed=$(patsubst seed%,%,$(call field,2,$*)) -o $@ --force

$(OUT)/pstar_level$(TOP).parquet: $(RUNS)
	$(CGTOOLS) sample-complexity $^ --level $(TOP) --by $(BY) --threshold $(THRESHOLD) -o $@ --force

ifneq ($(TOP),1)
$(OUT)/pstar_level1.parquet: $(HIER_RUNS)
	$(CGTOOLS) sample-complexity $^ --level 1 --by $(BY_LEVEL1) --threshold $(THRESHOLD) -o $@ --force
endif

$(OUT)/$(FIG)_ari.png: $(RUNS)
	$(CGTOOLS) plot cluster $^ --group m -o $@ --force \
	  --title "$(FIG_NAME): clustering ARI per level vs P ($(GRAMMAR_TEXT); mean of $(words $(SEEDS)) seeds)"

$(OUT)/$(FIG)_pstar.png: $(OUT)/pstar_level$(TOP).parquet $(DIFFUSION)
	$(CGTOOLS) plot sample-complexity $^ -o $@ --force \
	  --title "$(FIG_NAME): P* (ARI of level $(TOP) = $(THRESHOLD)) vs m ($(GRAMMAR_TEXT))"

$(OUT)/$(FIG)_pstar_level1.png: $(OUT)/pstar_level1.parquet
	$(CGTOOLS) plot sample-complexity $^ -o $@ --force \
	  --title "$(FIG_NAME): P* of level 1 (ARI = $(THRESHOLD)) vs m ($(GRAMMAR_TEXT))"

$(OUT)/summary.json: $(PSTAR) $(DIFFUSION) $(HELPER)
	$(PYTHON) $(HELPER) summary $(PSTAR) $(DIFFUSION) --figure $(FIG) --threshold $(THRESHOLD) --seeds $(SEEDS) \
	  --json $@.tmp --text $(OUT)/summary.txt && mv $@.tmp $@

# The whole chain in seconds: tiny grammars, two P values, one seed, into OUT when given on the
# command line (make tiny OUT=/tmp/x), else into out/tiny.
TINY_OUT := $(if $(filter command line,$(origin OUT)),$(OUT),out/tiny)
tiny:
	$(MAKE) --no-print-directory all OUT=$(TINY_OUT) $(TINY_VARS)

clean:
	rm -rf $(OUT)
