"""Learned latency predictor: fit, fallback, adaptation, records from runs, replanning."""

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, load_example

import edgeplan
from edgeplan.cli import main
from edgeplan.errors import EdgeplanError
from edgeplan.passes.annotate import annotate
from edgeplan.passes.capture import capture
from edgeplan.passes.records import COST_KEY
from edgeplan.passes.units import group_units
from edgeplan.planner import predictor as predictor_module
from edgeplan.planner.cost import RooflineCostModel
from edgeplan.planner.fleet import load_fleet
from edgeplan.planner.layer_space import ALIGNED_OUTPUT_SIZES, FAMILIES, SMALL_BLOCK_MFLOPS, layer_space
from edgeplan.planner.plan import Plan
from edgeplan.planner.predictor import (
    JOIN_BASIS,
    MIN_FIT_RECORDS,
    PREDICTED_KINDS,
    RUN_NOISE_PER_SPREAD,
    SIZE_KNOTS,
    STAGE_CUT_SHARE,
    LearnedCostModel,
    Predictor,
    PredictorError,
    ResidualModel,
    adapt,
    choose_knots,
    feature_vector,
    fit_joins,
    fit_model,
    huber_weights,
    join_features,
    model_family,
    nnls,
    older_features,
)
from edgeplan.planner.profile import (
    RUN_RUNTIME,
    ProfileStore,
    UnitProfile,
    combine_features,
    profile_units,
    records_from_run,
    unit_features,
)
from edgeplan.planner.report import format_plan
from edgeplan.runtime.pipeline import RUNS_FILE

TINY = {"n_layer": 4, "d_model": 32, "n_head": 2, "vocab": 64, "seq": 8}
# Seconds per op, per FLOP and per byte of each kind, and per session run: a known latency law.
TRUE_COEF = np.array([30e-6] + [value for kind in PREDICTED_KINDS for value in (
    {"matmul": 4e-6, "conv": 6e-6, "attention": 8e-6}.get(kind, 2e-6),
    {"matmul": 1 / 40e9, "conv": 1 / 25e9, "attention": 1 / 15e9}.get(kind, 1 / 2e9),
    1 / 8e9)])


# The kinds synthetic units are drawn from: fixed, so that a kind added to the predictor
# leaves every seed's draws as they were (the stem convolution and the layout reorders
# have fixtures of their own).
SYNTHETIC_KINDS = ("matmul", "conv", "depthwise", "attention", "norm", "elementwise", "reduce",
                   "embedding", "other")


def synthetic_features(rng: random.Random, kinds=SYNTHETIC_KINDS) -> dict[str, float]:
    features = {}
    for kind in rng.sample(list(kinds), rng.randint(1, min(4, len(kinds)))):
        count = rng.randint(1, 12)
        features[f"{kind}_count"] = float(count)
        features[f"{kind}_flops"] = float(count * 10 ** rng.uniform(4, 8))
        features[f"{kind}_bytes"] = float(count * 10 ** rng.uniform(3, 6.5))
    return features


def synthetic_records(count, seed, backend="cpu1", coef=TRUE_COEF, noise=0.02, kinds=SYNTHETIC_KINDS):
    rng = random.Random(seed)
    records = []
    for i in range(count):
        features = synthetic_features(rng, kinds)
        seconds = float(feature_vector(features) @ coef) * (1 + rng.uniform(-noise, noise))
        records.append(UnitProfile(model="synthetic", unit=f"u{i}", device="host", backend=backend,
                                   features=features, median_s=seconds, p10_s=seconds,
                                   p90_s=seconds, repeats=1, timestamp="2025-01-01T00:00:00+00:00"))
    return records


def relative_errors(model, records):
    return np.array([model.predict(r.features) / r.median_s - 1 for r in records])


def test_nnls_satisfies_the_optimality_conditions():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.normal(size=(12, 6))
        b = rng.normal(size=12)
        x = nnls(a, b)
        gradient = a.T @ (a @ x - b)
        assert (x >= 0).all()
        assert np.allclose(gradient[x > 0], 0, atol=1e-8)  # free coefficients: stationary
        assert (gradient[x == 0] >= -1e-8).all()  # clamped ones: moving up would not help


def test_nnls_from_a_start_finds_the_same_optimum():
    rng = np.random.default_rng(1)
    for _ in range(50):
        a = rng.normal(size=(12, 6))
        b = rng.normal(size=12)
        start = np.where(rng.random(6) < 0.5, rng.random(6), 0.0)  # feasible, any free set
        assert np.allclose(nnls(a, b, start=start), nnls(a, b), atol=1e-10)


def test_huber_weights_down_weight_errors_beyond_k_robust_deviations():
    errors = np.array([-0.02, -0.01, 0.0, 0.01, 0.02, 0.5])
    spread = 1.4826 * 0.015  # median absolute deviation from the median (0.005) is 0.015
    weights = huber_weights(errors, k=1.345)
    assert np.allclose(weights[:5], 1.0)
    assert weights[5] == pytest.approx(1.345 * spread / 0.495)
    assert np.allclose(huber_weights(np.zeros(4)), 1.0)  # no spread: nothing to judge by


def test_a_few_units_off_the_law_do_not_move_its_rates():
    """Nineteen units of 2 s per FLOP, timed 1 % either side of it, and three at twice that
    (as a launch-bound embedding runs against the rate its kind's big ops agree on): least
    squares on relative errors moves the rate 4 % towards the three, Huber's loss keeps the
    nineteen's."""
    flops = np.linspace(1.0, 5.0, 22)
    x = np.stack([flops, np.zeros(22)], axis=1)
    y = 2.0 * flops * np.where(np.arange(22) % 2 == 0, 1.01, 0.99)
    y[[3, 10, 17]] = 4.0 * flops[[3, 10, 17]]
    assert predictor_module._relative_nnls(x, y)[0] == pytest.approx(2.0, rel=0.005)
    least_squares = nnls(x / y[:, None], np.ones(22))[0]
    assert least_squares == pytest.approx(2.08, abs=0.01)


def test_fit_predicts_unseen_units_of_a_known_law():
    model = fit_model(synthetic_records(300, seed=1), "host", "cpu1")
    fresh = synthetic_records(200, seed=2)  # other units: corrections cannot apply
    errors = np.abs(relative_errors(model, fresh))
    assert np.median(errors) < 0.03 and np.mean(errors <= 0.10) > 0.95
    assert (model.coef >= 0).all() and model.kinds == frozenset(SYNTHETIC_KINDS)


def test_measured_units_are_predicted_as_measured():
    records = synthetic_records(100, seed=3)
    slow = records[0]
    records.append(UnitProfile(**{**slow.__dict__, "median_s": slow.median_s * 3}))
    model = fit_model(records, "host", "cpu1")
    assert model.predict(slow.features) == pytest.approx(slow.median_s * 3, rel=1e-9)
    # a stage-level record corrects each of its parts by the same factor, as they run
    # inside stages; alone, a unit timed alone stays as it was timed
    parts = [records[1].features, records[2].features]
    stage = UnitProfile(**{**records[1].__dict__, "unit": "u1..u2", "parts": tuple(parts),
                           "features": combine_features(parts),
                           "median_s": 2 * (records[1].median_s + records[2].median_s)})
    model = fit_model(records + [stage], "host", "cpu1")
    total = model.predict_stage(parts)
    assert total == pytest.approx(stage.median_s, rel=1e-9)
    # one session run: the per-run cost counts once, not once per unit
    inside = model.predict_many(parts, in_stage=True)
    assert total == pytest.approx(inside.sum() + model.joins(parts, inside).sum() - model.run_overhead_s, rel=1e-6)
    for record in records[1:3]:
        assert model.predict(record.features) == pytest.approx(record.median_s, rel=0.05)
        assert model.predict_stage([record.features]) == model.predict(record.features)
    # a unit no record timed alone: the stage's factor is all there is, alone too
    unseen = synthetic_records(1, seed=30)[0]
    inside = [records[1].features, unseen.features]
    both = UnitProfile(**{**stage.__dict__, "unit": "u1..x", "parts": tuple(inside),
                          "features": combine_features(inside), "median_s": stage.median_s})
    model = fit_model(records + [both], "host", "cpu1")
    assert model.predict(unseen.features) == pytest.approx(
        model.predict_many([unseen.features], in_stage=True)[0], rel=1e-12)
    assert model.predict(unseen.features) != pytest.approx(model.base(unseen.features), rel=0.1)


