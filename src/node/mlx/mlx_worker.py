"""One MLX rank of an Orchard model instance. Started by a node agent (never by ssh/mlx.launch).

Distributed set-up comes from the environment, exactly as `mlx.launch` would leave it:
  ring : MLX_RANK + MLX_HOSTFILE            (TCP; hostfile = JSON array of ["ip:port"] per rank)
  jaccl: MLX_RANK + MLX_IBV_DEVICES + MLX_JACCL_COORDINATOR   (RDMA over Thunderbolt 5)
  one rank: none of them.

Arguments: --model DIR --mode single|pipeline|tensor [--split N0,N1,...] [--backend ring|jaccl]
  pipeline: rank r runs one contiguous layer range. As in mlx-lm, rank N-1 holds the FIRST
            layers and rank 0 the LAST, so rank 0 is the plan's head stage (last layers +
            output) and the one that emits: plan stage s = rank N-1-s. Hidden states go
            r -> r-1 with send/recv (ring neighbours); rank 0's output is all_gathered so
            every rank computes identical logits and samples the same token. Works for any llama-family model whose layers sit in
            model.model.layers (llama, mistral, qwen2, qwen3, ministral3, qwen3_moe, deepseek_v3, ...), unlike mlx-lm's
            own pipeline which only a few architectures have.
  tensor  : mlx-lm's Model.shard(group) (heads, KV heads and MLP split across ranks).

Protocol: JSON lines. stdin: request / cancel / shutdown. stdout: ready / token / memory / done / error.
Only rank 0 writes token and done; every rank writes ready, memory (after each request) and its own errors. Logs go to stderr.
Every rank gets the same request from its agent; ranks check they agree on it (all_gather of a
digest) and agree each step on stop/cancel (one all_sum per token), so they stop at the same
step or not at all. The worker exits when stdin closes (its agent died) and, on Linux, also by
PR_SET_PDEATHSIG in case the GIL is held inside a blocking MLX call.
"""

import argparse
import hashlib
import json
import os
import queue
import sys
import threading
import time

_out_lock = threading.Lock()
_real_stdout = sys.stdout
# Nothing but protocol lines may reach stdout: libraries that print go to stderr.
sys.stdout = sys.stderr


def emit(obj):
    line = json.dumps(obj, separators=(",", ":"))
    with _out_lock:
        _real_stdout.write(line + "\n")
        _real_stdout.flush()


DEBUG = bool(os.environ.get("ORCHARD_MLX_DEBUG"))


def debug(msg):
    if DEBUG:
        log(msg)


def log(msg):
    sys.stderr.write(f"[mlx rank {os.environ.get('MLX_RANK', '0')}] {msg}\n")
    sys.stderr.flush()


