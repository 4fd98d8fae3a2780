"""Which numerics a model runs in: the layer implementation (TE or local) and the FP8 recipe.

``plan_precision`` is a pure function of the config and of a ``Hardware`` description, so the
routing and every error it raises are testable on a CPU. FP8 is only ever what was asked for:
a machine that cannot run the requested format or recipe is an error, never a bf16 fallback.
Frozen models (the GVM and the reference) run in bf16 whatever the policy trains in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_dvpo.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig

# The oldest Transformer Engine that has each recipe (megatron-core selects them by version too).
RECIPE_MIN_TE = {"delayed": (1, 0), "tensorwise": (2, 2), "blockwise": (2, 3)}
# FP8 GEMMs need every matrix dimension to be a multiple of 16.
FP8_ALIGNMENT = 16


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@dataclass(frozen=True)
class Hardware:
    """What the choice depends on. ``detect()`` reads this machine; tests write one out."""

    cuda: bool = False
    capability: Optional[tuple[int, int]] = None  # compute capability of the local GPU
    te_version: Optional[str] = None  # None: Transformer Engine is not installed
    # TE's own verdict on blockwise scaling, when TE could be asked: (supported, reason).
    block_scaling: Optional[tuple[bool, str]] = None

    @property
    def te(self) -> bool:
        return self.cuda and self.te_version is not None

    @property
    def name(self) -> str:
        if not self.cuda:
            return "this machine has no CUDA GPU"
        return f"this GPU is sm_{self.capability[0]}{self.capability[1]}"

    @staticmethod
    @functools.cache
    def detect() -> "Hardware":
        version = _te_version()
        if not torch.cuda.is_available():
            return Hardware(te_version=version)
        block = _te_block_scaling_verdict() if version is not None else None
        return Hardware(cuda=True, capability=torch.cuda.get_device_capability(),
                        te_version=version, block_scaling=block)


def _te_block_scaling_verdict() -> Optional[tuple[bool, str]]:
    """TE's own (supported, reason) for blockwise FP8 scaling, which knows the CUDA and driver
    conditions: ``check_fp8_block_scaling_support`` lives in ``transformer_engine.pytorch.fp8``
    in earlier TE 2.x releases and in ``transformer_engine.pytorch.quantization`` in later ones.
    None where neither has it (TE < 2.3): the plan then requires sm_90."""
    for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            check = importlib.import_module(module).check_fp8_block_scaling_support
        except (ImportError, AttributeError):
            continue
        return tuple(check())
    return None


def _te_version() -> Optional[str]:
    if importlib.util.find_spec("transformer_engine") is None:
        return None
    for dist in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "0.0"


@dataclass(frozen=True)
class PrecisionPlan:
    use_te: bool
    fp8: Optional[str] = None  # "hybrid" | "e4m3"; None: no FP8
    fp8_recipe: Optional[str] = None
    bf16_layers_at_start: int = 0
    bf16_layers_at_end: int = 0
    fp8_param_gather: bool = False
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"

    def transformer_config_kwargs(self) -> dict:
        """The FP8 fields of megatron's TransformerConfig (empty without FP8)."""
        if self.fp8 is None:
            return {}
        bf16_layers = self.bf16_layers_at_start + self.bf16_layers_at_end > 0
        return dict(fp8=self.fp8, fp8_recipe=self.fp8_recipe, fp8_param=self.fp8_param_gather,
                    first_last_layers_bf16=bf16_layers,
                    num_layers_at_start_in_bf16=self.bf16_layers_at_start,
                    num_layers_at_end_in_bf16=self.bf16_layers_at_end,
                    fp8_amax_history_len=self.amax_history_len,
                    fp8_amax_compute_algo=self.amax_compute_algo)

    def describe(self) -> str:
        impl = "Transformer Engine" if self.use_te else "local"
        if self.fp8 is None:
            return f"{impl} layers, no FP8"
        extra = ""
        if self.bf16_layers_at_start or self.bf16_layers_at_end:
            extra = (f", first {self.bf16_layers_at_start} and last {self.bf16_layers_at_end} "
                     "layers in bf16")
        if self.fp8_param_gather:
            extra += ", FP8 parameters gathered in FP8"
        return f"{impl} layers, FP8 {self.fp8} with {self.fp8_recipe} scaling{extra}"


