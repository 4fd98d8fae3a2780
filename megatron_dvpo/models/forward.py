"""Forward passes every trainer shares: per-token log-probs of a policy and values of a GVM.

Both run through megatron-core's pipeline schedule, so the same call works at any TP/PP/VPP
layout, forward-only or forward-backward, with microbatches. Per-token outputs exist on the last
pipeline stage only; other stages get empty lists.
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch.utils.checkpoint import checkpoint

from megatron_dvpo.distributed import max_over_expert_group
from megatron_dvpo.models.precision import FP8_ALIGNMENT

# head(model_output, batch) -> per-token tensors; loss_fn(outputs, batch) -> (loss, metrics)
Head = Callable[[torch.Tensor, dict], dict]
LossFn = Callable[[dict, dict], tuple]


def vocab_parallel_logprobs(logits: torch.Tensor, labels: torch.Tensor,
                            vocab_size: int) -> torch.Tensor:
    """log p(labels) from TP-sharded logits [b, s, v/tp], without gathering the vocabulary.

    Embedding padding columns (ids >= vocab_size) are masked out, so probabilities match an
    unpadded model exactly. ``logits`` is left as it is: megatron's cross entropy works in
    place on its input, so it gets a copy of its own (``.float()`` and ``.contiguous()`` return
    the same storage for fp32 contiguous logits, and the entropy is computed from them after).
    """
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    if start + shard > vocab_size:  # masked_fill writes a new tensor
        ids = torch.arange(start, start + shard, device=logits.device)
        own = logits.float().masked_fill(ids >= vocab_size, float("-inf"))
    else:
        own = logits.float().contiguous()
        if own.data_ptr() == logits.data_ptr():
            own = own.clone()
    return -tensor_parallel.vocab_parallel_cross_entropy(own, labels.contiguous())


def vocab_parallel_entropy(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Entropy of softmax(logits) from TP-sharded logits [b, s, v/tp], differentiable."""
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    logits = logits.float()
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    valid = torch.arange(start, start + shard, device=logits.device) < vocab_size
    logits = logits.masked_fill(~valid, float("-inf"))
    top = logits.max(-1, keepdim=True).values.detach()
    torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_tensor_model_parallel_group())
    shifted = (logits - top).masked_fill(~valid, 0.0)
    exp = shifted.exp() * valid
    total = reduce_from_tensor_model_parallel_region(exp.sum(-1))
    weighted = reduce_from_tensor_model_parallel_region((exp * shifted).sum(-1))
    return total.log() - weighted / total


