"""Megatron-LM's command line beyond ours: the catalogue of what we refuse, and why.

Megatron-LM ``core_v0.16.1`` has 680 flags. Each is either declared by an area module of this package
(implemented, or accepted where it cannot act: ``FlagGroup.add(no_effect=...)``) or listed here with the
reason it is refused and what to do instead: :data:`REFUSED` (flag -> reason), built from :data:`TOPICS`,
whose flags share a reason, plus :data:`OWN`, flags with their own. :func:`add_refused_flags` puts every
refused flag the parser lacks into it, so that a launch script naming one stops with one line (naming the
flag, the reason and the way out) instead of argparse's "unrecognized arguments", before anything is built. :data:`REFUSED_CHOICES` does the same for
the values of a flag we implement in part (``--moe-token-dispatcher-type flex``, ``--ckpt-format torch``).
:data:`OURS` lists our flags that Megatron-LM lacks.

docs/megatron_lm_flags.md holds the whole table, generated from this catalogue and the parser by
``python tests/megatron_lm/flags_table.py``; tests/test_megatron_lm_flags.py checks both against Megatron-LM's
own parser (its table, tests/megatron_lm/flags_core_v0.16.1.json), and that the document is up to date.
"""

from __future__ import annotations

import argparse
from typing import Dict, Tuple

from megatron_moe.errors import ConfigError

# Our flags that Megatron-LM lacks.
OURS = frozenset("""
    --device --moe-router-type --log-expert-load --no-log-expert-load --skip-nan-iterations
    --max-consecutive-skipped-iterations --max-skipped-iterations --no-verify-checkpoint
    --base-shuffle --no-base-shuffle --sam-num-groups --sam-renormalize-gates --sam-group-balance-loss-coeff
    --sam-expert-balance-loss-coeff --sam-alignment-loss-coeff --sam-capacity-factor
""".split())

