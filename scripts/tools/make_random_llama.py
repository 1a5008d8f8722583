"""Write a random-weight LLaMA-shaped model as an HF-sharded bf16 safetensors directory, streaming.

    python scripts/tools/make_random_llama.py --shape 7b --out /data/llama7b-random

Tensors are generated one at a time and written in shard files of at most ``--shard-gb``, so memory stays
near one shard whatever the model size (never the whole model). Weights ~ N(0, 0.02), norms 1: the model
computes garbage but has exactly the shapes, bytes and sharding of the real one, which is what loading and
memory benchmarks need. A byte-level BPE tokenizer with the model's vocabulary is trained on the shipped
pydoc corpus so the CLI can feed it text. The directory is written under a temporary name and renamed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

#: name: (layers, hidden, heads, KV heads, intermediate, vocab)
SHAPES = {
    "1.1b": (22, 2048, 32, 4, 5632, 32000),    # TinyLlama-1.1B
    "3b": (26, 3200, 32, 32, 8640, 32000),     # OpenLLaMA-3B
    "7b": (32, 4096, 32, 32, 11008, 32000),    # LLaMA-2-7B
}


def config_for(shape: str):
    from transformers import LlamaConfig
    layers, hidden, heads, kv, inter, vocab = SHAPES[shape]
    return LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       dtype="bfloat16", architectures=["LlamaForCausalLM"])


def tensor_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    out = [("model.embed_tokens.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (cfg.intermediate_size, h)),
                (p + "mlp.up_proj.weight", (cfg.intermediate_size, h)),
                (p + "mlp.down_proj.weight", (h, cfg.intermediate_size))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (cfg.vocab_size, h))]


def train_tokenizer(vocab_size: int):
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def write(shape: str, out: str, shard_gb: float, seed: int = 0) -> dict:
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ds_spd.outputs import check_output_dir, publish_dir
    check_output_dir(out, "model output", is_ours=lambda p: os.path.isfile(os.path.join(p, ".ds_spd_random_model")))
    cfg = config_for(shape)
    tmp = f"{out.rstrip(os.sep)}.tmp{os.getpid()}"
    os.makedirs(tmp)
    gen = torch.Generator().manual_seed(seed)
    limit = int(shard_gb * 2**30)
    shards: list[dict[str, int]] = [{}]
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0
    specs = tensor_shapes(cfg)

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, os.path.join(tmp, f"part-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards[-1] = {k: len(shards) for k in pending}
            shards.append({})
            pending, pending_bytes = {}, 0
    for name, size in tqdm(specs, desc=f"writing {shape}", unit="tensor"):
        t = (torch.ones(size, dtype=torch.bfloat16) if len(size) == 1 else
             torch.empty(size, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen))
        nbytes = t.numel() * 2
        if pending_bytes + nbytes > limit:
            flush()
        pending[name] = t
        pending_bytes += nbytes
        total += nbytes
    flush()
    n = len(shards) - 1
    weight_map = {}
    for i in range(1, n + 1):   # HF's names: model-0000i-of-0000n.safetensors
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.rename(os.path.join(tmp, f"part-{i:05d}.safetensors"), os.path.join(tmp, final))
        weight_map.update({k: final for k in shards[i - 1]})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    cfg.save_pretrained(tmp)
    train_tokenizer(cfg.vocab_size).save_pretrained(tmp)
    info = {"shape": shape, "bytes": total, "shards": n, "params": total // 2, "seed": seed}
    with open(os.path.join(tmp, ".ds_spd_random_model"), "w") as f:
        json.dump(info, f)
    publish_dir(tmp, out)
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest shard file (GiB)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    info = write(args.shape, args.out, args.shard_gb, args.seed)
    print(json.dumps({**info, "seconds": round(time.perf_counter() - t0, 1), "out": args.out}))


if __name__ == "__main__":
    main()
