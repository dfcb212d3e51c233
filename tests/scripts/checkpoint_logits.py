"""python tests/scripts/checkpoint_logits.py OUT.pt CKPT_DIR: our model, as the export rebuilds it from a
checkpoint of any layout (one process, evaluation mode), on the fixed tokens of train_and_save_logits.py;
saves its logits and its greedy continuation of the fixed prompt."""

import sys

import torch

from megatron_moe.conversion.hf_export import load_one_process_job
from train_and_save_logits import TOKENS, greedy

if __name__ == "__main__":
    out, load = sys.argv[1], sys.argv[2]
    job, _ = load_one_process_job(load)
    model, vocab = job.model.module.eval(), job.tokenizer.vocab_size
    with torch.no_grad():
        logits = model(TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)[..., :vocab]
    torch.save({"logits": logits, "tokens": TOKENS, "greedy": greedy(model, vocab)}, out)
