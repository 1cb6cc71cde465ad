"""Streamed conversion of a LLaMA-2-7B-shaped checkpoint: wall time, peak resident memory, bytes read/written.

    python benchmarks/scale.py                    # the full 7B shape (~13.5 GB of bf16 shards; needs ~30 GB free)
    python benchmarks/scale.py --layers 4         # the same shapes, 4 decoder layers (a quick check)

Writes a checkpoint with LLaMA-2-7B's config (hidden 4096, FFN 11008, 32 layers, vocab 32000; random bf16
weights) as Hugging Face safetensors shards to a scratch directory, drops it from the page cache, and
converts it in a child process with ``moefx.stream`` into 8 experts per FFN: ``init="split"`` when this moefx
has it, else ``init="random"`` with experts of 11008/8 = 1376 neurons (the same shapes and bytes as split).
Reports the child's wall time, its peak resident set size (``ru_maxrss`` from ``wait4``) and its I/O counters
(``/proc/<pid>/io``), then loads the result lazily in another child. The scratch directory is removed at the
end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

_CONVERT = textwrap.dedent("""
    import json, sys, time
    import moefx
    from moefx.stream import plan_stream, run_stream
    src, out, init, expert_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    config = moefx.MoEConfig(num_experts=8, top_k=2, init=init, expert_size=expert_size or None)
    t0 = time.perf_counter()
    plan = plan_stream(src, config)
    t1 = time.perf_counter()
    result = run_stream(plan, out)
    t2 = time.perf_counter()
    io = dict(line.split(": ") for line in open("/proc/self/io").read().split("\\n") if line)
    print(json.dumps({"plan_s": t1 - t0, "stream_s": t2 - t1, "bytes_read": result.bytes_read,
                      "bytes_written": result.bytes_written, "shards": len(plan.shard_files),
                      "io": {k: int(v) for k, v in io.items()}}))
""")

_LOAD = textwrap.dedent("""
    import json, sys, time
    import moefx
    t0 = time.perf_counter()
    model = moefx.load(sys.argv[1])
    print(json.dumps({"load_s": time.perf_counter() - t0, "moe_layers": len(moefx.moe_layers(model)),
                      "parameters": sum(p.numel() for p in model.parameters())}))
""")


def llama2_7b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
    )


def _child(args: list[str]) -> tuple[dict, float, int]:
    """Run a Python child; its JSON line, wall seconds and peak RSS in bytes (from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "MOEFX_QUIET": "1"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"scale.py: the child failed with exit code {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1]), wall, usage.ru_maxrss * 1024


def _drop_from_page_cache(directory: Path) -> None:
    for path in directory.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (default 32, as LLaMA-2-7B)")
    parser.add_argument("--scratch", default=tempfile.gettempdir(), help="where the scratch directory goes")
    parser.add_argument("--init", default=None, help="expert init (default: split if available, else random)")
    args = parser.parse_args()

    import moefx
    from moefx.config import EXPERT_INITS
    from moefx.zoo import write_random_checkpoint

    init = args.init or ("split" if "split" in EXPERT_INITS else "random")
    expert_size = 11008 // 8 if init == "random" else 0
    free = shutil.disk_usage(args.scratch).free
    need = int(args.layers / 32 * 27.5e9) + 2 * 10**9
    if free < need:
        print(f"scale.py: {args.scratch} has {free / 1e9:.1f} GB free, the run needs about {need / 1e9:.0f} GB; "
              "pass --scratch DIR with more space", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="moefx-scale-", dir=args.scratch))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below runs
    try:
        src, out = scratch / "llama-2-7b-shaped", scratch / "moe"
        t0 = time.perf_counter()
        size = write_random_checkpoint(src, llama2_7b_config(args.layers), max_shard_size=5 * 10**9)
        written_s = time.perf_counter() - t0
        _drop_from_page_cache(src)
        shards = sorted(p.name for p in src.glob("*.safetensors"))
        print(f"source: {size / 1e9:.2f} GB of bf16 weights in {len(shards)} shard(s), written in {written_s:.0f} s "
              f"(LLaMA-2-7B shapes, {args.layers} layers)")
        print(f"converting: init={init}, 8 experts per FFN{f' of {expert_size} neurons' if expert_size else ''}, "
              f"top-2, streamed, torch threads={os.cpu_count()} cores, moefx {moefx.__version__}")
        stats, wall, peak = _child([_CONVERT, str(src), str(out), init, str(expert_size)])
        io = stats["io"]
        print(f"wall time            {wall:8.1f} s  (plan on meta {stats['plan_s']:.1f} s, stream {stats['stream_s']:.1f} s, "
              "the rest interpreter start-up)")
        print(f"peak resident memory {peak / 2**30:8.2f} GiB (ru_maxrss of the converting process)")
        print(f"tensor bytes read    {stats['bytes_read'] / 1e9:8.2f} GB   written {stats['bytes_written'] / 1e9:.2f} GB "
              f"({stats['shards']} output shards)")
        print(f"process I/O          read {io['rchar'] / 1e9:.2f} GB ({io['read_bytes'] / 1e9:.2f} GB from the block "
              f"device), wrote {io['wchar'] / 1e9:.2f} GB ({io['write_bytes'] / 1e9:.2f} GB to the block device)")
        loaded, load_wall, load_peak = _child([_LOAD, str(out)])
        print(f"moefx.load (lazy)    {load_wall:8.1f} s, peak resident memory {load_peak / 2**30:.2f} GiB, "
              f"{loaded['moe_layers']} MoE layers, {loaded['parameters'] / 1e9:.2f} B parameters memory-mapped")
        ok = peak <= 3 * 2**30 and wall <= 300
        print(f"goals (<= 3 GiB resident, <= 5 min): {'met' if ok else 'NOT met'}")
        return 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        self_usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"(scratch {scratch} removed; this driver peaked at {self_usage:.2f} GiB while writing the source)")


if __name__ == "__main__":
    sys.exit(main())
