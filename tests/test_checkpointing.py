"""Which checkpoint a restart picks when a save was interrupted (no process groups needed)."""

from distributed.losses import mean_logprob_loss
from megatron_dvpo.checkpointing import (TRACKER, complete_checkpoints, find_latest_checkpoint,
                                         iteration_dir)


def fake_checkpoint(save_dir, step, complete=True):
    path = iteration_dir(save_dir, step)
    (path / "model").mkdir(parents=True)
    (path / "model" / "metadata.json").write_text("{}")
    if complete:
        (path / "train_state.json").write_text("{}")
    return path


def test_latest_follows_the_tracker(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    (tmp_path / TRACKER).write_text("10\n")
    assert find_latest_checkpoint(tmp_path) == iteration_dir(tmp_path, 10)


def test_interrupted_saves_are_never_picked(tmp_path):
    fake_checkpoint(tmp_path, 10)
    (tmp_path / TRACKER).write_text("10\n")
    # killed mid-save: a .partial directory, then a directory missing its last file
    partial = tmp_path / "iter_0000020.partial"
    (partial / "model").mkdir(parents=True)
    fake_checkpoint(tmp_path, 30, complete=False)
    assert find_latest_checkpoint(tmp_path) == iteration_dir(tmp_path, 10)
    assert complete_checkpoints(tmp_path) == [iteration_dir(tmp_path, 10)]


def test_stale_or_missing_tracker_falls_back_to_newest_complete(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    assert find_latest_checkpoint(tmp_path) == iteration_dir(tmp_path, 20)
    (tmp_path / TRACKER).write_text("40\n")  # names a checkpoint that never completed
    assert find_latest_checkpoint(tmp_path) == iteration_dir(tmp_path, 20)
    assert find_latest_checkpoint(tmp_path / "nothing") is None


def test_units_save_together_and_older_checkpoints_still_load(tmp_path, single_rank):
    """A policy and a critic in one iteration directory; a checkpoint written before there were
    several units (no ``units`` in its train state) restores its one model; a unit the
    checkpoint lacks is an error naming it."""
    import json

    import pytest
    import torch

    from megatron_dvpo.checkpointing import CheckpointManager
    from megatron_dvpo.config import ConfigError, load_config
    from megatron_dvpo.models import build_chunks
    from megatron_dvpo.training.trained_model import TrainedModel

    cfg = load_config(None, ["model.num_layers=1", "model.vocab_size=100",
                             f"checkpoint.save_dir={tmp_path}"])

    from megatron_dvpo.models import forward

    def unit(step=False):
        model = TrainedModel(build_chunks(cfg), cfg.optimizer, cfg.parallel, cfg.precision, 10)
        if step:  # optimizer state exists once a step was taken
            tokens = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
            model.update(forward.make_microbatches(2, tokens=tokens),
                         forward.policy_logprobs_head(100),
                         mean_logprob_loss())
        return model

    policy, critic = unit(step=True), unit(step=True)
    manager = CheckpointManager(cfg.checkpoint, {"model": policy, "critic": critic}, lambda: "")
    path = manager.save(3, {"kl": {"beta": 0.5}})
    assert (path / "model" / "metadata.json").is_file()
    assert (path / "critic" / "metadata.json").is_file()
    state = json.loads((path / "train_state.json").read_text())
    assert state["step"] == 3 and "critic" in state["units"] and state["kl"] == {"beta": 0.5}
    # as the earlier format: one model, no "units"
    del state["units"]
    (path / "train_state.json").write_text(json.dumps(state))
    restored = unit()
    with torch.no_grad():
        for p in restored.chunks[0].parameters():
            p.zero_()
    assert CheckpointManager(cfg.checkpoint, {"model": restored}, lambda: "").restore(path)[
        "step"] == 3
    for a, b in zip(restored.chunks[0].parameters(), policy.chunks[0].parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match=r"holds no 'value'"):
        CheckpointManager(cfg.checkpoint, {"model": unit(), "value": unit()},
                          lambda: "").restore(path)
