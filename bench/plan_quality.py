"""Do learned costs make better plans? Held-out models split into pipeline stages on this
host's backends, each split chosen by a cost model, every stage timed (issue 4's premise: a
roofline guess makes plans that look optimal and run unbalanced).

    .venv/bin/python bench/plan_quality.py [--store bench/out/predictor_store.jsonl] [--repeats 15]

For each held-out model of bench/predictor.py (HF GPT-2, HF LLaMA, the separable CNN, two
sizes each):
1. its units are timed alone on both backends (profile_units, the bench's protocol);
2. for every pipeline in PIPELINES (a backend per stage: 2-4 stages on one backend, or
   stages alternating between the 1-thread and the 2-thread backend, as on two unlike
   devices), the contiguous split with the smallest bottleneck (slowest stage) is chosen
   three ways: by the roofline (the `host` preset's figures, summed per stage), by the
   learned predictor trained on --store (`predict_stage`: c_run once and the joins of the
   cuts inside a stage), and by the units' measured times (summed: what a planner that had
   timed every unit alone on every backend would pick);
3. every distinct stage of those splits is timed on both backends, in the same rounds, and
   each split's measured bottleneck (each stage on its pipeline's backend) is compared with
   the best of the three.
The table: per kind of pipeline and policy, the median and worst measured bottleneck over
the best one (1.00 = picked the best split), and how often the policy's split was the best
or within 2 % of it; and how far the learned predictor's bottleneck was from the measured;
then every case where a policy's bottleneck was more than 10 % over the best, by model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from predictor import (  # noqa: E402
    BACKENDS,
    Profiler,
    held_out_models,
    progress_line,
    roofline_times,
    stage_names,
    unit_names,
    zoo_models,
)

from edgeplan.planner.predictor import Predictor  # noqa: E402
from edgeplan.planner.profile import ProfileStore  # noqa: E402

POLICIES = ("roofline", "learned", "units measured")
FAR_OFF = 1.10  # a bottleneck this much over the best split's is listed by model
# A backend per stage: one backend throughout, or two unlike ones alternating.
PIPELINES = tuple((backend,) * k for backend in BACKENDS for k in (2, 3, 4)) + (
    ("cpu1", "cpu2"), ("cpu2", "cpu1"), ("cpu1", "cpu2", "cpu1"), ("cpu2", "cpu1", "cpu2"))


def bottleneck_split(count: int, stages: int, stage_cost) -> list[int]:
    """stage_of_unit of the contiguous split into `stages` stages whose costliest stage
    (`stage_cost(stage, first, end)`: units first..end-1 as stage `stage`) is cheapest
    (DP over cut positions)."""
    best = {(0, 0): (0.0, [])}
    for s in range(1, stages + 1):
        for end in range(s, count - (stages - s) + 1):
            value, start = min((max(best[(start, s - 1)][0], stage_cost(s - 1, start, end)), start)
                               for start in range(s - 1, end) if (start, s - 1) in best)
            best[(end, s)] = (value, best[(start, s - 1)][1] + [end])
    bounds = [0] + best[(count, stages)][1]
    return [s for s in range(stages) for _ in range(bounds[s + 1] - bounds[s])]


def policy_splits(predictor: Predictor, unit_records) -> dict[tuple[str, tuple[str, ...]], list[int]]:
    """(policy, pipeline) -> the split that policy picks for one model's units."""
    rows = {b: sorted((r for r in unit_records if r.backend == b), key=lambda r: r.unit_index)
            for b in BACKENDS}
    features = [r.features for r in rows[BACKENDS[0]]]
    roofline = {b: roofline_times(rows[b], b) for b in BACKENDS}
    measured = {b: np.array([r.time_s for r in rows[b]]) for b in BACKENDS}
    learned = {b: predictor.models[("host", b)] for b in BACKENDS}
    stage_costs = {
        "roofline": lambda b, first, end: float(roofline[b][first:end].sum()),
        "learned": lambda b, first, end: learned[b].predict_stage(features[first:end]),
        "units measured": lambda b, first, end: float(measured[b][first:end].sum()),
    }
    return {(policy, pipeline): bottleneck_split(
                len(features), len(pipeline),
                lambda s, first, end, policy=policy, pipeline=pipeline: stage_costs[policy](pipeline[s], first, end))
            for policy in POLICIES for pipeline in PIPELINES if len(pipeline) <= len(features)}


