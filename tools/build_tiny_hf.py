#!/usr/bin/env python
"""Build a randomly initialised HF Llama (or, with ``--experts``, a Mixtral) around a
SentencePiece tokenizer (no download).

    python tools/build_tiny_hf.py --tokenizer tokenizer.model --out DIR [--layers 2 --hidden 64]
        [--ffn N --vocab N --tie --dtype bf16] [--experts N --topk K]

For demos and tests (the starting policy of the built-in synthetic pipeline) and for benchmarks
of real shapes: ``--vocab`` larger than the tokenizer's gives a real model's embedding size.
"""

import argparse
from pathlib import Path

import torch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--max-positions", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=None, help="default: 11/4 x hidden")
    parser.add_argument("--vocab", type=int, default=None,
                        help="embedding rows (>= the tokenizer's; default: the tokenizer's)")
    parser.add_argument("--tie", action="store_true", help="tie embedding and LM head")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--experts", type=int, default=0,
                        help="a Mixtral with this many experts per layer (0: a dense Llama)")
    parser.add_argument("--topk", type=int, default=2, help="experts per token (--experts)")
    args = parser.parse_args(argv)
    import transformers as tf

    from megatron_dvpo.data.tokenizer import SentencePieceTokenizer, export_hf_tokenizer

    sp = SentencePieceTokenizer(args.tokenizer)
    vocab = args.vocab or sp.vocab_size
    if vocab < sp.vocab_size:
        parser.error(f"--vocab {vocab} is smaller than the tokenizer's {sp.vocab_size} tokens")
    torch.manual_seed(args.seed)
    shape = dict(hidden_size=args.hidden, intermediate_size=args.ffn or (11 * args.hidden) // 4,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads, vocab_size=vocab,
                 max_position_embeddings=args.max_positions, bos_token_id=sp.bos_id,
                 eos_token_id=sp.eos_id, pad_token_id=sp.pad_id, tie_word_embeddings=args.tie)
    if args.experts:
        name, model = "Mixtral", tf.MixtralForCausalLM(tf.MixtralConfig(
            **shape, num_local_experts=args.experts, num_experts_per_tok=args.topk,
            sliding_window=None))
    else:
        name, model = "Llama", tf.LlamaForCausalLM(tf.LlamaConfig(**shape))
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model.to(dtype).save_pretrained(args.out)
    export_hf_tokenizer(args.tokenizer, Path(args.out))
    print(f"wrote a random {args.layers}-layer {name} ({vocab} embedding rows, tokenizer "
          f"{sp.vocab_size} tokens, {args.dtype}) to {args.out}")


if __name__ == "__main__":
    main()
