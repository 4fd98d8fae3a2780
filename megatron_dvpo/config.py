"""Typed run configuration: one YAML file plus ``a.b.c=value`` overrides.

Every job (GVM pretraining, DVPO, PPO, conversion) reads the same tree of dataclasses, so a model
or parallel layout written once works for all of them. Unknown keys and impossible layouts fail
before any process group or model is built, naming the key or the numbers involved.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megatron_dvpo.errors import InputError


class ConfigError(InputError):
    """A configuration that cannot run; the message names the key and what would fix it."""


# Value constraints, as field metadata: checked when a config is loaded, so that an impossible
# value is named before anything runs.
POSITIVE = {"check": (lambda v: v > 0, "> 0")}
NON_NEGATIVE = {"check": (lambda v: v >= 0, ">= 0")}
UNIT_INTERVAL = {"check": (lambda v: 0 <= v <= 1, "in [0, 1]")}
OPEN_UNIT_INTERVAL = {"check": (lambda v: 0 < v <= 1, "in (0, 1]")}


def _checked(default, constraint: dict):
    return field(default=default, metadata=constraint)


@dataclass
class ModelConfig:
    """Architecture of a Llama/Mistral/Qwen2/Qwen3-style decoder (or the GVM trunk)."""

    num_layers: int = _checked(2, POSITIVE)
    hidden_size: int = _checked(64, POSITIVE)
    num_attention_heads: int = _checked(4, POSITIVE)
    num_query_groups: Optional[int] = None  # None: multi-head attention (groups = heads)
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size
    kv_channels: Optional[int] = None  # None: hidden_size // num_attention_heads
    vocab_size: int = _checked(256, POSITIVE)
    # The embedding is padded to a multiple of this, independent of TP, so that checkpoints
    # reshard freely; padded logits are masked out of every probability we compute.
    make_vocab_size_divisible_by: int = _checked(128, POSITIVE)
    max_position_embeddings: int = _checked(512, POSITIVE)
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = 1e-5
    activation: Literal["swiglu", "gelu"] = "swiglu"
    add_bias_linear: bool = False
    add_qkv_bias: bool = False  # Qwen2
    qk_layernorm: bool = False  # Qwen3: an RMSNorm on each head's query and key, before RoPE
    # Mixture of experts (None: a dense MLP): each token goes to moe_router_topk of num_experts
    # expert MLPs of moe_ffn_hidden_size (None: ffn_hidden_size), weighted by the router's
    # softmax over its top-k logits (Mixtral), or over all experts first with
    # moe_router_pre_softmax (Qwen2-MoE's weights, not renormalised)
    num_experts: Optional[int] = _checked(None, POSITIVE)
    moe_router_topk: int = _checked(2, POSITIVE)
    moe_ffn_hidden_size: Optional[int] = _checked(None, POSITIVE)
    moe_router_pre_softmax: bool = False
    # the router's logits and softmax in this precision (megatron's moe_router_dtype; None: the
    # model's): in bf16, rounding can flip near-tied experts between the rollout's forward and
    # the training forward
    moe_router_dtype: Optional[Literal["fp32", "fp64"]] = None
    # Qwen2-MoE: a shared expert of this size in every MoE layer (None: none), its output
    # scaled by a sigmoid gate with moe_shared_expert_gate
    moe_shared_expert_intermediate_size: Optional[int] = _checked(None, POSITIVE)
    moe_shared_expert_gate: bool = False
    # the router's load-balancing (auxiliary) loss and z-loss coefficients in training
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: Optional[float] = None
    position_embedding_type: Literal["rope", "learned_absolute"] = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    # Llama-3 style frequency scaling; None disables it.
    rope_scaling_factor: Optional[float] = None
    rope_scaling_low_freq_factor: float = 1.0
    rope_scaling_high_freq_factor: float = 4.0
    rope_scaling_original_max_position: int = 8192
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # HF architecture this model round-trips to (used by the converters).
    hf_architecture: str = "LlamaForCausalLM"
    # A Global Value Model: the LM head is replaced by a scalar value head (docs/algorithm.md §1).
    value_head: bool = False
    # K > 1: K value heads on the one trunk, an ensemble whose spread says where the GVM is
    # unsure (docs/algorithm.md §1, "Value heads"); needs gvm.value_head_init_std > 0
    value_heads: int = _checked(1, POSITIVE)

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    # The defaults of the None-able sizes, resolved here and nowhere else.
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def expert_ffn_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_size


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    # MoE: each expert-parallel group of this many ranks splits every layer's experts
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # megatron DDP: start each gradient bucket's data-parallel reduction during the backward
    # pass instead of after it (Megatron-LM's --overlap-grad-reduce)
    overlap_grad_reduce: bool = False
    # parameters per gradient bucket with overlap_grad_reduce (None: megatron's default,
    # max(40M, 1M x data-parallel size)); smaller buckets start reducing earlier
    ddp_bucket_size: Optional[int] = _checked(None, POSITIVE)
    # distributed optimizer: all-gather each bucket's updated parameters during the next
    # update's forward pass instead of after the optimizer step (--overlap-param-gather)
    overlap_param_gather: bool = False
    # how long a collective waits for a stalled rank before the job fails
    # (Megatron-LM's --distributed-timeout-minutes)
    distributed_timeout_minutes: int = _checked(30, POSITIVE)


@dataclass
class PrecisionConfig:
    # fp32 on CPU; bf16 is the usual choice on GPU.
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # FP8 policy training through Transformer Engine (Hopper or newer). Frozen models (GVM,
    # reference, reward model) always run in bf16; rollout generation runs in bf16 too.
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    # Keep the first/last N transformer layers in bf16 (not with the delayed recipe).
    num_layers_at_start_in_bf16: int = 0
    num_layers_at_end_in_bf16: int = 0
    # Keep FP8 parameters and all-gather them in FP8 (needs the distributed optimizer).
    fp8_param_gather: bool = False
    fp8_amax_history_len: int = 1024  # delayed scaling only
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    # Attention implementation: "auto" picks Transformer Engine on a GPU with TE, else local.
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"


@dataclass
class RecomputeConfig:
    """Megatron's activation recompute for the models a job trains (Megatron-LM's
    --recompute-*): activations are recomputed in the backward pass instead of kept.
    ``selective`` recomputes the attention core only; ``full`` whole layers, by ``method``:
    ``uniform`` checkpoints groups of ``num_layers`` layers, ``block`` the first ``num_layers``
    layers of each pipeline stage."""

    granularity: Optional[Literal["full", "selective"]] = None
    method: Literal["uniform", "block"] = "uniform"
    num_layers: int = _checked(1, POSITIVE)

    def transformer_config_kwargs(self) -> dict:
        if self.granularity == "full":
            return {"recompute_granularity": "full", "recompute_method": self.method,
                    "recompute_num_layers": self.num_layers}
        return {"recompute_granularity": self.granularity}


@dataclass
class OptimizerConfig:
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = _checked(1e-4, POSITIVE)
    min_lr: float = _checked(0.0, NON_NEGATIVE)
    weight_decay: float = _checked(0.0, NON_NEGATIVE)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = _checked(1e-8, POSITIVE)
    clip_grad: float = _checked(1.0, NON_NEGATIVE)
    lr_warmup_steps: int = _checked(0, NON_NEGATIVE)
    lr_decay_style: Literal["constant", "linear", "cosine"] = "cosine"


@dataclass
class DataConfig:
    # A preprocessed prefix (tools/preprocess_data.py) or a .jsonl file, tokenized on first use.
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    tokenizer: Optional[str] = None  # SentencePiece .model file or HF tokenizer directory
    seq_length: int = _checked(128, POSITIVE)
    micro_batch_size: int = _checked(1, POSITIVE)
    # > 0: training microbatches of up to this many tokens (rows x the longest), rows sorted by
    # length and each microbatch cut to its longest row, for SFT, GVM training and the policy
    # and critic updates; 0: micro_batch_size rows each, at the batch's width
    micro_batch_tokens: int = _checked(0, NON_NEGATIVE)
    global_batch_size: int = _checked(8, POSITIVE)
    skip_bad_rows: bool = False
    max_length: Optional[int] = None  # prompt + response tokens; None: seq_length
    length_mode: Literal["filter", "truncate"] = "filter"
    chosen_reward: float = 1.0
    rejected_reward: float = -1.0
    # Trajectory conditioning (docs/algorithm.md §1, off by default): prefix each GVM sample with K
    # example (prompt, response) pairs of the judged policy, drawn from the training data.
    trajectory_context_k: int = _checked(0, NON_NEGATIVE)


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    # the run's event files; None: <run_dir>/tensorboard/<run_dir's name> (events_dir)
    tensorboard_dir: Optional[str] = None
    log_interval: int = _checked(1, POSITIVE)
    # dense bf16 peak TFLOP/s of one device, for perf/mfu; None: from the GPU's name (on a CPU,
    # or a GPU not in megatron_dvpo/perf.py's table, perf/mfu is then not logged)
    peak_tflops: Optional[float] = _checked(None, POSITIVE)

    @property
    def events_dir(self) -> Path:
        """TensorBoard names a run after its events' directory below ``--logdir`` (events
        right in ``--logdir`` make a run named "."), so the run's are one level below the
        ``--logdir`` it prints, in a directory named after the run."""
        if self.tensorboard_dir:
            return Path(self.tensorboard_dir)
        run_dir = Path(self.run_dir)
        return run_dir / "tensorboard" / run_dir.resolve().name


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None  # also where a restarted run resumes from
    load_dir: Optional[str] = None  # resume from here instead (default: save_dir)
    init_from: Optional[str] = None  # initial weights: a converted or trained checkpoint dir
    save_interval: int = _checked(0, NON_NEGATIVE)  # 0: only at the end
    keep_last: int = _checked(2, NON_NEGATIVE)  # 0: keep all
    # Distributed-optimizer state layout: dp_reshardable (fast; resume at the same TP/PP) or
    # fully_reshardable (gathered; resume at any layout).
    optimizer_sharding: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    # On resume, use this config's LR schedule instead of refusing one that differs from the
    # checkpoint's (Megatron-LM's --override-opt_param-scheduler).
    override_scheduler: bool = False
    # A damaged newest checkpoint (megatron_dvpo/integrity.py) stops the run instead of the
    # resume falling back to the newest intact one.
    strict_resume: bool = False


@dataclass
class GVMConfig:
    """Global Value Model pretraining (docs/algorithm.md §1), or reward-model training.

    ``objective=bradley_terry`` trains the same model as PPO's reward model (docs/algorithm.md §3):
    -log sigmoid(r_chosen - r_rejected) on the last-token values of whole pairs; then
    ``data.global_batch_size`` counts pairs.
    """

    # td: TD(lambda) token values; td_pairwise: plus pairwise_weight x Bradley-Terry on the
    # pair's final values; bradley_terry: PPO's reward model (megatron_dvpo/gvm/objectives.py)
    objective: Literal["td", "td_pairwise", "bradley_terry"] = "td"
    pairwise_weight: float = _checked(2.0, NON_NEGATIVE)  # tools/bench_gvm.py: 1 trails BT
    gamma: float = _checked(1.0, UNIT_INTERVAL)
    lam: float = _checked(0.95, UNIT_INTERVAL)
    # Which outputs are trained (docs/algorithm.md §1): qview fits q_0 .. q_{T-1},
    # released (the released code) fits q_{-1} .. q_{T-2}.
    alignment: Literal["qview", "released"] = "qview"
    # qview: also fit q_{-1} (V(s_0), which DVPO's td and gae estimators read) toward q_0's
    # target.
    train_prompt_value: bool = True
    value_head_init_std: float = 0.0  # 0: the zero-initialised head of the spec
    # steps between held-out evaluations; 0: only at the end
    eval_interval: int = _checked(0, NON_NEGATIVE)
    eval_max_pairs: int = _checked(0, NON_NEGATIVE)  # 0: every held-out pair


@dataclass
class RolloutConfig:
    """Sampling from the policy (docs/algorithm.md §2, step 1)."""

    max_new_tokens: int = _checked(640, POSITIVE)
    # EOS is not sampled before this many response tokens (vLLM's min_tokens): a frozen scorer
    # never trained on an empty answer cannot be gamed by one
    min_new_tokens: int = _checked(0, NON_NEGATIVE)
    # samples per prompt (GRPO/RLOO's groups); data.global_batch_size counts prompts
    n_samples: int = _checked(1, POSITIVE)
    # DVPO: > 0 steers sampling by the frozen GVM (GVM-guided decoding, models/guided.py): the
    # policy's guide_top_k candidates' logits shifted by guide_beta x (value - their mean)
    guide_beta: float = _checked(0.0, NON_NEGATIVE)
    guide_top_k: int = _checked(8, POSITIVE)
    temperature: float = _checked(1.0, NON_NEGATIVE)  # 0: greedy
    top_p: float = _checked(1.0, OPEN_UNIT_INTERVAL)
    top_k: int = _checked(0, NON_NEGATIVE)  # 0: no top-k filter
    max_prompt_length: int = _checked(512, POSITIVE)


@dataclass
class RLConfig:
    """What the RL algorithms share (docs/algorithm.md §2-3): the policy, its reference and KL
    penalty, and the clipped policy update."""

    policy: Optional[str] = None  # initial policy: a converted or trained checkpoint directory
    reference: Optional[str] = None  # reference policy for the KL term; default: ``policy``
    kl_coef: float = _checked(0.2, NON_NEGATIVE)  # initial beta; 0: no reference model at all
    kl_adaptive: bool = True
    kl_target: float = _checked(6.0, POSITIVE)  # nats per sequence (the released default)
    kl_horizon: int = _checked(10000, POSITIVE)
    gamma: float = _checked(1.0, UNIT_INTERVAL)  # GAE (DVPO's gae estimator, PPO)
    lam: float = _checked(0.95, UNIT_INTERVAL)
    whiten_advantages: bool = True
    ppo_epochs: int = _checked(4, POSITIVE)
    minibatches: int = _checked(1, POSITIVE)  # optimizer steps per PPO epoch
    clip_eps: float = _checked(0.2, POSITIVE)
    ratio_threshold: float = _checked(10.0, POSITIVE)
    entropy_coef: float = _checked(0.0, NON_NEGATIVE)
    # Policy-loss options (docs/algorithm.md §2, "Policy-loss options"). The loss
    # (rl/policy_loss.py POLICY_LOSSES): ppo, the clipped surrogate on each token's ratio; gspo,
    # on each response's sequence ratio (clip_eps of a few 1e-4 there). How token losses
    # aggregate: token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    policy_loss: Literal["ppo", "gspo"] = "ppo"
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                           "seq-mean-token-sum-norm"] = "token-mean"
    # dual-clip PPO: a negative advantage's token loss capped at -dual_clip x A (> 1; verl: 3)
    dual_clip: Optional[float] = _checked(None, {"check": (lambda v: v > 1, "> 1")})
    # bound on |log(pi_theta / pi_old)| before the exp (None: none)
    log_ratio_clamp: Optional[float] = _checked(None, POSITIVE)
    # the per-token KL penalty's estimator of KL(pi_old || pi_ref), with d = logp_old - logp_ref:
    # k1 = d (the released code), k2 = d^2 / 2, k3 = exp(-d) - 1 + d (non-negative)
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    # length as part of the reward, in every estimator (docs/algorithm.md §2, "Length"): each
    # response token costs length_penalty; a response cut at rollout.max_new_tokens without
    # EOS costs truncation_penalty more, at its last token (DAPO's overlong penalty, hard form)
    length_penalty: float = _checked(0.0, NON_NEGATIVE)
    truncation_penalty: float = _checked(0.0, NON_NEGATIVE)
    # correction of the sampler's and the training forward's log-prob mismatch: none, tis
    # (weights min(pi_train / pi_sampler, is_cap)) or icepop (the ratio inside [1/is_cap,
    # is_cap], the token dropped outside)
    is_correction: Literal["none", "tis", "icepop"] = "none"
    is_cap: float = _checked(2.0, {"check": (lambda v: v > 1, "> 1")})
    # The task's scorer for eval/true_reward_mean: synthetic:<seed>, bigram:<seed>,
    # module:function or file.py:function (megatron_dvpo/rl/rewards.py), or None.
    true_reward: Optional[str] = None
    # Signs of a gamed scorer (megatron_dvpo/rl/gaming.py): a warning on rank 0 past each
    # threshold; with stop_on_gaming the run saves and stops instead.
    gaming_max_repeat_rate: float = _checked(0.5, UNIT_INTERVAL)
    gaming_max_truncated_rate: float = _checked(0.5, UNIT_INTERVAL)
    gaming_max_value_ood_rate: float = _checked(0.2, UNIT_INTERVAL)
    # share of response tokens where a K-head GVM's heads disagree more than on its own data
    gaming_max_head_disagree_rate: float = _checked(0.2, UNIT_INTERVAL)
    gaming_min_entropy: float = _checked(0.05, NON_NEGATIVE)
    stop_on_gaming: bool = False
    # steps between held-out true-reward evaluations; 0: at the start and the end
    eval_interval: int = _checked(0, NON_NEGATIVE)


@dataclass
class DVPOConfig:
    """DVPO's own knobs (docs/algorithm.md §2): the frozen GVM and how its values become
    advantages; the shared policy-update knobs are in ``rl``."""

    gvm: Optional[str] = None  # the trained Global Value Model's checkpoint directory
    estimator: Literal["td", "q", "gae"] = "td"
    # gae only: how the GVM's values are whitened before GAE (docs/algorithm.md §2):
    # released = the released code's whitening of each forward chunk's raw outputs.
    value_whitening: Literal["released", "per_sequence_states", "none"] = "released"
    gvm_offload: bool = False  # keep the GVM on CPU during the policy update
    # a K-head GVM (model.value_heads > 1) is read as mean - head_pessimism x std over its
    # heads, per token: 0 reads the ensemble's mean (docs/algorithm.md §2, "Pessimistic values")
    head_pessimism: float = _checked(0.0, NON_NEGATIVE)
    # a GVM whose recorded held-out pair accuracy is below this is refused: near chance, its
    # values steer the policy by noise (tools/bench_defaults.py, bigram); 0 runs any GVM
    min_gvm_accuracy: float = _checked(0.6, UNIT_INTERVAL)
    # GVM refresh (semi-online, docs/algorithm.md §2): every refresh_interval steps (0: never),
    # pair two of the policy's samples per prompt, rank them by refresh_scorer (default:
    # rl.true_reward), and take refresh_updates GVM steps of its own objective at refresh_lr.
    refresh_interval: int = _checked(0, NON_NEGATIVE)
    refresh_scorer: Optional[str] = None
    refresh_updates: int = _checked(4, POSITIVE)
    refresh_lr: float = _checked(1e-5, POSITIVE)


@dataclass
class PPOConfig:
    """The classic RLHF PPO baseline (docs/algorithm.md §3); the shared knobs are in ``rl``."""

    reward_model: Optional[str] = None  # trained with gvm.objective=bradley_terry
    critic: Optional[str] = None  # the critic's initial weights; default: the reward model
    # the critic's loss (rl/losses.py VALUE_LOSSES): clipped around the rollout's values, or mse
    value_loss: Literal["clipped", "mse"] = "clipped"
    value_clip_eps: float = _checked(0.2, POSITIVE)


@dataclass
class GRPOConfig:
    """Critic-free baselines over rollout.n_samples samples per prompt (docs/algorithm.md §3)."""

    reward_model: Optional[str] = None  # trained with gvm.objective=bradley_terry
    # or the user's function of the text instead (a verifier): a scorer spec, as rl.true_reward
    scorer: Optional[str] = None
    # grpo: group-normalised rewards; dr_grpo: group-centred, no std (Dr. GRPO; pair it with
    # rl.loss_agg_mode=seq-mean-token-sum-norm); rloo: leave-one-out baseline
    estimator: Literal["grpo", "dr_grpo", "rloo"] = "grpo"


@dataclass
class DPOConfig:
    """Direct preference optimisation of a policy on the GVM's preference data (docs/algorithm.md
    §3); the policy starts from ``checkpoint.init_from``."""

    beta: float = _checked(0.1, POSITIVE)
    reference: Optional[str] = None  # the reference policy; default: checkpoint.init_from
    reference_free: bool = False  # no reference model: its log-probs are taken as 0
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO's logistic loss, or IPO's squared one
    # conservative DPO: the probability that a pair's label is wrong (sigmoid loss only)
    label_smoothing: float = _checked(0.0, {"check": (lambda v: 0 <= v < 0.5, "in [0, 0.5)")})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    gvm: GVMConfig = field(default_factory=GVMConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    dvpo: DVPOConfig = field(default_factory=DVPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    seed: int = _checked(1234, NON_NEGATIVE)
    train_steps: int = _checked(10, POSITIVE)
    # Save and exit after a step divisible by this (0: never), as Megatron-LM's --exit-interval:
    # for jobs shorter than the run, which then resume from the checkpoint.
    exit_interval: int = _checked(0, NON_NEGATIVE)
    # Steps with a NaN/Inf loss or gradient are skipped and counted; this many in a row stop the
    # run with a report.
    max_bad_steps: int = _checked(5, POSITIVE)
    # A diverged step stops the run at once (megatron_dvpo/training/health.py): a gradient norm
    # this many times the median of the previous divergence_window steps', or parameters whose
    # norm grew this many times in one step; 0 turns the check off.
    divergence_factor: float = _checked(10.0, NON_NEGATIVE)
    divergence_window: int = _checked(20, POSITIVE)
    # false: only the parameters' norm growth counts. An RL policy's gradient norm follows its
    # entropy: near-deterministic, its gradients are ~0 and the next new sample's are 100x that
    # (examples/dvpo_tiny.yaml; tools/bench_defaults.py, echo)
    divergence_grad_spikes: bool = True


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with errors that name the key.


# Keys that moved to another section, for the error message of an old config.
MOVED = {f"dvpo.{name}": f"rl.{name}" for name in (
    "policy", "reference", "kl_coef", "kl_adaptive", "kl_target", "kl_horizon", "gamma", "lam",
    "whiten_advantages", "ppo_epochs", "minibatches", "clip_eps", "ratio_threshold",
    "entropy_coef", "true_reward", "eval_interval")}


def _closest(key: str, valid: list[str], dotted: str = "") -> str:
    if dotted in MOVED:
        return f"it moved to {MOVED[dotted]!r}"
    matches = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(m) for m in matches)}? " if matches else ""
    return f"{hint}valid keys: {', '.join(sorted(valid))}"


def _check_value(path: str, value: Any, hint: Any) -> Any:
    """Validate (and lightly coerce) one value against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(path, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of {hint.__name__} keys, got {value!r}")
        return _build(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_check_value(f"{path}[{i}]", v, item_hint) for i, v in enumerate(value)]
    return value


def _check_field(cls, key: str, path: str, value: Any) -> Any:
    """``value`` checked against the type and the constraint of field ``key`` of ``cls``."""
    value = _check_value(path, value, typing.get_type_hints(cls)[key])
    check = next(f for f in dataclasses.fields(cls) if f.name == key).metadata.get("check")
    if check is not None and value is not None and not check[0](value):
        raise ConfigError(f"{path} must be {check[1]}, got {value!r}")
    return value


def _build(cls, data: dict, path: str = ""):
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; {_closest(str(key), names, full)}")
        kwargs[key] = _check_field(cls, key, full, value)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else None


def _apply_override(tree: dict, keys: list[str], value: Any, cls, text: str) -> None:
    """Set tree[k0][k1]... = value, checking each key against the dataclass it lands in, and
    the value against its field, so that a bad value is blamed on the command line."""
    node, node_cls = tree, cls
    for depth, key in enumerate(keys):
        names = [f.name for f in dataclasses.fields(node_cls)]
        dotted = ".".join(keys[: depth + 1])
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r} in override; "
                              f"{_closest(key, names, dotted)}")
        if depth == len(keys) - 1:
            try:
                _check_field(node_cls, key, dotted, value)
            except ConfigError as e:
                raise ConfigError(f"command line {text!r}: {e}") from None
            node[key] = value
            return
        node_cls = typing.get_type_hints(node_cls)[key]
        if not dataclasses.is_dataclass(node_cls):
            raise ConfigError(f"{dotted!r} is a value, not a section; cannot set {'.'.join(keys)}")
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted!r} must be a mapping")


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None,
                cls=RunConfig):
    """Read ``path`` (YAML) into ``cls`` and apply ``key=value`` overrides on top."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for text in overrides or []:
        keys, value = _parse_override(text)
        _apply_override(tree, keys, value, cls, text)
    try:
        return _build(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


# Model keys that decide a parameter's shape: a checkpoint's value cannot be overridden.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "ffn_hidden_size", "kv_channels", "vocab_size", "make_vocab_size_divisible_by",
              "normalization", "activation", "add_bias_linear", "add_qkv_bias", "qk_layernorm",
              "position_embedding_type", "tie_embeddings", "value_head", "num_experts",
              "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
              "moe_shared_expert_gate", "value_heads")


def model_from_checkpoint(cfg: RunConfig, directory: str | Path, key: str,
                          overrides: list[str], ignore: tuple[str, ...] = ()) -> ModelConfig:
    """Set ``cfg.model`` to the model of checkpoint ``directory`` (named by config key ``key``).

    The YAML's model section is replaced; ``model.*`` overrides on the command line apply on
    top, but one that would change a parameter's shape (``SHAPE_KEYS`` less ``ignore``) is an
    error naming the key, instead of a shape error deep inside the checkpoint loader.
    """
    model = load_config(Path(directory) / "config.yaml").model
    given = [text for text in overrides if text.split("=", 1)[0].startswith("model.")]
    requested = load_config(None, given).model
    for text in given:
        name = text.split("=", 1)[0][len("model."):]
        value = getattr(requested, name)
        if name in SHAPE_KEYS and name not in ignore and value != getattr(model, name):
            raise ConfigError(f"command line {text!r}: {key}={directory} has model.{name}="
                              f"{getattr(model, name)!r}, and the model comes from that "
                              "checkpoint; drop the override")
        setattr(model, name, value)
    cfg.model = model
    return model


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_changes(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf of two config dicts that differs (a resumed run's
    config against its checkpoint's)."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return changes


# The models a run scores or anchors with: swapping one on resume changes what the curves
# measure from that step on.
SCORING_MODELS = {
    "reference": ("the reference model", "rollout/kl_ref and the KL penalty"),
    "dvpo.gvm": ("the GVM", "every DVPO advantage"),
    "ppo.reward_model": ("the reward model", "PPO's rewards"),
    "grpo.reward_model": ("the reward model", "GRPO's rewards")}


def scoring_model_changes(before: dict, after: dict) -> list[str]:
    """One line per scoring model a resumed run's config swaps (``SCORING_MODELS``); the
    reference is ``rl.reference``, else the initial ``rl.policy``."""
    def model(config: dict, key: str):
        if key == "reference":
            rl = config.get("rl", {})
            return rl.get("reference") or rl.get("policy")
        section, name = key.split(".")
        return config.get(section, {}).get(name)

    return [f"{what} changed ({model(before, key)} -> {model(after, key)}): {reads} come from "
            "the new one from here on, and their curves jump"
            for key, (what, reads) in SCORING_MODELS.items()
            if model(before, key) != model(after, key)]


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# Validation of layouts: run before building process groups.


def _validate_sizes(parallel: ParallelConfig) -> None:
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size", "expert_model_parallel_size"):
        if getattr(parallel, name) < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(parallel, name)}")


def validate_model(model: ModelConfig, parallel: ParallelConfig) -> None:
    _validate_sizes(parallel)
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if getattr(model, name) < 1:
            raise ConfigError(f"model.{name} must be >= 1, got {getattr(model, name)}")
    heads = model.num_attention_heads
    groups = model.query_groups
    if heads % groups:
        raise ConfigError(f"model.num_attention_heads={heads} is not divisible by "
                          f"model.num_query_groups={groups}")
    if heads % tp:
        raise ConfigError(f"model.num_attention_heads={heads} is not divisible by "
                          f"parallel.tensor_model_parallel_size={tp}")
    if groups % tp:
        raise ConfigError(f"model.num_query_groups={groups} is not divisible by "
                          f"parallel.tensor_model_parallel_size={tp}")
    if model.kv_channels is None and model.hidden_size % heads:
        raise ConfigError(f"model.hidden_size={model.hidden_size} is not divisible by "
                          f"model.num_attention_heads={heads}; set model.kv_channels")
    ffn = model.ffn_size
    if ffn % tp:
        raise ConfigError(f"model.ffn_hidden_size={ffn} is not divisible by "
                          f"parallel.tensor_model_parallel_size={tp}")
    if model.padded_vocab_size % tp:
        raise ConfigError(f"padded vocab size {model.padded_vocab_size} (vocab_size="
                          f"{model.vocab_size}, make_vocab_size_divisible_by="
                          f"{model.make_vocab_size_divisible_by}) is not divisible by "
                          f"parallel.tensor_model_parallel_size={tp}")
    if model.value_heads > 1 and not model.value_head:
        raise ConfigError(f"model.value_heads={model.value_heads} needs a value model "
                          "(model.value_head=true): a policy has no value heads")
    ep = parallel.expert_model_parallel_size
    if ep > 1 and not model.num_experts:
        raise ConfigError(f"parallel.expert_model_parallel_size={ep} needs a mixture-of-experts "
                          "model (model.num_experts)")
    if model.num_experts:
        if model.num_experts % ep:
            raise ConfigError(f"model.num_experts={model.num_experts} is not divisible by "
                              f"parallel.expert_model_parallel_size={ep}")
        if tp > 1 and not parallel.sequence_parallel:  # megatron's MoELayer refuses to train
            raise ConfigError(f"a mixture of experts at tensor_model_parallel_size={tp} needs "
                              "parallel.sequence_parallel=true (megatron-core refuses MoE "
                              "layers under TP without it)")
        if model.moe_router_topk == 1 and not model.moe_router_pre_softmax:
            raise ConfigError("model.moe_router_topk=1 needs model.moe_router_pre_softmax=true "
                              "(a softmax over one chosen logit is 1; megatron-core refuses it)")
        if not model.moe_router_topk <= model.num_experts:
            raise ConfigError(f"model.moe_router_topk={model.moe_router_topk} exceeds "
                              f"model.num_experts={model.num_experts}")
    if model.num_layers % (pp * vpp):
        what = f"pipeline_model_parallel_size={pp}"
        if vpp > 1:
            what += f" x virtual_pipeline_model_parallel_size={vpp}"
        raise ConfigError(f"model.num_layers={model.num_layers} is not divisible by "
                          f"parallel.{what}")


def validate_parallel(parallel: ParallelConfig, world_size: int) -> None:
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    cp = parallel.context_parallel_size
    _validate_sizes(parallel)
    vpp = parallel.virtual_pipeline_model_parallel_size
    if vpp is not None and (vpp < 2 or pp < 2):
        raise ConfigError(f"parallel.virtual_pipeline_model_parallel_size={vpp} needs "
                          f"pipeline_model_parallel_size >= 2 (got {pp}) and a value >= 2")
    if cp != 1:
        raise ConfigError(f"parallel.context_parallel_size={cp} is not supported: attention runs "
                          "on SDPA, which needs the whole sequence on each rank; set it to 1")
    if parallel.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs "
                          "parallel.tensor_model_parallel_size > 1")
    if parallel.overlap_param_gather and not parallel.use_distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs "
                          "parallel.use_distributed_optimizer=true (it overlaps the distributed "
                          "optimizer's parameter all-gather)")
    if world_size % (tp * pp * cp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor_model_parallel_size"
                          f"={tp} x pipeline_model_parallel_size={pp} x context_parallel_size={cp}"
                          f" = {tp * pp * cp}")
    ep = parallel.expert_model_parallel_size
    if world_size % (tp * pp * ep):  # megatron: experts split TP x EP ranks of a stage
        raise ConfigError(f"world size {world_size} is not divisible by tensor_model_parallel_size"
                          f"={tp} x pipeline_model_parallel_size={pp} x "
                          f"expert_model_parallel_size={ep} = {tp * pp * ep}")


def validate_recompute(recompute: RecomputeConfig, model: ModelConfig,
                       parallel: ParallelConfig) -> None:
    if recompute.granularity != "full":
        return
    layers = model.num_layers // parallel.pipeline_model_parallel_size
    limit = model.num_layers if recompute.method == "uniform" else layers
    if recompute.num_layers > limit:
        where = "model.num_layers" if recompute.method == "uniform" else "layers per pipeline stage"
        raise ConfigError(f"recompute.num_layers={recompute.num_layers} exceeds the {limit} "
                          f"{where} (recompute.method={recompute.method})")


def validate(cfg: RunConfig, world_size: int) -> None:
    validate_parallel(cfg.parallel, world_size)
    validate_model(cfg.model, cfg.parallel)
    validate_recompute(cfg.recompute, cfg.model, cfg.parallel)
    data = cfg.data
    dp = world_size // (cfg.parallel.tensor_model_parallel_size
                        * cfg.parallel.pipeline_model_parallel_size
                        * cfg.parallel.context_parallel_size)
    # rollouts hold rollout.n_samples rows per prompt (data.global_batch_size counts prompts)
    rows = data.global_batch_size * cfg.rollout.n_samples
    if rows % (data.micro_batch_size * dp):
        samples = (f" x rollout.n_samples={cfg.rollout.n_samples}"
                   if cfg.rollout.n_samples > 1 else "")
        raise ConfigError(f"data.global_batch_size={data.global_batch_size}{samples} is not "
                          f"divisible by data.micro_batch_size={data.micro_batch_size} x "
                          f"data-parallel size {dp}")
    if 0 < data.micro_batch_tokens < data.seq_length:
        raise ConfigError(f"data.micro_batch_tokens={data.micro_batch_tokens} is below "
                          f"data.seq_length={data.seq_length}: a row of full length would not "
                          "fit in a microbatch")
    if data.micro_batch_tokens > 0 and cfg.parallel.expert_model_parallel_size > 1:
        raise ConfigError(f"data.micro_batch_tokens={data.micro_batch_tokens} needs "
                          "parallel.expert_model_parallel_size=1: expert-parallel ranks run "
                          "as many microbatches, and token budgets give each rank its own count")
    if data.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(f"data.seq_length={data.seq_length} exceeds "
                          f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
