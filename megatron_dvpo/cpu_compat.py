"""Run real megatron-core on a CPU-only torch (gloo), for CI and laptops.

megatron-core assumes CUDA in a handful of places that no config flag avoids. Every accommodation
lives here, each with the upstream call it works around. ``install()`` is called by
``megatron_dvpo.distributed.init_distributed`` only when CUDA is absent; it is never a side effect
of importing library code, and it is a strict no-op when CUDA is present.

Two mechanisms, both plain attribute replacement (a global ``TorchFunctionMode`` is not active
inside autograd backward, so activation recompute would break with one):

* Upstream modules that name ``torch.cuda.current_device()``, ``device="cuda"`` or
  ``torch.cuda.synchronize()`` get a module-local ``torch`` that redirects those to the CPU. The
  real ``torch`` module is untouched, so nothing outside those modules sees a difference.
* The RNG tracker, ``Tensor.type()`` and ``Tensor.cuda()``, which cannot be scoped to a module.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

# Upstream modules that get the CPU-redirecting ``torch`` and the calls in them that need it
# (megatron-core 0.16.1).
_REDIRECTED_MODULES = {
    # forward_backward_*: total_num_tokens = torch.zeros([], device="cuda")
    "megatron.core.pipeline_parallel.schedules": "torch.zeros(device='cuda')",
    # recv buffers on torch.cuda.current_device(); torch.cuda.synchronize() after batched p2p
    "megatron.core.pipeline_parallel.p2p_communication": "current_device, synchronize",
    # RotaryEmbedding.get_emb: inv_freq.to(device=torch.cuda.current_device())
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "current_device",
    # Attention._allocate_memory: the static KV cache on torch.cuda.current_device()
    "megatron.core.transformer.attention": "current_device",
    # GPTModel.forward: sequence_len_offset tensor on torch.cuda.current_device()
    "megatron.core.models.gpt.gpt_model": "current_device",
    # ColumnParallelLinear/RowParallelLinear: weight and all-gather buffers on current_device()
    "megatron.core.tensor_parallel.layers": "current_device",
    # gather/reduce-scatter output buffers on torch.cuda.current_device()
    "megatron.core.tensor_parallel.mappings": "current_device",
    # GlobalMemoryBuffer.get_tensor, norm helpers: current_device() and device="cuda"
    "megatron.core.utils": "current_device, device='cuda'",
    # ParamAndGradBuffer: buffers on current_device(), torch.cuda.stream/default_stream
    "megatron.core.distributed.param_and_grad_buffer": "current_device, streams",
    # DistributedDataParallel: torch.cuda.Stream for overlapped grad reduce
    "megatron.core.distributed.distributed_data_parallel": "Stream, synchronize",
    # MixedPrecisionOptimizer/FP32Optimizer: found_inf, _scale on device='cuda'; empty_cache()
    "megatron.core.optimizer.optimizer": "device='cuda', empty_cache",
    # fp16's loss scalers: scale, growth and backoff tensors on device='cuda'
    "megatron.core.optimizer.grad_scaler": "device='cuda'",
    # DistributedOptimizer: shard buffers on torch.cuda.current_device()
    "megatron.core.optimizer.distrib_optimizer": "current_device",
    # get_grad_norm_fp32 / clip_grad_by_total_norm_fp32: device='cuda' scratch tensors
    "megatron.core.optimizer.clip_grads": "device='cuda'",
    # dist_checkpointing save: torch.cuda.synchronize() before writing
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "synchronize",
    # save: verify-reuse and failure flags on device='cuda' / current_device()
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "device='cuda'",
    # async save bookkeeping: torch.cuda.synchronize(), flags on current_device()
    "megatron.core.dist_checkpointing.strategies.async_utils": "synchronize, current_device",
    # parallel_state barrier helpers: torch.cuda.synchronize()
    "megatron.core.parallel_state": "synchronize",
    # activation recompute (CheckpointFunction) saves torch.cuda.random.get_rng_state()
    "megatron.core.tensor_parallel.random": "random.get_rng_state",
    # TopKRouter: weights moved to, and aux-loss scratch made on, torch.cuda.current_device()
    "megatron.core.transformer.moe.router": "current_device",
    # GroupedMLP/SequentialMLP helpers: expert buffers on torch.cuda.current_device()
    "megatron.core.transformer.moe.experts": "current_device",
    # the MoE metrics tracker: per-layer loss values on device="cuda"
    "megatron.core.transformer.moe.moe_utils": "device='cuda'",
}

_CPU = torch.device("cpu")
_installed: dict[str, object] = {}


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_factory(fn):
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = fn.__name__
    return factory


class _NoStream:
    """Stands in for torch.cuda.Stream: CPU ops are already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event


