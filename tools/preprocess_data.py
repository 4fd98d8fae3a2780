"""Tokenize JSONL preference/scored files into a memory-mapped value dataset.

Options: megatron_dvpo/data/preprocess.py; file format: megatron_dvpo/data/dataset.py.
"""

from megatron_dvpo.data.preprocess import main

if __name__ == "__main__":
    main()
