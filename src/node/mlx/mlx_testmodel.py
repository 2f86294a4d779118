"""Write a deterministic tiny MLX model directory for tests (run with the Orchard MLX venv).

Same arguments -> same bytes: MLX's RNG is seeded, mlx-lm's own model class and save helpers
write the weights and index, and the tokenizer JSON is written by hand (byte-level BPE with the
256 byte tokens plus <s>/</s>, no merges), so nothing depends on hash order or on the hub.

Usage: python mlx_testmodel.py --out DIR [--arch llama|ministral3|qwen3_moe|deepseek_v3] [--layers N]
       [--hidden H] [--heads A] [--kv-heads K] [--intermediate I] [--experts E] [--active-experts K]
       [--seed S]
The MoE architectures get E routed experts of which K are active per token; deepseek_v3 also gets
Multi-head Latent Attention (compressed q and kv), one shared expert and a leading dense layer,
so every code path of the real family runs.
Prints one JSON line describing what it wrote.
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

VOCAB_BYTES = 256
BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258

# A tiny chat template so chat endpoints can be exercised; roles are spelled out in bytes.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode map used by ByteLevel tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_json():
    byte_map = bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(VOCAB_BYTES)}
    vocab["<s>"] = BOS_ID
    vocab["</s>"] = EOS_ID
    special = lambda i, s: {  # noqa: E731
        "id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": True,
    }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [special(BOS_ID, "<s>"), special(EOS_ID, "</s>")],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [],
        },
    }


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "ministral3": "Ministral3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

MOE_ARCHS = ("qwen3_moe", "deepseek_v3")


def moe_config(args, cfg):
    """Expert (and, for deepseek_v3, MLA) keys on top of the dense base config."""
    # --intermediate sizes the experts: tests make them wide so layer bytes, not fixed overheads,
    # decide the placement of a tiny model.
    moe_inter = args.intermediate or max(8, args.hidden // 2)
    cfg["num_experts_per_tok"] = args.active_experts
    cfg["moe_intermediate_size"] = moe_inter
    cfg["norm_topk_prob"] = True
    cfg["rope_theta"] = 10000.0
    if args.arch == "qwen3_moe":
        cfg.update({"num_experts": args.experts, "decoder_sparse_step": 1, "mlp_only_layers": []})
        return cfg
    head = args.hidden // args.heads
    cfg.update({
        "n_routed_experts": args.experts,
        "n_shared_experts": 1,
        "routed_scaling_factor": 1.0,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "n_group": 1,
        "topk_group": 1,
        "moe_layer_freq": 1,
        # Layer 0 dense, the rest MoE: the real checkpoints lead with dense layers too.
        "first_k_dense_replace": 1 if args.layers > 1 else 0,
        "kv_lora_rank": max(8, args.hidden // 4),
        "q_lora_rank": max(8, args.hidden // 2),
        "qk_rope_head_dim": max(2, head // 2),
        "qk_nope_head_dim": max(2, head // 2),
        "v_head_dim": head,
        "attention_bias": False,
    })
    return cfg


def model_config(args):
    cfg = {
        "model_type": args.arch,
        "architectures": [ARCHITECTURES[args.arch]],
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "intermediate_size": args.intermediate or args.hidden * 2,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads or args.heads,
        "head_dim": args.hidden // args.heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }
    if args.arch in MOE_ARCHS:
        return moe_config(args, cfg)
    if args.arch == "llama":
        cfg["rope_theta"] = 10000.0
    else:
        cfg["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "llama_4_scaling_beta": 0.1,
            "original_max_position_embeddings": 4096,
        }
    return cfg


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="llama", choices=sorted(ARCHITECTURES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--intermediate", type=int, default=0)
    ap.add_argument("--experts", type=int, default=4, help="routed experts (MoE architectures)")
    ap.add_argument("--active-experts", type=int, default=2, help="experts per token (MoE architectures)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.hidden % args.heads != 0:
        sys.exit(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    if not 1 <= args.active_experts <= args.experts:
        sys.exit(f"--active-experts {args.active_experts} must be 1..--experts {args.experts}")

    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.utils import _get_classes, save_config, save_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args)
    model_class, args_class = _get_classes(cfg)
    mx.random.seed(args.seed)
    model = model_class(args_class.from_dict(cfg))
    # With default inits a tiny random model falls into repeating one token within a few steps,
    # which would make "same tokens" a weak oracle. Seeded noise of std 0.3 on every weight
    # gives long non-repeating greedy sequences, so a broken split or a lost step shows up.
    params = dict(tree_flatten(model.parameters()))
    keys = sorted(params)
    noisy = {}
    for i, k in enumerate(keys):
        v = params[k]
        noise = mx.random.normal(v.shape, key=mx.random.key(args.seed * 100003 + i)) * 0.3
        noisy[k] = (v + noise).astype(mx.float32)
    model.load_weights(list(noisy.items()))
    mx.eval(model.parameters())
    save_model(out, model)
    save_config(dict(cfg), out / "config.json")
    with open(out / "tokenizer.json", "w") as f:
        json.dump(tokenizer_json(), f, indent=2, ensure_ascii=False, sort_keys=False)
    with open(out / "tokenizer_config.json", "w") as f:
        json.dump({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "add_bos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 4096,
            "chat_template": CHAT_TEMPLATE,
        }, f, indent=2, sort_keys=True)
    files = {}
    for name in sorted(os.listdir(out)):
        p = out / name
        if p.is_file():
            files[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    experts = {"experts": args.experts, "active_experts": args.active_experts} if args.arch in MOE_ARCHS else {}
    print(json.dumps({"dir": str(out), "arch": args.arch, "layers": args.layers, "hidden": args.hidden,
                      "vocab_size": VOCAB_SIZE, **experts, "files": files}))


if __name__ == "__main__":
    main()