def test_stage_records_are_fitted_together_not_last_one_wins():
    """Two stages: two identical blocks, then a block and a head that runs 1.5x its
    prediction inside stages. The blocks keep the factor their own stage says (1.1), the
    head takes the rest, so a three-block stage nobody timed is predicted right."""
    records = synthetic_records(100, seed=5)
    block, head = (r.features for r in synthetic_records(2, seed=31))
    model = fit_model(records, "host", "cpu1")
    (p_block, p_head), c_run = model.predict_many([block, head]), model.run_overhead_s

    def stage_record(parts, true_times):
        seconds = sum(true_times) - (len(parts) - 1) * c_run + model.joins(
            parts, model.predict_many(parts)).sum()
        return UnitProfile(**{**records[0].__dict__, "unit": f"stage{len(parts)}", "parts": tuple(parts),
                              "features": combine_features(parts), "median_s": seconds,
                              "p10_s": seconds, "p90_s": seconds})

    blocks = stage_record([block, block], [1.1 * p_block] * 2)
    mixed = stage_record([block, head], [1.1 * p_block, 1.5 * p_head])
    fitted = fit_model(records + [blocks, mixed], "host", "cpu1")
    for record in (blocks, mixed):
        assert fitted.predict_stage(record.parts) == pytest.approx(record.median_s, rel=1e-3)
    three = [block] * 3
    expected = 3 * 1.1 * p_block - 2 * c_run + model.joins(three, model.predict_many(three)).sum()
    # a share of each stage's error goes to its cut (STAGE_CUT_SHARE): the three-block
    # stage, with a cut more than the stage of blocks timed, is off by a part of that share
    assert fitted.predict_stage(three) == pytest.approx(expected, rel=5e-3)
    # never timed alone: the factor it takes inside stages, most of its 1.5 (its cut the rest)
    assert fitted.predict(head) == pytest.approx(fitted.predict_many([head], in_stage=True)[0], rel=1e-12)
    assert 1.4 * p_head < fitted.predict(head) < 1.5 * p_head


def test_one_stage_teaches_its_units_a_share_that_shrinks_with_its_cuts():
    """A five-unit chain run as one stage, 1.3x its prediction: the stage is predicted as
    measured; its units take the share 1 / (1 + STAGE_CUT_SHARE * 4) of the error as a
    factor, its four cuts the rest in equal seconds, so a stage of two of its units learns
    less than the whole error, where a two-unit stage measured alone teaches its units more."""
    records = synthetic_records(MIN_FIT_RECORDS, seed=5)  # enough for the law to leave stages out
    chain = [r.features for r in synthetic_records(5, seed=40)]
    model = fit_model(records, "host", "cpu1")

    def recorded(parts, factor):
        seconds = factor * model.predict_stage(parts)
        return UnitProfile(**{**records[0].__dict__, "unit": f"stage{len(parts)}", "parts": tuple(parts),
                              "features": combine_features(parts), "median_s": seconds,
                              "p10_s": seconds, "p90_s": seconds})

    whole = recorded(chain, 1.3)
    fitted = fit_model(records + [whole], "host", "cpu1")
    assert fitted.predict_stage(chain) == pytest.approx(whole.median_s, rel=1e-6)
    before, after = model.predict_many(chain), fitted.predict_many(chain, in_stage=True)
    share = 1.0 / (1.0 + STAGE_CUT_SHARE * 4)
    target = whole.median_s + 4 * model.run_overhead_s - model.joins(chain, before).sum()
    assert after / before == pytest.approx(np.full(5, (target / before.sum()) ** share), rel=1e-3)
    cuts = fitted.joins(chain, after) - model.joins(chain, after)
    assert cuts == pytest.approx(np.full(4, (target - before.sum() * (target / before.sum()) ** share) / 4))
    pair = chain[:2]
    taught = fitted.predict_stage(pair) / model.predict_stage(pair)
    alone = fit_model(records + [recorded(pair, 1.3)], "host", "cpu1")
    assert 1.0 < taught < alone.predict_stage(pair) / model.predict_stage(pair) == pytest.approx(1.3)


def test_a_runs_error_is_learned_as_far_as_runs_show_more_than_their_noise():
    """Stage times from runs: an error within a run's noise (RUN_NOISE_PER_SPREAD x the spread of
    the profiled timings) moves the stage half way for one run and 2/3 of the way for two
    (the predictor's error is taken to be at least the noise); an error far beyond the noise
    is learned almost whole. A profiled stage record is taken as timed."""
    records = [dataclasses.replace(r, p10_s=r.median_s / 1.1, p90_s=r.median_s * 1.1)
               for r in synthetic_records(MIN_FIT_RECORDS, seed=5)]
    noise = RUN_NOISE_PER_SPREAD * (1.1 * 1.1 - 1.0)
    chain = [r.features for r in synthetic_records(3, seed=41)]
    model = fit_model(records, "host", "cpu1")
    predicted = model.predict_stage(chain)

    def run(factor, hour=0, runtime=RUN_RUNTIME):
        seconds = factor * predicted
        return UnitProfile(model="m", unit="u0..u2", device="host", backend="cpu1",
                           features=combine_features(chain), parts=tuple(chain), median_s=seconds,
                           p10_s=seconds, p90_s=seconds, repeats=8, runtime=runtime,
                           timestamp=f"2025-01-01T{hour:02d}:00:00+00:00")

    def learned(*runs):
        return fit_model(records + list(runs), "host", "cpu1").predict_stage(chain) / predicted

    assert learned(run(1.03)) == pytest.approx(1.03 ** 0.5, rel=1e-6)
    assert learned(run(1.03), run(1.03, hour=1)) == pytest.approx(1.03 ** (2 / 3), rel=1e-6)
    far = math.log(1.5)
    weight = (far * far - noise * noise) / (far * far)
    assert weight > 0.99 and learned(run(1.5)) == pytest.approx(1.5 ** weight, rel=1e-6)
    # profiled, its units timed in the same rounds: no run's noise to shrink
    assert learned(run(1.03, runtime="onnxruntime")) == pytest.approx(1.03, rel=1e-6)


# What a cut inside a stage adds: per cut, per byte of 4-D and of other tensors crossing,
# per byte of the two units' weights, per LayerNorm byte of a pointwise-only unit after it,
# per elementwise byte of the unit before a cut of 4-D tensors only, per byte of 4-D
# tensors in aliased channel planes (JOIN_BASIS).
TRUE_JOIN = np.array([-1e-3, -2e-9, -4e-9, 1e-10, -1e-9, -1.5e-9, -1e-9])


