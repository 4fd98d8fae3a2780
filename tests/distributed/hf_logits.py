"""Run under torchrun: logits of converted checkpoints, at several layouts, against HF's.

Usage: torchrun --nproc-per-node N hf_logits.py OUT_JSON HF_DIR:CKPT_DIR:LAYOUT[,LAYOUT] ...
with LAYOUT as in equivalence.py (tp2pp1, tp1pp2, ...). Rank 0 writes {name: {layout: diff}}.
"""

import json
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import load_model
from megatron_dvpo.config import ParallelConfig, load_config
from megatron_dvpo.models import build_chunks, forward

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from distributed.equivalence import all_max, parse_layout  # noqa: E402
from hf_models import load as load_hf  # noqa: E402


def full_logits(logits, batch):
    return {"logits": gather_from_tensor_model_parallel_region(logits)}


def main():
    out_json, specs = sys.argv[1], sys.argv[2:]
    distributed.init_distributed(ParallelConfig(), seed=0)
    tokens = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(3))
    results = {}
    for spec in specs:
        hf_dir, ckpt, layouts = spec.split(":")
        with torch.no_grad():
            expected = load_hf(Path(hf_dir))(tokens).logits
        for name in layouts.split(","):
            layout = parse_layout(name)
            distributed.set_parallel_layout(layout)
            cfg = load_config(Path(ckpt) / "config.yaml")
            cfg.parallel = layout
            chunks = build_chunks(cfg, initialize=False)
            load_model(chunks, Path(ckpt) / "model")
            for chunk in chunks:
                chunk.eval()
            with torch.no_grad():
                outputs = forward.run_microbatches(
                    chunks, forward.make_microbatches(2, tokens=tokens), full_logits,
                    forward_only=True)
            diff = -1.0
            if parallel_state.is_pipeline_last_stage():
                got = forward.concat_outputs(outputs, "logits")[..., :cfg.model.vocab_size]
                diff = (got - expected).abs().max().item()
            results.setdefault(Path(hf_dir).name, {})[name] = all_max(diff)
    if distributed.is_rank0():
        Path(out_json).write_text(json.dumps(results, indent=2))
    distributed.shutdown()


if __name__ == "__main__":
    main()
