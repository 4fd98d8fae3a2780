"""What a run writes to TensorBoard: a resumed run shows each step once, and the resolved
config is there as text."""

import base64
import hashlib
import json
import urllib.parse

import pytest
from conftest import REPO, ScaledLossJob, resumed_from


def test_a_resumed_run_logs_each_step_once_and_its_config_as_text(tmp_path, single_rank,
                                                                  capsys):
    """Steps 1-6 saved at 4; a run resumed there logs 5 and 6 again into the same directory:
    TensorBoard shows 1-6 once each (they read 1-6, 5, 6 before), and the config text. The
    resumed run names each config key it changed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_dvpo.demo import run_events, scalars
    from megatron_dvpo.training.loop import TrainingLoop

    keys = {"checkpoint.save_interval": 4, "logging.log_interval": 1, "train_steps": 6}
    first = ScaledLossJob(tmp_path, {}, **keys)
    TrainingLoop(first.cfg, first, first.units).run()
    saves = resumed_from(tmp_path, tmp_path / "again", 4)
    second = ScaledLossJob(tmp_path, {}, **keys, **{"checkpoint.save_dir": str(saves),
                                                     "max_bad_steps": 7})
    capsys.readouterr()
    TrainingLoop(second.cfg, second, second.units).run()
    out = capsys.readouterr().out.splitlines()
    said = [line for line in out if line.startswith("resume:")]
    assert [line.split(": ", 2)[2].split(":")[0] for line in said] == [
        "checkpoint.save_dir", "max_bad_steps"], said
    assert said[1].endswith("-> 7"), said
    # one level below the --logdir the run prints: TensorBoard names the run after the run
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'tensorboard'}" in out
    assert run_events(tmp_path / "tensorboard") == tmp_path / "tensorboard" / tmp_path.name
    logs = scalars(tmp_path / "tensorboard")
    assert [step for step, _ in logs["x/loss"]] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(run_events(tmp_path / "tensorboard")))
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


def test_a_swapped_scoring_model_is_named_on_resume():
    """Another rl.policy with no rl.reference swaps the reference the KL is measured against
    (issue 31: rollout/kl_ref jumped from 27 to 51 without a word)."""
    from megatron_dvpo.config import scoring_model_changes

    before = {"rl": {"policy": "/a", "reference": None}, "dvpo": {"gvm": "/g"}}
    said = scoring_model_changes(before, {"rl": {"policy": "/b", "reference": None},
                                          "dvpo": {"gvm": "/g"}})
    assert len(said) == 1 and said[0].startswith("the reference model changed (/a -> /b)")
    pinned = {"rl": {"policy": "/b", "reference": "/a"}, "dvpo": {"gvm": "/h"}}
    assert [s.split(" changed")[0] for s in scoring_model_changes(before, pinned)] == ["the GVM"]


def test_constant_settings_are_logged_once_and_the_config_is_in_hparams(tmp_path, single_rank):
    """A constant learning rate (or KL coefficient) is one point, a changing one every step;
    the HParams tab has the run's settings and its summary tags; the Custom Scalars tab the
    job's dashboard, whose link opens Time Series with its cards pinned and smoothing off."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from megatron_dvpo.demo import scalars
    from megatron_dvpo.logging import Dashboard, MetricsLogger

    logger = MetricsLogger(tmp_path / "tb", total_steps=3)
    dashboard = Dashboard(
        pinned=("eval/true_reward_mean", "x/kl"),
        charts={"1. is it learning": {"reward": ["eval/true_reward_mean"], "kl": ["x/kl"]},
                "2. is it fast": {"step time": ["perf/step_time_s"]}})
    link = urllib.parse.urlsplit(dashboard.link(port=6007, forceSVG="true"))
    assert (link.netloc, link.path) == ("localhost:6007", "/data/plugin/dvpo/view")
    query = dict(urllib.parse.parse_qsl(link.query))
    assert json.loads(query.pop("pinnedCards")) == [
        {"plugin": "scalars", "tag": "eval/true_reward_mean"}, {"plugin": "scalars", "tag": "x/kl"}]
    assert query == {"smoothing": "0", "forceSVG": "true"}
    with pytest.raises(ValueError, match="11 pinned cards; TensorBoard pins at most 10"):
        Dashboard(pinned=tuple(f"t/{i}" for i in range(11)))
    logger.open(hparams={"optimizer.lr": 1e-3, "dvpo.estimator": "gae"},
                metrics=("eval/true_reward_mean",), dashboard=dashboard)
    for step, lr in ((1, 1e-3), (2, 1e-3), (3, 5e-4)):
        logger.log(step, {"policy/lr": lr, "critic/lr": 0.1 * step, "policy/loss": 1.0,
                          "rollout/beta": 0.05})  # a fixed KL coefficient
    logger.close()
    logs = scalars(tmp_path / "tb")
    assert [s for s, _ in logs["policy/lr"]] == [1, 3] and len(logs["critic/lr"]) == 3
    assert [s for s, _ in logs["rollout/beta"]] == [1]
    assert len(logs["policy/loss"]) == 3
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    assert {h.name for h in experiment.hparam_infos} == {"optimizer.lr", "dvpo.estimator"}
    assert [m.name.tag for m in experiment.metric_infos] == ["eval/true_reward_mean"]
    # the Custom Scalars tab: the categories and charts in the job's order
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0]
                           .tensor_proto.string_val[0])
    assert [(c.title, [chart.title for chart in c.chart]) for c in layout.category] == [
        ("1. is it learning", ["reward", "kl"]), ("2. is it fast", ["step time"])]
    assert list(layout.category[0].chart[0].multiline.tag) == ["eval/true_reward_mean"]