def chain_records(models: int, seed: int, join=TRUE_JOIN, noise=0.01, units=5, aliased_chains=None):
    """Unit records of `models` synthetic chains of units and stage records of their pairs
    and of their first three units, timed as the law plus `join` at every inner cut. Every
    third 4-D cut (of the chains in `aliased_chains`, default all) is in aliased planes."""
    rng = random.Random(seed)
    records = []
    for m in range(models):
        chain = []
        for _ in range(units):
            # every third unit or so holds pointwise ops only (a norm after a block)
            features = synthetic_features(rng, ("norm", "elementwise") if rng.random() < 0.3 else SYNTHETIC_KINDS)
            nchw = rng.choice([0.0, rng.uniform(1e5, 2e6)])
            # half the cuts of 4-D tensors carry nothing else, as a conv net's
            other = 0.0 if nchw and rng.random() < 0.5 else rng.uniform(1e4, 5e5)
            aliased = nchw if (m + len(chain)) % 3 == 0 and (aliased_chains is None or m in aliased_chains) else 0.0
            features.update(cut_nchw_bytes=nchw, cut_bytes=nchw + other, cut_aliased_bytes=aliased,
                            param_bytes=rng.uniform(1e5, 8e6))
            chain.append(features)
        alone = [float(feature_vector(f) @ TRUE_COEF) for f in chain]
        for i, (features, seconds) in enumerate(zip(chain, alone)):
            records.append(UnitProfile(model=f"chain{m}", unit=f"u{i}", device="host", backend="cpu1",
                                       features=features, median_s=seconds, p10_s=seconds,
                                       p90_s=seconds, repeats=1, timestamp="2025-01-01T00:00:00+00:00"))
        for start, end in [(i, i + 2) for i in range(units - 1)] + [(0, 3)]:
            parts = tuple(chain[start:end])
            seconds = (sum(alone[start:end]) - (end - start - 1) * TRUE_COEF[0]
                       + sum(join_features(a, b) @ join for a, b in zip(parts, parts[1:])))
            seconds *= 1 + rng.uniform(-noise, noise)
            records.append(UnitProfile(model=f"chain{m}", unit=f"u{start}..u{end - 1}", device="host",
                                       backend="cpu1", features=combine_features(parts), median_s=seconds,
                                       quiet_s=seconds, p10_s=seconds, p90_s=seconds, repeats=1, parts=parts,
                                       timestamp="2025-01-01T00:00:00+00:00"))
    return records


def test_join_model_learns_what_cuts_inside_a_stage_change():
    """Stages of chains never seen are predicted with their inner cuts' joins; without the
    join model the sums of units miss by the joins."""
    # 16 chains: six coefficients from 8 chains' 40 stages came out 0.2-4.7x here
    model = fit_model(synthetic_records(300, seed=30) + chain_records(16, seed=31), "host", "cpu1")
    assert model.join_coef is not None and len(model.join_coef) == len(JOIN_BASIS)
    assert np.allclose(model.join_coef, TRUE_JOIN, rtol=0.3, atol=2e-6 * np.abs(TRUE_JOIN).max())
    fresh = [r for r in chain_records(8, seed=32, noise=0.0) if r.parts]
    with_joins = np.array([model.predict_stage(r.parts) / r.median_s - 1 for r in fresh])
    plain = dataclasses.replace(model, join_coef=None)
    without = np.array([plain.predict_stage(r.parts) / r.median_s - 1 for r in fresh])
    assert np.median(np.abs(with_joins)) < 0.03 < np.median(np.abs(without))
    # a join never saves more than the smaller of its two units costs
    part = fresh[0].parts[:2]
    times = model.predict_many(part)
    greedy = dataclasses.replace(model, join_coef=np.array([-1.0] + [0.0] * (len(JOIN_BASIS) - 1)))
    assert greedy.joins(part, times)[0] == pytest.approx(-times.min())


def test_join_model_is_dropped_where_it_does_not_predict_other_models():
    """Stage times that scatter around the sums of their units, unrelated to the cuts: the
    fit on other models predicts a left-out model's stages no better than no join."""
    records = chain_records(8, seed=33, join=np.zeros(len(JOIN_BASIS)), noise=0.0)
    rng = random.Random(34)
    scattered = [dataclasses.replace(r, median_s=r.median_s * (1 + rng.uniform(-0.2, 0.2)))
                 if r.parts else r for r in records]
    assert fit_joins(scattered, float(TRUE_COEF[0])) is None
    assert fit_joins(records[:12], float(TRUE_COEF[0])) is None  # one model only: too few
    profiled = chain_records(16, seed=35)
    assert fit_joins(profiled, float(TRUE_COEF[0])) is not None
    # a feature that one model's cuts alone have: no left-out fit can vouch for it
    one_aliased = fit_joins(chain_records(16, seed=35, aliased_chains={0}), float(TRUE_COEF[0]))
    assert one_aliased[JOIN_BASIS.index("aliased_bytes")] == 0.0
    assert fit_joins(chain_records(16, seed=35, aliased_chains={0, 1}), float(TRUE_COEF[0]))[
        JOIN_BASIS.index("aliased_bytes")] < 0  # two models: fitted
    # stage records from runs (no quiet round; codecs inside their times) are not used
    from_runs = [dataclasses.replace(r, quiet_s=0.0) for r in profiled]
    assert fit_joins(from_runs, float(TRUE_COEF[0])) is None


def size_dependent_records(count, seed, efficiency_knee=3e6):
    """The known law of TRUE_COEF, slowed down for small units: a unit of F FLOPs runs at
    1 / (1 + knee / F) of the law's speed (kernels far below peak when small)."""
    records = synthetic_records(count, seed, noise=0.02, kinds=("matmul", "elementwise", "norm"))
    return [UnitProfile(**{**r.__dict__, "model": f"model{i % 40}", "median_s": r.median_s * (
        1 + efficiency_knee / sum(r.features.get(f"{k}_flops", 0.0) for k in PREDICTED_KINDS))})
        for i, r in enumerate(records)]


def op_size_records(count, seed, families=8):
    """TRUE_COEF's law with matmul's rate per FLOP bending with the mean matmul's size:
    8x slower at 10 kFLOP per op, 2x at 1 MFLOP, 1x from 100 MFLOP (linear in log10
    size between them), as small GEMMs run below peak; units of `families` model families."""
    records = synthetic_records(count, seed, noise=0.02, kinds=("matmul", "elementwise"))
    slow = []
    for i, r in enumerate(records):
        f = r.features
        extra = 0.0
        if f.get("matmul_count"):
            size = math.log10(f["matmul_flops"] / f["matmul_count"])
            extra = (np.interp(size, [4, 6, 8], [8.0, 2.0, 1.0]) - 1.0) * f["matmul_flops"] * TRUE_COEF[2]
        seconds = r.median_s + extra
        slow.append(UnitProfile(**{**r.__dict__, "model": f"family{i % families}-{i}",
                                   "median_s": seconds, "p10_s": seconds, "p90_s": seconds}))
    return slow


def test_size_binned_law_is_chosen_where_op_size_bends_the_rate():
    train, fresh = op_size_records(300, seed=41), op_size_records(200, seed=42)
    assert choose_knots(train) == SIZE_KNOTS
    model = fit_model(train, "host", "cpu1")
    assert model.size_knots == SIZE_KNOTS
    binned = dataclasses.replace(model, residual=None, corrections={})
    plain_coef = fit_model([UnitProfile(**{**r.__dict__, "model": "one"}) for r in train],
                           "host", "cpu1")
    assert plain_coef.size_knots == ()  # one family: nothing to choose with
    plain = dataclasses.replace(plain_coef, residual=None, corrections={})
    binned_errors, plain_errors = (np.abs(relative_errors(m, fresh)) for m in (binned, plain))
    assert np.median(binned_errors) < 0.5 * np.median(plain_errors)
    assert np.mean(binned_errors <= 0.10) > np.mean(plain_errors <= 0.10) + 0.1
    # split columns add up to the plain ones
    features = fresh[0].features
    assert feature_vector(features, SIZE_KNOTS).sum() == pytest.approx(feature_vector(features).sum())
    # where the rate does not bend, the plain law's fewer coefficients win
    assert choose_knots([UnitProfile(**{**r.__dict__, "model": f"family{i % 8}-{i}"})
                         for i, r in enumerate(synthetic_records(300, seed=43))]) == ()