# (title, reason, flags): topics whose flags share a reason. A reason says what the flag is for, why it is
# refused and what to do instead; the title heads the topic in docs/megatron_lm_flags.md.
TOPICS: Tuple[Tuple[str, str, str], ...] = (
    ("Reinforcement learning",
     "Megatron-LM's reinforcement-learning loop (GRPO) is not part of this project, which pretrains", """
        --perform-rl-step --rl-prompts-per-eval --grpo-prompts-per-step --grpo-group-size --grpo-iterations
        --grpo-clamp-eps-lower --grpo-clamp-eps-upper --grpo-kl-beta --grpo-entropy-term-weight
        --grpo-filter-groups-with-same-reward --langrl-inference-server-type
        --langrl-inference-server-conversation-template --langrl-external-server --no-langrl-external-server
        --langrl-env-config --rl-default-temperature --rl-default-top-p --rl-default-top-k
        --rl-offload-optimizer-during-inference --rl-offload-kv-cache-during-training
        --no-rl-offload-kv-cache-during-training --rl-remove-kv-cache-during-training
        --no-rl-remove-kv-cache-during-training --rl-reset-cuda-graphs --no-rl-reset-cuda-graphs
        --rl-partial-rollouts --no-rl-partial-rollouts --rl-inference-logprobs-is-correction
        --no-rl-inference-logprobs-is-correction --rl-importance-sampling-truncation-coef
        --rl-use-sequence-packing --no-rl-use-sequence-packing --rl-sequence-packing-max-sequences-per-bin
        --rl-sequence-packing-algo --rl-training-cuda-graphs --no-rl-training-cuda-graphs
        --rl-inference-tensor-model-parallel-size --rl-inference-pipeline-model-parallel-size
        --rl-inference-expert-model-parallel-size --rl-inference-expert-tensor-model-parallel-size
        --rl-inference-model-unified-memory-level --rl-offload-inference-model-weights-when-idle
        --no-rl-offload-inference-model-weights-when-idle --refit-method --rl-verify-model-weights-swap
        --no-rl-verify-model-weights-swap --rl-parallel-generation-tasks --rl-skip-bos-token
        --no-rl-skip-bos-token --sft --sft-tokenizer-prompt-format"""),
    ("Inference and text generation",
     "inference and text generation are not part of this project, which trains; export the checkpoint to "
     "Hugging Face (tools/convert_checkpoint.py) and serve it there", """
        --inference-batch-times-seqlen-threshold --max-tokens-to-oom --output-bert-embeddings
        --bert-embedder-type --use-legacy-static-engine --inference-max-requests --inference-max-seq-length
        --inference-max-batch-size --inference-dynamic-batching --inference-dynamic-batching-buffer-size-gb
        --inference-dynamic-batching-paused-buffer-size-gb --inference-dynamic-batching-block-size
        --inference-dynamic-batching-max-requests --inference-dynamic-batching-max-tokens
        --inference-dynamic-batching-num-cuda-graphs --inference-dynamic-batching-track-paused-request-events
        --decode-only-cuda-graphs --inference-dynamic-batching-unified-memory-level --nccl-all-reduce-for-prefill
        --enable-chunked-prefill --disable-chunked-prefill --inference-dynamic-batching-cuda-graph-max-tokens
        --inference-dynamic-batching-cuda-graph-mixed-prefill-count --inference-logging-step-interval
        --inference-wandb-logging --no-inference-wandb-logging --inference-coordinator-port --flash-decode
        --inference-rng-tracker --inference-fuse-tp-communication --mlp-chunks-for-prefill --cache-mla-latents
        --moe-pad-experts-for-cuda-graph-inference --symmetric-ar-type"""),
    ("BERT, T5, retrieval and vision models",
     "for Megatron-LM's BERT, T5, retrieval (ICT/REALM) and vision models; this project trains GPT models only",
     """
        --encoder-num-layers --decoder-num-layers --encoder-seq-length --decoder-seq-length --bert-no-binary-head
        --apply-residual-connection-post-layernorm --relative-attention-num-buckets
        --relative-attention-max-distance --sample-rate --mask-prob --short-seq-prob --vocab-extra-ids
        --ict-head-size --biencoder-projection-dim --biencoder-shared-query-context-model --ict-load --bert-load
        --titles-data-path --query-in-block-prob --use-one-sent-docs --evidence-data-path
        --retriever-report-topk-accuracies --retriever-score-scaling --block-data-path --embedding-path
        --indexer-batch-size --indexer-log-interval --num-classes --img-h --img-w --num-channels --patch-dim
        --classes-fraction --data-per-class-fraction --no-data-sharding --head-lr-mult --vision-pretraining
        --vision-pretraining-type --vision-backbone-type --swin-backbone-type --mask-type --mask-factor
        --iter-per-epoch --dino-local-img-size --dino-local-crops-number --dino-head-hidden-size
        --dino-bottleneck-size --dino-freeze-last-layer --dino-norm-last-layer --dino-warmup-teacher-temp
        --dino-teacher-temp --dino-warmup-teacher-temp-epochs --mrope-section"""),
    ("Mamba and hybrid models",
     "Mamba and hybrid (Mamba/attention) models are not implemented; this project trains transformers", """
        --is-hybrid-model --mamba-state-dim --mamba-head-dim --mamba-num-groups --mamba-num-heads
        --disable-mamba-mem-eff-path --hybrid-attention-ratio --hybrid-mlp-ratio --hybrid-override-pattern"""),
    ("Attention variants",
     "this attention variant (DeepSeek sparse attention, gated delta net / linear attention, sliding windows, "
     "attention sinks, gated outputs) is not implemented; the model has standard softmax attention", """
        --experimental-attention-variant --dsa-indexer-n-heads --dsa-indexer-head-dim --dsa-indexer-topk
        --dsa-indexer-loss-coeff --dsa-indexer-use-sparse-loss --linear-conv-kernel-dim --linear-key-head-dim
        --linear-value-head-dim --linear-num-key-heads --linear-num-value-heads --linear-attention-freq
        --window-size --window-attn-skip-freq --softmax-type --attention-output-gate --qk-l2-norm --qk-clip
        --qk-clip-alpha --qk-clip-threshold --log-max-attention-logit"""),
    ("Multi-latent attention",
     "multi-latent attention (DeepSeek's MLA) is not implemented: its size flags have nothing to size; the "
     "model has standard (grouped-query) attention, sized by --num-attention-heads, --num-query-groups and "
     "--kv-channels", """
        --multi-latent-attention --q-lora-rank --kv-lora-rank --qk-head-dim --qk-pos-emb-head-dim --v-head-dim
        --rotary-scaling-factor --mscale --mscale-all-dim"""),
    ("Multi-token prediction",
     "multi-token prediction (MTP) is not implemented; the model predicts the next token only", """
        --mtp-num-layers --mtp-loss-scaling-factor --mtp-standalone"""),
    ("Heterogeneous layers",
     "per-layer architectures from a file (heterogeneous models) are not implemented; every layer has the "
     "flags' shape", """
        --heterogeneous-layers-config-path --heterogeneous-layers-config-encoded-json"""),
    ("Rotary-embedding variants",
     "this rotary-embedding variant is not implemented (RoPE here: --position-embedding-type rope with "
     "--rotary-base and --rotary-percent); a Hugging Face export could not express it either", """
        --rotary-interleaved --rotary-seq-len-interpolation-factor --use-rope-scaling --rope-scaling-factor
        --no-rope-freq"""),
    ("Activations",
     "this activation is not offered: the MLP uses GeLU, or SwiGLU with --swiglu", """
        --openai-gelu --squared-relu --quick-geglu --glu-linear-offset --activation-func-clamp-value
        --use-fused-weighted-squared-relu --use-te-activation-func --onnx-safe"""),
    ("Initialisation",
     "initialisation is ours: every weight is drawn from N(0, --init-method-std) by a generator seeded with "
     "--seed and its global name, the same in every parallel layout (megatron_moe/model.py); other schemes are "
     "not offered", """
        --no-initialization --init-method-xavier-uniform --embedding-init-method-std --data-parallel-random-init
        --init-model-with-meta-device"""),
    ("Optimizers other than Adam",
     "only Adam (megatron-core's AdamW, --weight-decay decoupled) is offered", """
        --sgd-momentum --muon-momentum --muon-no-split-qkv --muon-use-nesterov --muon-scale-mode
        --muon-fp32-matmul-prec --muon-num-ns-steps --muon-tp-mode --muon-extra-scale-factor
        --dump-param-to-param-group-map"""),
    ("Optimizer offloading to the CPU",
     "the optimizer runs on the device: CPU offloading of optimizer state is not offered; shard it over "
     "data-parallel ranks with --use-distributed-optimizer", """
        --optimizer-cpu-offload --optimizer-offload-fraction --use-torch-optimizer-for-cpu-offload
        --overlap-cpu-optimizer-d2h-h2d --no-pin-cpu-grads --no-pin-cpu-params"""),
    ("Precision-aware optimizer",
     "Transformer Engine's precision-aware optimizer (lower-precision main parameters, gradients and Adam "
     "moments) is not offered: they are fp32", """
        --use-precision-aware-optimizer --main-grads-dtype --main-params-dtype --exp-avg-dtype --exp-avg-sq-dtype
        --reuse-grad-buf-for-mxfp8-param-ag"""),
    ("FP4 and mixed per-layer precision",
     "FP4 and mixed per-layer FP8/BF16 precision are not offered; FP8 through Transformer Engine is "
     "(--fp8-format, --fp8-recipe)", """
        --fp4-format --fp4-recipe --fp4-param-gather --fp4-quantizer-factory --first-last-layers-bf16
        --num-layers-at-start-in-bf16 --num-layers-at-end-in-bf16 --fp8-quantizer-factory
        --te-precision-config-file --use-kitchen-attention --kitchen-attention-backend"""),
    ("FSDP",
     "Megatron-FSDP and torch FSDP2 are not offered: shard the optimizer state over data-parallel ranks with "
     "--use-distributed-optimizer", """
        --use-megatron-fsdp --data-parallel-sharding-strategy --outer-dp-sharding-strategy --fsdp-double-buffer
        --suggested-communication-unit-size --keep-fp8-transpose-cache --enable-full-sharding-in-hsdp
        --use-torch-fsdp2 --torch-fsdp2-no-reshard-after-forward --fsdp-manual-registration
        --no-strict-fsdp-dtensor-load --disable-strict-fsdp-dtensor-load --num-distributed-optimizer-instances"""),
    ("CUDA graphs",
     "CUDA graphs are not offered: the training step runs eagerly", """
        --enable-cuda-graph --external-cuda-graph --cuda-graph-warmup-steps --cuda-graph-scope --te-rng-tracker"""),
    ("Other parallel layouts",
     "this parallel layout is not offered (TP, PP with virtual stages and uneven first/last stages, EP, "
     "expert TP, DP, and context parallelism on the Transformer Engine path are); lay the model out with "
     "--tensor-model-parallel-size, --pipeline-model-parallel-size, --num-layers-per-virtual-pipeline-stage, "
     "--decoder-first/last-pipeline-num-layers, --expert-model-parallel-size and --expert-tensor-parallel-size",
     """
        --hierarchical-context-parallel-sizes --cp-comm-type --max-seqlen-per-dp-cp-rank
        --hybrid-context-parallel --microbatch-group-size-per-virtual-pipeline-stage
        --pipeline-model-parallel-layout --use-tp-pp-dp-mapping"""),
    ("Communication tuning",
     "this communication tuning is not offered: communication runs through torch.distributed's default "
     "process groups and megatron-core's defaults", """
        --pipeline-model-parallel-comm-backend
        --overlap-p2p-communication-warmup-flush --use-ring-exchange-p2p --no-scatter-gather-tensors-in-pipeline
        --no-align-grad-reduce --no-align-param-gather --ddp-num-buckets --ddp-pad-buckets-for-high-nccl-busbw
        --ddp-reduce-scatter-with-fp32-accumulation --ddp-average-in-collective
        --overlap-param-gather-with-optimizer-step --use-nccl-ub --disable-symmetric-registration --use-sharp
        --sharp-enabled-group --create-all-gather-group --no-gradient-reduce-div-fusion
        --nccl-communicator-config-path --high-priority-stream-groups --disable-gloo-process-groups
        --distributed-timeout-seconds-after-init --lazy-mpu-init --fake-process-group
        --overlap-moe-expert-parallel-comm --delay-wgrad-compute --ep-overlap-early-attn-memory-release
        --defer-embedding-wgrad-compute --wgrad-deferral-limit --moe-shared-expert-overlap"""),
    ("Activation offloading",
     "activation offloading to host memory is not offered; save memory with --recompute-granularity", """
        --cpu-offloading-num-layers --fine-grained-activation-offloading --offload-modules
        --min-offloaded-tensor-size --distribute-saved-activations --no-clone-scatter-output-in-embedding
        --disable-clone-scatter-output-in-embedding"""),
    ("DeepEP and HybridEP",
     "DeepEP and HybridEP (the flex dispatcher's GPU kernels) are not available: use --moe-token-dispatcher-type "
     "alltoall or allgather", """
        --moe-enable-deepep --moe-flex-dispatcher-backend --moe-deepep-num-sms --moe-hybridep-num-sms"""),
    ("Other MoE features",
     "this MoE feature is not implemented (routing replay, forced balancing, input jitter, latent experts, "
     "upcycling, the legacy grouped GEMM)", """
        --moe-enable-routing-replay --moe-router-force-load-balancing --moe-input-jitter-eps --moe-latent-size
        --moe-apply-probs-on-input --moe-use-upcycling --moe-upcycling-granularity --moe-use-legacy-grouped-gemm"""),
    ("Dataset options",
     "the dataset is Megatron-LM's GPT dataset from --data-path (or --mock-data) divided by --split; "
     "per-split paths, argument files, FIM samples, phases and dataset-builder options are not offered", """
        --train-data-path --valid-data-path --test-data-path --data-args-path --per-split-data-args-path
        --per-dataset-sequences-path --phase-transition-iterations --object-storage-cache-path
        --mid-level-dataset-surplus --dataloader-fast-cache-load --dataloader-defer-npy-index-mmap
        --num-dataset-builder-threads --reset-attention-mask --fim-data --fim-rate --fim-spm-rate
        --fim-split-sample --fim-fragment-rate --fim-no-prefix --fim-prefix-token --fim-middle-token
        --fim-suffix-token --fim-pad-token --fim-eod-token --disable-msc"""),
    ("Tokenizer options",
     "the tokenizer is built from --tokenizer-type and its local files only; this option of Megatron-LM's "
     "tokenizers is not offered", """
        --padded-vocab-size --tokenizer-metadata --tokenizer-special-tokens --legacy-tokenizer
        --tokenizer-sentencepiece-legacy"""),
    ("Checkpointing options",
     "checkpoints are megatron-core distributed checkpoints (--ckpt-format torch_dist), saved synchronously "
     "every --save-interval iterations and at the end; this checkpointing option is not offered", """
        --save-wgrads-interval --save-dgrads-interval --save-retain-interval --load-main-params-from-ckpt
        --non-persistent-save-interval --non-persistent-ckpt-type --non-persistent-global-ckpt-dir
        --non-persistent-local-ckpt-dir --non-persistent-local-ckpt-algo --pretrained-checkpoint --ckpt-step
        --ckpt-convert-format --ckpt-convert-save --ckpt-convert-update-legacy-dist-opt-format --async-save
        --use-persistent-ckpt-worker --ckpt-fully-parallel-load --ckpt-assume-constant-structure
        --ckpt-fully-parallel-save --dist-ckpt-save-pre-mcore-014 --distrib-optim-fully-reshardable-mem-efficient
        --replication --replication-jump --replication-factor --no-save-optim --no-save-rng"""),
    ("Arguments from a checkpoint",
     "a checkpoint's run_config.json is compared with the flags instead (architecture differences are refused "
     "in one line): give the model and parallel flags explicitly", """
        --use-checkpoint-args --use-mp-args-from-checkpoint-args --no-use-tokenizer-model-from-checkpoint-args
        --disable-use-tokenizer-model-from-checkpoint-args"""),
    ("Cluster tooling",
     "NVIDIA's cluster tooling (autoresume, fault tolerance, in-process restart, straggler detection, "
     "one-logger, workload inspector, energy monitor) is not available; a restarted job resumes exactly from "
     "its last checkpoint (--save/--load, docs/reliability.md)", """
        --adlr-autoresume --adlr-autoresume-interval --enable-ft-package --calc-ft-timeouts --ft-num-warmup-iters
        --inprocess-restart --inprocess-max-iterations --inprocess-monitor-thread-interval
        --inprocess-monitor-process-interval --inprocess-progress-watchdog-interval --inprocess-heartbeat-interval
        --inprocess-soft-timeout --inprocess-hard-timeout --inprocess-heartbeat-timeout --inprocess-barrier-timeout
        --inprocess-completion-timeout --inprocess-last-call-wait --inprocess-termination-grace-time
        --inprocess-granularity --inprocess-active-world-size --inprocess-empty-cuda-cache --log-straggler
        --straggler-ctrlr-port --straggler-minmax-count --disable-straggler-on-startup
        --run-workload-inspector-server --one-logger-project --one-logger-run-name --one-logger-async
        --app-tag-run-name --app-tag-run-version --log-energy"""),
    ("Re-run engine",
     "Megatron-LM's re-run engine (result validation, error injection, loss-spike checks) is not available; a "
     "NaN/Inf loss or gradient stops the run (or, with --skip-nan-iterations, skips the update)", """
        --rerun-mode --error-injection-rate --error-injection-type --check-for-spiky-loss --check-for-large-grads
        --result-rejected-tracker-filename --check-weight-hash-across-dp-replicas-interval"""),
    ("Training-loop options",
     "this training-loop option is not offered", """
        --skip-train --test-mode --full-validation --multiple-validation-sets --iterations-to-skip
        --exit-signal --exit-signal-handler-for-dataloader --decrease-batch-size-if-needed --train-sync-interval --config-logger-dir
        --batch-invariant-mode --yaml-cfg --enable-experimental --spec --use-legacy-models --log-progress"""),
    ("Old flags",
     "an old Megatron-LM flag, replaced (--batch-size: --micro-batch-size; --warmup: --lr-warmup-iters; "
     "--model-parallel-size: --tensor-model-parallel-size; --checkpoint-activations: --recompute-granularity "
     "full; --use-rotary-position-embeddings: --position-embedding-type rope; --use-dist-ckpt and "
     "--dist-ckpt-format: --ckpt-format); give its replacement", """
        --batch-size --warmup --model-parallel-size --checkpoint-activations --use-rotary-position-embeddings
        --use-dist-ckpt --dist-ckpt-format"""),
)