def die_with_parent():
    """Linux: the kernel kills us when the agent dies, even while C++ code holds the GIL."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # parent already gone before prctl took effect
            os._exit(1)
    except Exception as e:  # pragma: no cover - best effort
        log(f"PR_SET_PDEATHSIG unavailable: {e}")


class Inbox:
    """Reads stdin on a thread: requests queue up, cancels are flags, EOF ends the process."""

    def __init__(self):
        self.requests = queue.Queue()
        self.cancelled = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="stdin", daemon=True).start()

    def _run(self):
        for raw in sys.stdin:
            raw = raw.strip()
            if not raw:
                continue
            try:
                msg = json.loads(raw)
            except ValueError:
                emit({"type": "error", "message": f"invalid JSON on stdin: {raw[:120]}", "fatal": False})
                continue
            kind = msg.get("type")
            if kind == "request":
                self.requests.put(msg)
            elif kind == "cancel":
                with self.lock:
                    self.cancelled.add(str(msg.get("id")))
            elif kind == "shutdown":
                self.requests.put(None)
            else:
                emit({"type": "error", "message": f"unknown message type {kind!r}", "fatal": False})
        log("stdin closed; exiting")
        # stdin closed: the agent is gone (or wants us gone). Other ranks notice the broken ring.
        os._exit(0)

    def forget(self, rid):
        with self.lock:
            self.cancelled.discard(rid)

    def is_cancelled(self, rid):
        with self.lock:
            return rid in self.cancelled


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=["single", "pipeline", "tensor"], default="pipeline")
    ap.add_argument("--split", default="", help="layers per plan stage, first layers first (stage s = rank N-1-s)")
    ap.add_argument("--backend", choices=["ring", "jaccl", "any"], default="ring")
    return ap.parse_args()


def init_group(args, mx):
    distributed = any(k in os.environ for k in ("MLX_HOSTFILE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR"))
    if not distributed:
        return None
    # strict=True: a misconfigured hostfile is an error, not a silent group of one.
    return mx.distributed.init(strict=True, backend=args.backend)


def make_pipeline_layer(nn, mx, layer, group, recv_from, send_to, gather):
    """Wrap one local layer: receive before it and/or send + all_gather after it."""
    class PipelineLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = layer
            # make_cache() of mlx-lm models looks at these.
            self.use_sliding = getattr(layer, "use_sliding", False)
            if hasattr(layer, "is_sliding"):
                self.is_sliding = layer.is_sliding

        def __call__(self, x, *a, **kw):
            if recv_from is not None:
                x = mx.distributed.recv_like(x, recv_from, group=group)
            x = self.inner(x, *a, **kw)
            if send_to is not None:
                x = mx.distributed.send(x, send_to, group=group)
                # Prefill evaluates only the KV caches, not the logits: tie the send into this
                # layer's cache so the hidden state still travels (or the next rank waits forever).
                cache = kw.get("cache", a[-1] if a else None)
                if cache is not None and getattr(cache, "keys", None) is not None:
                    cache.keys = mx.depends(cache.keys, x)
            if gather:
                # Every rank contributes its h; rank 0's (first in rank order) is the true
                # output of the stack.
                b = x.shape[0]
                x = mx.distributed.all_gather(x, group=group)[:b]
            return x

    return PipelineLayer()


def apply_pipeline(model, group, split, nn, mx):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or not isinstance(layers, list) or not hasattr(inner, "embed_tokens"):
        raise ValueError(f"pipeline split needs a llama-family model (model.model.layers); {type(model).__module__} has none")
    n, rank = group.size(), group.rank()
    total = len(layers)
    if not split:
        base, extra = divmod(total, n)
        split = [base + (1 if s < extra else 0) for s in range(n)]
    if len(split) != n or sum(split) != total or any(s <= 0 for s in split):
        raise ValueError(f"split {split} must have {n} positive entries summing to {total} layers")
    stage = n - 1 - rank
    start = sum(split[:stage])
    end = start + split[stage]
    local = []
    for i in range(start, end):
        # Input comes from the rank holding the layers before ours (rank + 1), output goes to
        # the rank holding the layers after ours (rank - 1).
        recv_from = rank + 1 if (i == start and rank < n - 1) else None
        send_to = rank - 1 if (i == end - 1 and rank > 0) else None
        local.append(make_pipeline_layer(nn, mx, layers[i], group, recv_from, send_to, gather=(i == end - 1)))
    inner.layers = local
    # Models that index the cache by their first full/sliding attention layer must index the
    # local slice now.
    if hasattr(inner, "fa_idx"):
        inner.fa_idx = next((j for j, l in enumerate(local) if not l.use_sliding), None)
    if hasattr(inner, "swa_idx"):
        inner.swa_idx = next((j for j, l in enumerate(local) if l.use_sliding), None)
    if getattr(inner, "fa_idx", 0) is None and not hasattr(inner, "swa_idx"):
        raise ValueError("pipeline split of this model needs at least one full-attention layer per rank")
    return start, end


def apply_tensor(model, config, group):
    if not hasattr(model, "shard"):
        raise ValueError(f"model_type {config.get('model_type')} has no tensor-parallel shard() in mlx-lm")
    n = group.size()
    heads = config.get("num_attention_heads", 0)
    kv = config.get("num_key_value_heads") or heads
    inter = config.get("intermediate_size", 0)
    for name, v in (("num_attention_heads", heads), ("num_key_value_heads", kv), ("intermediate_size", inter)):
        if v % n != 0:
            raise ValueError(f"tensor parallel over {n} ranks needs {name} ({v}) divisible by {n}")
    model.shard(group)


def load(args, group):
    import mlx.core as mx
    import mlx.nn as nn
    from pathlib import Path
    from mlx_lm.utils import load_model, load_tokenizer

    path = Path(args.model)
    # strict=True: every checkpoint name must match a parameter (mlx-lm's sharded_load loads
    # non-strictly, where a misnamed weight silently stays random).
    model, config = load_model(path, lazy=True, strict=True)
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    layers = [0, len(model.layers)] if hasattr(model, "layers") else [0, 0]
    mode = args.mode if group is not None and group.size() > 1 else "single"
    if mode == "pipeline":
        split = [int(s) for s in args.split.split(",") if s.strip()] if args.split else []
        layers = list(apply_pipeline(model, group, split, nn, mx))
    elif mode == "tensor":
        apply_tensor(model, config, group)
    mx.eval(model.parameters())
    if group is not None and group.size() > 1:
        # Barrier: when this returns on every rank, every rank has loaded and the ring is up.
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer, config, mode, layers


def memory_report(mx):
    """MLX's own allocator counters for this rank (bytes). On the CPU backend (Linux) MLX tracks
    them as on Metal: active = live arrays (weights, caches), peak = the most ever live since the
    last reset_peak_memory(); buffers MLX keeps cached for reuse count in neither."""
    return {"active_bytes": int(mx.get_active_memory()), "peak_bytes": int(mx.get_peak_memory())}


def request_digest(req):
    canon = {k: req.get(k) for k in ("id", "prompt", "tokens", "messages", "continue_tokens", "max_tokens", "temperature", "top_p", "seed", "ignore_eos")}
    h = hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).digest()
    return [int.from_bytes(h[i : i + 3], "little") for i in range(0, 12, 3)]  # fits exactly in int32/float32


def prompt_tokens(req, tokenizer):
    if req.get("tokens") is not None:
        toks = [int(t) for t in req["tokens"]]
    elif req.get("messages") is not None:
        text = tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=False)
        toks = tokenizer.encode(text, add_special_tokens=False)
    elif req.get("prompt") is not None:
        toks = tokenizer.encode(req["prompt"], add_special_tokens=False)
    else:
        raise ValueError("request has none of tokens, messages, prompt")
    if not toks:
        raise ValueError("empty prompt")
    # A resumed stream: the tokens a lost group already delivered continue the prompt.
    return toks + [int(t) for t in (req.get("continue_tokens") or [])]


def token_bytes_of(tokenizer):
    """Each token's raw bytes, for tokenizers whose tokens are bytes (byte-level BPE, SentencePiece
    with byte fallback): the agent decodes the stream itself and holds a character split over tokens
    until it is complete (src/node/mlx/token-text.ts). None for any other tokenizer: then the
    detokenizer's text is all there is."""
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, _byte_decoder

    detok = tokenizer.detokenizer
    if isinstance(detok, BPEStreamingDetokenizer):
        byte_of, names = _byte_decoder(), detok.tokenmap
        def bpe(t):
            name = names[t] if t < len(names) else "!"
            return bytes(byte_of[c] for c in name) if all(c in byte_of for c in name) else name.encode("utf-8")
        return bpe
    if isinstance(detok, SPMStreamingDetokenizer):
        pieces = detok.tokenmap
        return lambda t: pieces[t].replace(SPMStreamingDetokenizer._sep, b" ")
    return None