def logit_temperature(sampling_temperature: float) -> float:
    """The temperature log-probs are computed at: the sampler's, or 1 for greedy decoding."""
    return sampling_temperature if sampling_temperature > 0 else 1.0


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``; the logits themselves at 1, so that the common case makes no
    copy of a vocabulary-wide tensor."""
    return logits if temperature == 1.0 else logits / temperature


# Positions whose vocabulary-wide softmax is computed at once (and recomputed in the backward
# pass) by the log-prob head of RL: bounds its fp32 temporaries at any response length.
LOGPROB_CHUNK = 128


def policy_logprobs_head(vocab_size: int, temperature: float = 1.0,
                         entropy: bool = False, entropy_grad: bool = False, start: int = 0,
                         chunk: int = 0) -> Head:
    """Log-prob of each next token under ``softmax(logits / temperature)``:
    ``logprobs[:, t] = log p(tokens[:, start+t+1] | tokens[:, :start+t+1])``; with ``entropy``
    also the entropy of that distribution at each position (differentiable with
    ``entropy_grad``).

    RL log-probs use the temperature the rollout sampled with (docs/algorithm.md, section 2),
    and only the response's positions: ``start`` skips the prompt's (``prompt_width - 1``).
    With ``chunk`` > 0 the positions go through in chunks of that many, each recomputed in the
    backward pass, so that the fp32 temporaries of the vocabulary-wide softmax exist for one
    chunk at a time instead of being kept for every position.
    """

    def positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple:
        logits = tempered(logits, temperature)
        logprobs = vocab_parallel_logprobs(logits, labels, vocab_size)
        if not entropy:
            return (logprobs,)
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            return logprobs, vocab_parallel_entropy(logits, vocab_size)

    def head(logits: torch.Tensor, batch: dict) -> dict:
        skipped = batch["tokens"].shape[1] - logits.shape[1]  # positions the LM head skipped
        logits, labels = logits[:, start - skipped:-1], batch["tokens"][:, start + 1:]
        width = logits.shape[1]
        if chunk <= 0 or chunk >= width:
            parts = [positions(logits, labels)]
        else:
            run = (partial(checkpoint, positions, use_reentrant=False)
                   if torch.is_grad_enabled() else positions)
            parts = [run(logits[:, i:i + chunk], labels[:, i:i + chunk])
                     for i in range(0, width, chunk)]
        names = ("logprobs", "entropy")[:len(parts[0])]
        return {name: torch.cat([p[k] for p in parts], dim=1) for k, name in enumerate(names)}

    head.logits_from = start  # run_microbatches runs the LM head from here on
    return head


def gvm_values_head(values: torch.Tensor, batch: dict) -> dict:
    """One value per position: ``values[:, t]`` has read ``tokens[:, :t+1]``."""
    return {"values": values}


def make_microbatches(micro_batch_size: int, **tensors: torch.Tensor) -> list[dict]:
    """Split [B, ...] tensors (``tokens`` required) into microbatches of ``micro_batch_size``."""
    total = tensors["tokens"].shape[0]
    if total % micro_batch_size:
        raise ValueError(f"batch of {total} rows is not divisible by micro_batch_size "
                         f"{micro_batch_size}")
    return [{k: v[i:i + micro_batch_size] for k, v in tensors.items()}
            for i in range(0, total, micro_batch_size)]


def token_budget_microbatches(tokens_per_microbatch: int, lengths: torch.Tensor,
                              group: int = 1, **tensors: torch.Tensor) -> list[dict]:
    """Rows sorted by length into microbatches of at most ``tokens_per_microbatch`` tokens (rows
    x the longest row; a longer unit goes alone), each cut to its longest row: far less padding
    than fixed-size microbatches on a length-skewed batch. Every tensor of two or more
    dimensions is ``[rows, columns, ...]`` with its columns ending where ``tokens``' end, and
    loses the same trailing columns. Consecutive groups of ``group`` rows (a preference pair)
    stay together, in order. Losses normalised by global counts give the same gradients as
    with fixed microbatches."""
    if lengths.shape[0] % group:
        raise ValueError(f"{lengths.shape[0]} rows do not split into groups of {group}")
    unit_lengths = lengths.view(-1, group).max(1).values.tolist()
    groups: list[list[int]] = []
    for unit in sorted(range(len(unit_lengths)), key=lambda u: -unit_lengths[u]):
        current = groups[-1] if groups else []
        if not current or (len(current) + 1) * group * unit_lengths[current[0]] > \
                tokens_per_microbatch:
            groups.append(current := [])
        current.append(unit)
    width = tensors["tokens"].shape[1]
    microbatches = []
    for units in groups:
        index = torch.tensor([u * group + k for u in units for k in range(group)],
                             device=tensors["tokens"].device)
        cut = width - int(unit_lengths[units[0]])
        microbatches.append({k: v[index][:, :v.shape[1] - cut] if v.dim() > 1 else v[index]
                             for k, v in tensors.items()})
    return microbatches


def split_microbatches(micro_batch_size: int, micro_batch_tokens: int, lengths: torch.Tensor,
                       group: int = 1, **tensors: torch.Tensor) -> list[dict]:
    """``data.micro_batch_tokens`` > 0: token-budget microbatches; otherwise
    ``micro_batch_size`` rows each, at the batch's width."""
    if micro_batch_tokens > 0:
        return token_budget_microbatches(micro_batch_tokens, lengths, group, **tensors)
    return make_microbatches(micro_batch_size, **tensors)


def sequence_multiple(model_chunks: list[torch.nn.Module]) -> int:
    """FP8 GEMMs need the token dimension aligned, and sequence parallelism splits it over the
    tensor-parallel ranks; other numerics take any length."""
    config = model_chunks[0].config
    multiple = FP8_ALIGNMENT if getattr(config, "fp8", None) else 1
    if config.sequence_parallel:
        multiple = math.lcm(multiple, config.tensor_model_parallel_size)
    return multiple


def padding_mask(left_pad: torch.Tensor, seq: int) -> torch.Tensor:
    """[b, 1, seq, seq] dense mask of left-padded rows' padding keys (True = masked)."""
    columns = torch.arange(seq, device=left_pad.device)
    return (columns[None, :] < left_pad[:, None])[:, None, None, :].expand(-1, -1, seq, -1)


def move_padding_right(tokens: torch.Tensor, left_pad: torch.Tensor) -> torch.Tensor:
    """Each left-padded row rotated so that it starts at column 0, its padding at the end."""
    seq = tokens.shape[1]
    columns = torch.arange(seq, device=tokens.device)[None, :] + left_pad[:, None]
    return tokens.gather(1, columns % seq)


