"""Mixture of experts: expert parallelism reproduces one rank's numbers, and its layout checks.

One torchrun launch runs tests/distributed/equivalence.py with ``--moe``: a policy and a GVM
(a value head on an MoE trunk) with 4 experts, top-2 and the load-balancing loss, each
data-parallel rank on its own rows. Expert-parallel layouts load the reference's weights and
must give its log-probs, values, every gradient element (experts included) and the weights
after one Adam step.
"""

import json
import shutil

import pytest
import yaml

from conftest import REPO, launch
from megatron_dvpo.config import ConfigError, ModelConfig, ParallelConfig
from megatron_dvpo.config import validate_model, validate_parallel
from test_parallel_equivalence import _assert_matches, _assert_matches_in_bf16

LAYOUTS = ["tp1pp1ep2", "tp1pp1ep2dopt"]  # 2 ranks, each data-parallel rank its own rows
FOUR_RANK_LAYOUTS = ["tp2pp1ep2sp", "tp1pp2ep2"]  # 4 ranks, the same rows on every rank


def _launch(tmp_path_factory, mode: str, layouts: list[str], nproc: int) -> dict:
    work = tmp_path_factory.mktemp("moe")
    out = work / "result.json"
    launch([str(REPO / "tests" / "distributed" / "equivalence.py"), str(out), str(work),
            mode, *layouts], nproc=nproc)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def expert_parallel(tmp_path_factory):
    return _launch(tmp_path_factory, "--moe", LAYOUTS, 2)


@pytest.fixture(scope="module")
def expert_with_tp_or_pp(tmp_path_factory):
    return _launch(tmp_path_factory, "--moe-same-rows", FOUR_RANK_LAYOUTS, 4)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_parallel_matches_one_rank_of_experts(expert_parallel, layout):
    grads = "dopt" not in layout  # see _assert_matches
    _assert_matches(expert_parallel, layout, grads)
    _assert_matches_in_bf16(expert_parallel, layout, grads)


@pytest.mark.multirank
@pytest.mark.parametrize("layout", FOUR_RANK_LAYOUTS)
def test_expert_parallel_with_tp_or_pp_matches_one_rank(expert_with_tp_or_pp, layout):
    _assert_matches(expert_with_tp_or_pp, layout)
    _assert_matches_in_bf16(expert_with_tp_or_pp, layout)


@pytest.mark.parametrize("model, parallel, world, message", [
    (dict(), dict(expert_model_parallel_size=2), 2,
     "parallel.expert_model_parallel_size=2 needs a mixture-of-experts model"),
    (dict(num_experts=6), dict(expert_model_parallel_size=4), 4,
     "model.num_experts=6 is not divisible by parallel.expert_model_parallel_size=4"),
    (dict(num_experts=4, moe_router_topk=5), dict(), 1,
     "model.moe_router_topk=5 exceeds model.num_experts=4"),
    (dict(num_experts=4, moe_router_topk=1), dict(), 1,
     "model.moe_router_topk=1 needs model.moe_router_pre_softmax=true"),
    (dict(num_experts=4), dict(tensor_model_parallel_size=2), 2,
     "a mixture of experts at tensor_model_parallel_size=2 needs parallel.sequence_parallel"),
    (dict(num_experts=4), dict(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                               sequence_parallel=True), 2,
     "world size 2 is not divisible by tensor_model_parallel_size=2 x "
     "pipeline_model_parallel_size=1 x expert_model_parallel_size=2 = 4"),
])
def test_expert_layouts_are_checked_before_any_process_group(model, parallel, world, message):
    with pytest.raises(ConfigError, match=message):
        layout = ParallelConfig(**parallel)
        validate_model(ModelConfig(**model), layout)
        validate_parallel(layout, world)


def test_token_budget_microbatches_are_refused_with_expert_parallelism():
    from megatron_dvpo.config import load_config, validate

    cfg = load_config(None, ["model.num_experts=4", "parallel.expert_model_parallel_size=2",
                             "data.micro_batch_tokens=1024"])
    with pytest.raises(ConfigError, match="data.micro_batch_tokens=1024 needs "
                                          "parallel.expert_model_parallel_size=1"):
        validate(cfg, 2)