def serve(model, tokenizer, config, group, inbox):
    import mlx.core as mx
    from mlx_lm.generate import generate_step, generation_stream
    from mlx_lm.sample_utils import make_sampler

    rank = group.rank() if group is not None else 0
    size = group.size() if group is not None else 1
    vocab = int(config.get("vocab_size", 0))
    eos = set(tokenizer.eos_token_ids or [])
    token_bytes = token_bytes_of(tokenizer)

    def collective_sum(values):
        # On the generation stream, so it is ordered after the model's own collectives that
        # generate_step has already queued there (two streams would race on the ring sockets).
        arr = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=group, stream=generation_stream)
        mx.eval(arr)
        return arr.tolist()

    while True:
        req = inbox.requests.get()
        if req is None:
            return
        rid = str(req.get("id"))
        debug(f"request {rid}")
        started = time.monotonic()
        # Each request's memory line reports the peak of that request alone (weights included).
        mx.reset_peak_memory()
        try:
            toks = prompt_tokens(req, tokenizer)
            if any(t < 0 or t >= vocab for t in toks):
                raise ValueError(f"prompt token out of range 0..{vocab - 1}")
            local_error = ""
        except Exception as e:  # a bad request: every rank sees the same bad request
            toks, local_error = [], str(e)
        if size > 1:
            # Agree on the request: all ranks must hold the identical request and verdict.
            mine = request_digest(req) + [1.0 if local_error else 0.0]
            gathered = mx.distributed.all_gather(mx.array([mine], dtype=mx.float32), group=group, stream=generation_stream)
            rows = gathered.tolist()
            debug(f"request {rid} agreed: {rows}")
            if any(row != rows[0] for row in rows):
                emit({"type": "error", "id": rid, "message": f"ranks disagree on request {rid}", "fatal": True})
                os._exit(3)
        if local_error:
            if rank == 0:
                emit({"type": "error", "id": rid, "message": local_error, "fatal": False})
            continue

        max_tokens = int(req.get("max_tokens", 64))
        temperature = float(req.get("temperature", 0.0))
        top_p = float(req.get("top_p", 1.0))
        ignore_eos = bool(req.get("ignore_eos", False))
        want_top = int(req.get("logprobs", 0) or 0)
        # Same seed on every rank, so sampling with temperature > 0 picks the same token everywhere.
        mx.random.seed(int(req.get("seed", 0)))
        sampler = make_sampler(temp=temperature, top_p=top_p)
        detok = tokenizer.detokenizer
        detok.reset()
        finish = "length"
        count = 0
        first_ms = None
        for tok, logprobs in generate_step(mx.array(toks), model, max_tokens=max_tokens, sampler=sampler):
            tok = int(tok)
            count += 1
            debug(f"step {count} token {tok}")
            if first_ms is None:
                first_ms = (time.monotonic() - started) * 1000
            is_eos = tok in eos and not ignore_eos
            cancelled = inbox.is_cancelled(rid)
            if size > 1:
                total_cancel, total_tok = collective_sum([1.0 if cancelled else 0.0, float(tok)])
                if total_tok != float(tok) * size:
                    emit({"type": "error", "id": rid, "message": f"ranks sampled different tokens at step {count}", "fatal": True})
                    os._exit(3)
                cancelled = total_cancel > 0
            if is_eos:
                finish = "stop"
                break
            if rank == 0:
                detok.add_token(tok)
                msg = {"type": "token", "id": rid, "index": count - 1, "token": tok, "text": detok.last_segment}
                if token_bytes:
                    msg["bytes"] = token_bytes(tok).hex()
                if want_top:
                    lp = logprobs.astype(mx.float32)
                    top = mx.argsort(-lp)[:want_top]
                    msg["logprob"] = float(lp[tok].item())
                    # Each token's own text (not the detokenizer's running segment, which holds
                    # back a partial character): what OpenAI's logprobs name a token by.
                    msg["token_text"] = tokenizer.decode([tok])
                    msg["top_logprobs"] = [[int(i), float(v), tokenizer.decode([int(i)])] for i, v in zip(top.tolist(), lp[top].tolist())]
                emit(msg)
            if cancelled:
                finish = "cancelled"
                break
        inbox.forget(rid)
        # Before done, so a driver that holds rank 0 has its memory line when done arrives.
        emit({"type": "memory", "id": rid, "rank": rank, **memory_report(mx)})
        if rank == 0:
            detok.finalize()
            elapsed = (time.monotonic() - started) * 1000
            emit({
                "type": "done", "id": rid, "finish_reason": finish, "prompt_tokens": len(toks),
                "completion_tokens": count - (1 if finish == "stop" else 0), "text_tail": detok.last_segment,
                "ranks": size, "ranks_agree": True, "first_token_ms": first_ms, "total_ms": elapsed,
            })