class _NoCudaRandom:
    """``torch.cuda.random`` without a CUDA generator: its state is empty (the CPU generator's,
    which recompute saves and restores as well, is the one in use)."""

    @staticmethod
    def get_rng_state(device=None):
        return torch.empty(0, dtype=torch.uint8)


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by redirected modules: the current device is the CPU."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.Stream = _NoStream
        self.random = _NoCudaRandom()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return _CPU

    @staticmethod
    def synchronize(device=None):
        pass

    @staticmethod
    def empty_cache():
        pass

    @staticmethod
    def stream(stream):
        return contextlib.nullcontext()

    @staticmethod
    def default_stream(device=None):
        return _NoStream()

    current_stream = default_stream


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by redirected modules; everything but CUDA placement is the real torch."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in ("zeros", "empty", "ones", "full", "tensor", "arange"):
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


_TYPE_NAMES_AS_CUDA = {"torch.FloatTensor", "torch.HalfTensor", "torch.BFloat16Tensor"}


def _tensor_type_as_cuda(original):
    # DistributedOptimizer._build_model_and_main_param_groups, Float16OptimizerWithFloat16Params
    # and clip_grad_by_total_norm_fp32 assert `param.type() == 'torch.cuda.FloatTensor'`.
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return "torch.cuda." + name[len("torch."):] if name in _TYPE_NAMES_AS_CUDA else name
        return original(self, dtype, non_blocking, **kwargs)

    return type_


def _tensor_cuda_stays_on_cpu(self, device=None, non_blocking=False, **kwargs):
    # LanguageModule.setup_embeddings_and_output_layer: weight.data = weight.data.cuda() before
    # the tied-embedding all-reduce under PP; also rope_utils (CP) and dist_checkpointing's
    # exchange_utils. A CPU-only torch raises on any .cuda(), so staying on CPU changes nothing
    # that worked before.
    return self


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """Named CPU generator states: megatron's tracker keeps CUDA generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    return CpuRNGStatesTracker


def install() -> bool:
    """Install the CPU accommodations; returns False (and changes nothing) when CUDA is present."""
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    cpu_torch = _CpuTorch()
    for name in _REDIRECTED_MODULES:
        module = importlib.import_module(name)
        _installed[name] = module.torch
        module.torch = cpu_torch

    _installed["Tensor.type"] = torch.Tensor.type
    torch.Tensor.type = _tensor_type_as_cuda(torch.Tensor.type)
    _installed["Tensor.cuda"] = torch.Tensor.cuda
    torch.Tensor.cuda = _tensor_cuda_stays_on_cpu

    # model_parallel_cuda_manual_seed and every dropout fork use the CUDA RNG tracker.
    from megatron.core.tensor_parallel import random as mp_random

    _installed["rng_tracker"] = (mp_random._CUDA_RNG_STATE_TRACKER,
                                 mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    mp_random._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    # RouterGatingLinearFunction.forward tests `te_general_gemm is not None`, but without
    # Transformer Engine megatron-core 0.16.1 never defines the name (moe_utils.py:34): NameError
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        _installed["moe_utils.te_general_gemm"] = True
    return True


def is_installed() -> bool:
    return bool(_installed)


def uninstall() -> None:
    """Undo ``install()``; used by tests that check the accommodations are scoped."""
    if not _installed:
        return
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER, mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = (
        _installed.pop("rng_tracker"))
    torch.Tensor.type = _installed.pop("Tensor.type")
    torch.Tensor.cuda = _installed.pop("Tensor.cuda")
    if _installed.pop("moe_utils.te_general_gemm", False):
        from megatron.core.transformer.moe import moe_utils

        del moe_utils.te_general_gemm
    for name, original in _installed.items():
        importlib.import_module(name).torch = original
    _installed.clear()
