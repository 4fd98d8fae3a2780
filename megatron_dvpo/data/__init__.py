"""Data layer: tokenizers, JSONL preference/score parsing, the synthetic task, the memory-mapped
value dataset and its resumable sampler (SPEC.md section 2, "Training data")."""
