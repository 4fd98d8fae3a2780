"""Build megatron-core ``GPTModel``s (dense Llama, Mistral, Qwen2/3 and MoE shapes) from our
config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_dvpo.config import (ModelConfig, ParallelConfig, PrecisionConfig, RecomputeConfig,
                                  RunConfig)
from megatron_dvpo.device import device
from megatron_dvpo.models.precision import Hardware, PrecisionPlan, plan_precision
from megatron_dvpo.models.spec import decoder_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig,
                       plan: PrecisionPlan, initialize: bool = True,
                       recompute: RecomputeConfig = RecomputeConfig()) -> TransformerConfig:
    dtype = DTYPES[precision.params_dtype]
    on_gpu = torch.cuda.is_available()
    swiglu = model.activation == "swiglu"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        **_moe_kwargs(model, parallel, on_gpu),
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # On CPU, master weights are drawn whole and then split (the only initialisation that
        # works there), so every TP layout starts from the same function. GPU runs initialise on
        # the device; real runs load a checkpoint anyway.
        use_cpu_initialization=not on_gpu,
        # initialize=False leaves parameters allocated but unwritten: a skeleton for conversion
        # or loading, whose untouched pages cost no memory.
        perform_initialization=initialize,
        # gloo mismatches batched sends and receives to the same peer under interleaved PP and
        # gives silently wrong results (NOTES.md); plain isend/irecv is correct.
        batch_p2p_comm=on_gpu,
        **recompute.transformer_config_kwargs(),
        **plan.transformer_config_kwargs(),
    )


def _moe_kwargs(model: ModelConfig, parallel: ParallelConfig, on_gpu: bool) -> dict:
    """megatron's MoE settings; none for a dense model. The experts are a SequentialMLP of the
    layer's own linear layers (no grouped GEMM), so their weights are named and sharded like
    the dense MLP's."""
    if not model.num_experts:
        return {}
    return dict(
        num_moe_experts=model.num_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.expert_ffn_size,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_dtype=model.moe_router_dtype,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_z_loss_coeff=model.moe_z_loss_coeff,
        moe_grouped_gemm=False,
        # alltoall builds torch.cuda.Stream()s (token_dispatcher.py): allgather on CPU
        moe_token_dispatcher_type="alltoall" if on_gpu else "allgather",
        expert_model_parallel_size=parallel.expert_model_parallel_size,
    )


def build_gpt_model(cfg: RunConfig, pre_process: bool | None = None,
                    post_process: bool | None = None, vp_stage: int | None = None,
                    model_class=GPTModel, initialize: bool = True,
                    **model_kwargs) -> GPTModel:
    """A GPTModel for this rank's pipeline stage (the layers of ``vp_stage`` under VPP)."""
    model = cfg.model
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                             vp_stage=vp_stage)
    plan = plan_precision(cfg.precision, cfg.parallel, model, Hardware.detect())
    config = transformer_config(model, cfg.parallel, cfg.precision, plan, initialize,
                                cfg.recompute)
    gpt = model_class(
        config=config,
        transformer_layer_spec=decoder_spec(model, config, plan.use_te, vp_stage),
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type=model.position_embedding_type,
        rotary_percent=model.rotary_percent,
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
        **model_kwargs,
    )
    if model.rope_scaling_factor is not None and model.position_embedding_type == "rope":
        _apply_llama3_rope_scaling(gpt, model)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def build_model_chunks(cfg: RunConfig, model_class=GPTModel, initialize: bool = True,
                       **model_kwargs) -> list[GPTModel]:
    """One model per virtual pipeline stage (a single one without VPP), as the schedules expect."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else range(vpp)
    return [build_gpt_model(cfg, vp_stage=stage, model_class=model_class, initialize=initialize,
                            **model_kwargs) for stage in stages]


def _apply_llama3_rope_scaling(gpt: GPTModel, model: ModelConfig) -> None:
    # megatron hard-codes Llama-3.1's low/high factors and original context; HF configs carry
    # their own, so recompute the scaled frequencies with the configured ones.
    rope = gpt.rotary_pos_emb
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq, factor=model.rope_scaling_factor,
        low_freq_factor=model.rope_scaling_low_freq_factor,
        high_freq_factor=model.rope_scaling_high_freq_factor,
        original_max_position_embeddings=model.rope_scaling_original_max_position)


def count_parameters(chunks: list[torch.nn.Module]) -> tuple[int, int]:
    """(parameters on this rank, parameters of the whole model) across TP and PP.

    TP-replicated tensors count once; the tied copy of the embedding on the last stage is skipped.
    """
    local = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    unique = 0
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        tied = getattr(chunk, "share_embeddings_and_output_weights", False)
        for name, p in chunk.named_parameters():
            if name == "output_layer.weight" and tied:
                continue
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                unique += p.numel()
    total = torch.tensor([unique], dtype=torch.int64, device=device())
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return local, int(total.item())


def training_flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Model FLOPs of one trained token (forward + backward), for MFU.

    The standard 6·N plus attention (PaLM's 12·L·s·d_attn, no causal discount). N counts the
    parameters that multiply: attention and MLP matrices and the LM head (a value model's
    head: one column); norms, biases and the embedding lookup do no matrix work. In a mixture
    of experts a token multiplies by its top-k experts, the router and any shared expert (the
    active parameters), not by every expert.
    """
    heads = model.num_attention_heads
    groups, head_dim = model.query_groups, model.head_dim
    attn = heads * head_dim
    hidden = model.hidden_size
    mlp_matrices = 3 if model.activation == "swiglu" else 2
    if model.num_experts:
        shared = model.moe_shared_expert_intermediate_size or 0
        mlp = (mlp_matrices * hidden * (model.moe_router_topk * model.expert_ffn_size + shared)
               + hidden * (model.num_experts + model.moe_shared_expert_gate))
    else:
        mlp = mlp_matrices * hidden * model.ffn_size
    per_layer = hidden * (attn + 2 * groups * head_dim) + attn * hidden + mlp
    head = 1 if model.value_head else model.padded_vocab_size
    matmul_params = model.num_layers * per_layer + model.hidden_size * head
    return 6.0 * matmul_params + 12.0 * model.num_layers * seq_length * attn
