"""`make demo`, second half: run a compiled GPT through the runtime and check it against torch.

    python examples/demo.py out/gpt

Feeds three microbatches of random token ids through the pipeline of stages (one thread
per stage), compares the logits with the PyTorch model's, and exits non-zero if they
differ by more than 1e-4.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpt  # noqa: E402  (the example next to this file)

import edgeplan.runtime  # noqa: E402
from edgeplan.planner.plan import Plan  # noqa: E402
from edgeplan.planner.report import format_plan  # noqa: E402
from edgeplan.runtime.manifest import read_manifest  # noqa: E402

TOLERANCE = 1e-4


def main(out_dir: str) -> int:
    model, example = gpt.build()
    batch, seq = example["input_ids"].shape
    microbatches = 3
    ids = torch.randint(0, model.cfg.vocab, (batch * microbatches, seq), generator=torch.Generator().manual_seed(1))
    pipe = edgeplan.runtime.load(out_dir)
    outputs = pipe.run({"input_ids": ids.numpy()})
    with torch.no_grad():
        expected = model(input_ids=ids).numpy()
    error = float(np.abs(outputs["output"] - expected).max())
    print(format_plan(Plan.from_json(out_dir), read_manifest(out_dir)))
    stats = pipe.last_stats
    print(f"\nran {stats.microbatches} microbatches through {len(pipe.sessions)} stages in "
          f"{stats.wall_s * 1e3:.1f} ms; max |pipeline - torch| = {error:.2e} (tolerance {TOLERANCE:g})")
    if error > TOLERANCE:
        print("demo FAILED: pipeline output differs from torch")
        return 1
    print("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out/gpt"))