def main():
    die_with_parent()
    args = parse_args()
    inbox = Inbox()  # before anything that can block (ring accept has no timeout)
    t0 = time.monotonic()
    try:
        import mlx.core as mx
        import mlx_lm.utils  # noqa: F401  (the slow imports happen before the ring handshake)

        # Tells the driver this rank is about to listen/dial, so it can start rank N-1 last.
        emit({"type": "starting", "rank": int(os.environ.get("MLX_RANK", "0")), "pid": os.getpid()})
        group = init_group(args, mx)
        model, tokenizer, config, mode, layers = load(args, group)
    except Exception as e:
        emit({"type": "error", "message": f"start-up failed: {type(e).__name__}: {e}", "fatal": True})
        log(f"start-up failed: {e!r}")
        sys.exit(1)
    emit({
        "type": "ready", "rank": group.rank() if group else 0, "size": group.size() if group else 1,
        "mode": mode, "layers": layers, "load_ms": round((time.monotonic() - t0) * 1000), "pid": os.getpid(),
        "mlx": mx.__version__, "device": str(mx.default_device()), "memory": memory_report(mx),
    })
    try:
        serve(model, tokenizer, config, group, inbox)
    except Exception as e:
        # A lost peer raises here (mlx >= 0.32.1); the group is broken, so the rank ends.
        emit({"type": "error", "message": f"{type(e).__name__}: {e}", "fatal": True})
        log(f"fatal: {e!r}")
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