def kind_of(pipeline: tuple[str, ...]) -> str:
    return "one backend" if len(set(pipeline)) == 1 else "alternating"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "bench" / "out" / "predictor_store.jsonl")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per unit or stage")
    args = parser.parse_args(argv)
    if not args.store.is_file():
        print(f"plan_quality: no profile store at {args.store}; run "
              f"`.venv/bin/python bench/predictor.py --store {args.store}` first", file=sys.stderr)
        return 2
    started = time.perf_counter()
    print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    predictor = Predictor.fit(ProfileStore(args.store).load())
    profile = Profiler(args.repeats)
    profile.calibrate(*next(zoo_models())[1:])
    # ratio[kind][policy] = measured bottleneck / best of the three, one per (model, pipeline)
    ratio = {kind_of(p): {policy: [] for policy in POLICIES} for p in PIPELINES}
    predicted_error = {kind: [] for kind in ratio}
    far_off = []  # (policy, model, pipeline, ratio) of bottlenecks over 1.10x the best
    for name, build in held_out_models():
        model, inputs = build()
        units = profile(model, inputs, name=name, progress=progress_line(f"{name} units"))
        chosen = policy_splits(predictor, units)
        splits = list(dict.fromkeys(tuple(split) for split in chosen.values()))
        stages = profile(model, inputs, name=f"{name}-splits", splits=[list(s) for s in splits],
                         progress=progress_line(f"{name} splits"))
        names = unit_names(units, name)
        timed = {(r.unit, r.backend): r for r in stages}
        for pipeline in PIPELINES:
            if len(pipeline) > len(names):
                continue
            bottleneck = {}
            for policy in POLICIES:
                records = [timed[(stage, backend)] for stage, backend
                           in zip(stage_names(chosen[(policy, pipeline)], names), pipeline)]
                bottleneck[policy] = max(r.time_s for r in records)
                if policy == "learned":
                    predicted = max(predictor.models[("host", r.backend)].predict_stage(r.parts or (r.features,))
                                    for r in records)
                    predicted_error[kind_of(pipeline)].append(predicted / bottleneck[policy] - 1)
            best = min(bottleneck.values())
            for policy in POLICIES:
                ratio[kind_of(pipeline)][policy].append(bottleneck[policy] / best)
                if bottleneck[policy] > FAR_OFF * best:
                    far_off.append((policy, name, pipeline, bottleneck[policy] / best))

    print("\nMeasured bottleneck (slowest stage) of each policy's split over the best of the three")
    print(f"{'pipelines':<12} {'cases':>5} {'policy':<15} {'median':>7} {'worst':>7} {'best':>6} {'<=2%':>6}")
    for kind, by_policy in ratio.items():
        for policy in POLICIES:
            r = np.array(by_policy[policy])
            print(f"{kind:<12} {len(r):>5} {policy:<15} {np.median(r):>7.3f} {r.max():>7.3f} "
                  f"{np.mean(r <= 1.0) * 100:>5.0f}% {np.mean(r <= 1.02) * 100:>5.0f}%")
    for kind, errs in predicted_error.items():
        e = np.abs(errs)
        print(f"{kind:<12} learned bottleneck predicted vs measured: median |error| "
              f"{np.median(e) * 100:.1f} %, within 10 % {np.mean(e <= 0.1) * 100:.0f} %")
    print(f"\nBottlenecks more than {(FAR_OFF - 1) * 100:.0f} % over the best, by policy and model")
    for policy in POLICIES:
        cases = sorted((c for c in far_off if c[0] == policy), key=lambda c: (c[1], -c[3]))
        print(f"{policy:<15} {len(cases):>2}: " + (", ".join(
            f"{model} {'-'.join(pipeline)} {r:.2f}" for _, model, pipeline, r in cases) or "none"))
    print(f"total {time.perf_counter() - started:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