def test_tensorboard_serves_the_page_a_run_links_to(tmp_path):
    """TensorBoard run from this environment serves the run's link (this package's plugin,
    without a tab): a page allowed to run its one script, which unticks "Ignore outliers" in
    TensorBoard's stored settings (keeping the others) and goes on to Time Series with the
    link's query. Without it, a chart leaves out its lowest and highest points."""
    import sys
    import urllib.request

    from torch.utils.tensorboard import SummaryWriter

    from megatron_dvpo.logging import Dashboard

    sys.path.insert(0, str(REPO / "tools"))
    from screenshot_tensorboard import get_json, serve

    with SummaryWriter(str(tmp_path / "run")) as writer:
        writer.add_scalar("eval/true_reward_mean", -0.2, 0)
    with serve(tmp_path) as (url, port, runs):
        link = urllib.parse.urlsplit(Dashboard(("eval/true_reward_mean",)).link(
            "127.0.0.1", port))
        with urllib.request.urlopen(f"{url}{link.path}?{link.query}", timeout=10) as response:
            page, headers = response.read().decode(), response.headers
        listed = get_json(f"{url}/data/plugins_listing")
    assert runs == ["run"] and "dvpo" not in listed and "scalars" in listed
    script = page.split("<script>")[1].split("</script>")[0]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in headers["Content-Security-Policy"]
    assert 'const key = "_tb_global_settings";' in script  # TensorBoard's own key
    assert "settings.ignoreOutliers = false;" in script
    assert "localStorage.setItem(key, JSON.stringify(settings));" in script
    assert 'location.replace("../../../" + window.location.search + "#timeseries")' in script


def test_reading_a_directory_of_several_runs_asks_for_one(tmp_path):
    """``scalars`` reads the one run in or below a directory; with two below it, it names
    them instead of picking one."""
    from torch.utils.tensorboard import SummaryWriter

    from megatron_dvpo.demo import scalars

    for name in ("a", "b"):
        with SummaryWriter(str(tmp_path / "tensorboard" / name)) as writer:
            writer.add_scalar("x/loss", 1.0, 1)
    assert scalars(tmp_path / "tensorboard" / "a") == {"x/loss": [(1, 1.0)]}
    with pytest.raises(ValueError, match=r"2 runs' event files below it \(.*/a, .*/b\)"):
        scalars(tmp_path / "tensorboard")