def _check_fp8_hardware(precision: PrecisionConfig, hw: Hardware) -> None:
    asked = f"precision.fp8={precision.fp8} (fp8_recipe={precision.fp8_recipe})"
    hint = "FP8 never falls back to bf16 silently; unset precision.fp8 to train in bf16."
    if precision.transformer_impl == "local":
        raise ConfigError(f"{asked} needs Transformer Engine layers, but "
                          f"precision.transformer_impl=local. {hint}")
    if not hw.cuda:
        raise ConfigError(f"{asked} needs FP8 support on a CUDA GPU (Hopper or newer) with "
                          f"Transformer Engine; {hw.name}. {hint}")
    if hw.te_version is None:
        raise ConfigError(f"{asked} needs Transformer Engine (NGC PyTorch container, or the `gpu` "
                          f"extra), which is not installed. {hint}")
    if hw.capability < (8, 9):
        raise ConfigError(f"{asked} needs FP8 support: compute capability 8.9 or newer (Ada, "
                          f"Hopper, Blackwell); {hw.name}. {hint}")
    need = RECIPE_MIN_TE[precision.fp8_recipe]
    if _version_tuple(hw.te_version) < need:
        raise ConfigError(f"{asked} needs Transformer Engine >= {need[0]}.{need[1]}; "
                          f"installed: {hw.te_version}. {hint}")
    if precision.fp8_recipe == "blockwise":
        if hw.block_scaling is not None and not hw.block_scaling[0]:
            raise ConfigError(f"{asked}: Transformer Engine says blockwise scaling cannot run "
                              f"here ({hw.block_scaling[1]}). {hint}")
        if hw.block_scaling is None and hw.capability[0] != 9:
            raise ConfigError(f"{asked} needs a Hopper GPU (sm_90); {hw.name}. {hint}")