def _moe_update(topk: int, forward_only_first: bool = False):
    import torch

    from distributed.losses import mean_logprob_loss
    from megatron_dvpo.config import load_config
    from megatron_dvpo.models import build_chunks, forward
    from megatron_dvpo.training.trained_model import TrainedModel

    cfg = load_config(None, ["model.num_layers=2", "model.vocab_size=100", "model.num_experts=4",
                             f"model.moe_router_topk={topk}", "model.moe_aux_loss_coeff=0.01",
                             "model.moe_z_loss_coeff=0.001"])
    model = TrainedModel(build_chunks(cfg), cfg.optimizer, cfg.parallel, cfg.precision, 10)
    tokens = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    batches = forward.make_microbatches(2, tokens=tokens)
    if forward_only_first:  # a frozen model's kind of pass: not counted
        forward.token_logprobs(model.chunks, batches, 100)
        assert model.routers.counts.sum() == 0
    return model.update(batches, forward.policy_logprobs_head(100), mean_logprob_loss())


def test_router_metrics_of_an_update(single_rank):
    """Every expert chosen: the load is even; top-2 of 4: the busiest expert's share is above
    an even split and the idlest's below. The router losses come from megatron's tracker, and
    a dense model has none of it."""
    even = _moe_update(topk=4).router
    assert even["moe_expert_load_max"] == even["moe_expert_load_min"] == 1.0
    assert even["moe_expert_load_max_layer0"] == even["moe_expert_load_max_layer1"] == 1.0
    assert even["moe_load_balancing_loss"] > 0 and even["moe_z_loss"] > 0
    skewed = _moe_update(topk=2, forward_only_first=True).router
    assert 1.0 < skewed["moe_expert_load_max"] <= 2.0 and 0.0 <= skewed["moe_expert_load_min"] < 1


@pytest.fixture(scope="module")
def moe_pipeline(tmp_path_factory):
    """The demo's stages with a 4-expert, top-2 Mixtral as the starting model: an MoE policy
    (SFT), an MoE GVM, 40 DVPO steps at DP=2, and the export of the trained policy."""
    from conftest import NPROC
    from megatron_dvpo.demo import _run, policy_and_gvm

    work = tmp_path_factory.mktemp("moe_pipeline")
    data, policy, gvm = policy_and_gvm(work, NPROC, shape=("--experts", "4"))
    _run("6. DVPO", ["-m", "megatron_dvpo.rl.dvpo", "--config", "examples/dvpo_tiny.yaml",
                     f"data.train_path={data}/train.jsonl", f"data.eval_path={data}/eval.jsonl",
                     f"rl.policy={policy}", f"dvpo.gvm={gvm}", f"logging.run_dir={work}/dvpo",
                     f"checkpoint.save_dir={work}/dvpo/checkpoints", "train_steps=40"], NPROC)
    _run("7. export", ["tools/convert_megatron_to_hf.py", "--ckpt", str(work / "dvpo" /
                                                                    "checkpoints"),
                       "--out", str(work / "hf_trained")])
    return work