# Flags with a reason of their own (these override a topic's).
OWN: Dict[str, str] = {
    "--moe-flex-dispatcher-backend": "the flex dispatcher's backend (DeepEP or HybridEP, GPU kernels) is not "
                                     "available: use --moe-token-dispatcher-type alltoall or allgather",
    "--apply-wd-to-qk-layernorm": "decay for the --qk-layernorm weights is not offered: norm weights and biases "
                                  "have no weight decay (megatron-core's default groups)",
    "--no-weight-decay-cond-type": "decay for the --qk-layernorm weights is not offered: norm weights and biases "
                                   "have no weight decay (megatron-core's default groups)",
    "--moe-router-padding-for-quantization": "FP4 is not offered, so this is --moe-router-padding-for-fp8, which "
                                             "megatron-core 0.16.1 keeps as its alias: use that spelling",
    "--fp32-residual-connection": "the residual stream has the parameters' dtype (fp32, or bf16/fp16 with "
                                  "--bf16/--fp16); an fp32 residual is not offered",
}

# Megatron-LM's choices of flags we implement in part: flag -> {choice: reason}.
REFUSED_CHOICES: Dict[str, Dict[object, str]] = {
    "--moe-token-dispatcher-type": {
        "flex": "the flex dispatcher needs DeepEP or HybridEP (GPU kernels), which are not available: use "
                "--moe-token-dispatcher-type alltoall (or allgather)"},
    "--ckpt-format": {
        fmt: "checkpoints are megatron-core distributed checkpoints only: use --ckpt-format torch_dist (the "
             "default); tools/convert_checkpoint.py converts to and from Hugging Face"
        for fmt in ("torch", "torch_dcp", "fsdp_dtensor")},
    "--tokenizer-type": {
        **{name: "BERT's WordPiece tokenizers are for BERT models; this project trains GPT models"
           for name in ("BertWordPieceLowerCase", "BertWordPieceCase")},
        "TikTokenizer": "the tiktoken tokenizer is not offered; use HuggingFaceTokenizer with a local directory "
                        "holding tokenizer.json",
        **{name: "multimodal and SFT tokenizers are not part of this project, which pretrains text models"
           for name in ("MultimodalTokenizer", "NullMultimodalTokenizer", "SFTTokenizer")}},
    "--position-embedding-type": {
        "mrope": "multimodal RoPE is for vision-language models, not implemented; use rope",
        "relative": "T5's relative position buckets are not implemented; use rope or learned_absolute",
        "none": "a model without position embeddings (NoPE) is not implemented; use rope or learned_absolute"},
    "--transformer-impl": {
        "inference_optimized": "inference is not part of this project; use transformer_engine or local"},
    "--moe-router-load-balancing-type": {
        "global_aux_loss": "the global-batch auxiliary loss is not implemented; use aux_loss or seq_aux_loss"},
    "--optimizer": {
        name: "only Adam (megatron-core's AdamW) is offered; use --optimizer adam or leave it out"
        for name in ("sgd", "muon", "dist_muon")},
    "--dataloader-type": {
        "cyclic": "the training data is read once in order (--dataloader-type single, Megatron-LM's default for "
                  "pretraining)",
        "external": "the data loader is this project's own; use --dataloader-type single"},
    "--cuda-graph-impl": {
        name: "CUDA graphs are not offered: the training step runs eagerly" for name in ("local", "transformer_engine")},
    "--rope-type": {
        "yarn": "YaRN is Megatron-LM's for multi-latent attention, which is not implemented; standard attention "
                "takes rope"},
    "--fp8-recipe": {
        "mxfp8": "MXFP8 needs Blackwell GPUs and is not wired here; use delayed or tensorwise",
        "custom": "custom FP8 quantizer factories are not offered; use delayed or tensorwise"},
}