def test_size_bins_are_judged_on_left_out_models_with_the_layer_space_kept(monkeypatch):
    records = op_size_records(320, seed=41)
    # half the units from four sampled layer families, half from four models
    named = [UnitProfile(**{**r.__dict__, "model": f"layers-kind{i % 4}" if i % 2 else f"model{i % 8}-{i}"})
             for i, r in enumerate(records)]
    fits = []
    real_nnls = predictor_module._relative_nnls
    monkeypatch.setattr(predictor_module, "_relative_nnls",
                        lambda x, y: fits.append(len(y)) or real_nnls(x, y))
    assert choose_knots(named) == SIZE_KNOTS
    # each of the 4 models left out once per law, every layer family in every fit
    assert len(fits) == 2 * 4 and all(n == len(named) - 40 for n in fits)
    fits.clear()
    layers_only = [UnitProfile(**{**r.__dict__, "model": f"layers-kind{i % 4}"}) for i, r in enumerate(records)]
    assert choose_knots(layers_only) == SIZE_KNOTS
    assert len(fits) == 2 * 4  # no models: the layer families are left out instead


def test_residual_weight_is_judged_on_left_out_models_not_layer_families():
    """Small sampled layers whose two families' residuals disagree (+0.5 / -0.5: no
    family predicts the other's), and large units of four models sharing one residual
    (+0.3). Judged on every family, the disagreement decides (weight 0); judged on the
    models, as a new model is, the residual carries over."""
    small = [r.features for r in synthetic_records(80, seed=51)]
    large = [{k: v * 1e3 if k.endswith(("_flops", "_bytes")) or k in ("flops", "bytes_moved") else v
              for k, v in f.items()} for f in (r.features for r in synthetic_records(80, seed=52))]
    groups = [f"layers-kind{i % 2}" for i in range(80)] + [f"model{i % 4}" for i in range(80)]
    residuals = np.array([0.5 if i % 2 else -0.5 for i in range(80)] + [0.3] * 80)
    fitted = ResidualModel.fit(TRUE_COEF, small + large, residuals, groups=groups)
    assert fitted.weight > 0.5
    assert np.median(fitted.predict(large)) > 0.15  # the models' +0.3 carries over
    only_layers = ResidualModel.fit(TRUE_COEF, small, residuals[:80], groups=groups[:80])
    assert only_layers.weight == 0.0  # no models: the layer families are judged


def test_residual_neighbours_share_what_a_unit_is_made_of():
    """Matmul-only units of four models whose residual grows with size: the kind shares
    say nothing among them (all alike), which left size alone deciding, and then a
    convolution of a matmul unit's size took that unit's residual in full. The kind
    shares always count: the convolution lies far from every matmul unit."""
    rng = random.Random(61)
    sizes = [10 ** rng.uniform(4, 8) for _ in range(80)]
    matmuls = [{"matmul_count": 1.0, "matmul_flops": f, "matmul_bytes": f / 10} for f in sizes]
    residuals = np.array([0.1 * (np.log10(f) - 6) for f in sizes])
    fitted = ResidualModel.fit(TRUE_COEF, matmuls, residuals, groups=[f"model{i % 4}" for i in range(80)])
    assert fitted.weight > 0
    largest = int(np.argmax(sizes))
    conv = {"conv_count": 1.0, "conv_flops": sizes[largest], "conv_bytes": sizes[largest] / 10}
    own, other = fitted.predict([matmuls[largest], conv])
    assert own > 0.1  # a matmul unit near others of its size: their residual
    assert abs(other) < 0.2 * own  # the convolution: shrunk towards the additive law


def test_residual_model_follows_size_dependent_efficiency(monkeypatch):
    # on the plain law: the size-binned one would take part of the bend itself
    monkeypatch.setattr(predictor_module, "choose_knots", lambda records: ())
    train, fresh = size_dependent_records(400, seed=11), size_dependent_records(200, seed=12)
    model = fit_model(train, "host", "cpu1")
    assert model.residual is not None
    additive_only = dataclasses.replace(model, residual=None, corrections={})
    learned = np.abs(relative_errors(model, fresh))
    additive = np.abs(relative_errors(additive_only, fresh))
    # the additive law cannot bend with size; the residual model follows it
    assert np.mean(learned) < 0.85 * np.mean(additive)
    assert np.median(learned) < np.median(additive)
    assert np.mean(learned <= 0.10) > np.mean(additive <= 0.10) + 0.03
    # far from every training unit the residual fades: the prediction is the additive law
    far = {"matmul_count": 1.0, "matmul_flops": 1e15, "matmul_bytes": 1e12}
    assert model.residual.predict([far])[0] == pytest.approx(0.0, abs=0.05)
    # ... and on a training unit it is that unit's own residual, as far as leave-one-out trusts it
    near = train[0].features
    own = np.log(train[0].median_s / model.additive(near))
    assert 0 < model.residual.weight <= 1
    assert model.residual.predict([near])[0] == pytest.approx(model.residual.weight * own, abs=1e-3)


def test_depthwise_conv_is_its_own_kind():
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, groups=16), torch.nn.Conv2d(16, 1, 1),
                                torch.nn.Conv2d(1, 4, 3)).eval()
    gm = annotate(capture(model, (torch.randn(1, 16, 10, 10),), "convs"))
    kinds = [n.meta[COST_KEY].kind for n in gm.graph.nodes if n.op == "call_function"]
    # a single-channel input is dense even with one channel per filter (and fewer
    # channels than ONNX Runtime's block: read as NCHW, kind "stem")
    assert kinds == ["depthwise", "conv", "stem"]
    features = combine_features([unit_features(u) for u in group_units(gm)])
    assert features["depthwise_count"] == 1 and features["conv_count"] == 1 and features["stem_count"] == 1
    assert features["depthwise_flops"] == 2 * 16 * 8 * 8 * 9


def test_residual_model_needs_a_few_units_and_other_models():
    assert fit_model(synthetic_records(5, seed=13), "host", "cpu1").residual is None
    residual = fit_model(size_dependent_records(200, seed=13), "host", "cpu1").residual
    assert residual is not None and residual.weight > 0
    # units of one model only: leave-one-model-out has nothing to predict from, weight 0
    one_model = [UnitProfile(**{**r.__dict__, "model": "only"}) for r in size_dependent_records(200, seed=13)]
    residual = fit_model(one_model, "host", "cpu1").residual
    assert residual is not None and residual.weight == 0.0
    assert np.all(residual.predict([r.features for r in one_model[:5]]) == 0.0)
    # sizes of one family ("only-1", "only-2", ...) do not vouch for each other either
    one_family = [UnitProfile(**{**r.__dict__, "model": f"only-{i % 40}-{i % 3}"})
                  for i, r in enumerate(size_dependent_records(200, seed=13))]
    assert fit_model(one_family, "host", "cpu1").residual.weight == 0.0


def test_model_family_is_the_name_before_its_size():
    assert model_family("gpt-2-128-4-512-32-2") == "gpt"
    assert model_family("llama_style-1-384-6-3") == "llama_style"
    assert model_family("sepchain-160-k3-80") == "sepchain"
    assert model_family("layers-conv") == "layers-conv"
    assert model_family("hf-gpt2-small") == "hf-gpt2-small"
    assert model_family("resnet") == "resnet"


def test_adaptation_improves_with_samples():
    source = fit_model(synthetic_records(300, seed=4), "host", "cpu1")
    # The target backend: twice as fast on FLOPs, same per-op overhead, slower memory.
    target_coef = TRUE_COEF.copy()
    target_coef[2::3] /= 2.0
    target_coef[3::3] *= 1.3
    tests = synthetic_records(200, seed=6, backend="cpu2", coef=target_coef)
    curve = []
    for k in (0, 5, 20, 60):
        # mean over a few sample draws: which 5 units one gets matters more than 5 vs 20
        errors = [np.median(np.abs(relative_errors(adapt(
            source, synthetic_records(60, seed=seed, backend="cpu2", coef=target_coef)[:k],
            "host", "cpu2"), tests))) for seed in (5, 15, 25, 35, 45)]
        curve.append(float(np.mean(errors)))
    assert curve[0] > curve[1] > curve[2] >= curve[3] - 0.005
    assert curve[3] < 0.06 < curve[0]


