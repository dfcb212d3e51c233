"""python tests/scripts/checkpoint_logits.py OUT.pt TRAINING FLAGS (incl. --load CKPT --finetune): our model
loaded from a checkpoint of any layout (one process, evaluation mode), on the fixed tokens of
train_and_save_logits.py (modulo the vocabulary); saves its logits and its greedy continuation of the fixed prompt."""

import contextlib
import io
import sys

import torch

from megatron_moe.checkpointing import load_checkpoint
from megatron_moe.training import setup
from train_and_save_logits import TOKENS, greedy

if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    with contextlib.redirect_stdout(io.StringIO()):
        job = setup(argv)
    load_checkpoint(job)
    model, vocab = job.model[0].module.eval(), job.tokenizer.vocab_size
    tokens = TOKENS % vocab  # the same tokens whenever the vocabulary holds them
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :vocab]
    torch.save({"logits": logits, "tokens": tokens, "greedy": greedy(model, vocab)}, out)
