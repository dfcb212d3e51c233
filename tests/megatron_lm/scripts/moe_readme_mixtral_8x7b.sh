#!/bin/bash
# Shrunk copy of the Mixtral 8x7B training example ("## Examples", the bash block) of Megatron-LM's
# megatron/core/transformer/moe/README.md at tag core_v0.16.1
# (https://github.com/NVIDIA/Megatron-LM/blob/core_v0.16.1/megatron/core/transformer/moe/README.md),
# run by tests/test_megatron_lm_scripts.py: two CPU iterations on 2 processes, pipeline parallel with virtual
# stages (PP 2 x VPP 2). Its pipeline takes both processes, so its experts are not spread: EP 2 would need 4.
# Changed, and nothing else (every other line and flag is the original's):
#   GPUS_PER_NODE 8 -> 2; NNODES default 4 -> 1; --seq-length 4096 -> 64;
#   --max-position-embeddings 32768 -> 256; --num-layers 32 -> 4; --hidden-size 4096 -> 128;
#   --ffn-hidden-size 14336 -> 448; --num-attention-heads 32 -> 8; --num-query-groups 8 -> 2;
#   --expert-model-parallel-size 8 -> 1; --global-batch-size 128 -> 4; --train-iters 500000 -> 2;
#   --lr-decay-iters 320000 -> 2; --lr-warmup-iters 500 -> 1; --pipeline-model-parallel-size 4 -> 2;
#   --num-layers-per-virtual-pipeline-stage 8 -> 1; --eval-iters 10 -> 1;
#   pretrain_gpt.py -> pretrain_gpt_moe.py.

# Runs Mixtral 8x7B model on 32 H100/A100 GPUs

export CUDA_DEVICE_MAX_CONNECTIONS=1

GPUS_PER_NODE=2
MASTER_ADDR=${MASTER_ADDR:-"localhost"}
MASTER_PORT=${MASTER_PORT:-"6000"}
NNODES=${NNODES:-"1"}
NODE_RANK=${RANK:-"0"}
WORLD_SIZE=$(($GPUS_PER_NODE*$NNODES))

CHECKPOINT_PATH=$1
TOKENIZER_MODEL=$2
DATA_PATH=$3

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NNODES
    --node_rank $NODE_RANK
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

MODEL_ARGS=(
    --disable-bias-linear
    --seq-length 64
    --max-position-embeddings 256
    --num-layers 4
    --hidden-size 128
    --ffn-hidden-size 448
    --num-attention-heads 8
    --init-method-std 0.01
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --normalization RMSNorm
    --position-embedding-type rope
    --swiglu
    --untie-embeddings-and-output-weights
    --group-query-attention
    --num-query-groups 2
    --no-masked-softmax-fusion
    --no-position-embedding
)

MOE_ARGS=(
    --num-experts 8
    --expert-model-parallel-size 1
    --moe-router-load-balancing-type aux_loss
    --moe-router-topk 2
    --moe-aux-loss-coeff 1e-2
    --moe-grouped-gemm
    --moe-permute-fusion
    --moe-token-dispatcher-type alltoall
)

DATA_ARGS=(
    --tokenizer-type Llama2Tokenizer
    --tokenizer-model ${TOKENIZER_MODEL}
    --data-path $DATA_PATH
    --split 99990,8,2
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 4
    --lr 1e-4
    --train-iters 2
    --lr-decay-iters 2
    --lr-decay-style cosine
    --min-lr 1.0e-5
    --weight-decay 0.1
    --lr-warmup-iters 1
    --clip-grad 1.0
    --bf16
    --overlap-grad-reduce
    --overlap-param-gather
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 2
    --num-layers-per-virtual-pipeline-stage 1
    --sequence-parallel
    --use-distributed-optimizer
)

LOGGING_ARGS=(
    --log-interval 1
    --save-interval 10000
    --eval-interval 1000
    --eval-iters 1
    --save $CHECKPOINT_PATH
    --load $CHECKPOINT_PATH
    --tensorboard-dir "${CHECKPOINT_PATH}/tensorboard"
    --ckpt-format torch_dist
    --auto-detect-ckpt-format
)

torchrun ${DISTRIBUTED_ARGS[@]} pretrain_gpt_moe.py \
    ${MODEL_ARGS[@]} \
    ${MOE_ARGS[@]} \
    ${DATA_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]} \
    ${LOGGING_ARGS[@]}