def test_adaptation_carries_the_sources_memory_until_a_sample_times_the_same_unit():
    records = synthetic_records(100, seed=31)
    slow = records[0]
    records.append(UnitProfile(**{**slow.__dict__, "median_s": slow.median_s * 3}))
    source = fit_model(records, "host", "cpu1")
    samples = synthetic_records(10, seed=32, backend="cpu2", coef=TRUE_COEF * 0.5)
    adapted = adapt(source, samples, "host", "cpu2")
    # ran 3x its law on the source: 3x the adapted law on the target too
    assert adapted.predict(slow.features) == pytest.approx(
        3 * slow.median_s / source.base(slow.features) * adapted.base(slow.features), rel=0.02)
    timed = UnitProfile(**{**slow.__dict__, "backend": "cpu2", "median_s": slow.median_s * 0.5})
    again = adapt(source, samples + [timed], "host", "cpu2")
    assert again.predict(slow.features) == pytest.approx(timed.median_s, rel=1e-9)

def test_few_records_adapt_from_the_backend_that_explains_them():
    own = synthetic_records(MIN_FIT_RECORDS, seed=7)
    few = synthetic_records(8, seed=8, backend="cpu2", coef=TRUE_COEF * 0.5)
    predictor = Predictor.fit(own + few)
    adapted = predictor.models[("host", "cpu2")]
    assert adapted.source == "host/cpu1" and adapted.records == 8
    tests = synthetic_records(100, seed=9, backend="cpu2", coef=TRUE_COEF * 0.5)
    assert np.median(np.abs(relative_errors(adapted, tests))) < 0.05
    with pytest.raises(PredictorError, match="no backend has the"):
        Predictor.fit(few)
    with pytest.raises(PredictorError, match="no records"):
        Predictor.fit([])



def test_an_unseen_device_with_few_records_is_adapted_and_costed_by_its_fleet_name(tiny_units):
    """`edgeplan profile --device box` on another machine: its handful of records make an
    adapted model under the fleet device's name, which the cost model finds before the
    `host` preset's own, so box's column differs from host's by box's speed."""
    import dataclasses

    host = synthetic_records(MIN_FIT_RECORDS, seed=11)
    box = [dataclasses.replace(r, device="box")
           for r in synthetic_records(10, seed=12, coef=TRUE_COEF * 0.5)]
    predictor = Predictor.fit(host + box)
    adapted = predictor.models[("box", "cpu1")]
    assert adapted.source == "host/cpu1" and adapted.records == 10
    tests = synthetic_records(100, seed=13, coef=TRUE_COEF * 0.5)
    assert np.median(np.abs(relative_errors(adapted, tests))) < 0.05
    fleet = load_fleet({"name": "two", "device": [
        {"name": "host", "preset": "host", "only_backends": ["cpu1"]},
        {"name": "box", "preset": "host", "only_backends": ["cpu1"]}]})
    assert predictor.model_for(fleet.device("box"), "cpu1") is adapted
    tables = LearnedCostModel(predictor).costs(tiny_units, fleet)
    on_host = tables.compute_s[:, tables.slots.index(("host", "cpu1"))]
    on_box = tables.compute_s[:, tables.slots.index(("box", "cpu1"))]
    learned = ~tables.guessed[:, tables.slots.index(("box", "cpu1"))]
    assert learned.any()
    assert np.median(on_box[learned] / on_host[learned]) == pytest.approx(0.5, rel=0.1)
    # the plan says where each backend's learned costs come from
    assert tables.slot_sources == (f"fitted on {MIN_FIT_RECORDS} record(s)",
                                   "adapted from host/cpu1 with 10 record(s)")
    model, inputs = load_example("gpt").build(**TINY)
    plan = edgeplan.compile(model, inputs, fleet=fleet, cost_model=LearnedCostModel(predictor))
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again.costs.slot_sources == tables.slot_sources
    used = {f"{s.device}/{s.backend}" for s in plan.stages}
    report = format_plan(again)
    for slot, source in zip(("host/cpu1", "box/cpu1"), tables.slot_sources):
        assert (f"{slot}: {source}" in report) == (slot in used)

@pytest.fixture(scope="module")
def tiny_units():
    model, inputs = load_example("gpt").build(**TINY)
    return group_units(annotate(capture(model, inputs)))


def test_fallback_marks_guessed_units(tiny_units):
    # Data for cpu1 only, and without attention: blocks fall back to the roofline there.
    kinds = tuple(k for k in SYNTHETIC_KINDS if k != "attention")
    cost_model = LearnedCostModel(Predictor.fit(synthetic_records(200, seed=10, kinds=kinds)))
    fleet = load_fleet("host")
    tables = cost_model.costs(tiny_units, fleet)
    roofline = RooflineCostModel().costs(tiny_units, fleet)
    cpu1, cpu2 = tables.slots.index(("host", "cpu1")), tables.slots.index(("host", "cpu2"))
    blocks = [i for i, u in enumerate(tiny_units) if u.name.startswith("blocks.")]
    assert tables.model == "learned" and len(blocks) == TINY["n_layer"]
    assert tables.guessed[:, cpu2].all()  # no data at all for cpu2
    assert (tables.slot_sources[cpu1], tables.slot_sources[cpu2]) == ("fitted on 200 record(s)", "")
    pair = cost_model.costs(tiny_units, load_fleet("host-pair"))  # devices of kind host
    assert set(pair.slot_sources) == {"fitted on 200 record(s) of host/cpu1"}
    assert tables.guessed[blocks, cpu1].all()
    assert not tables.guessed[[0, len(tiny_units) - 1], cpu1].any()  # embedding, head
    assert np.array_equal(tables.compute_s[tables.guessed], roofline.compute_s[tables.guessed])
    head = tiny_units[-1]
    expected = float(feature_vector(unit_features(head)) @ TRUE_COEF)
    # the unit's column leaves c_run out: a stage pays it once, in stage_overhead_s
    assert tables.compute_s[-1, cpu1] + tables.stage_overhead_s[cpu1] == pytest.approx(expected, rel=0.05)
    assert tables.stage_overhead_s[cpu1] == pytest.approx(TRUE_COEF[0], rel=0.2)
    assert tables.stage_overhead_s[cpu2] == 0.0  # roofline: no per-run cost
    assert set(tables.guessed_units) == {u.name for u in tiny_units}

    model, inputs = load_example("gpt").build(**TINY)
    plan = edgeplan.compile(model, inputs, fleet="host", cost_model=cost_model)
    stage = plan.stages[0]
    assert stage.guessed_units == tuple(
        u.name for u, row in zip(tiny_units, tables.guessed)
        if row[tables.slots.index((stage.device, stage.backend))])
    again = Plan.from_dict(json.loads(plan.to_json()))
    assert again.stages[0].guessed_units == stage.guessed_units
    assert np.array_equal(again.costs.guessed, plan.costs.guessed)
    assert again.units[1].features == unit_features(tiny_units[1])


def test_cost_tables_carry_joins_between_learned_units(tiny_units):
    kinds = tuple(k for k in SYNTHETIC_KINDS if k != "attention")
    predictor = Predictor.fit(synthetic_records(200, seed=10, kinds=kinds))
    model = dataclasses.replace(predictor.models[("host", "cpu1")], join_coef=TRUE_JOIN)
    predictor = Predictor({("host", "cpu1"): model})
    fleet = load_fleet("host")
    tables = LearnedCostModel(predictor).costs(tiny_units, fleet)
    training = LearnedCostModel(predictor).costs(tiny_units, fleet, mode="training")
    cpu1 = tables.slots.index(("host", "cpu1"))
    learned = ~tables.guessed[:, cpu1]
    both = learned[:-1] & learned[1:]
    assert both.any() and not both.all()
    features = [unit_features(u) for u in tiny_units]
    for u in np.flatnonzero(both):
        pair = features[u:u + 2]
        assert tables.join_s[u, cpu1] == pytest.approx(model.joins(pair, model.predict_many(pair))[0])
        assert training.join_s[u, cpu1] == pytest.approx(3 * tables.join_s[u, cpu1])
    assert not tables.join_s[~both, cpu1].any()  # next to a guessed unit: no join
    assert not tables.join_s[:, tables.slots.index(("host", "cpu2"))].any()  # roofline slot
    start, end = map(int, np.flatnonzero(both)[[0, 0]] + [0, 2])
    assert tables.stage_compute_s(start, end, cpu1) == pytest.approx(
        model.predict_stage(features[start:end]), rel=1e-9)


