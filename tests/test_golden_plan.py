"""Golden plan: the decision for a small GPT must not drift unnoticed.

Compares the stable part of the plan (units with their FLOPs, bytes and cuts; stages with
devices, unit ranges and boundary tensors) with tests/golden/gpt2layer_plan.json.
After an intended change, regenerate with EDGEPLAN_UPDATE_GOLDEN=1 and review the diff.
"""

import json
import os

from conftest import ROOT, load_example

import edgeplan

GOLDEN = ROOT / "tests" / "golden" / "gpt2layer_plan.json"


def stable_view(plan) -> dict:
    return {
        "schema_version": plan.schema_version,
        "units": [[u.name, u.flops, u.param_bytes, u.peak_activation_bytes, u.cut_bytes] for u in plan.units],
        "stages": [
            {
                "device": s.device, "backend": s.backend, "units": [s.unit_start, s.unit_end],
                "param_bytes": s.param_bytes, "memory_bytes": s.memory_bytes,
                "boundary": None if s.boundary is None else
                [[t.name, list(t.shape), t.dtype] for t in s.boundary.tensors],
            }
            for s in plan.stages
        ],
    }


def test_plan_matches_golden():
    model, inputs = load_example("gpt").build(n_layer=2, d_model=32, n_head=2, vocab=64, seq=8)
    plan = edgeplan.compile(model, inputs, fleet="jetson-cluster", num_stages=2, time_limit_s=5)
    view = stable_view(plan)
    if os.environ.get("EDGEPLAN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(view, indent=1) + "\n")
    assert view == json.loads(GOLDEN.read_text())