def restore_left_padding(hidden: torch.Tensor, left_pad: torch.Tensor,
                         start: int = 0) -> torch.Tensor:
    """Sequence-first [s, b, h] hidden states of rows moved by ``move_padding_right`` back to the
    left-padded columns, positions ``start:`` only (the padding columns hold garbage)."""
    seq = hidden.shape[0]
    rows = torch.arange(start, seq, device=hidden.device)[:, None] - left_pad[None, :]
    index = (rows % seq)[:, :, None].expand(-1, -1, hidden.shape[2])
    return hidden.gather(0, index)


def model_inputs(batch: dict, length: int, padding_right: bool = True) -> tuple:
    """(tokens, position_ids, attention_mask) right-padded to ``length``.

    Causal attention keeps the padding invisible to the real positions, whose outputs are then
    exactly those of the unpadded batch. Left-padded rows (``batch["left_pad"]``, rollouts) are
    moved to start at column 0 with ``padding_right``, so attention stays plain causal (SDPA's
    flash path, no [s, s] mask); otherwise (sequence parallelism) they get a dense padding mask.
    """
    tokens = batch["tokens"]
    seq = tokens.shape[1]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(seq, device=tokens.device).expand_as(tokens)
    mask = batch.get("attention_mask")
    if "left_pad" in batch:
        if padding_right:
            tokens = move_padding_right(tokens, batch["left_pad"])
        else:
            mask = padding_mask(batch["left_pad"], seq)
    extra = length - seq
    if extra:
        tokens = F.pad(tokens, (0, extra))
        tail = torch.arange(1, extra + 1, device=tokens.device)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + tail], dim=1)
        if mask is not None:  # [b, 1, q, k]: padding keys and queries are not masked out
            mask = F.pad(mask, (0, extra, 0, extra if mask.shape[-2] > 1 else 0), value=False)
    return tokens, position_ids, mask


class _OutputLayerInput:
    """What the last stage's output layer (LM or value head) reads: positions ``start:`` only,
    so a prompt's logits are never computed when only the response is scored, and rows moved by
    ``move_padding_right`` back to their left-padded columns (set per microbatch as
    ``left_pad``). Neither under sequence parallelism, where the head's input is split over the
    sequence: there rows keep their padding mask and every position is computed."""

    def __init__(self, model_chunks: list[torch.nn.Module], start: int):
        self.sequence_parallel = model_chunks[0].config.sequence_parallel
        self.start = 0 if self.sequence_parallel else max(start, 0)
        self.left_pad: Optional[torch.Tensor] = None
        self.layers = [module.output_layer
                       for module in (getattr(c, "module", c) for c in model_chunks)
                       if getattr(module, "post_process", False)
                       and hasattr(module, "output_layer")]

    def _view(self, hidden: torch.Tensor) -> torch.Tensor:  # sequence-first: [s, b, h]
        if self.left_pad is not None:
            return restore_left_padding(hidden, self.left_pad, self.start)
        return hidden[self.start:]

    def __enter__(self):
        if not self.sequence_parallel:
            for layer in self.layers:
                layer.forward = partial(lambda forward, hidden, *args, **kwargs:
                                        forward(self._view(hidden), *args, **kwargs),
                                        layer.forward)
        return self

    def __exit__(self, *exc):
        if not self.sequence_parallel:
            for layer in self.layers:
                del layer.forward  # the class's own again


