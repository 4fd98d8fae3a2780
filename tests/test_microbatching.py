"""Token-budget microbatches: rows sorted by length, grouped under the budget, cut to their
longest row; pairs kept together. (Same gradients as fixed microbatches at DP=2 and PP=2:
tests/test_rl_equivalence.py, the ``tok`` layouts.)"""

import pytest
import torch

from megatron_dvpo.config import ConfigError, load_config, validate
from megatron_dvpo.models.forward import split_microbatches, token_budget_microbatches


def test_rows_sorted_into_microbatches_under_the_budget_and_cut_to_their_longest_row():
    lengths = torch.tensor([6, 11, 8, 9, 11, 7, 10, 11])
    tokens = torch.arange(8)[:, None] * 100 + torch.arange(11)[None, :]
    per_token = torch.arange(8)[:, None] * 100 + torch.arange(5)[None, :]  # the last 5 columns
    mbs = token_budget_microbatches(22, lengths, tokens=tokens, per_token=per_token,
                                    row_lengths=lengths)
    assert [mb["row_lengths"].tolist() for mb in mbs] == [[11, 11], [11, 10], [9, 8], [7, 6]]
    for mb in mbs:
        width = int(mb["row_lengths"].max())
        assert mb["tokens"].shape[1] == width and mb["tokens"].numel() <= 22
        rows = mb["tokens"][:, 0] // 100
        assert torch.equal(mb["tokens"], tokens[rows, :width])
        # per-token tensors lose the same trailing columns as the tokens
        assert torch.equal(mb["per_token"], per_token[rows, :5 - (11 - width)])
    assert sorted(torch.cat([mb["tokens"][:, 0] // 100 for mb in mbs]).tolist()) == list(range(8))


def test_pairs_stay_together_and_a_long_unit_goes_alone():
    lengths = torch.tensor([3, 12, 4, 4, 2, 1])
    mbs = token_budget_microbatches(16, lengths, group=2, tokens=torch.zeros(6, 12),
                                    rows=torch.arange(6))
    assert [mb["rows"].tolist() for mb in mbs] == [[0, 1], [2, 3, 4, 5]]
    assert [mb["tokens"].shape[1] for mb in mbs] == [12, 4]
    fixed = split_microbatches(2, 0, lengths, tokens=torch.zeros(6, 12))
    assert [mb["tokens"].shape for mb in fixed] == [(2, 12)] * 3


def test_a_budget_below_the_sequence_length_is_refused():
    cfg = load_config(None, ["data.seq_length=64", "data.micro_batch_tokens=32"])
    with pytest.raises(ConfigError, match="data.micro_batch_tokens=32 is below"):
        validate(cfg, 1)
