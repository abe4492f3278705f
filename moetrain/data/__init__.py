"""Data: sources, cleaning, tokenizers, batching.

Translation (parallel text), imported on use so that ``import moetrain.data`` stays cheap:

    sources.py     read the Hub's WMT'14 or local files (aligned .en/.de, TSV, JSONL); clean with counts
    tokenizer.py   shared source/target BPE/Unigram vocabulary -> PreTrainedTokenizerFast directory
    pipeline.py    config -> cached, tokenised splits (datasets.map) and padded batches
    batching.py    token-budget length-bucketed batches: deterministic, resumable, rank-sharded
    synthetic.py   the demo's generated language pair (deterministic from a seed)

Pretraining text and GLUE live in ``text.py`` and ``glue.py``.
"""
