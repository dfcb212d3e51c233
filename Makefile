# `make demo`: tiny GPT-MoE pretraining on CPU (2 processes, expert parallel). `make test`: the test suite.
VENV := .venv
PY := $(VENV)/bin/python
TORCHRUN := $(VENV)/bin/torchrun
PYTEST_ARGS ?= -q

.PHONY: setup demo test

setup: $(VENV)/.installed

# torch first, pinned: the CPU wheel; an unpinned torch request would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(TORCHRUN) --nproc_per_node 2 pretrain_gpt_moe.py \
	  --num-layers 4 --hidden-size 128 --ffn-hidden-size 256 --num-attention-heads 4 \
	  --seq-length 128 --max-position-embeddings 128 --normalization RMSNorm --swiglu \
	  --position-embedding-type rope --num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.01 \
	  --expert-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 16 \
	  --train-iters 100 --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --lr-decay-style cosine \
	  --mock-data --tokenizer-type NullTokenizer --vocab-size 1024 \
	  --log-interval 10 --eval-interval 50 --eval-iters 2 --seed 1234

# pytest's exit status 5 means "no tests collected": not a failure of the code.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests || { rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && exit 0; exit $$rc; }