@pytest.mark.multirank
def test_dvpo_with_an_moe_policy_and_gvm_raises_the_true_reward(moe_pipeline):
    """Measured: the held-out true reward -0.20 -> +0.60, the GVM at 97.5% held-out pair
    accuracy, the rollout's log-probs equal to the training forward's to 2e-7 (the same tokens
    go to the same experts), and the router metrics logged for the policy and the GVM."""
    from megatron_dvpo.demo import scalars

    work = moe_pipeline
    dvpo, gvm = scalars(work / "dvpo" / "tensorboard"), scalars(work / "gvm" / "tensorboard")
    reward = [v for _, v in dvpo["eval/true_reward_mean"]]
    assert reward[0] < 0 < reward[-1] and reward[-1] >= reward[0] + 0.5, reward
    assert gvm["gvm/pair_acc_last"][-1][1] >= 0.9
    assert max(v for _, v in dvpo["rollout/logprob_diff"]) < 1e-5
    for logs, prefix in ((dvpo, "policy"), (gvm, "gvm")):
        assert 1.0 <= logs[f"{prefix}/moe_expert_load_max"][-1][1] <= 4.0
        assert logs[f"{prefix}/moe_load_balancing_loss"][-1][1] > 0
        assert f"{prefix}/moe_expert_load_max_layer1" in logs
    config = json.loads((work / "hf_trained" / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] == 4


@pytest.mark.multirank
def test_bf16_moe_dvpo_at_ep2_resumes_bit_for_bit(moe_pipeline, tmp_path):
    """The MoE policy trained by DVPO in bf16 with its experts split over two ranks (EP=2),
    guided by the MoE GVM: a run resumed at step 2 matches the unbroken run bit for bit."""
    from conftest import NPROC, resumed_from
    from megatron_dvpo import cpu_compat
    from megatron_dvpo.demo import _run
    from test_bf16 import BF16, assert_resumed_run_matches

    work = moe_pipeline
    for run in ("unbroken", "resumed"):
        if run == "resumed":
            resumed_from(tmp_path / "unbroken", tmp_path / "resumed", 2)
        _run(f"bf16 DVPO at EP=2 ({run})", [
            "-m", "megatron_dvpo.rl.dvpo", "--config", "examples/dvpo_tiny.yaml",
            f"data.train_path={work}/synthetic/train.jsonl", "data.eval_path=null",
            f"rl.policy={work}/sft/checkpoints/iter_0000100",
            f"dvpo.gvm={work}/gvm/checkpoints/iter_0000300", "rl.eval_interval=0",
            "parallel.expert_model_parallel_size=2", "data.global_batch_size=16",
            "data.micro_batch_size=4", *BF16, f"logging.run_dir={tmp_path / run}",
            f"checkpoint.save_dir={tmp_path / run}/checkpoints"], NPROC)
    try:
        assert_resumed_run_matches(tmp_path / "unbroken", tmp_path / "resumed", ["model"])
    finally:
        cpu_compat.uninstall()


@pytest.fixture(scope="module")
def moe_rl_steps(moe_pipeline, tmp_path_factory):
    """tests/distributed/rl_equivalence.py on the MoE pipeline's converted Mixtral policy and
    zero-head GVM: one GVM, DVPO and PPO step at EP=2 and at PP=2, against one rank.

    The policy's load-balancing loss is off here: it is a statistic of each microbatch's
    routing, and the policy update shuffles a rank's rows into microbatches, so at another
    data-parallel size other rows share a microbatch (measured: 1e-4 in the policy's gradients
    at DP=2 x EP=2 with it on, 5e-8 with it off). The GVM's and the critic's steps keep it."""
    work = tmp_path_factory.mktemp("moe_rl_equivalence")
    for name, target in (("synthetic", "synthetic"), ("gvm", "gvm_init")):
        (work / name).symlink_to(moe_pipeline / target, target_is_directory=True)
    shutil.copytree(moe_pipeline / "policy", work / "policy")
    config = yaml.safe_load((work / "policy" / "config.yaml").read_text())
    config["model"]["moe_aux_loss_coeff"] = 0.0
    (work / "policy" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    script = str(REPO / "tests" / "distributed" / "rl_equivalence.py")
    launch([script, str(work), *RL_LAYOUTS], nproc=2)
    launch([script, str(work), "dp1pp1", "compare"], nproc=1)
    return json.loads((work / "diffs.json").read_text())


RL_LAYOUTS = ["dp2pp1ep2", "dp1pp2"]


@pytest.mark.multirank
@pytest.mark.parametrize("layout", RL_LAYOUTS)
def test_rl_steps_on_moe_models_equal_one_rank(moe_rl_steps, layout):
    """DVPO's and PPO's advantages, losses, gradients and stepped weights, with each
    data-parallel rank on its own rows, as for the dense models (test_rl_equivalence.py)."""
    from test_rl_equivalence import assert_equal_in_bf16, assert_equal_in_fp32

    assert_equal_in_fp32(moe_rl_steps[layout], layout)
    assert_equal_in_bf16(moe_rl_steps[f"{layout}-bf16"], layout)