def _check_fp8_model(precision: PrecisionConfig, parallel: ParallelConfig,
                     model: ModelConfig) -> None:
    start, end = precision.num_layers_at_start_in_bf16, precision.num_layers_at_end_in_bf16
    per_stage = model.num_layers // parallel.pipeline_model_parallel_size
    for key, value in (("num_layers_at_start_in_bf16", start), ("num_layers_at_end_in_bf16", end)):
        if value < 0:
            raise ConfigError(f"precision.{key} must be >= 0, got {value}")
        if value > per_stage:
            raise ConfigError(f"precision.{key}={value} exceeds the {per_stage} layers of a "
                              f"pipeline stage (model.num_layers={model.num_layers} / "
                              f"pipeline_model_parallel_size="
                              f"{parallel.pipeline_model_parallel_size})")
    if start + end >= model.num_layers:
        raise ConfigError(f"precision.num_layers_at_start_in_bf16={start} + "
                          f"num_layers_at_end_in_bf16={end} leave none of the "
                          f"{model.num_layers} layers in FP8")
    tp = parallel.tensor_model_parallel_size
    ffn = model.ffn_size
    for what, size in (("model.hidden_size", model.hidden_size),
                       ("model.ffn_hidden_size / tensor_model_parallel_size", ffn // tp)):
        if size % FP8_ALIGNMENT:
            raise ConfigError(f"FP8 GEMMs need dimensions divisible by {FP8_ALIGNMENT}: "
                              f"{what} = {size}")


def plan_precision(precision: PrecisionConfig, parallel: ParallelConfig,
                   model: Optional[ModelConfig], hw: Hardware) -> PrecisionPlan:
    """Resolve ``precision`` on ``hw``; asking for what cannot run is an error, not a fallback.

    ``model=None`` checks only what does not depend on the model (used before a DVPO job has read
    its policy's config).
    """
    impl = precision.transformer_impl
    if impl == "transformer_engine" and not hw.te:
        missing = hw.name if not hw.cuda else "transformer_engine is not installed"
        raise ConfigError("precision.transformer_impl=transformer_engine needs a CUDA GPU and the "
                          "transformer_engine package (NGC PyTorch container, or the `gpu` extra)"
                          f"; {missing}")
    use_te = impl == "transformer_engine" or (impl == "auto" and hw.te)
    fp8_only = {"num_layers_at_start_in_bf16": precision.num_layers_at_start_in_bf16,
                "num_layers_at_end_in_bf16": precision.num_layers_at_end_in_bf16,
                "fp8_param_gather": precision.fp8_param_gather}
    if precision.fp8 is None:
        for key, value in fp8_only.items():
            if value:
                raise ConfigError(f"precision.{key}={value} only applies to FP8 training: set "
                                  "precision.fp8 (hybrid or e4m3) or leave it unset")
        return PrecisionPlan(use_te=use_te)
    if precision.params_dtype != "bf16":
        raise ConfigError(f"precision.fp8={precision.fp8} trains bf16 parameters with FP8 "
                          f"GEMMs: set precision.params_dtype=bf16 (got "
                          f"{precision.params_dtype})")
    if precision.fp8_recipe == "delayed" and (precision.num_layers_at_start_in_bf16
                                              or precision.num_layers_at_end_in_bf16):
        raise ConfigError("precision.fp8_recipe=delayed cannot keep first/last layers in bf16 "
                          "(its amax reduction spans the whole block): use fp8_recipe=tensorwise "
                          "or blockwise, or set num_layers_at_start/end_in_bf16=0")
    if precision.fp8_param_gather and not parallel.use_distributed_optimizer:
        raise ConfigError("precision.fp8_param_gather=true keeps FP8 parameters and all-gathers "
                          "them from the distributed optimizer's shards: set "
                          "parallel.use_distributed_optimizer=true")
    if model is not None:
        _check_fp8_model(precision, parallel, model)
    _check_fp8_hardware(precision, hw)
    return PrecisionPlan(use_te=True, fp8=precision.fp8, fp8_recipe=precision.fp8_recipe,
                         bf16_layers_at_start=precision.num_layers_at_start_in_bf16,
                         bf16_layers_at_end=precision.num_layers_at_end_in_bf16,
                         fp8_param_gather=precision.fp8_param_gather,
                         amax_history_len=precision.fp8_amax_history_len,
                         amax_compute_algo=precision.fp8_amax_compute_algo)


def inference_precision(precision: PrecisionConfig) -> PrecisionConfig:
    """The precision of a frozen model (GVM, reference, reward model): the run's, without FP8."""
    return dataclasses.replace(precision, fp8=None, fp8_param_gather=False,
                               num_layers_at_start_in_bf16=0, num_layers_at_end_in_bf16=0)


@contextlib.contextmanager
def fp8_disabled(model_chunks: list[torch.nn.Module]):
    """Forward passes in bf16 on a model built for FP8 training: rollout generation.

    megatron enters FP8 autocast per forward from ``config.fp8``, which every layer of a model
    shares; with it off, TE's linear modules (TE 2.x ``Linear``/``LayerNormLinear``/
    ``LayerNormMLP``) take the non-FP8 branch, ``cast_if_needed(weight, activation_dtype)``,
    and run bf16 GEMMs. With FP8 primary weights (``precision.fp8_param_gather``) the weight is
    a ``Float8Tensor`` and that cast dequantizes it: the rollout computes in bf16 over the
    FP8-rounded weights the training forward also uses (the bf16 master copy lives in the
    distributed optimizer), so ``rollout/logprob_diff`` measures the FP8 activations and GEMMs
    of training, not a weight mismatch.
    """
    configs = {id(chunk.config): chunk.config for chunk in model_chunks}.values()
    saved = [(config, config.fp8) for config in configs]
    for config in configs:
        config.fp8 = None
    try:
        yield
    finally:
        for config, fp8 in saved:
            config.fp8 = fp8


# Attributes megatron reads at forward time to decide on sequence-parallel communication: the
# linear layers', the embedding's reduce-scatter and our value head's.
SEQUENCE_PARALLEL_FLAGS = ("sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def sequence_parallel_disabled(model_chunks: list[torch.nn.Module]):
    """Plain tensor parallelism on a model built for sequence parallelism: decoding. A decode
    step has one token per row, which cannot be split over the tensor-parallel ranks; with
    sequence parallelism off the same weights compute the same numbers with all-reduces
    instead of reduce-scatters and all-gathers."""
    saved = []
    for chunk in model_chunks:
        for module in [chunk.config, *chunk.modules()]:
            for name in SEQUENCE_PARALLEL_FLAGS:
                if getattr(module, name, None) is True:
                    saved.append((module, name))
                    setattr(module, name, False)
    try:
        yield
    finally:
        for module, name in saved:
            setattr(module, name, True)
