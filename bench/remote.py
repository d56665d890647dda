"""Remote pipeline benchmark: the local pipeline vs 2, 3 and 4 `edgeplan worker`s on loopback.

    python bench/remote.py [--quick] [--microbatches N] [--repeats R]

Compiles examples/gpt.py once per stage count (2, 3, 4) on a fleet of four equal devices,
starts four worker processes on 127.0.0.1 (one ONNX Runtime thread per stage, like the local
pipeline it is compared with), deploys each compile and runs the same batch locally and
remotely. Every remote output is checked bitwise against the local one.

Columns: throughput in microbatches/s of the local pipeline (threads in one process) and of
the workers (window of 2 x stages microbatches in flight), medians over the repeats; the
sequential latency of one microbatch through the workers (window 1); and the per-hop overhead:
(sequential latency - the stages' busy time measured on the workers, codecs included) / hops,
with hops = stages + 1 (driver -> first worker -> ... -> last worker -> driver). The overhead
is what framing, raw encoding, gRPC and the loopback add per hop. All processes share this
host's cores, so these are loopback figures, not a fleet's: re-run on a quiet machine.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import edgeplan
from edgeplan.cli import load_module
from edgeplan.runtime.deploy import connect, deploy

ROOT = Path(__file__).resolve().parent.parent
DEVICES = ("dev-0", "dev-1", "dev-2", "dev-3")
STAGE_COUNTS = (2, 3, 4)


def fleet_toml(addresses: dict[str, str] | None = None) -> str:
    text = 'name = "loopback"\n'
    for name in DEVICES:
        text += f'[[device]]\nname = "{name}"\npreset = "raspberry-pi-5-8gb"\n'
        if addresses:
            text += f'address = "{addresses[name]}"\n'
    return text


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def start_workers(root: Path, token_file: Path) -> tuple[list[subprocess.Popen], dict[str, str]]:
    procs = [subprocess.Popen([sys.executable, "-m", "edgeplan.cli", "worker", "--listen", "127.0.0.1:0",
                               "--token-file", str(token_file), "--dir", str(root / name), "--threads", "1"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for name in DEVICES]
    addresses = {}
    for name, proc in zip(DEVICES, procs):
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(60)
        if not line or "listening on" not in line[0]:
            raise SystemExit(f"worker {name} did not start: {line}")
        addresses[name] = line[0].split("listening on ")[1].split()[0]
    return procs, addresses


def median_run(run, inputs: dict, repeats: int) -> tuple[float, dict, object]:
    """Median throughput (microbatches/s) of `run.run(inputs)`, after one warm-up run."""
    outputs = run.run(inputs)
    rates = []
    for _ in range(repeats):
        outputs = run.run(inputs)
        rates.append(run.last_stats.throughput_per_s)
    return statistics.median(rates), outputs, run.last_stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer microbatches and repeats")
    parser.add_argument("--microbatches", type=int, default=None, help="per run (default 64, quick 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per number (default 5, quick 2)")
    args = parser.parse_args(argv)
    microbatches = args.microbatches or (16 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 5)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    example = load_module(ROOT / "examples" / "gpt.py")
    model, example_inputs = example.build()
    rng = np.random.default_rng(0)
    inputs = {"input_ids": rng.integers(0, model.cfg.vocab, (2 * microbatches, 32), dtype=np.int64)}

    with tempfile.TemporaryDirectory(prefix="edgeplan-bench-remote-") as tmp:
        tmp = Path(tmp)
        (tmp / "fleet.toml").write_text(fleet_toml())
        token_file = tmp / "fleet.token"
        token_file.write_text(os.urandom(16).hex())
        procs, addresses = start_workers(tmp / "workers", token_file)
        try:
            (tmp / "fleet-addresses.toml").write_text(fleet_toml(addresses))
            rows = []
            for stages in STAGE_COUNTS:
                out = tmp / f"gpt-{stages}"
                edgeplan.compile(model, example_inputs, fleet=str(tmp / "fleet.toml"), out_dir=out,
                                 num_stages=stages, time_limit_s=5)
                local = edgeplan.runtime.load(out, threads_per_stage=1)
                local_rate, local_out, _ = median_run(local, inputs, repeats)
                deploy(out, tmp / "fleet-addresses.toml", token_file)
                with connect(out) as remote:
                    remote_rate, remote_out, _ = median_run(remote, inputs, repeats)
                    exact = all(np.array_equal(local_out[k], remote_out[k]) for k in local_out)
                with connect(out, window=1) as sequential:
                    sequential.run(inputs)
                    latencies, overheads = [], []
                    for _ in range(repeats):
                        sequential.run(inputs)
                        stats = sequential.last_stats
                        latency = stats.wall_s / stats.microbatches
                        latencies.append(latency)
                        overheads.append((latency - sum(stats.stage_mean_s)) / (stages + 1))
                rows.append([f"gpt, {stages} stages", f"{local_rate:.1f}", f"{remote_rate:.1f}",
                             f"{remote_rate / local_rate:.2f}", f"{statistics.median(latencies) * 1e3:.2f}",
                             f"{statistics.median(overheads) * 1e3:.3f}", "yes" if exact else "NO"])
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(10)
    print(f"GPT example (examples/gpt.py defaults), batch 2 x 32 tokens a microbatch, {microbatches} "
          f"microbatches a run, median of {repeats}; {os.cpu_count()} CPU core(s), load average "
          f"{load:.2f} at start; one ONNX Runtime thread per stage, local and remote")
    print(table(["pipeline", "local mb/s", "workers mb/s", "workers/local", "seq latency ms",
                 "overhead ms/hop", "bitwise equal"], rows))
    print(f"\nbenchmark wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
