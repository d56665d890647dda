"""bench/unseen_backend.py on the committed xeon16 records (as this host's) with a made-up
TVM backend whose time is cpu1's times a factor that grows with a unit's matmul share (6x
for a unit without matmuls, 16x for one of matmuls only): no rescaling of either ONNX
Runtime model fits it, and a few samples close most of the gap, as the pool's own fit does."""

import dataclasses
import json
import re
from pathlib import Path

from edgeplan.cli import load_module
from edgeplan.planner.profile import TVM_BACKEND, ProfileStore, combine_features

ROOT = Path(__file__).resolve().parent.parent
XEON16 = ROOT / "bench" / "data" / "xeon16"


def tvm_factor(features: dict) -> float:
    return 6.0 + 10.0 * features["matmul_flops"] / max(features["flops"], 1.0)


def with_tvm(records, suffix: str = ""):
    """The cpu1 records, as this host's, and each again as tvm1 (time x tvm_factor)."""
    out = []
    for r in records:
        if r.backend != "cpu1":
            continue
        host = dataclasses.replace(r, device="host", model=r.model + suffix)
        factor = tvm_factor(r.features)
        out += [host, dataclasses.replace(host, backend=TVM_BACKEND, median_s=r.median_s * factor,
                                          quiet_s=r.quiet_s * factor, reference_s=0.0)]
    return out


def first_half_stages(records):
    """Per model, its first half of units as one stage record: the summed time (each backend)."""
    stages = []
    for model in {r.model for r in records}:
        for backend in ("cpu1", TVM_BACKEND):
            rows = sorted((r for r in records if r.model == model and r.backend == backend),
                          key=lambda r: r.unit_index)[: 4]
            parts = tuple(r.features for r in rows)
            seconds = sum(r.time_s for r in rows)
            stages.append(dataclasses.replace(rows[0], unit="..".join((rows[0].unit, rows[-1].unit)),
                                              features=combine_features(parts), parts=parts,
                                              median_s=seconds, quiet_s=seconds))
    return stages


def test_unseen_backend_bench_adapts_the_ort_models_to_tvm(tmp_path, capsys):
    bench = load_module(ROOT / "bench" / "unseen_backend.py", "edgeplan_bench_unseen_backend")
    store = tmp_path / "store.jsonl"
    xeon = ProfileStore(XEON16 / "store.jsonl").load()
    ProfileStore(store).append([dataclasses.replace(r, device="host") for r in xeon])
    (tmp_path / "store_heldout_splits.json").write_text(json.dumps({}))
    zoo = [r for r in xeon if not r.parts and not r.model.startswith("layers-")]
    ProfileStore(tmp_path / "store_tvm.jsonl").append(with_tvm(zoo))
    first = with_tvm(ProfileStore(XEON16 / "heldout.jsonl").load())
    again = with_tvm(ProfileStore(XEON16 / "heldout_again.jsonl").load(), "-repeat")
    ProfileStore(tmp_path / "store_tvm_heldout.jsonl").append(first + first_half_stages(first) + again)

    assert bench.main(["--store", str(store), "--reuse", "--draws", "3"]) == 0
    out = capsys.readouterr().out
    floor = re.search(r"^tvm1\s+22\s+([\d.]+)%", out, re.M)
    assert floor is not None and float(floor.group(1)) < 20.0  # xeon16's own run-to-run noise
    ratio = float(re.search(r"tvm1 time / cpu1 time, same units and moments: median ([\d.]+)", out).group(1))
    assert 6.0 <= ratio <= 16.0
    for level, count in (("unit", 22), ("stage", 3)):
        row = re.search(rf"^{level}\s+{count} \|(.*)$", out, re.M).group(1)
        unchanged, k5, k10, k20, own = (float(x) for x in re.findall(r"([\d.]+)%\s+\d+%", row))
        assert unchanged > 80.0  # cpu1 as is: 6-16x too fast
        assert k5 < 0.5 * unchanged and k20 < 0.25 * unchanged
        assert own < 0.25 * unchanged  # the pool's own fit: zoo units only, no layer space
        assert re.search(r"cpu[12] \d+", row)  # the sources the draws chose


def test_unseen_backend_bench_names_the_missing_files(tmp_path, capsys):
    bench = load_module(ROOT / "bench" / "unseen_backend.py", "edgeplan_bench_unseen_backend")
    assert bench.main(["--store", str(tmp_path / "none.jsonl"), "--reuse"]) == 2
    assert "bench/predictor.py --store" in capsys.readouterr().err
