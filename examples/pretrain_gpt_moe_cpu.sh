#!/bin/bash
# One node, 4 gloo processes on CPU: TP=2 x EP=2 GPT-MoE on the KJV demo data (examples/prepare_kjv_data.sh),
# or on synthetic tokens when the data is not there. ROUTER=topk|base|sam picks the routing scheme, ITERS the
# training iterations, CHECKPOINTS the --save/--load directory (a relaunch resumes from it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUTER=${ROUTER:-topk}
ITERS=${ITERS:-200}
CHECKPOINTS=${CHECKPOINTS:-checkpoints/gpt_moe_cpu_${ROUTER}}

if [ -f data/kjv_text_document.bin ]; then
    DATA_ARGS=(--data-path data/kjv_text_document --split 98,2,0 --data-cache-path data/cache
               --tokenizer-type GPT2BPETokenizer --vocab-file data/gpt2-vocab.json --merge-file data/gpt2-merges.txt)
else
    echo "data/kjv_text_document not found (run examples/prepare_kjv_data.sh): training on --mock-data" >&2
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 50257)
fi

case "$ROUTER" in
    topk) ROUTER_ARGS=(--moe-router-type topk --moe-router-topk 2 --moe-aux-loss-coeff 0.01
                       --moe-token-dispatcher-type alltoall) ;;
    base) ROUTER_ARGS=(--moe-router-type base --moe-router-topk 1) ;;
    sam)  ROUTER_ARGS=(--moe-router-type sam --sam-num-groups 2 --moe-router-topk 2) ;;
    *) echo "ROUTER must be topk, base or sam" >&2; exit 2 ;;
esac
PARALLEL_ARGS=(--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 2)

OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 pretrain_gpt_moe.py \
    --device cpu \
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 512 --num-attention-heads 4 --seq-length 128 \
    --max-position-embeddings 128 --normalization RMSNorm --swiglu --position-embedding-type rope \
    --untie-embeddings-and-output-weights --disable-bias-linear \
    --num-experts 4 --moe-ffn-hidden-size 256 --moe-layer-freq 1 "${ROUTER_ARGS[@]}" \
    "${PARALLEL_ARGS[@]}" --use-distributed-optimizer \
    --micro-batch-size 4 --global-batch-size 16 --train-iters "$ITERS" \
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters $((ITERS / 10)) --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
    --adam-beta1 0.9 --adam-beta2 0.95 --hidden-dropout 0.0 --attention-dropout 0.0 --seed 1234 \
    "${DATA_ARGS[@]}" \
    --log-interval 10 --eval-interval 100 --eval-iters 5 \
    --save "$CHECKPOINTS" --load "$CHECKPOINTS" --save-interval 100 \
    --exit-signal-handler
