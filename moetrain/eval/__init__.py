"""Evaluation metrics.

    bleu.py           sacreBLEU with its signature; tokenised, compound-split BLEU (WMT'14 tables)
    glue_metrics.py   GLUE task metrics
"""
