"""torchrun tests/scripts/train_and_save_logits.py OUT.pt <pretrain flags incl. --save>: trains and saves.

The last rank writes the per-iteration lm losses; a one-process run also writes the trained model's
logits on fixed tokens and its greedy continuation of a fixed prompt (the references for export tests).
"""

import sys

import torch
import torch.distributed as dist

from megatron_moe.training import setup, train

TOKENS = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
PROMPT, NEW_TOKENS = [464, 3290, 318, 257], 8


@torch.no_grad()
def greedy(model, vocab_size: int):
    ids = torch.tensor([[token % vocab_size for token in PROMPT]])
    for _ in range(NEW_TOKENS):
        logits = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)[0, -1, :vocab_size]
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0].tolist()


if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    job = setup(argv)
    result = {"losses": train(job)}
    if dist.get_world_size() == 1:
        model, vocab = job.model[0].module.eval(), job.tokenizer.vocab_size
        with torch.no_grad():
            result["logits"] = model(TOKENS, torch.arange(TOKENS.shape[1]).expand_as(TOKENS), None)[..., :vocab]
        result.update(tokens=TOKENS, greedy=greedy(model, vocab))
    if result["losses"]:
        torch.save(result, out)