def test_layer_space_gives_one_unit_per_sampled_layer():
    seen = []
    for name, bank, inputs, descriptions in layer_space(samples=3, seed=1):
        units = group_units(annotate(capture(bank, inputs, name)))
        family = name.removeprefix("layers-")
        # a family of pairs draws whole pairs: 3 samples are 2 pairs; a dense family twice 3
        assert len(descriptions) == {"conv_epilogue": 4, "small_separable_block": 6,
                                     "aligned_separable_block": 6}.get(family, 3)
        assert [u.name for u in units] == [f"layers.{i}" for i in range(len(descriptions))]
        kind = {"linear": "matmul", "llama_block": "attention", "conv_epilogue": "conv",
                "separable_block": "conv", "small_separable_block": "conv",
                "aligned_separable_block": "conv"}.get(family, family)
        for unit, description in zip(units, descriptions):
            block = family.removeprefix("small_").removeprefix("aligned_")
            assert description.split()[0] in (kind, block, "batch_norm", "layer_norm", "rms_norm", "softmax",
                                              *ELEMENTWISE_OPS)
            if family != "norm":
                expected = "depthwise" if " dw" in description else kind
                # a dense conv reading fewer than STEM_CHANNELS channels: kind "stem"
                if kind == "conv" and int(description.split()[1].split("->")[0]) < 16:
                    expected = "depthwise" if family.endswith("separable_block") else "stem"
                assert expected in {m.kind for m in unit.op_mix}, (description, unit.op_mix)
        seen.append(family)
    assert tuple(seen) == FAMILIES
    # conv channel counts are multiples of 8, as in real CNNs, except image stems' 3 inputs
    stems = 0
    for name, bank, _, descriptions in layer_space(samples=16, seed=2, families=(
            "conv", "separable_block", "small_separable_block", "aligned_separable_block")):
        for layer, description in zip(bank.layers, descriptions):
            convs = [m for m in layer.modules() if isinstance(m, torch.nn.Conv2d)]
            assert convs and all(c.out_channels % 8 == 0 for c in convs), description
            for conv in convs:
                if conv.in_channels == 3:
                    stems += 1
                    assert conv.stride == (2, 2) and conv.groups == 1, description
                else:
                    assert conv.in_channels % 8 == 0, description
    assert stems >= 1
    # the dense family: twice the samples, every block what an edge CNN's blocks cost
    (_, bank, inputs, descriptions), = layer_space(samples=16, seed=2, families=("small_separable_block",))
    assert len(descriptions) == 32
    for block, x in zip(bank.layers, inputs):
        out_size = (x.shape[-1] - 1) // block.depthwise.stride[0] + 1
        kernel = block.depthwise.kernel_size[0]
        mflops = 2 * x.shape[1] * out_size ** 2 * (kernel ** 2 + block.pointwise.out_channels) / 1e6
        assert SMALL_BLOCK_MFLOPS[0] <= mflops <= SMALL_BLOCK_MFLOPS[1]
    # the aligned pairs: alike but for the output size, one in channel planes 4 KiB apart
    (_, bank, inputs, descriptions), = layer_space(samples=8, seed=4, families=("aligned_separable_block",))
    units = group_units(annotate(capture(bank, inputs, "aligned")))
    for index in range(0, len(units), 2):
        (aligned, off), (x_aligned, x_off) = bank.layers[index:index + 2], inputs[index:index + 2]
        assert x_aligned.shape[1] == x_off.shape[1] and aligned.pointwise.out_channels == off.pointwise.out_channels
        assert (aligned.depthwise.kernel_size, aligned.depthwise.stride, type(aligned.act)) == (
            off.depthwise.kernel_size, off.depthwise.stride, type(off.act))
        stride = aligned.depthwise.stride[0]
        assert x_aligned.shape[-1] // stride in ALIGNED_OUTPUT_SIZES
        assert abs(x_off.shape[-1] - x_aligned.shape[-1]) == 4 * stride
        kinds = [{m.kind for m in unit.op_mix} for unit in units[index:index + 2]]
        assert "aliased_layout" in kinds[0] and "aliased_layout" not in kinds[1]
    # the conv epilogue pairs: one conv, its ReLU free, its other activation an epilogue
    (_, bank, inputs, descriptions), = layer_space(samples=8, seed=3, families=("conv_epilogue",))
    units = group_units(annotate(capture(bank, inputs, "pairs")))
    for index in range(0, len(units), 2):
        free, paid = ({m.kind: m for m in unit.op_mix} for unit in units[index:index + 2])
        assert "epilogue" not in free and free["fused"].count == 2
        assert paid["epilogue"].count == 1 and paid["fused"].count == 1
        assert {k: m for k, m in free.items() if k != "fused"} == {
            k: m for k, m in paid.items() if k not in ("fused", "epilogue")}
        assert inputs[index] is inputs[index + 1]
        assert descriptions[index].endswith("+bn +relu")
        assert descriptions[index].rsplit(" +", 1)[0] == descriptions[index + 1].rsplit(" +", 1)[0]
    again = [d for _, _, _, d in layer_space(samples=3, seed=1)]
    assert again == [d for _, _, _, d in layer_space(samples=3, seed=1)]  # seeded
    with pytest.raises(ValueError, match="unknown"):
        list(layer_space(families=("lstm",)))


ELEMENTWISE_OPS = ("gelu", "gelu_tanh", "silu", "relu", "sigmoid", "square")


