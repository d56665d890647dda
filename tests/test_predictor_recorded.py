"""The learned predictor on recorded stores (bench/data: bench/predictor.py's stores and
held-out measurements; host-n profiled with the conv epilogue pairs of the layer space,
host-q a fresh store of the same code in another session, host-j in a steady phase before
the pairs), refit under this code with every record's features
recomputed: the held-out figures they had when recorded hold, so a change that makes the
predictor worse on real measurements fails here, not in the next bench run."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from edgeplan.cli import load_module
from edgeplan.planner.layer_space import layer_space
from edgeplan.planner.predictor import JOIN_BASIS, Predictor
from edgeplan.planner.profile import ProfileStore

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"


def refit(folder: Path):
    """(bench module, fitted predictor, training records, held-out unit records, held-out
    stage records) of a recorded store."""
    bench = load_module(ROOT / "bench" / "predictor.py", "edgeplan_bench_predictor")
    store = bench.refeature(ProfileStore(folder / "store.jsonl").load(), samples=24)
    measured = bench.refeature(ProfileStore(folder / "store_heldout.jsonl").load(), samples=24)
    splits_of = json.loads((folder / "store_heldout_splits.json").read_text())
    units, stages, _ = bench.split_records(measured, splits_of)
    return bench, Predictor.fit(store), store, units, stages


@pytest.fixture(scope="module")
def recorded():
    return refit(DATA / "host-n")


def figures(bench, model, records) -> tuple[float, float]:
    """(median |error|, share within 10 %) of the learned predictions of `records`."""
    err = np.abs(bench.errors(bench.learned_times(model, records), records))
    return float(np.median(err)), float(np.mean(err <= 0.10))


def test_held_out_stages_as_recorded(recorded):
    bench, predictor, _, _, stages = recorded
    cpu1 = [r for r in stages if r.backend == "cpu1"]
    assert len(cpu1) == 46
    median, within = figures(bench, predictor.models[("host", "cpu1")], cpu1)
    assert median <= 0.05 and within >= 0.88  # 4.1 % / 93 % when recorded, 4.3 % / 93 % now
    cnn = [r for r in cpu1 if r.model.startswith("sep-cnn")]
    median, within = figures(bench, predictor.models[("host", "cpu1")], cnn)
    assert median <= 0.04 and within >= 0.85  # 2.0 % / 100 %; 14.8 % / 21 % with epilogues priced by bytes
    cpu2 = [r for r in stages if r.backend == "cpu2"]
    median, _ = figures(bench, predictor.models[("host", "cpu2")], cpu2)
    # 12.2 % when recorded, 13.8 % before boolean attention masks were costed, 14.3 % now,
    # against a noise floor of 9.9 % (its 2-thread pool slept: a backend the runtime never runs)
    assert median <= 0.15


def stage_figures(folder: Path) -> dict[str, tuple[float, float]]:
    """Backend -> (median |error|, share within 10 %) of a recorded store's held-out stages,
    refit under this code."""
    bench, predictor, _, _, stages = refit(folder)
    return {backend: figures(bench, predictor.models[("host", backend)],
                             [r for r in stages if r.backend == backend]) for backend in bench.BACKENDS}


def test_held_out_stages_of_a_second_fresh_store():
    """Store Q, profiled in a fast phase in another session than N, by the same profiling
    code: its held-out stages meet the target on cpu1 too."""
    stages = stage_figures(DATA / "host-q")
    assert stages["cpu1"][0] <= 0.05 and stages["cpu1"][1] >= 0.90  # 2.8 % / 93 % when recorded, 3.0 % / 93 % now
    # 6.3 % when recorded, 9.8 % with linear biases costed, 10.6 % with boolean attention
    # masks: its 2-thread pool slept (a backend the runtime never runs), and its cpu2
    # stages' own two timings differ by 13.8 %
    assert stages["cpu2"][0] <= 0.11


def test_held_out_stages_of_a_store_timed_as_the_runtime_runs_two_threads():
    """Store T, the first whose 2-thread sessions were timed spinning, as the runtime runs
    them (planner/profile.py): its cpu2 stages' median is below their own noise floor's
    (5.9 % / 65 %), and cpu1's is 0.2 points over the target's 5 % (noise floor 3.5 % /
    91 %). Transposes and splits
    costed as the copies ONNX Runtime runs (annotate: kind "copy") and linear layers' biases
    as the Gemms it runs (units: kind "bias") took cpu2 from 7.4 % / 63 % to 6.0 % / 67 % and
    cpu1 from 5.1 % / 93 % to 4.9 % / 91 %; the kernels of boolean attention masks
    (units: `_attention_masks`) cpu2 to 5.3 % / 72 %, expands as the copies ONNX Runtime
    runs cpu2 to 4.9 % / 72 % and cpu1 to 5.2 % / 93 % (HF LLaMA-small's last stages,
    3-4 % high before, 5 % now, crossed the median)."""
    stages = stage_figures(DATA / "host-t")
    # 5.2 % / 93 % and 4.9 % / 72 %; 4.8 % / 93 % and 4.8 % / 74 % with unfused activations
    # in the join model; 4.5 % / 89 % and 4.6 % / 76 % with the law fitted under Huber's loss
    # (two of its 46 cpu1 stages crossed 10 %: T's noise floor is 3.5 % / 91 %)
    assert stages["cpu1"][0] <= 0.055 and stages["cpu1"][1] >= 0.85
    assert stages["cpu2"][0] <= 0.055 and stages["cpu2"][1] >= 0.70


@pytest.mark.parametrize("store, cpu1, cpu2", [
    # 2.5 % / 100 % and 5.4 % / 63 % when recorded; 2.0 % / 100 % and 5.9 % / 76 % with
    # copies and biases; 1.7 % / 100 % and 5.2 % / 83 % with boolean attention masks;
    # 1.8 % / 100 % and 5.1 % / 83 % with expands as copies; 2.5 % / 100 % and 5.1 % / 83 %
    # with unfused activations in the join model; 2.5 % / 100 % and 5.1 % / 85 % under Huber's loss
    ("host-u", (0.030, 0.95), (0.055, 0.83)),
    # 3.1 % / 98 % and 7.4 % / 63 %; 2.4 % / 98 % and 5.1 % / 85 %; 2.3 % / 98 % and 4.4 % / 85 %;
    # 2.1 % / 98 % and 3.8 % / 85 %; 2.9 % / 98 % and 3.9 % / 87 %; 2.7 % / 98 % and 3.9 % / 87 %
    ("host-v", (0.030, 0.95), (0.045, 0.85)),
    # 2.4 % / 98 % and 5.2 % / 78 % when recorded, the CNN's cpu2 stages 12.9 % / 36 %;
    # 2.0 % / 100 % and 5.3 % / 89 % (the CNN's 8.1 % / 71 %) with unfused activations;
    # 1.8 % / 100 % and 4.3 % / 91 % (the CNN's 4.0 % / 86 %) under Huber's loss
    ("host-x", (0.030, 0.95), (0.050, 0.90)),
    # 2.6 % / 98 % and 5.2 % / 85 % when recorded, the CNN's cpu2 stages 8.3 % / 57 %;
    # 2.3 % / 98 % and 5.6 % / 89 % (the CNN's 8.0 % / 79 %) with unfused activations;
    # 2.3 % / 100 % and 4.9 % / 96 % (the CNN's 5.2 % / 93 %) under Huber's loss
    ("host-y", (0.030, 0.95), (0.050, 0.90)),
    # 1.4 % / 100 % and 5.1 % / 85 % when recorded, the CNN's cpu2 stages 9.5 % / 57 %;
    # 2.2 % / 100 % and 4.8 % / 89 % (the CNN's 7.2 % / 71 %) with unfused activations;
    # 1.7 % / 100 % and 3.7 % / 93 % (the CNN's 5.2 % / 100 %) under Huber's loss
    ("host-z", (0.030, 0.98), (0.050, 0.90)),
])
def test_held_out_stages_of_quiet_stores_meet_the_target(store, cpu1, cpu2):
    """Stores U, V, X, Y and Z, timed as the runtime runs two threads, in quiet phases (noise
    floor of the cpu1 stages 1.2 %, 0.4 %, 0.5 %, 0.5 % and 0.4 %, of the cpu2 stages 3.3 % /
    87 %, 3.0 % / 78 %, 1.2 % / 96 %, 0.7 % / 100 % and 0.5 % / 100 %): cpu1 meets the target
    on all five, cpu2 on X, Y and Z, the stores timed in twelve rounds, since the law's fit is
    robust (Huber's loss); of U and V, timed in six, U is 0.1 points over the median and V
    has 87 % within 10 %. X, Y and Z were profiled after every predictor change these tests
    guard but two: the join model's unfused-activation term was found on Z's stages, after Z
    was profiled, and the robust fit was judged on all ten recorded stores."""
    stages = stage_figures(DATA / store)
    assert stages["cpu1"][0] <= cpu1[0] and stages["cpu1"][1] >= cpu1[1]
    assert stages["cpu2"][0] <= cpu2[0] and stages["cpu2"][1] >= cpu2[1]


def test_dense_small_separable_blocks_bring_the_held_out_cnn_closer():
    """Store Z, the first profiled with the layer space's small_separable_block family (48
    separable blocks of 30-400 us, where the held-out CNN's blocks run), refit without
    them. Under a least-squares law they carried the CNN on two threads (cpu2 CNN units 5.8 %
    / 83 % -> 7.0 % / 67 % without them, all stages 4.8 % / 89 % -> 5.7 % / 89 %). Under
    Huber's loss the law no longer leans on them: the CNN's cpu2 units still come closer
    with them (4.7 % / 92 % against 5.6 % / 92 %), but its stages are 5.2 % / 100 % either way
    and all cpu2 stages meet the target either way (3.7 % / 93 % and 3.5 % / 98 %); on one
    thread the CNN's stages are 1.5 % / 100 % either way."""
    bench, predictor, store, units, stages = refit(DATA / "host-z")
    without = Predictor.fit([r for r in store if r.model != "layers-small_separable_block"])
    assert len(without.models[("host", "cpu2")].corrections) < len(predictor.models[("host", "cpu2")].corrections)
    cnn_units = [r for r in units if r.backend == "cpu2" and r.model.startswith("sep-cnn")]
    dense, sparse = (figures(bench, p.models[("host", "cpu2")], cnn_units) for p in (predictor, without))
    assert dense[0] < sparse[0] - 0.005 and dense[1] >= sparse[1]
    every = [r for r in stages if r.backend == "cpu2"]
    for fitted in (predictor, without):
        median, within = figures(bench, fitted.models[("host", "cpu2")], every)
        assert median <= 0.05 and within >= 0.90
    cnn = [r for r in stages if r.backend == "cpu1" and r.model.startswith("sep-cnn")]
    median, within = figures(bench, predictor.models[("host", "cpu1")], cnn)
    assert median <= 0.03 and within >= 0.95



def without_aliasing(records):
    """Records as if no reorder wrote into aliased planes: kind aliased_layout and the
    aliased cut bytes at 0 (what the features said before they existed)."""
    def plain(features):
        return {k: 0.0 if k.startswith("aliased_layout_") or k == "cut_aliased_bytes" else v
                for k, v in features.items()}
    return [dataclasses.replace(r, features=plain(r.features), parts=tuple(plain(p) for p in r.parts))
            for r in records]


def test_reorders_into_aliased_planes_on_the_store_that_samples_them():
    """Store AA, profiled with the layer space's aligned_separable_block pairs and a
    separable chain at 64 px. On one thread a cut of 4-D tensors in channel planes 4 KiB
    apart saves 54 us per MB more than another's (bench/layout_aliasing.py: such a
    ReorderOutput takes 94-104 us per MB, the others' 37-64), and with the surcharge the
    held-out CNN's units, whose 64-px model writes 32 x 32 planes, go from 3.7 % / 83 % to
    2.1 % / 100 %, all cpu1 stages from 2.1 % / 100 % to 1.8 % / 100 % (under Huber's loss:
    2.5 % / 83 % to 0.9 % / 100 %, and 2.4 % / 98 % to 1.5 % / 100 %). Two threads' cuts do not
    show it (-3 us per MB): cpu2's stages 5.6 % / 93 % without it, 5.6 % / 91 % with (4.0 % / 93 %
    and 3.9 % / 93 % under Huber's loss)."""
    bench, predictor, store, units, stages = refit(DATA / "host-aa")
    blind = Predictor.fit(without_aliasing(store))
    cpu1 = predictor.models[("host", "cpu1")]
    aliased = cpu1.join_coef[JOIN_BASIS.index("aliased_bytes")]
    assert aliased < -30e-12
    cnn = [r for r in units if r.backend == "cpu1" and r.model.startswith("sep-cnn")]
    # the law's surcharge is what the cut saves of it: 2 surcharge bytes per tensor byte
    stem = next(r for r in cnn if r.features["aliased_layout_count"] > 0)
    surcharge = cpu1.additive(stem.features) - cpu1.additive(without_aliasing([stem])[0].features)
    assert surcharge == pytest.approx(-aliased / 2 * stem.features["aliased_layout_bytes"], rel=1e-3)
    seen = figures(bench, cpu1, cnn)
    unseen = figures(bench, blind.models[("host", "cpu1")], without_aliasing(cnn))
    assert seen[0] < unseen[0] - 0.01 and seen[1] >= unseen[1] + 0.1
    cpu1_stages = [r for r in stages if r.backend == "cpu1"]
    median, within = figures(bench, cpu1, cpu1_stages)
    assert median <= 0.025 and within >= 0.98
    median, within = figures(bench, predictor.models[("host", "cpu2")], [r for r in stages if r.backend == "cpu2"])
    assert median <= 0.05 and within >= 0.90

def test_held_out_stages_of_a_store_timed_in_twelve_rounds():
    """Store W, each unit timed in 12 rounds instead of 6 (planner/profile.py ROUNDS): its
    held-out cpu2 stages' own two timings agree to 1.8 % / 96 % within 10 % (T, U, V: 3.0-5.9 %
    / 65-87 %), so a cpu2 target is measurable here. cpu1 meets the target; cpu2 does not:
    the training store's cpu2 ran in a slower phase than its held-out models (2-thread
    reference 132 against 106 us), and the CNN's stages stay 14 % off."""
    stages = stage_figures(DATA / "host-w")
    # 2.1 % / 96 % and 7.2 % / 77 % when recorded; 2.0 % / 96 % and 6.6 % / 77 % with
    # boolean attention masks costed; 2.1 % / 96 % and 6.6 % / 77 % with expands as copies;
    # 3.0 % / 96 % and 5.9 % / 81 % with unfused activations in the join model
    assert stages["cpu1"][0] <= 0.035 and stages["cpu1"][1] >= 0.95
    assert stages["cpu2"][0] <= 0.075 and stages["cpu2"][1] >= 0.75


def test_learned_beats_the_roofline_on_every_backend(recorded):
    bench, predictor, _, _, stages = recorded
    for backend in bench.BACKENDS:
        rows = [r for r in stages if r.backend == backend]
        roofline = np.median(np.abs(bench.errors(bench.roofline_times(rows, backend), rows)))
        assert figures(bench, predictor.models[("host", backend)], rows)[0] < roofline / 2


def test_hf_gpt2_blocks_are_costed_as_onnx_runtime_fuses_them():
    """HF GPT-2's written-out GELU is one FastGelu kernel (annotate): costed as 8 ops its
    blocks were predicted 11 % high and its units had a median error of 8.9 % (store J,
    steady phase; store N's held-out models ran in a noisier one)."""
    bench, predictor, _, units, _ = refit(DATA / "host-j")
    rows = [r for r in units if r.backend == "cpu1" and r.model.startswith("hf-gpt2")]
    median, _ = figures(bench, predictor.models[("host", "cpu1")], rows)
    assert median <= 0.05  # 3.2 %


def test_the_law_prices_conv_epilogues_as_the_pairs_measured_them(recorded):
    """Each conv_epilogue pair (one conv with a free ReLU, then with a ReLU6, sigmoid or
    tanh) differs by its epilogue alone: the 1-thread law prices that difference within
    3 us or 15 % of what was measured (priced by bytes, a ReLU6 after a 16 -> 40 conv
    at 57 px came out +37 us where it measured +13). The two timings of a pair are two
    records, each as noisy as its conv: a ReLU6 after a 168 -> 40 conv at 21 px measured +4.6
    us, 0.26 ns per element where the other ReLU6 pairs took 0.06-0.22, and is priced +2.0
    (+3.0 before the law's fit was robust, which priced the other eleven further off)."""
    _, predictor, store, _, _ = recorded
    model = predictor.models[("host", "cpu1")]
    (_, _, _, descriptions), = layer_space(samples=24, families=("conv_epilogue",))
    timed = {r.unit: r for r in store if r.model == "layers-conv_epilogue" and r.backend == "cpu1"}
    for index in range(0, len(descriptions), 2):
        free, paid = timed[f"layers.{index}"], timed[f"layers.{index + 1}"]
        measured = paid.time_s - free.time_s
        priced = model.additive(paid.features) - model.additive(free.features)
        assert abs(priced - measured) <= max(3e-6, 0.15 * measured), descriptions[index + 1]


def test_a_store_profiled_after_the_robust_fit_meets_the_target_in_either_timing():
    """Store BB, profiled after the law's fit became robust (Huber's loss) and judged once:
    cpu1's held-out stages meet the target in both timings (1.7 % / 100 % and 1.8 % / 100 %),
    cpu2's in the second (4.1 % / 93 %) and one stage short in the first (3.7 % / 89 %). The
    stage short is a measurement: sep-cnn-64's features.2..head on two threads ran 203 us in
    every round of its first session and 120 us in its second, the 2-thread reference fast in
    both (120 us), and is predicted 130."""
    bench, predictor, _, _, stages = refit(DATA / "host-bb")
    measured = bench.refeature(ProfileStore(DATA / "host-bb" / "store_heldout.jsonl").load(), samples=24)
    splits_of = json.loads((DATA / "host-bb" / "store_heldout_splits.json").read_text())
    _, _, again = bench.split_records(measured, splits_of)
    judged = {(r.model, r.unit, r.backend) for r in stages}
    second = [dataclasses.replace(r, model=r.model.removesuffix("-repeat")) for r in again
              if (r.model.removesuffix("-repeat"), r.unit, r.backend) in judged]
    assert len(second) == len(stages) == 92
    for timing, floor in ((stages, 0.85), (second, 0.90)):
        cpu1, cpu2 = ([r for r in timing if r.backend == b] for b in ("cpu1", "cpu2"))
        median, within = figures(bench, predictor.models[("host", "cpu1")], cpu1)
        assert median <= 0.03 and within >= 0.98
        median, within = figures(bench, predictor.models[("host", "cpu2")], cpu2)
        assert median <= 0.05 and within >= floor
    slow = next(r for r in stages if r.model == "sep-cnn-64" and r.unit == "features.2..head" and r.backend == "cpu2")
    fast = next(r for r in second if r.model == "sep-cnn-64" and r.unit == "features.2..head" and r.backend == "cpu2")
    assert slow.time_s > 1.5 * fast.time_s and slow.reference_s < 1.05 * fast.reference_s
