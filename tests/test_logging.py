"""What a run writes to TensorBoard: a resumed run shows each step once, and the resolved
config is there as text."""

from conftest import ScaledLossJob, resumed_from


def test_a_resumed_run_logs_each_step_once_and_its_config_as_text(tmp_path, single_rank,
                                                                  capsys):
    """Steps 1-6 saved at 4; a run resumed there logs 5 and 6 again into the same directory:
    TensorBoard shows 1-6 once each (they read 1-6, 5, 6 before), and the config text. The
    resumed run names each config key it changed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_dvpo.demo import scalars
    from megatron_dvpo.training.loop import TrainingLoop

    keys = {"checkpoint.save_interval": 4, "logging.log_interval": 1, "train_steps": 6}
    first = ScaledLossJob(tmp_path, {}, **keys)
    TrainingLoop(first.cfg, first, first.units).run()
    saves = resumed_from(tmp_path, tmp_path / "again", 4)
    second = ScaledLossJob(tmp_path, {}, **keys, **{"checkpoint.save_dir": str(saves),
                                                     "max_bad_steps": 7})
    capsys.readouterr()
    TrainingLoop(second.cfg, second, second.units).run()
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("resume:")]
    assert [line.split(": ", 2)[2].split(":")[0] for line in said] == [
        "checkpoint.save_dir", "max_bad_steps"], said
    assert said[1].endswith("-> 7"), said
    logs = scalars(tmp_path / "tensorboard")
    assert [step for step, _ in logs["x/loss"]] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    text = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "    train_steps: 6" in text and "    model:" in text


def test_config_changes_name_each_differing_key():
    from megatron_dvpo.config import config_changes

    before = {"rl": {"policy": "/a", "kl_coef": 0.1}, "seed": 1}
    after = {"rl": {"policy": "/b", "kl_coef": 0.1}, "seed": 1, "extra": {"x": 2}}
    assert config_changes(before, after) == ["extra: None -> {'x': 2}",
                                             "rl.policy: '/a' -> '/b'"]
    assert config_changes(before, before) == []
