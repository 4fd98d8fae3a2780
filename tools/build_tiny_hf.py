#!/usr/bin/env python
"""Build a small randomly initialised HF Llama around a SentencePiece tokenizer (no download).

    python tools/build_tiny_hf.py --tokenizer tokenizer.model --out DIR [--layers 2 --hidden 64]

For demos and tests: the starting policy of the built-in synthetic pipeline.
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
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import transformers as tf

    from megatron_dvpo.data.tokenizer import SentencePieceTokenizer, export_hf_tokenizer

    sp = SentencePieceTokenizer(args.tokenizer)
    torch.manual_seed(args.seed)
    config = tf.LlamaConfig(hidden_size=args.hidden, intermediate_size=(11 * args.hidden) // 4,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, vocab_size=sp.vocab_size,
                            max_position_embeddings=args.max_positions, bos_token_id=sp.bos_id,
                            eos_token_id=sp.eos_id, pad_token_id=sp.pad_id,
                            tie_word_embeddings=False)
    tf.LlamaForCausalLM(config).save_pretrained(args.out)
    export_hf_tokenizer(args.tokenizer, Path(args.out))
    print(f"wrote a random {args.layers}-layer Llama with a {sp.vocab_size}-token vocabulary to "
          f"{args.out}")


if __name__ == "__main__":
    main()
