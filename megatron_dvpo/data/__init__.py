"""Data layer: tokenizers, JSONL preference/score parsing, the synthetic task, the memory-mapped
value dataset and its resumable sampler (docs/algorithm.md §1, "Training data")."""