def test_profile_stages_gives_stage_records():
    model, inputs = load_example("gpt").build(n_layer=2, d_model=32, n_head=2, vocab=64, seq=8)
    # extra_rounds=1: retries during a slow spell only lengthen a test that times nothing exactly
    records = profile_units(model, inputs, threads=(1,), repeats=2, extra_rounds=1,
                            stage_of_unit=[0] * 3 + [1] * 3)
    assert [r.unit for r in records] == ["tok_emb..blocks.0", "blocks.1..head"]
    for record in records:
        assert len(record.parts) == 3 and record.median_s > 0
        assert record.features["flops"] == sum(p["flops"] for p in record.parts)
    with pytest.raises(EdgeplanError, match="stage_of_unit"):
        profile_units(model, inputs, threads=(1,), repeats=1, stage_of_unit=[0, 2, 2, 2, 2, 2])
    # several splits in the same rounds: every distinct stage once, first appearance first
    units, pairs, halves = list(range(6)), [i // 2 for i in range(6)], [0] * 3 + [1] * 3
    records = profile_units(model, inputs, threads=(1, 2), repeats=2, extra_rounds=1,
                            splits=[units, pairs, halves, units])
    names = ["tok_emb", "pos_emb", "blocks.0", "blocks.1", "ln_f", "head", "tok_emb..pos_emb",
             "blocks.0..blocks.1", "ln_f..head", "tok_emb..blocks.0", "blocks.1..head"]
    assert [r.unit for r in records] == [n for n in names for _ in ("cpu1", "cpu2")]
    assert [r.backend for r in records[:2]] == ["cpu1", "cpu2"]
    by_name = {r.unit: r for r in records if r.backend == "cpu1"}
    assert not by_name["blocks.0"].parts and len(by_name["blocks.0..blocks.1"].parts) == 2
    assert by_name["blocks.0..blocks.1"].parts[0] == by_name["blocks.0"].features
    # one round's reference for all of them: they were timed together
    assert len({r.reference_s for r in records if r.backend == "cpu1"}) == 1
    with pytest.raises(EdgeplanError, match="not both"):
        profile_units(model, inputs, threads=(1,), stage_of_unit=units, splits=[units])


@pytest.fixture
def compiled_pair(tmp_path, tiny_units):
    """Tiny GPT on host-pair with a learned model of a known law; a factory file for the CLI."""
    store = tmp_path / "profiles.jsonl"
    ProfileStore(store).append(synthetic_records(200, seed=11))
    factory = tmp_path / "tiny_gpt.py"
    factory.write_text(
        "from edgeplan.cli import load_module\n"
        f"gpt = load_module({str(EXAMPLES / 'gpt.py')!r})\n"
        "def build():\n"
        f"    return gpt.build(**{TINY!r})\n")
    out = tmp_path / "out"
    assert main(["compile", f"{factory}:build", "--fleet", "host-pair", "-o", str(out),
                 "--cost-model", "learned", "--store", str(store)]) == 0
    return store, factory, out


def test_records_from_run_and_replan(compiled_pair, capsys):
    store, factory, out = compiled_pair
    plan = Plan.from_json(out)
    assert plan.costs.model == "learned" and len(plan.stages) == 2
    pipe = edgeplan.runtime.load(out)
    ids = np.random.default_rng(0).integers(0, TINY["vocab"], (4, TINY["seq"]))
    pipe.run({"input_ids": ids})
    edgeplan.runtime.record_run(out, pipe.last_stats, emulated_links=False)

    records = records_from_run(out)
    assert [r.unit_index for r in records] == [0, 1]
    for record, stage, measured in zip(records, plan.stages, pipe.last_stats.stage_mean_s):
        assert (record.device, record.backend) == ("host", f"cpu{pipe.threads_per_stage}")
        assert record.median_s == measured and record.repeats == 2
        units = plan.units[stage.unit_start:stage.unit_end]
        assert record.features["flops"] == sum(u.features["flops"] for u in units)
    assert records_from_run(out, records) == []  # imported once only

    # Measurements say stage 0 is 4x slower than planned: the replan moves units off it.
    first = plan.stages[0]
    run = {"time": 1.0e9, "host": "test", "microbatches": 8, "wall_s": 1.0,
           "stage_mean_s": [4 * first.compute_s, plan.stages[1].compute_s], "link_mean_s": [],
           "emulated_links": False, "remote": False, "threads_per_stage": 1}
    (out / RUNS_FILE).write_text(json.dumps(run) + "\n")
    replanned = out.parent / "replanned"
    assert main(["compile", str(factory) + ":build", "--fleet", "host-pair", "-o", str(replanned),
                 "--replan", str(out), "--store", str(store), "--plan-only"]) == 0
    after = Plan.from_json(replanned)
    assert after.stages[0].unit_end < first.unit_end

    capsys.readouterr()
    assert main(["profile", "--from-run", str(out), "--store", str(store)]) == 0
    text = capsys.readouterr().out
    assert "2 stage measurement(s)" in text and "measured" in text and "predicted now" in text
    assert main(["profile", "--from-run", str(out), "--store", str(store)]) == 0
    assert "in the store already" in capsys.readouterr().out


def test_from_run_errors_name_the_fix(compiled_pair, tmp_path, capsys):
    _store, _factory, out = compiled_pair
    with pytest.raises(EdgeplanError, match="no recorded runs"):
        records_from_run(out)
    (out / RUNS_FILE).write_text(json.dumps({"time": 1.0, "stage_mean_s": [0.1]}) + "\n")
    with pytest.raises(EdgeplanError, match="1 stage times for a plan of 2 stages"):
        records_from_run(out)
    (out / RUNS_FILE).write_text(json.dumps({"time": 1.0, "stage_mean_s": [0.1, 0.1]}) + "\n")
    with pytest.raises(EdgeplanError, match="run the model again"):
        records_from_run(out)
    (out / RUNS_FILE).write_text("{oops\n")
    with pytest.raises(EdgeplanError, match=r"runs\.jsonl, line 1"):
        records_from_run(out)
    assert main(["profile", "--store", str(tmp_path / "x.jsonl")]) == 2
    assert "nothing to measure" in capsys.readouterr().err


def test_join_features_of_a_cut():
    before = {"cut_bytes": 5000.0, "cut_nchw_bytes": 3000.0, "param_bytes": 100.0,
              "conv_count": 1.0, "conv_bytes": 7.0}
    norm_only = {"param_bytes": 20.0, "norm_count": 1.0, "norm_bytes": 400.0,
                 "elementwise_count": 1.0, "elementwise_bytes": 200.0, "fused_count": 1.0,
                 "fused_bytes": 50.0}
    # only the LayerNorm's bytes: ORT fuses it with the residual add before the cut
    assert join_features(before, norm_only).tolist() == [1.0, 3000.0, 2000.0, 120.0, 400.0, 0.0, 0.0]
    # an RMSNorm (elementwise ops and a reduction) fuses without a cost of its own
    rms_norm = {"elementwise_count": 4.0, "elementwise_bytes": 900.0, "reduce_count": 1.0,
                "reduce_bytes": 300.0}
    assert join_features(before, rms_norm)[4] == 0.0
    # a unit with a matmul is more than pointwise work: nothing to fuse
    assert join_features(before, {**norm_only, "matmul_count": 1.0})[4] == 0.0
    assert len(join_features({}, {})) == len(JOIN_BASIS)
    # a conv net's cut after an unfused activation: its elementwise bytes; a cut that
    # carries other tensors too (a transformer's) has none
    hardswish = {"cut_bytes": 3000.0, "cut_nchw_bytes": 3000.0, "conv_count": 1.0,
                 "elementwise_count": 2.0, "elementwise_bytes": 6000.0}
    assert join_features(hardswish, {})[JOIN_BASIS.index("activation_bytes")] == 6000.0
    assert join_features({**hardswish, "cut_bytes": 5000.0}, {})[JOIN_BASIS.index("activation_bytes")] == 0.0
    # 4-D tensors in channel planes 4 KiB apart: the cut also drops a slower ReorderOutput
    aliased = join_features({**before, "cut_aliased_bytes": 1000.0}, {})
    assert aliased[JOIN_BASIS.index("aliased_bytes")] == 1000.0 and aliased[JOIN_BASIS.index("nchw_bytes")] == 3000.0



def test_aliased_reorders_are_a_surcharge_priced_by_what_cuts_save():
    """Kind "aliased_layout" counts reorders that kind "layout" counts too: a store without a
    join model for it prices them as any reorder (no roofline fallback, no call to profile
    again), and with one a unit's surcharge is what a cut of such a tensor saves (2 surcharge
    bytes per tensor byte)."""
    kinds = SYNTHETIC_KINDS + ("layout",)
    unit = {"op_count": 3.0, "conv_count": 2.0, "conv_flops": 4e6, "conv_bytes": 2e5,
            "layout_count": 2.0, "layout_bytes": 4e5, "aliased_layout_count": 1.0, "aliased_layout_bytes": 2e5}
    plain_unit = {k: v for k, v in unit.items() if "aliased" not in k}
    plain = fit_model(synthetic_records(300, seed=81, kinds=kinds, noise=0.0), "host", "cpu1")
    assert plain.covers(unit) and plain.predict(unit) == pytest.approx(plain.predict(plain_unit))
    gm = annotate(capture(torch.nn.Conv2d(16, 16, 3, padding=1).eval(), (torch.randn(1, 16, 32, 32),), "conv"))
    written = unit_features(group_units(gm)[0])
    assert written["aliased_layout_count"] == 1.0
    assert older_features({k: v for k, v in written.items() if not k.startswith("aliased_")}) == frozenset()
    # chains whose every third 4-D cut is aliased: the join model prices it, the law follows
    joined = fit_model(synthetic_records(300, seed=30, kinds=kinds) + chain_records(16, seed=31), "host", "cpu1")
    aliased = joined.join_coef[JOIN_BASIS.index("aliased_bytes")]
    assert 0.5 * TRUE_JOIN[-1] > aliased > 2 * TRUE_JOIN[-1]
    # (the law takes it from the join model fitted before the law's c_run was refit: 1e-4 apart)
    assert joined.additive(unit) - joined.additive(plain_unit) == pytest.approx(-aliased / 2 * 2e5, rel=1e-3)


def test_records_with_older_features_are_named_in_the_provenance():
    """A store profiled before the `stem` and `layout` kinds existed still fits, and plans
    say how many of its records to profile again; hand-written sparse features are not
    judged."""
    gm = annotate(capture(torch.nn.Conv2d(3, 16, 3).eval(), (torch.randn(1, 3, 12, 12),), "stem"))
    current = unit_features(group_units(gm)[0])
    assert older_features(current) == frozenset() and current["stem_count"] == 1
    before = {k: v for k, v in current.items() if not k.startswith(("stem_", "layout_"))}
    assert older_features(before) == {"stem", "layout"}
    records = synthetic_records(MIN_FIT_RECORDS, seed=71)
    aged = records[:5]
    records[:5] = [dataclasses.replace(r, features={**before, **r.features}) for r in aged]
    model = fit_model(records, "host", "cpu1")
    assert model.older_note == (" (5 of them profiled before op kind(s) stem, layout existed: units "
                                "with those kinds fall back to the roofline where no newer record has "
                                "them; profile those models again)")
    assert fit_model(records[5:] * 2, "host", "cpu1").older_note == ""
    # a plan says it next to where its costs come from; a stem conv unit is on the roofline
    tables = LearnedCostModel(Predictor({("host", "cpu1"): model})).costs(group_units(gm), load_fleet("host"))
    cpu1 = tables.slots.index(("host", "cpu1"))
    assert tables.slot_sources[cpu1] == f"fitted on {MIN_FIT_RECORDS} record(s)" + model.older_note
    assert tables.guessed[0, cpu1]


def test_records_that_timed_a_sleeping_pool_are_left_out_where_others_time_it_spinning():
    """A 2-thread store profiled before pools were timed spinning, with newer records
    appended: the old ones time a backend the runtime never runs (here 2x slower) and are
    left out; a backend with only old ones is fitted on them and plans say so."""
    profiled = "onnxruntime 1.20.0"
    spinning = [dataclasses.replace(r, runtime=profiled, spinning=True)
                for r in synthetic_records(MIN_FIT_RECORDS, seed=81, backend="cpu2")]
    sleeping = [dataclasses.replace(r, runtime=profiled, unit=f"old-{r.unit}", median_s=2 * r.median_s,
                                    p10_s=2 * r.p10_s, p90_s=2 * r.p90_s)
                for r in synthetic_records(MIN_FIT_RECORDS, seed=82, backend="cpu2")]
    held_out = synthetic_records(40, seed=83, backend="cpu2")
    model = fit_model(spinning + sleeping, "host", "cpu2")
    assert np.median(np.abs(relative_errors(model, held_out))) < 0.05
    assert model.records == MIN_FIT_RECORDS and model.sleeping_left_out == MIN_FIT_RECORDS
    assert model.older_note == (f" ({MIN_FIT_RECORDS} older record(s) that timed its thread pool "
                                f"sleeping left out: newer ones time it spinning, as the runtime runs it)")
    # the same store without the marks prices the backend too slow (by 21 % here)
    unmarked = fit_model([dataclasses.replace(r, spinning=False) for r in spinning] + sleeping, "host", "cpu2")
    assert np.median(relative_errors(unmarked, held_out)) > 0.15
    # only old records: fitted on, and a plan is told to profile again
    old_only = fit_model(sleeping, "host", "cpu2")
    assert old_only.sleeping_records == MIN_FIT_RECORDS and old_only.sleeping_left_out == 0
    assert "timed its thread pool sleeping between ops" in old_only.older_note
    assert "profile again" in old_only.older_note
    # a fleet backend's name says nothing of its threads (`profile --backend cpu`): marked
    # records say it runs a pool
    renamed = [dataclasses.replace(r, backend="cpu") for r in spinning + sleeping]
    assert fit_model(renamed, "jetson", "cpu").sleeping_left_out == MIN_FIT_RECORDS
    # adapting to the backend from a few samples leaves the old ones out the same way
    source = fit_model(synthetic_records(MIN_FIT_RECORDS, seed=84), "host", "cpu1")
    adapted = adapt(source, spinning[:5] + sleeping[:5], "host", "cpu2")
    assert adapted.records == 5 and adapted.sleeping_left_out == 5
    # one thread has no pool; runs and hand-written records (no ONNX Runtime named) are not judged
    for records in (synthetic_records(MIN_FIT_RECORDS, seed=85),
                    [dataclasses.replace(r, runtime=RUN_RUNTIME) for r in sleeping], held_out * 2):
        assert fit_model(records, "host", records[0].backend).older_note == ""


def conv_chain_records(models: int, seed: int, layout_s_per_byte=1 / 30e9):
    """Chains of single-conv units whose layout reorders (input and output, 2 x its
    activation bytes each way) cost `layout_s_per_byte`: in such units layout bytes move
    in step with conv bytes, so unit times alone cannot tell the two rates apart; stages
    of consecutive units drop both reorders at each inner cut (4 x the cut's bytes)."""
    rng = random.Random(seed)
    law = {"runs": 20e-6, "conv_count": 3e-6, "conv_flops": 1 / 50e9, "conv_bytes": 1 / 40e9}
    records = []
    for m in range(models):
        chain, alone = [], []
        for _ in range(5):
            activation, flops = rng.uniform(1e5, 2e6), 10 ** rng.uniform(6, 8)
            features = {"op_count": 1.0, "conv_count": 1.0, "conv_flops": flops, "conv_bytes": 2 * activation,
                        "layout_count": 2.0, "layout_bytes": 4 * activation,
                        "cut_nchw_bytes": activation, "cut_bytes": activation, "param_bytes": 1e4}
            chain.append(features)
            alone.append(law["runs"] + sum(features[k] * v for k, v in law.items() if k != "runs")
                         + features["layout_bytes"] * layout_s_per_byte)
        for i, (features, seconds) in enumerate(zip(chain, alone)):
            records.append(UnitProfile(model=f"convs{m}", unit=f"u{i}", device="host", backend="cpu1",
                                       features=features, median_s=seconds, p10_s=seconds, p90_s=seconds,
                                       repeats=1, timestamp="2025-01-01T00:00:00+00:00"))
        for start, end in [(i, i + 2) for i in range(4)] + [(0, 3), (2, 5)]:
            parts = tuple(chain[start:end])
            seconds = (sum(alone[start:end]) - (end - start - 1) * law["runs"]
                       - sum(4 * p["cut_nchw_bytes"] * layout_s_per_byte for p in parts[:-1]))
            records.append(UnitProfile(model=f"convs{m}", unit=f"u{start}..u{end - 1}", device="host",
                                       backend="cpu1", features=combine_features(parts), median_s=seconds,
                                       quiet_s=seconds, p10_s=seconds, p90_s=seconds, repeats=1, parts=parts,
                                       timestamp="2025-01-01T00:00:00+00:00"))
    return records, law


def test_layout_reorders_cost_what_the_join_model_says_a_cut_saves():
    """Unit times alone leave the reorders' rate and the convs' byte rate confounded (run G:
    the law gave the reorders nothing on cpu1, and separable blocks, one pair of reorders
    for two convs, came out 14-22 % low); the join model measures the reorders (what a cut
    inside a stage saves), and the law takes their rate from it."""
    records, _ = conv_chain_records(6, seed=81)
    model = fit_model(records, "host", "cpu1")
    assert model.join_coef[JOIN_BASIS.index("nchw_bytes")] == pytest.approx(-4 / 30e9, rel=0.05)
    layout_s_per_byte = (model.additive({"layout_bytes": 1e6}) - model.run_overhead_s) / 1e6
    assert layout_s_per_byte == pytest.approx(1 / 30e9, rel=0.05)
    # no stage records, no join model: the law fits the layout column like any other
    alone = fit_model([r for r in records if not r.parts], "host", "cpu1")
    assert alone.join_coef is None
