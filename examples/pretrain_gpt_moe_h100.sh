#!/bin/bash
# Multi-node H100 pretraining: 8 GPUs per node, BF16 + Transformer Engine FP8 (hybrid), TP=2 with sequence
# parallelism, EP=4, distributed optimizer with gradient reduction and parameter all-gather overlapped with
# compute. Run on every node with NNODES, NODE_RANK, MASTER_ADDR set (examples/pretrain_gpt_moe_slurm.sbatch
# does it under SLURM). The nodes meet by torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT; a lost rank or
# node makes torchrun relaunch every node (up to MAX_RESTARTS times) and the job resumes from the latest
# checkpoint in $CHECKPOINTS. EXTRA_ARGS: more pretrain flags (e.g. "--exit-duration-in-mins 1430").
# ROUTER=topk|base|sam picks the routing scheme; topk adds megatron's grouped-GEMM experts, fused token
# permutation, fp32 routing and the z-loss.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUTER=${ROUTER:-topk}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_ID=${RDZV_ID:-gpt-moe}
DATA_PATH=${DATA_PATH:-data/my-corpus_text_document}
CHECKPOINTS=${CHECKPOINTS:-checkpoints/gpt_moe_${ROUTER}}

case "$ROUTER" in
    topk) ROUTER_ARGS=(--moe-router-type topk --moe-router-topk 2 --moe-aux-loss-coeff 0.01
                       --moe-router-load-balancing-type aux_loss --moe-token-dispatcher-type alltoall
                       --moe-router-dtype fp32 --moe-z-loss-coeff 1e-3 --moe-grouped-gemm --moe-permute-fusion) ;;
    base) ROUTER_ARGS=(--moe-router-type base --moe-router-topk 1) ;;
    sam)  ROUTER_ARGS=(--moe-router-type sam --sam-num-groups 8 --moe-router-topk 2) ;;
    *) echo "ROUTER must be topk, base or sam" >&2; exit 2 ;;
esac
PARALLEL_ARGS=(--tensor-model-parallel-size 2 --sequence-parallel --expert-model-parallel-size 4
               --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
               --distributed-timeout-minutes 60)

# a fresh rendezvous store per restart: torch's shared one breaks relaunched workers (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node 8 \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID" \
    --max_restarts "$MAX_RESTARTS" pretrain_gpt_moe.py \
    --num-layers 24 --hidden-size 2048 --ffn-hidden-size 5632 --num-attention-heads 16 --group-query-attention --num-query-groups 4 \
    --seq-length 4096 --max-position-embeddings 4096 --normalization RMSNorm --swiglu \
    --position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear \
    --num-experts 64 --moe-ffn-hidden-size 1408 --moe-layer-freq 1 "${ROUTER_ARGS[@]}" \
    "${PARALLEL_ARGS[@]}" --pipeline-model-parallel-size 1 \
    --bf16 --transformer-impl transformer_engine --fp8-format hybrid \
    --micro-batch-size 1 --global-batch-size 1024 --train-iters 500000 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
    --adam-beta1 0.9 --adam-beta2 0.95 --hidden-dropout 0.0 --attention-dropout 0.0 --seed 1234 \
    --data-path "$DATA_PATH" --split 99,1,0 --data-cache-path data/cache \
    --tokenizer-type GPT2BPETokenizer --vocab-file data/gpt2-vocab.json --merge-file data/gpt2-merges.txt \
    --log-interval 10 --log-throughput --eval-interval 1000 --eval-iters 10 --tensorboard-dir "$CHECKPOINTS"/tensorboard \
    --save "$CHECKPOINTS" --load "$CHECKPOINTS" --save-interval 1000 --exit-signal-handler ${EXTRA_ARGS:-}