def padded_lengths(widths: list[int], multiple: int) -> list[int]:
    """Each microbatch's width rounded up to ``multiple``, then to the largest over the ranks
    that exchange tokens with this one (expert parallelism), which must run as many."""
    agreed = max_over_expert_group([len(widths), *(-(-w // multiple) * multiple for w in widths)])
    if agreed[0] != len(widths):
        raise ValueError(f"{len(widths)} microbatches here, {agreed[0]} on another rank of the "
                         "expert-parallel group: token-budget microbatches "
                         "(data.micro_batch_tokens) need expert_model_parallel_size=1")
    return agreed[1:]


def _forward_step(head: Head, loss_fn: Optional[LossFn], num_microbatches: int,
                  head_input: _OutputLayerInput, data_iterator, model):
    batch, length = next(data_iterator)
    seq = batch["tokens"].shape[1]
    padding_right = not head_input.sequence_parallel
    head_input.left_pad = batch.get("left_pad") if padding_right else None
    output = model(*model_inputs(batch, length, padding_right))

    def loss_func(output_tensor):
        skipped = length - output_tensor.shape[1]  # leading positions the LM head skipped
        outputs = head(output_tensor[:, :seq - skipped], batch)
        if loss_fn is None:
            return output_tensor.new_zeros(()), {k: v.detach() for k, v in outputs.items()}
        loss, metrics = loss_fn(outputs, batch)
        # The schedule divides by the number of microbatches; undo it so the gradient is that of
        # the sum of loss_fn over microbatches, and callers choose their own normalisation.
        return loss * num_microbatches, {"loss": loss.detach(), **metrics}

    return output, loss_func


def run_microbatches(model_chunks: list[torch.nn.Module], microbatches: list[dict], head: Head,
                     loss_fn: Optional[LossFn] = None, forward_only: bool = False) -> list[dict]:
    """Run the pipeline schedule; returns one dict per microbatch on the last stage.

    With ``loss_fn`` and ``forward_only=False`` gradients accumulate into the parameters (or the
    DDP buffers) as for ``sum(loss_fn(...) for each microbatch)``.
    """
    if not forward_only and loss_fn is None:
        raise ValueError("forward-backward needs a loss_fn")
    multiple = sequence_multiple(model_chunks)
    lengths = padded_lengths([mb["tokens"].shape[1] for mb in microbatches], multiple)
    shapes = {(mb["tokens"].shape[0], length) for mb, length in zip(microbatches, lengths)}
    chunks = len(model_chunks)
    # Interleaved schedules take one iterator per model chunk, each yielding every microbatch.
    iterators = [iter(list(zip(microbatches, lengths))) for _ in range(chunks)]
    forward_backward = get_forward_backward_func()
    rows = microbatches[0]["tokens"].shape[0]
    with _OutputLayerInput(model_chunks, getattr(head, "logits_from", 0)) as head_input, \
            _variable_shapes(model_chunks, len(shapes) > 1):
        return forward_backward(
            forward_step_func=partial(_forward_step, head, loss_fn, len(microbatches),
                                      head_input),
            data_iterator=iterators if chunks > 1 else iterators[0],
            model=model_chunks,
            num_microbatches=len(microbatches),
            seq_length=lengths[0],
            micro_batch_size=rows,
            forward_only=forward_only,
        )


@contextlib.contextmanager
def _variable_shapes(model_chunks: list[torch.nn.Module], variable: bool):
    """Microbatches of different shapes (token-budget microbatches): pipeline stages then
    exchange each activation's shape before it (megatron's ``variable_seq_lengths``)."""
    config = model_chunks[0].config
    saved = config.variable_seq_lengths
    config.variable_seq_lengths = saved or variable
    try:
        yield
    finally:
        config.variable_seq_lengths = saved


def concat_outputs(outputs: list[dict], key: str) -> Optional[torch.Tensor]:
    """Stack one per-token output across microbatches (None off the last stage)."""
    return torch.cat([o[key] for o in outputs]) if outputs else None


@torch.no_grad()
def token_logprobs(model_chunks, microbatches: list[dict], vocab_size: int,
                   temperature: float = 1.0, start: int = 0):
    """[B, S-1-start] log-probs of each sequence's own next tokens from position ``start`` on
    (last stage; None elsewhere)."""
    for chunk in model_chunks:
        chunk.eval()
    head = policy_logprobs_head(vocab_size, temperature, start=start, chunk=LOGPROB_CHUNK)
    outputs = run_microbatches(model_chunks, microbatches, head, forward_only=True)
    return concat_outputs(outputs, "logprobs")


@torch.no_grad()
def token_values(model_chunks, microbatches: list[dict]):
    """[B, S] GVM values per position (last stage; None elsewhere)."""
    for chunk in model_chunks:
        chunk.eval()
    outputs = run_microbatches(model_chunks, microbatches, gvm_values_head, forward_only=True)
    return concat_outputs(outputs, "values")


def rollout_microbatches(rollout, micro_batch_size: int) -> list[dict]:
    """A rollout's left-padded sequences as microbatches (``model_inputs`` moves the padding)."""
    return make_microbatches(micro_batch_size, tokens=rollout.tokens,
                             left_pad=rollout.prompt_pad)


def response_logprobs(chunks, rollout, vocab_size: int, micro_batch_size: int,
                      temperature: float = 1.0):
    """[B, T] log-probs of each response token from a full forward pass (last stage), under
    ``softmax(logits / temperature)``: response token t sits at column width + t and is scored
    by the logits at width - 1 + t, so the prompt's positions are never scored."""
    logprobs = token_logprobs(chunks, rollout_microbatches(rollout, micro_batch_size),
                              vocab_size, temperature, start=rollout.prompt_width - 1)
    return None if logprobs is None else logprobs * rollout.response_mask


def rollout_values(chunks, rollout, micro_batch_size: int):
    """[B, P+T] value-model outputs at every position of a rollout (last stage; None
    elsewhere). ``rl/scoring.py`` reads the Q-view from them."""
    return token_values(chunks, rollout_microbatches(rollout, micro_batch_size))