def _refused() -> Dict[str, str]:
    refused: Dict[str, str] = {}
    for _, reason, flags in TOPICS:
        for flag in flags.split():
            if flag in refused:
                raise ValueError(f"{flag} is listed twice in the catalogue")  # a mistake of ours: at import
            refused[flag] = reason
    return {**refused, **OWN}


# Every Megatron-LM flag we refuse -> why, and what to do instead.
REFUSED: Dict[str, str] = _refused()


def refusal(flag: str) -> str:
    return f"{flag} (Megatron-LM's) is not supported here: {REFUSED[flag]}"


class _Refuse(argparse.Action):
    """A refused Megatron-LM flag: given, it stops the parse with one line (whatever values follow it)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, argparse.SUPPRESS, nargs="*", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigError(refusal(option_string))


def add_refused_flags(parser: argparse.ArgumentParser) -> None:
    """Every refused flag the parser does not declare: given, one line naming it and the reason."""
    declared = set(parser._option_string_actions)
    group = parser.add_argument_group("Megatron-LM flags refused here (see docs/megatron_lm_flags.md)")
    for flag in REFUSED:
        if flag not in declared:
            group.add_argument(flag, action=_Refuse)


def is_refused(action: argparse.Action) -> bool:
    return isinstance(action, _Refuse)
