"""What a mixture of experts' routers did in a training update: each layer's expert load and
megatron's router losses, as an update's metrics.

The load is counted by a forward hook on each router, in training forwards only (a frozen
model's scoring passes and the sampler's decoding do not count), and reported per layer as the
busiest and idlest expert's share of the tokens relative to an even split: 1 is balanced, E
means one of E experts took everything. The load-balancing loss and z-loss are the values
megatron's routers record per layer (before their coefficients), averaged over microbatches
and data-parallel replicas.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_dvpo.device import device

ROUTER_LOSSES = ("load_balancing_loss", "z_loss")


class RouterStats:
    """Counts tokens per (layer, expert) in this model's training forwards."""

    def __init__(self, routers: list[TopKRouter], num_layers: int, num_experts: int):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device())
        self.num_layers = num_layers
        for router in routers:
            router.register_forward_hook(self._count)

    @classmethod
    def of(cls, chunks: list[torch.nn.Module]) -> RouterStats | None:
        """The stats of a model with routers; None for a dense one."""
        routers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
        if not routers:
            return None
        config = routers[0].config
        return cls(routers, config.num_layers, config.num_moe_experts)

    def _count(self, router: TopKRouter, inputs, output) -> None:
        if router.training and torch.is_grad_enabled():
            _, routing_map = output
            self.counts[router.layer_number - 1] += routing_map.sum(0).to(torch.float64)

    def take(self, microbatches: int) -> dict[str, float]:
        """The update's metrics (a collective over every rank), then a fresh start."""
        counts = self.counts.clone()
        self.counts.zero_()
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        losses = torch.stack([tracker[n]["values"].double().to(device()) if n in tracker
                              else counts.new_zeros(self.num_layers) for n in ROUTER_LOSSES])
        moe_utils.clear_aux_losses_tracker()
        # the ratios do not depend on how often a token was counted (TP without SP routes
        # every token on each TP rank); the losses are averaged over the ranks holding a layer
        torch.distributed.all_reduce(counts)
        torch.distributed.all_reduce(losses)
        holders = (torch.distributed.get_world_size()
                   / parallel_state.get_pipeline_model_parallel_world_size())
        losses = losses / (holders * max(microbatches, 1))
        routed = counts.sum(1) > 0
        if not routed.any():
            return {}
        share = counts[routed] / counts[routed].mean(1, keepdim=True)
        busiest, idlest = share.max(1).values, share.min(1).values
        metrics = {"moe_expert_load_max": busiest.max().item(),
                   "moe_expert_load_min": idlest.min().item()}
        for name, values in zip(ROUTER_LOSSES, losses):
            if name in tracker:
                metrics[f"moe_{name}"] = values[routed].mean().item()
        layers = routed.nonzero().flatten().tolist()
        metrics.update({f"moe_expert_load_max_layer{i}": v
                        for i, v in zip(layers, busiest.tolist())})
        return metrics
