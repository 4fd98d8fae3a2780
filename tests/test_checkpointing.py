"""Which checkpoint a restart picks when a save was interrupted (no process groups needed)."""

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
