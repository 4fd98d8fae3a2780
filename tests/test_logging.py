"""What a run writes to TensorBoard: a resumed run shows each step once, and the resolved
config is there as text."""

from conftest import ScaledLossJob, resumed_from


def test_a_resumed_run_logs_each_step_once_and_its_config_as_text(tmp_path, single_rank):
    """Steps 1-6 saved at 4; a run resumed there logs 5 and 6 again into the same directory:
    TensorBoard shows 1-6 once each (they read 1-6, 5, 6 before), and the config text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_dvpo.demo import scalars
    from megatron_dvpo.training.loop import TrainingLoop

    keys = {"checkpoint.save_interval": 4, "logging.log_interval": 1, "train_steps": 6}
    first = ScaledLossJob(tmp_path, {}, **keys)
    TrainingLoop(first.cfg, first, first.units).run()
    saves = resumed_from(tmp_path, tmp_path / "again", 4)
    second = ScaledLossJob(tmp_path, {}, **keys, **{"checkpoint.save_dir": str(saves)})
    TrainingLoop(second.cfg, second, second.units).run()
    logs = scalars(tmp_path / "tensorboard")
    assert [step for step, _ in logs["x/loss"]] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    text = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "    train_steps: 6" in text and "    model:" in text
