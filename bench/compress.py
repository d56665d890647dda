"""Boundary compression benchmark: codec speed and size, model error, and pipeline throughput.

    python bench/compress.py [--quick]

Table 1: every codec on a 16 MB float32 activation (normal(0, 1), [8, 512, 1024]): bytes
ratio, encode and decode GB/s of float32 input on one core (numpy runs these single-threaded;
`edgeplan codecs` prints the same table), and this core's codec_gbs figure.
Table 2: per example and codec, at the middle cut, the relative L2 error of the outputs and
the argmax agreement (next token for the language models, top-1 for the CNN) on
calibration batches that were not used to build the model. Random-weight language models
have nearly flat logits, so any perturbation flips some argmaxes; the "(trained)" rows
repeat the language models after a few hundred steps of next-byte training on text from
Python's standard library (bytes as tokens, real text, nothing downloaded), measured on
held-out files: agreement of a model with real confidence.
Table 3: a 2-stage pipeline over a slow link (20 Mbit/s, 2 ms: a weak Wi-Fi or 4G uplink)
with and without compression (--max-error 0.01): predicted throughput from the plan, and
throughput measured by the local runtime with the link EMULATED (each message is held for
latency + wire bytes / bandwidth; compute and codecs are real, on this host). The plan
predicts for the Pis: their roofline compute, and codec times scaled from this host's by
host codec_gbs / the Pi preset's (an estimate, see planner/fleet.py).
"""

import argparse
import os
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import edgeplan  # noqa: E402
from edgeplan.cli import load_module  # noqa: E402
from edgeplan.passes.annotate import annotate  # noqa: E402
from edgeplan.passes.capture import capture  # noqa: E402
from edgeplan.passes.compress import measure_cuts  # noqa: E402
from edgeplan.passes.units import group_units  # noqa: E402
from edgeplan.runtime.codec_speed import codec_speeds, reference_gbs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MAX_ERROR = 0.01


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def codec_speed(repeats: int) -> str:
    rows = [[speed.codec, f"{speed.ratio:.2f}x", f"{speed.encode_gbs:.2f}", f"{speed.decode_gbs:.2f}"]
            for speed in codec_speeds(repeats)]
    return (table(["codec", "bytes ratio", "encode GB/s", "decode GB/s"], rows)
            + f"\nthis core's codec_gbs figure (int8 encode + decode): {reference_gbs(repeats):.2f} GB/s")


def calibration_batches(inputs: dict, count: int) -> list[dict]:
    batches = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(100 + seed)
        batch = {}
        for name, tensor in inputs.items():
            if tensor.dtype.is_floating_point:
                batch[name] = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            else:
                batch[name] = torch.randint(0, int(tensor.max()) + 1, tensor.shape, generator=generator)
        batches.append(batch)
    return batches


def text_corpus() -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) byte streams: the standard library's Python sources, split by file."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held_out = [f for i, f in enumerate(files) if i % 10 == 0]
    train = [f for i, f in enumerate(files) if i % 10 != 0]
    read = lambda paths: np.frombuffer(b"\n".join(p.read_bytes() for p in paths), np.uint8)  # noqa: E731
    return read(train), read(held_out)


def text_batches(stream: np.ndarray, batch: int, seq: int, count: int, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, stream.size - seq, (count, batch))
    return [torch.from_numpy(np.stack([stream[s:s + seq] for s in row]).astype(np.int64)) for row in starts]


def train_on_text(model: torch.nn.Module, stream: np.ndarray, steps: int) -> float:
    """Next-byte training with AdamW; returns the final loss (nats per byte)."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step, ids in enumerate(text_batches(stream, 16, 64, steps, seed=1)):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def model_errors(names: list[str], batches: int, train_steps: int) -> str:
    rows = []
    train, held_out = text_corpus()
    variants = [(name, False) for name in names]
    variants += [(name, True) for name in names if name in ("gpt", "llama_hf")]
    for name, trained in variants:
        model, inputs = load_module(EXAMPLES / f"{name}.py").build(batch=8)
        calibration = calibration_batches(inputs, batches)
        label = f"{name} (random weights)" if name in ("gpt", "llama_hf") else name
        if trained:
            loss = train_on_text(model, train, train_steps)
            calibration = [{"input_ids": ids} for ids in text_batches(held_out, 8, 32, batches, seed=2)]
            label = f"{name} (trained, loss {loss:.2f})"
        gm = annotate(capture(model, inputs))
        units = group_units(gm)
        middle = len(units) // 2
        cut = measure_cuts(gm, units[: middle + 2], calibration)[middle]
        for m in cut.codecs:
            if m.codec.endswith("+zstd") and m.codec != "int8+zstd":
                continue  # the lossless stage changes size, not error: one zstd row is enough
            rows.append([label, f"after {units[middle].name}", m.codec, f"{m.ratio:.2f}x",
                         f"{m.output_error:.2e}", "-" if m.agreement is None else f"{m.agreement:.2%}"])
    return table(["model", "cut", "codec", "bytes ratio", "output rel. error", "agreement"], rows)


def pipeline_throughput(names: list[str], microbatches: int) -> str:
    rows = []
    fleet = "pi-pair-slow-link"
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model, inputs = load_module(EXAMPLES / f"{name}.py").build(batch=8)
            calibration = calibration_batches(inputs, 4)
            feeds = {k: np.concatenate([b[k].numpy() for b in calibration] * (microbatches // 4))
                     for k in inputs}
            for max_error in (None, MAX_ERROR):
                out = Path(tmp) / f"{name}-{max_error}"
                plan = edgeplan.compile(model, inputs, fleet=fleet, out_dir=out, num_stages=2,
                                        max_error=max_error, calibration_inputs=calibration)
                pipe = edgeplan.runtime.load(out, emulate_links=True)
                pipe.run({k: v[: len(v) // microbatches] for k, v in feeds.items()})  # warm-up
                pipe.run(feeds)
                boundary = plan.stages[0].boundary
                rows.append([
                    name, "raw" if max_error is None else f"<= {max_error:g}", boundary.codec,
                    f"{boundary.ratio:.2f}x", f"{plan.bottleneck_s * 1e3:.2f}",
                    f"{plan.throughput_per_s:.1f}", f"{pipe.last_stats.throughput_per_s:.1f}",
                    f"{pipe.last_stats.link_mean_s[0] * 1e3:.2f}",
                    "-" if boundary.agreement is None else f"{boundary.agreement:.2%}",
                ])
    return table(["model", "budget", "codec", "ratio", "predicted ms/mb", "predicted mb/s",
                  "measured mb/s (emulated link)", "link ms/mb (emulated)", "agreement"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and models")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    names = ["gpt", "resnet"] if args.quick else ["gpt", "resnet", "llama_hf", "gpt2_hf"]
    print("Codecs on a 16 MB float32 activation (one core)")
    print(codec_speed(repeats=2 if args.quick else 5))
    print(f"\nModel error per codec at the middle cut ({2 if args.quick else 8} calibration batches "
          f"of 8 x 32)")
    print(model_errors(names, batches=2 if args.quick else 8, train_steps=30 if args.quick else 300))
    print(f"\n2-stage pipeline over a 20 Mbit/s, 2 ms link, raw vs --max-error {MAX_ERROR:g} "
          f"(mb = microbatch of 8; link EMULATED by the runtime, compute and codecs real)")
    print(pipeline_throughput(names[:2] if args.quick else names, microbatches=8 if args.quick else 32))
    print(f"\nbenchmark wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
