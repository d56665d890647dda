"""Learned latency predictor: per-backend models fitted on the profile store, behind CostModel.

Model. A unit's latency on a backend is predicted as a sum over the op kinds it contains,

    t = c_run + sum_kind (c_op[kind] * count + c_flop[kind] * flops + c_byte[kind] * bytes)

with every coefficient >= 0 (an op never saves time), so a unit's prediction adds up from
what its nodes cost: a model never seen in training is predicted from its op-kind mix,
FLOPs and bytes (the `<kind>_count/_flops/_bytes` features of the store). The fit is a
non-negative least squares on relative errors (each record's row divided by its measured
time), so small and large units weigh alike, and robust: records whose relative error lies
beyond HUBER_K robust standard deviations of all errors weigh less the farther out they lie
(Huber's loss, by reweighted least squares), so a few units the law cannot describe (a
position embedding or a final LayerNorm of some microseconds, 15-70 % off any rate the rest
agree on) do not pull the rates every other unit is priced by. A stage-level record (a
run's measured stage time, its features summed over the stage's units) is one more row of
the same system.

Measured units are remembered: records leave correction factors (measured / predicted)
for the exact computations they timed (feature vectors), in two memories. A unit timed
alone corrects the unit alone (`corrections`, the latest record winning). Stages
(profiled, or measured in a run) give their units one factor each as they run inside a
stage (`stage_corrections`), fitted to all stage records at once (`_stage_factors`: where
one stage is all there is, its one factor spread over its units), and correct the unit
alone only where no record timed it alone. A unit alone is predicted from the first, a
stage of several units and the planner's cost tables from the second, then the first:
inside a stage a unit need not run as it ran alone (an LM head timed 65 us alone and 98 us
a unit of its stages), and a stage of a run is what measurements from runs bring to the
next plan (`edgeplan profile --from-run`, `edgeplan compile --replan`). One stage cannot
say whether its units or its cuts are off, so its units take a share of its error that
shrinks with its cuts, 1 / (1 + STAGE_CUT_SHARE * cuts), and its cuts the rest, as seconds
each (`cut_corrections`, added to the joins): a whole model run as one stage (HF GPT-2-256,
12 % over its units and joins, where its two blocks alone run as their sum) taught all its
units its whole error, and the model's other splits got worse. And a run's stage time is
one timing at one moment, as noisy here as the predictor is wrong: its error is shrunk
towards the prediction by how far the runs show more than a run's noise
(`_shrunk_run_times`), so one run moves a stage at least half way, more runs further, and
an error far beyond the noise is learned almost whole.

Adaptation. A backend with fewer than MIN_FIT_RECORDS records is not fitted on its own:
it starts from the known backend whose model explains its few samples best, rescales it
by the samples' median ratio, and refits every coefficient from the samples with a ridge
pull towards the rescaled source (ADAPT_RIDGE), so a handful of samples moves the overall
speed and more samples move individual op kinds. The source's residual model and memory of
measured computations come along (`adapt`). A device profiled elsewhere (`edgeplan profile
--device`) with few records is adapted the same way, from whichever known backend its
records pick.

Size-dependent efficiency. The additive law has one rate per op kind, but a kernel's
efficiency changes with its size (small matmuls run far below peak, and worse on two
threads, which a small op cannot keep busy; caches matter), as nn-Meter found. Two
corrections. First, the law itself may bend: in the size-binned law a kind's FLOPs
(matmul, conv, stem, depthwise, attention) or bytes (elementwise, norm, reduce) are split over
SIZE_KNOTS by the kind's mean op size in the unit (hat functions in log10 size), so each
kind gets a rate per knot, interpolated between them, with the plain law the special
case of equal rates. A backend uses it only where it predicts the units of a model
family left out of the fit clearly better than the plain law (`choose_knots`). Second, a
residual model: log(measured / additive) of every training unit is remembered at the
unit's point in a feature space (log FLOPs, bytes, op count and FLOPs per byte, and each
op kind's share of the unit's additive time; standardized), and a unit is predicted as
additive * exp(w * r), r the distance-weighted mean residual of its nearest training
units, shrunk towards 0 as the unit lies farther from them than training units lie from
each other. The neighbour count, the weight of the kind shares in the distance and w are
chosen by leave-one-family-out error on the training units of models (the layer space's
units serve as neighbours and are not judged): each unit predicted from the units of
other model families only, as a model never profiled will be (w = 0 where other
families' residuals do not predict a family's units). A family is a model name up to its
first "-<digit>" (`model_family`): the sizes of one model ("gpt-2-128-4", "gpt-2-256-4")
share their code, so a residual that carries over from one size to the next says little
about another implementation of the same layers. Interpolation between profiled sizes
gets sharper, and far from every profiled unit the prediction stays the additive law.

Stages. One session run of a stage pays the per-run cost c_run once, not once per unit,
and a stage is not the sum of its units run alone: ONNX Runtime keeps 4-D activations in
its blocked conv layout inside a stage instead of reordering them at every unit's edges,
two units' weights in one session evict each other from the caches that a unit timed
alone has to itself, and it fuses across a cut: a residual add before the cut and a
LayerNorm unit after it become one SkipLayerNormalization, which ran 70 us here where the
Add and LayerNormalization ran 25 us (GPT-2's last block and ln_f: +16 % as one stage).
A join model says what each cut inside a stage adds:

    join(cut) = j_cut + j_nchw * nchw_bytes + j_other * other_bytes + j_weights * weight_bytes
                + j_layernorm * layernorm_bytes + j_activation * activation_bytes
                + j_aliased * aliased_bytes

(the cut's 4-D and other tensor bytes, the two neighbours' weight bytes, the LayerNorm
bytes of the unit after the cut if that unit holds pointwise ops only, the elementwise
bytes of the unit before a cut that only 4-D tensors cross: an activation ONNX Runtime
does not fuse into the conv before it, as a Hardswish, which changed what a cut saves on
two threads 2-4x against ReLU chains of the same tensor bytes, so that one rate per 4-D
byte priced a ReLU6 CNN's cuts at twice what they saved; and the 4-D bytes in channel
planes a multiple of 4 KiB apart, whose ReorderOutput, writing 8 channels into planes that
map to the same cache sets, took twice the time per byte here (kind `aliased_layout`);
signed coefficients), fitted on the store's stage records whose units were timed alone
too: each gives measured stage - (sum of its units' measured times - (parts - 1) * c_run)
= sum of its cuts' joins. It is kept only where it predicts the stages of models left out of its fit better than no join
does (leave-one-model-out, not family: what a cut changes is a mechanism, a fusion or a
layout, that one family alone may show, and leaving that family out would ask the fit for
a mechanism it never saw; a feature that the cuts of one model alone have is held at 0,
as no such fit sees it), and a join never saves more than the smaller neighbour costs.
`predict_stage(parts)` = sum of the parts' predictions - (parts - 1) * c_run + the joins
of its cuts; the cost tables carry the joins as `join_s` for the solvers.

The join model's 4-D term is also what prices ORT's layout reorders (op kind `layout`: a
conv unit alone reorders its input and output; a cut inside a stage drops both, 4 layout
bytes per byte of 4-D tensor crossing). Unit times alone cannot price them: a unit's
reorders move in step with its convs' bytes, and the law gave them nothing on the 1-thread
backend (run G), so separable blocks, one pair of reorders for two convs, came out 14-22 %
low. Where a join model is kept with a negative 4-D term, the law takes the `layout` rate
from it and fits the other coefficients to what that leaves (`_reorder_rates`): held-out
stages on cpu1 within 10 % went 59-87 % -> 67-93 % in stores D-G (bench/predictor_notes.md).
So does the surcharge of a ReorderOutput into aliased planes (`aliased_layout`, 2 bytes per
byte of such a tensor), from the aliased term, and 0 where the join model has none: a
unit's surcharge is then what a cut saves of it. Fitted on unit times alone it took up
what else runs slower at those sizes (store AA, 1 thread: 46 us per MB, where a cut saves
27 and bench/layout_aliasing.py times 24-30), and on two threads, whose cuts do not show
it (-3 us per MB), it priced the held-out CNN's stages with aliased cuts 12-18 % high.

Fallback. `LearnedCostModel` predicts a (unit, slot) pair from the model for the slot's
device (by name or preset kind) and backend, if the model has seen every op kind of the
unit; everything else is costed by the roofline and marked in `CostTables.guessed`.

Thread pools. A multi-thread record profiled with its ONNX Runtime pool sleeping between
ops (every edgeplan before the profiler kept pools spinning, as the runtime's sessions do)
times a backend the runtime never runs, up to 2x slower (planner/profile.py). A backend
that has spinning records is fitted without the sleeping ones; one that has only sleeping
records is fitted on them and says so in plans (`older_note`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeplan.errors import EdgeplanError
from edgeplan.planner.cost import CostTables, RooflineCostModel
from edgeplan.planner.profile import (
    LAYER_SPACE_PREFIX,
    OP_KINDS,
    RUN_RUNTIME,
    UnitProfile,
    sleeping_pool,
    unit_features,
    unmarked_profile,
)

# Kinds whose nodes cost time; views alias, "fused" ops run inside the convolution before
# them, and "input"/"param" are not ops.
PREDICTED_KINDS = tuple(kind for kind in OP_KINDS if kind not in ("view", "fused"))
# Kinds that count ops of another kind again, for what they cost beyond its rate
# (passes/units.py): a model that never saw one prices it at nothing more, an older record
# without it has its ops in the other kind, so neither is a reason to fall back or re-profile.
SURCHARGE_KINDS = frozenset({"aliased_layout"})
_COUNTED_KINDS = np.array([kind not in SURCHARGE_KINDS for kind in PREDICTED_KINDS])
BASIS = ("runs",) + tuple(f"{kind}_{quantity}" for kind in PREDICTED_KINDS
                          for quantity in ("count", "flops", "bytes"))
# An own fit needs a few records per coefficient; fewer means adapting a known backend.
MIN_FIT_RECORDS = 3 * len(BASIS)
# The size-binned law (module docstring): the quantity whose rate bends with an op's size,
# per kind, and the knots of the rate's curve in log10 of a kind's mean op size (FLOPs or
# bytes per op: 10 kFLOP .. 100 MFLOP, 10 kB in the L1 .. 100 MB past the last cache).
SIZED_QUANTITY = {"matmul": "flops", "conv": "flops", "stem": "flops", "depthwise": "flops",
                  "attention": "flops", "elementwise": "bytes", "norm": "bytes", "reduce": "bytes"}
SIZE_KNOTS = (4.0, 6.0, 8.0)
# The size-binned law's 14 extra coefficients must lower the held-out family error by this
# share of it (a one-standard-error rule): on this host's 1-thread backend it won by 0.1-0.3
# points of 17-19 % in three stores, within noise, and predicted held-out models worse.
KNOTS_MARGIN = 0.05
# Huber's constant for the law's fit, in robust standard deviations (1.4826 x the median
# absolute deviation) of the records' relative errors: the usual choice, 95 % as efficient
# as least squares where errors are normal. Refit on the ten recorded stores (N, Q, T-AA),
# the held-out cpu2 stages' median was lower or the same in all ten (AA 5.6 / 91 -> 3.9 / 93 %
# median / within 10 %), cpu1's in seven (0.4-0.6 points higher on N, Q and W;
# bench/predictor_notes.md). Reweighting stops when no weight moves by more than
# HUBER_TOLERANCE (at 1e-2 it stopped short: Y's cpu2 stages 5.6 % where 1e-3 and 1e-4 give
# 4.9 %), or after HUBER_ITERATIONS fits.
HUBER_K = 1.345
HUBER_TOLERANCE = 1e-3
HUBER_ITERATIONS = 20
# Weight of the pull towards the source model per coefficient, in squared relative errors of
# one sample: (sigma / tau)^2 for ~10 % sample error and ~50 % spread of a coefficient
ADAPT_RIDGE = 0.04
# The residual model: neighbours averaged (before leave-one-family-out picks), and how far (in
# multiples of the training units' median nearest-neighbour distance) a unit may lie
# before its residual is halved.
RESIDUAL_NEIGHBORS = 4
RESIDUAL_REACH = 2.0
# Weights of the kind shares next to the size in the residual model's distance, chosen by
# leave-one-family-out. Never 0: by size alone a GPT-2 block took conv units' residuals
# (store F with layout reorders: cpu1 held-out units 10.8 %, the additive law alone 7.0 %).
RESIDUAL_SHARE_WEIGHTS = (0.3, 1.0)
# Pull of each stage-memory factor towards its stages' own factors (squared relative
# error per unit of factor): small, so that the stage records decide where they can.
STAGE_MEMORY_RIDGE = 1e-3
# A stage record's error beyond its units' predictions and joins is its units' and its
# cuts' at once, and one stage cannot say which: its units take the share
# 1 / (1 + STAGE_CUT_SHARE * cuts) of it (in log, as factors) and its cuts the rest (as
# seconds, `cut_corrections`), so a whole model run as one stage teaches its units less
# than a stage of two does. 0.1: the ratio of the two errors' variances, a cut's (stage
# records against their measured units plus joins, per cut) to a unit's (the law on model
# families left out of its fit), robust estimates 0.05-0.18 on the stores in bench/data.
STAGE_CUT_SHARE = 0.1
# A run's stage time is one timing at one moment, and the predictor's error is of the same
# size as the timing noise here: the held-out stages timed twice minutes apart moved by
# 2.6-8.9 % (rms, 1 thread) and 7.8-13.6 % (2 threads) in the six stores of bench/data, about
# this share of the spread (p90 / p10 - 1) of the backend's profiled timings (0.09-0.24 over
# the twelve store-backends): what `_shrunk_run_times` takes as a run's noise.
RUN_NOISE_PER_SPREAD = 0.16
# The join model's features of a cut (module docstring) and the fewest stage records
# (from at least two models) it is fitted on.
JOIN_BASIS = ("cut", "nchw_bytes", "other_bytes", "weight_bytes", "layernorm_bytes", "activation_bytes",
              "aliased_bytes")
# Op kinds that make a unit more than pointwise work (what ORT cannot fuse with a neighbour).
HEAVY_KINDS = ("matmul", "conv", "stem", "depthwise", "attention", "embedding")
MIN_JOIN_RECORDS = 8
JOIN_RIDGE = 1e-3
_FAMILY_END = re.compile(r"-\d")


class PredictorError(EdgeplanError):
    """The profile store cannot train a predictor (no records, unknown backend)."""


def feature_vector(features: dict[str, float], knots: Sequence[float] = ()) -> np.ndarray:
    """The basis values of one record's or unit's features (one session run): BASIS, or
    with `knots` the size-binned basis, where a SIZED_QUANTITY column is split over the
    knots by the kind's mean op size (linear in log10 between neighbouring knots), so the
    split columns add up to the plain one."""
    if not knots:
        return np.array([1.0] + [float(features.get(name, 0.0)) for name in BASIS[1:]])
    out = [1.0]
    for kind in PREDICTED_KINDS:
        count = float(features.get(f"{kind}_count", 0.0))
        for quantity in ("count", "flops", "bytes"):
            value = float(features.get(f"{kind}_{quantity}", 0.0))
            if SIZED_QUANTITY.get(kind) != quantity:
                out.append(value)
            elif value > 0 and count > 0:
                out.extend(value * _knot_weights(math.log10(value / count), knots))
            else:
                out.extend([0.0] * len(knots))
    return np.array(out)


def _knot_weights(x: float, knots: Sequence[float]) -> np.ndarray:
    """Hat functions over the knots at x (clamped at the ends); they sum to 1."""
    weights = np.zeros(len(knots))
    if x <= knots[0] or x >= knots[-1]:
        weights[0 if x <= knots[0] else -1] = 1.0
        return weights
    right = int(np.searchsorted(knots, x))
    t = (x - knots[right - 1]) / (knots[right] - knots[right - 1])
    weights[right - 1], weights[right] = 1.0 - t, t
    return weights


@functools.cache
def _column_kinds(knots: tuple[float, ...]) -> np.ndarray:
    """The index in PREDICTED_KINDS of each column of the basis after "runs" (computed
    once per basis: every prediction asks for it)."""
    kinds = np.array([k for k, kind in enumerate(PREDICTED_KINDS) for quantity in ("count", "flops", "bytes")
                      for _ in range(len(knots) if knots and SIZED_QUANTITY.get(kind) == quantity else 1)])
    kinds.flags.writeable = False  # shared by every caller
    return kinds


def join_features(before: dict[str, float], after: dict[str, float]) -> np.ndarray:
    """The JOIN_BASIS values of the cut between two consecutive units' features."""
    nchw = float(before.get("cut_nchw_bytes", 0.0))
    # Kind "norm": LayerNorm, RMSNorm (annotate recognises its written-out ops), and the
    # batch and group norms no convolution folds. After a residual add ORT fuses either
    # into a Skip(Simplified)LayerNormalization when both run in one stage.
    layernorm = (0.0 if any(after.get(f"{kind}_count", 0.0) for kind in HEAVY_KINDS)
                 else float(after.get("norm_bytes", 0.0)))
    other = float(before.get("cut_bytes", 0.0)) - nchw
    # A conv net's cut (4-D tensors only) after an activation the conv does not fuse; a
    # transformer's GELU before a cut of its hidden state is not one.
    activation = float(before.get("elementwise_bytes", 0.0)) if nchw > 0 and other == 0 else 0.0
    return np.array([1.0, nchw, other,
                     float(before.get("param_bytes", 0.0)) + float(after.get("param_bytes", 0.0)),
                     layernorm, activation, float(before.get("cut_aliased_bytes", 0.0))])


def model_family(model: str) -> str:
    """A store record's model name up to its first "-<digit>" (where its size begins):
    "gpt-2-128-4-512" -> "gpt", "resnet-32-2" -> "resnet", "layers-conv" -> "layers-conv"."""
    return _FAMILY_END.split(model, maxsplit=1)[0]


def is_model_family(family: str) -> bool:
    """Whether a family is a model's, not one of the sampled layer space's: the families
    the size bins and the residual model are judged on (`choose_knots`)."""
    return not family.startswith(LAYER_SPACE_PREFIX)


def older_features(features: dict[str, float]) -> frozenset[str]:
    """The op kinds a record's features lack: it was profiled by an edgeplan before they
    existed (its `stem` convs counted as `conv`, no `layout` reorders), so its ops are
    costed as that version saw them and its measured computations match no unit of now.
    Only records written by `unit_features` (with an "op_count") are judged: hand-written
    features may leave out the kinds they do not use. SURCHARGE_KINDS are not asked for."""
    if "op_count" not in features:
        return frozenset()
    return frozenset(kind for kind in OP_KINDS if f"{kind}_count" not in features and kind not in SURCHARGE_KINDS)


def _older(records: Sequence[UnitProfile]) -> tuple[int, tuple[str, ...]]:
    """How many records have older features, and the kinds they lack (in OP_KINDS order)."""
    lacking = [older_features(r.features) for r in records]
    return (sum(1 for kinds in lacking if kinds),
            tuple(kind for kind in OP_KINDS if any(kind in kinds for kinds in lacking)))


def kinds_of(features: dict[str, float]) -> frozenset[str]:
    """The op kinds a unit must have been trained on to be predicted (SURCHARGE_KINDS aside)."""
    return frozenset(k for k in PREDICTED_KINDS if k not in SURCHARGE_KINDS and features.get(f"{k}_count", 0.0) > 0)


def nnls(a: np.ndarray, b: np.ndarray, max_iterations: int | None = None,
         start: np.ndarray | None = None) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set), from x = 0 or from a
    feasible `start` whose positive entries begin free: a reweighted fit starts from the
    last round's solution, whose free set barely moves."""
    rows, cols = a.shape
    tolerance = 10 * np.finfo(float).eps * np.linalg.norm(a, 1) * max(rows, cols)
    x = np.zeros(cols) if start is None else np.where(start > tolerance, start, 0.0)
    passive = x > 0
    if passive.any():
        x = _descend(a, b, x, passive, tolerance)
    for _ in range(max_iterations or 3 * cols):
        gradient = a.T @ (b - a @ x)
        if passive.all() or gradient[~passive].max(initial=-np.inf) <= tolerance:
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        x = _descend(a, b, x, passive, tolerance)
    return x


def _descend(a: np.ndarray, b: np.ndarray, x: np.ndarray, passive: np.ndarray,
             tolerance: float) -> np.ndarray:
    """Lawson-Hanson's inner loop: from feasible x, the least-squares solution on the free
    (`passive`, updated in place) columns, stepping back to the boundary and fixing at 0 the
    columns that would turn negative."""
    while True:
        z = np.zeros(len(x))
        z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
        if z[passive].min(initial=np.inf) > 0:  # (a start can leave no column free)
            return z
        blocking = passive & (z <= 0)
        alpha = np.min(x[blocking] / (x[blocking] - z[blocking]))
        x = x + alpha * (z - x)
        passive &= x > tolerance
        x[~passive] = 0.0


def _relative_nnls(x: np.ndarray, y: np.ndarray, prior: np.ndarray | None = None,
                   ridge: float = 0.0, fixed: dict[int, float] | None = None) -> np.ndarray:
    """Non-negative coefficients minimizing relative errors, under Huber's loss (module
    docstring), or squared with a ridge to a prior (adaptation: a few samples give no
    robust spread to judge them by).

    Columns are scaled to unit norm (the basis spans FLOPs, bytes and counts, 12 orders of
    magnitude apart); with a prior, coefficients are solved as multiples of it. `fixed`
    columns keep the given coefficients, and the others fit what they leave of each time.
    """
    if prior is not None:
        rows = x / y[:, None] * prior[None, :]
        active = prior > 0
        rows = rows[:, active]
        penalty = math.sqrt(ridge) * np.eye(int(active.sum()))
        solved = nnls(np.vstack([rows, penalty]),
                      np.concatenate([np.ones(len(y)), math.sqrt(ridge) * np.ones(int(active.sum()))]))
        out = np.zeros(len(prior))
        out[active] = solved * prior[active]
        return out
    columns = sorted(fixed or {})
    values = np.array([fixed[c] for c in columns]) if columns else np.zeros(0)
    free = np.delete(np.arange(x.shape[1]), columns)
    # relative to the whole time: x_free c / y = 1 - x_fixed v / y (1 with nothing fixed)
    share = 1.0 - x[:, columns] @ values / y
    rows = x[:, free] / y[:, None]
    out = np.zeros(x.shape[1])
    out[columns] = values
    weights = np.ones(len(y))
    for _ in range(HUBER_ITERATIONS):
        root = np.sqrt(weights)
        weighted = rows * root[:, None]
        norms = np.linalg.norm(weighted, axis=0)
        used = norms > 0
        start = out[free[used]] * norms[used]  # the last round's solution in this round's scale
        out[free] = 0.0
        out[free[used]] = nnls(weighted[:, used] / norms[used], share * root, start=start) / norms[used]
        updated = huber_weights(x @ out / y - 1.0)
        if np.max(np.abs(updated - weights)) <= HUBER_TOLERANCE:
            break
        weights = updated
    return out


def huber_weights(errors: np.ndarray, k: float = HUBER_K) -> np.ndarray:
    """Each error's weight under Huber's loss: 1 within k robust standard deviations of the
    errors' median (1.4826 x their median absolute deviation), k sd / |distance| beyond."""
    distance = np.abs(errors - np.median(errors))
    spread = 1.4826 * float(np.median(distance))
    if spread <= 0.0:
        return np.ones(len(errors))
    return np.minimum(1.0, k * spread / np.maximum(distance, 1e-300))


def _encode(features: dict[str, float], knots: Sequence[float] = ()) -> tuple[np.ndarray, np.ndarray]:
    """A unit's plain basis values without "runs" (its key in the memories, and its size in
    the residual model) and its row in the basis of `knots`: built once per prediction."""
    plain = feature_vector(features)
    return plain[1:], (feature_vector(features, knots) if knots else plain)


def residual_features(features: dict[str, float], coef: np.ndarray,
                      knots: Sequence[float] = ()) -> np.ndarray:
    """A unit's point in the residual model: its size (log FLOPs, bytes, ops, FLOPs per
    byte) and what it is made of (each kind's share of its additive-law time; `coef` over
    the basis of `knots`)."""
    return _residual_point(*_encode(features, knots), coef, knots)


def _residual_point(plain: np.ndarray, row: np.ndarray, coef: np.ndarray,
                    knots: Sequence[float]) -> np.ndarray:
    """residual_features of a unit's encoded features (`_encode`)."""
    # count, flops, bytes of the unit's ops (a surcharge counts some of them again)
    ops, flops, moved = plain.reshape(len(PREDICTED_KINDS), 3)[_COUNTED_KINDS].sum(axis=0)
    size = [math.log1p(flops), math.log1p(moved), math.log1p(ops),
            math.log1p(flops / moved) if moved > 0 else 0.0]
    per_kind = np.bincount(_column_kinds(tuple(knots)), weights=row[1:] * coef[1:],
                           minlength=len(PREDICTED_KINDS))
    total = per_kind.sum()
    return np.concatenate([size, per_kind / total if total > 0 else per_kind])


@dataclass(frozen=True, eq=False)
class ResidualModel:
    """Distance-weighted nearest-neighbour residuals in standardized feature space.

    `neighbors` and `weight` (how much of the local residual to apply, 0 = additive law
    only) are chosen by leave-one-family-out error on the training units, so the residual
    model is used as far as it predicts model families it has not seen, and not at all
    where it does not.
    """

    coef: np.ndarray        # the additive law's coefficients (for the kind shares)
    points: np.ndarray      # [N, F] scaled training points
    residuals: np.ndarray   # [N] log(measured / additive prediction)
    center: np.ndarray      # [F] mean of the raw points
    scale: np.ndarray       # [F] multiplier of each raw column (1 / its spread x its weight)
    reach: float            # distance to the nearest unit at which a residual is halved
    neighbors: int = RESIDUAL_NEIGHBORS
    weight: float = 1.0
    knots: tuple[float, ...] = ()  # the basis of coef (feature_vector)

    @classmethod
    def fit(cls, coef: np.ndarray, features: Sequence[dict[str, float]],
            residuals: np.ndarray, groups: Sequence[str] | None = None,
            knots: Sequence[float] = ()) -> ResidualModel | None:
        """None with fewer than 2 * RESIDUAL_NEIGHBORS points (too few to say anything local).

        Leave-one-group-out (`groups`: the model family each unit comes from; default: each
        unit its own group) picks how much the kind shares count next to the size
        (RESIDUAL_SHARE_WEIGHTS), the neighbour count and the weight of the residual: each
        unit is predicted from the units of other groups only, as a model never profiled
        will be, and the error is judged on the models' units (the layer space's where there
        are no others): a new model is new code over sampled op kinds, not a new layer
        family (choose_knots).
        """
        if len(features) < 2 * RESIDUAL_NEIGHBORS:
            return None
        knots = tuple(knots)
        raw = np.array([residual_features(f, coef, knots) for f in features])
        residuals = np.asarray(residuals, dtype=float)
        center, spread = raw.mean(axis=0), raw.std(axis=0)
        spread[spread < 1e-9] = 1.0
        size_columns = 4
        labels = np.array(list(groups) if groups is not None else range(len(residuals)), dtype=object)
        same_group = labels[:, None] == labels[None, :]
        judged = np.array([is_model_family(str(label)) for label in labels])
        if not judged.any():
            judged[:] = True
        best_error, best = float(np.mean(np.abs(residuals[judged]))), None
        for share_weight in RESIDUAL_SHARE_WEIGHTS:
            scale = 1.0 / spread
            scale[size_columns:] *= share_weight
            points = (raw - center) * scale
            distances = _distances(points, points)
            # Leave out the unit's own group, and every unit of the same computation (a
            # block measured twice says nothing about units not measured).
            distances[same_group | (distances < 1e-9)] = np.inf
            nearest = distances.min(axis=1)
            positive = nearest[np.isfinite(nearest) & (nearest > 0)]
            reach = RESIDUAL_REACH * (float(np.median(positive)) if len(positive) else 1.0)
            model = cls(coef, points, residuals, center, scale, reach, knots=knots)
            for neighbors in (1, 2, 4, 8):
                if neighbors > int(np.isfinite(distances).sum(axis=1).min()):
                    break
                held_out = model._local(distances, neighbors)  # each unit from the others
                for weight in (0.25, 0.5, 0.75, 1.0):
                    error = float(np.mean(np.abs(residuals - weight * held_out)[judged]))
                    if error < best_error:
                        best_error, best = error, (model, neighbors, weight)
        if best is None:
            return cls(coef, raw - center, residuals, center, 1.0 / spread, 1.0, weight=0.0, knots=knots)
        model, neighbors, weight = best
        return dataclasses.replace(model, neighbors=neighbors, weight=weight)

    def _local(self, distances: np.ndarray, neighbors: int) -> np.ndarray:
        """Shrunk distance-weighted mean residual of each row's nearest points."""
        nearest = np.argpartition(distances, neighbors - 1, axis=1)[:, :neighbors]
        d = np.take_along_axis(distances, nearest, axis=1)
        weights = 1.0 / (d + 1e-6 * self.reach)
        local = (weights * self.residuals[nearest]).sum(axis=1) / weights.sum(axis=1)
        # Shrink towards the additive law with the distance to the nearest neighbour.
        return local / (1.0 + (d.min(axis=1) / self.reach) ** 2)

    def predict(self, features: Sequence[dict[str, float]]) -> np.ndarray:
        """log correction factor of each unit."""
        encoded = [_encode(f, self.knots) for f in features]
        return self.predict_encoded([plain for plain, _ in encoded], [row for _, row in encoded])

    def predict_encoded(self, plains: Sequence[np.ndarray], rows: Sequence[np.ndarray]) -> np.ndarray:
        """`predict` of units encoded by `_encode` (their plain values and rows in the basis
        of `knots`): a prediction encodes its units once."""
        if not len(plains):
            return np.zeros(0)
        queries = np.array([_residual_point(p, r, self.coef, self.knots) for p, r in zip(plains, rows)])
        distances = _distances((queries - self.center) * self.scale, self.points)
        return self.weight * self._local(distances, min(self.neighbors, self.points.shape[0]))


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    squared = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


@dataclass(frozen=True)
class LatencyModel:
    """A fitted model of one (device, backend): coefficients over BASIS (or the size-binned
    basis of `size_knots`), the kinds it has seen, and per-computation corrections from
    measurements (see module docstring)."""

    device: str
    backend: str
    coef: np.ndarray
    kinds: frozenset[str]
    records: int
    corrections: dict[tuple[float, ...], float] = field(default_factory=dict)
    stage_corrections: dict[tuple[float, ...], float] = field(default_factory=dict)
    # seconds a cut between two measured computations adds beyond the join model
    cut_corrections: dict[tuple[tuple[float, ...], tuple[float, ...]], float] = field(default_factory=dict)
    source: str = ""  # "device/backend" it was adapted from; "" for an own fit
    residual: ResidualModel | None = None
    join_coef: np.ndarray | None = None  # over JOIN_BASIS; None: no join model (joins 0)
    size_knots: tuple[float, ...] = ()  # () = the plain law over BASIS
    # Records whose features predate op kinds of this version (`older_features`): how many,
    # and the kinds they lack.
    older_records: int = 0
    older_kinds: tuple[str, ...] = ()
    # Records that timed a multi-thread pool sleeping (`sleeping_pool`): fitted on, where the
    # backend has no others, or left out.
    sleeping_records: int = 0
    sleeping_left_out: int = 0

    @property
    def run_overhead_s(self) -> float:
        """c_run: what one session run costs besides its ops."""
        return float(self.coef[0])

    @property
    def provenance(self) -> str:
        """Where the model comes from, for plans: its own fit or the backend it was adapted from."""
        if self.source:
            return f"adapted from {self.source} with {self.records} record(s)"
        return f"fitted on {self.records} record(s)"

    @property
    def older_note(self) -> str:
        """For plans, where some records were profiled by an older edgeplan: with older
        features (how many, and what it costs: a unit with a kind no record has falls back
        to the roofline), or timing the backend's thread pool sleeping."""
        notes = []
        if self.older_records:
            notes.append(f"{self.older_records} of them profiled before op kind(s) "
                         f"{', '.join(self.older_kinds)} existed: units with those kinds fall back to "
                         f"the roofline where no newer record has them; profile those models again")
        if self.sleeping_records:
            notes.append(f"{self.sleeping_records} of them timed its thread pool sleeping between ops, "
                         f"as edgeplan profiled before it timed pools spinning like the runtime runs "
                         f"them: they price the backend up to 2x slow; profile again")
        if self.sleeping_left_out:
            notes.append(f"{self.sleeping_left_out} older record(s) that timed its thread pool sleeping "
                         f"left out: newer ones time it spinning, as the runtime runs it")
        return "".join(f" ({note})" for note in notes)

    def covers(self, features: dict[str, float]) -> bool:
        return kinds_of(features) <= self.kinds

    def additive(self, features: dict[str, float]) -> float:
        return float(feature_vector(features, self.size_knots) @ self.coef)

    def base_many(self, features: Sequence[dict[str, float]]) -> np.ndarray:
        """Additive law times the residual correction, before per-computation corrections."""
        return self._base_encoded(*self._encode_many(features))

    def _encode_many(self, features: Sequence[dict[str, float]]) -> tuple[np.ndarray, np.ndarray]:
        encoded = [_encode(f, self.size_knots) for f in features]
        plains = np.array([plain for plain, _ in encoded]).reshape(len(encoded), len(BASIS) - 1)
        rows = np.array([row for _, row in encoded]).reshape(len(encoded), len(self.coef))
        return plains, rows

    def _base_encoded(self, plains: np.ndarray, rows: np.ndarray) -> np.ndarray:
        additive = rows @ self.coef
        if self.residual is None:
            return additive
        return additive * np.exp(self.residual.predict_encoded(plains, rows))

    def base(self, features: dict[str, float]) -> float:
        return float(self.base_many([features])[0])

    def predict(self, features: dict[str, float]) -> float:
        """Seconds for one run of a unit alone."""
        return float(self.predict_many([features])[0])

    def predict_many(self, features: Sequence[dict[str, float]], in_stage: bool = False) -> np.ndarray:
        """Seconds for one run of each unit: alone, or `in_stage` as one of a stage's units
        (module docstring: the two memories)."""
        plains, rows = self._encode_many(features)
        keys = [tuple(plain) for plain in plains]  # as _key builds them
        factors = np.array([self.stage_corrections.get(k, self.corrections.get(k, 1.0)) if in_stage
                            else self.corrections.get(k, 1.0) for k in keys])
        return self._base_encoded(plains, rows) * factors

    def joins(self, parts: Sequence[dict[str, float]], times: np.ndarray) -> np.ndarray:
        """Seconds each cut between consecutive parts adds when they run in one stage,
        `times` the parts' own predictions: a join saves at most the smaller neighbour."""
        if len(parts) < 2 or (self.join_coef is None and not self.cut_corrections):
            return np.zeros(max(len(parts) - 1, 0))
        raw = (np.zeros(len(parts) - 1) if self.join_coef is None else
               np.array([join_features(a, b) for a, b in zip(parts, parts[1:])]) @ self.join_coef)
        if self.cut_corrections:
            keys = [_key(part) for part in parts]
            raw = raw + np.array([self.cut_corrections.get(cut, 0.0) for cut in zip(keys, keys[1:])])
        return np.maximum(raw, -np.minimum(times[:-1], times[1:]))

    def predict_stage(self, parts: Sequence[dict[str, float]]) -> float:
        """Seconds for one run of consecutive units as one stage: c_run counted once, and
        the joins of the cuts inside it."""
        times = self.predict_many(parts, in_stage=len(parts) > 1)
        return float(times.sum() + self.joins(parts, times).sum()) - (len(parts) - 1) * self.run_overhead_s


def _key(features: dict[str, float]) -> tuple[float, ...]:
    """A unit's key in the memories: its encoded plain values (`_encode`)."""
    return tuple(_encode(features)[0])


def _remember(model: LatencyModel, records: Sequence[UnitProfile]) -> LatencyModel:
    """The model with a correction per measured computation: units timed alone in
    `corrections` (latest record last), units inside stages in `stage_corrections` (and in
    `corrections` where no record timed them alone), and the cuts inside stages in
    `cut_corrections`: of a stage's error, its units take a share that shrinks with its
    cuts (STAGE_CUT_SHARE) and its cuts the rest, in equal seconds, averaged over the stage
    records a cut is in."""
    encoded = [model._encode_many(record.parts or (record.features,)) for record in records]
    keys_of = [[tuple(plain) for plain in plains] for plains, _ in encoded]  # as _key builds them
    bases_of = [model._base_encoded(*parts_encoded) for parts_encoded in encoded]
    joins_of = [float(model.joins(record.parts or (record.features,), bases).sum())
                for record, bases in zip(records, bases_of)]
    times = _shrunk_run_times(model, records, keys_of, bases_of, joins_of)
    corrections: dict[tuple[float, ...], float] = {}
    stages = []  # (keys, bases, the units' share of the target) of every stage record
    cut_seconds: dict[tuple[tuple[float, ...], tuple[float, ...]], list[float]] = {}
    for record, keys, bases, joins, seconds in zip(records, keys_of, bases_of, joins_of, times):
        parts = record.parts or (record.features,)
        if bases.sum() <= 0 or seconds <= 0:
            continue
        # predict_stage subtracts c_run per extra part and adds the joins: the target is
        # what the parts' corrected predictions must add up to for it to hit the record.
        target = max(seconds + (len(parts) - 1) * model.run_overhead_s - joins, 1e-12)
        if record.parts:
            total = float(bases.sum())
            units_target = total * (target / total) ** (1.0 / (1.0 + STAGE_CUT_SHARE * (len(parts) - 1)))
            stages.append((keys, bases, units_target))
            for cut in zip(keys, keys[1:]):
                cut_seconds.setdefault(cut, []).append((target - units_target) / (len(parts) - 1))
        else:
            corrections[keys[0]] = target / float(bases.sum())
    in_stage = _stage_factors(stages)
    corrections.update({key: factor for key, factor in in_stage.items() if key not in corrections})
    return dataclasses.replace(model, corrections=corrections, stage_corrections=in_stage,
                               cut_corrections={cut: float(np.mean(s)) for cut, s in cut_seconds.items()})


def _shrunk_run_times(model: LatencyModel, records: Sequence[UnitProfile], keys_of: Sequence[list],
                      bases_of: Sequence[np.ndarray], joins_of: Sequence[float]) -> list[float]:
    """Each record's time, a run's (RUN_RUNTIME) error shrunk towards the model's prediction
    (empirical Bayes). A computation timed in n runs with mean log error e keeps
    e * tau^2 / (tau^2 + sigma^2 / n): sigma is a run's noise (RUN_NOISE_PER_SPREAD x the
    median spread of the backend's profiled timings), tau^2 the model's own error,
    mean(e^2 - sigma^2 / n) over the runs' computations but at least sigma^2 (on this host
    the predictor's held-out stage error is the size of the noise), so one run moves a stage
    at least half way. Profiled records are kept as timed: their units were timed in the
    same rounds. A run timed in a slow moment then teaches a predictor that was within its
    noise half of that moment, and a model off by far more than the noise (an adapted
    device, a stage slowdown no unit shows) learns almost all of it. Without profiled
    timings to size the noise, runs are taken as timed."""
    times = [record.time_s for record in records]
    spreads = [r.p90_s / r.p10_s - 1.0 for r in records if r.runtime != RUN_RUNTIME and r.p10_s > 0]
    noise = RUN_NOISE_PER_SPREAD * float(np.median(spreads)) if spreads else 0.0
    errors_of: dict[tuple, list[tuple[int, float]]] = {}  # computation -> (record index, log error)
    for i, (record, keys, bases, joins) in enumerate(zip(records, keys_of, bases_of, joins_of)):
        if record.runtime != RUN_RUNTIME or record.time_s <= 0:
            continue
        predicted = float(bases.sum()) + joins - (len(keys) - 1) * model.run_overhead_s
        if predicted > 0:
            errors_of.setdefault(tuple(keys), []).append((i, math.log(record.time_s / predicted)))
    if not errors_of or noise <= 0:
        return times
    means = {computation: float(np.mean([e for _, e in runs])) for computation, runs in errors_of.items()}
    model_variance = max(float(np.mean([means[computation] ** 2 - noise * noise / len(runs)
                                        for computation, runs in errors_of.items()])), noise * noise)
    for runs in errors_of.values():
        weight = model_variance / (model_variance + noise * noise / len(runs))
        for i, error in runs:
            times[i] = records[i].time_s * math.exp((weight - 1.0) * error)
    return times


def _stage_factors(stages: Sequence[tuple[list, np.ndarray, float]]) -> dict[tuple[float, ...], float]:
    """One factor per computation inside stages that fits every stage record at once
    (least squares on relative errors), pulled by STAGE_MEMORY_RIDGE towards the mean of
    the factors of the stages it is in (a stage's one factor spread over its units, the
    whole answer where one stage is all there is). So identical blocks in several stages
    take what the stages of blocks alone say, and a stage's other units (an LM head that
    runs slower inside a stage) take the rest, instead of the last stage's factor."""
    if not stages:
        return {}
    index: dict[tuple[float, ...], int] = {}
    for keys, _, _ in stages:
        for key in keys:
            index.setdefault(key, len(index))
    rows = np.zeros((len(stages), len(index)))
    prior_sum, prior_count = np.zeros(len(index)), np.zeros(len(index))
    for i, (keys, bases, target) in enumerate(stages):
        columns = [index[key] for key in keys]
        np.add.at(rows[i], columns, bases / target)
        distinct = sorted(set(columns))
        prior_sum[distinct] += target / float(bases.sum())
        prior_count[distinct] += 1
    prior = prior_sum / prior_count
    pull = math.sqrt(STAGE_MEMORY_RIDGE)
    factors = np.linalg.lstsq(np.vstack([rows, pull * np.eye(len(index))]),
                              np.concatenate([np.ones(len(stages)), pull * prior]), rcond=None)[0]
    factors = np.where(factors > 0, factors, prior)
    return {key: float(factors[j]) for key, j in index.items()}


def fit_joins(records: Sequence[UnitProfile], run_overhead_s: float) -> np.ndarray | None:
    """JOIN_BASIS coefficients from the profiled stage records whose parts were all timed
    alone as unit records (of the same backend), or None where they do not predict stages
    of models left out of the fit better than no join (module docstring). Stage records
    from runs (no quiet_s) are left out: their times include the boundary codecs."""
    alone = {_key(r.features): r.time_s for r in records if not r.parts and r.time_s > 0}
    cuts, floors, targets, scales, groups = [], [], [], [], []
    for record in records:
        if (len(record.parts) < 2 or record.quiet_s <= 0
                or not all(_key(p) in alone for p in record.parts)):
            continue
        parts = record.parts
        times = np.array([alone[_key(p)] for p in parts])
        cuts.append(np.array([join_features(a, b) for a, b in zip(parts, parts[1:])]))
        floors.append(-np.minimum(times[:-1], times[1:]))  # the most a join may save
        targets.append(record.time_s - times.sum() + (len(parts) - 1) * run_overhead_s)
        scales.append(record.time_s)
        groups.append(record.model)
    if len(cuts) < MIN_JOIN_RECORDS or len(set(groups)) < 2:
        return None
    scales = np.array(scales)
    x = np.array([c.sum(axis=0) for c in cuts]) / scales[:, None]
    y = np.array(targets) / scales
    labels = np.array(groups, dtype=object)
    # A feature the cuts of one model alone have is held at 0: leaving that model out, no
    # fit sees it, so nothing can vouch for its coefficient (store T's one conv net with
    # aliased cuts fitted -152 us per MB on two threads where a second model's gave -3).
    shown = np.array([len(set(labels[x[:, j] != 0])) >= 2 for j in range(x.shape[1])])
    shown[0] = True
    x = np.where(shown, x, 0.0)
    cuts = [np.where(shown, c, 0.0) for c in cuts]
    held_out = np.empty(len(y))
    for group in set(groups):
        inside = labels == group
        coef = _ridge(x[~inside], y[~inside])
        # judged as predicted: each cut's join clamped at what its neighbours cost
        held_out[inside] = [np.maximum(cuts[i] @ coef, floors[i]).sum() / scales[i]
                            for i in np.flatnonzero(inside)]
    if np.mean(np.abs(y - held_out)) >= np.mean(np.abs(y)):
        return None
    return _ridge(x, y)


def _ridge(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with a small ridge, on columns scaled to unit norm."""
    norms = np.linalg.norm(x, axis=0)
    norms[norms == 0] = 1.0
    scaled = x / norms
    penalty = math.sqrt(JOIN_RIDGE) * np.eye(x.shape[1])
    solved = np.linalg.lstsq(np.vstack([scaled, penalty]), np.concatenate([y, np.zeros(x.shape[1])]),
                             rcond=None)[0]
    return solved / norms


def choose_knots(records: Sequence[UnitProfile]) -> tuple[float, ...]:
    """SIZE_KNOTS where the size-binned law predicts the units of a model family left out
    of its fit better than the plain law by KNOTS_MARGIN (median |predicted / measured - 1|
    over the left-out units, the figure the predictor is judged by: a mean lets a few
    units no law fits decide), else () for the plain law; () with fewer than two families.

    The families left out are the models', the sampled layer space staying in every fit: a
    model never profiled is new code over op kinds the layer space samples, while leaving a
    layer family out asks the law for an op family it never saw (that test kept the plain
    law on the 1-thread backend where held-out models ran better binned, bench/predictor_notes.md). A store
    of layer families only leaves those out in turn."""
    labels = np.array([model_family(r.model) for r in records], dtype=object)
    families = set(labels)
    if len(families) < 2:
        return ()
    models = {family for family in families if is_model_family(family)} or families
    y = np.array([r.time_s for r in records])
    errors = {}
    for knots in ((), SIZE_KNOTS):
        x = np.array([feature_vector(r.features, knots) for r in records])
        misses = []
        for family in models:
            inside = labels == family
            misses.append(np.abs(x[inside] @ _relative_nnls(x[~inside], y[~inside]) / y[inside] - 1.0))
        errors[knots] = float(np.median(np.concatenate(misses)))
    return SIZE_KNOTS if errors[SIZE_KNOTS] < (1.0 - KNOTS_MARGIN) * errors[()] else ()


def _reorder_rates(join_coef: np.ndarray | None) -> dict[str, float]:
    """Seconds per byte of kinds `layout` and `aliased_layout` as the join model measures
    them (0 where it does not): a cut of a B-byte 4-D tensor drops its ReorderOutput and
    ReorderInput (4B layout bytes), and of one in aliased planes the ReorderOutput's
    surcharge too (2B aliased_layout bytes)."""
    if join_coef is None:
        return {"layout": 0.0, "aliased_layout": 0.0}
    return {"layout": max(0.0, -float(join_coef[JOIN_BASIS.index("nchw_bytes")]) / 4.0),
            "aliased_layout": max(0.0, -float(join_coef[JOIN_BASIS.index("aliased_bytes")]) / 2.0)}


def _reorder_columns(knots: tuple[float, ...], join_coef: np.ndarray | None) -> dict[int, float]:
    """The law's coefficients the join model sets (`_reorder_rates`), by column: the layout
    rate where it measures one, and always a surcharge kind's, 0 where no join prices it (a
    unit's surcharge is what a cut saves of it), with its count and FLOP columns at 0 (it
    adds no kernel)."""
    fixed = {}
    for kind, rate in _reorder_rates(join_coef).items():
        column = _bytes_column(knots, kind)
        if kind in SURCHARGE_KINDS:
            fixed.update({column - 2: 0.0, column - 1: 0.0, column: rate})
        elif rate:
            fixed[column] = rate
    return fixed


def _bytes_column(knots: tuple[float, ...], kind: str) -> int:
    """The column of a kind's bytes in the basis of `knots`: the kind's last (its bytes
    unsized, as the layout kind's are)."""
    return 1 + int(np.flatnonzero(_column_kinds(tuple(knots)) == PREDICTED_KINDS.index(kind))[-1])


def spinning_pool_records(records: Sequence[UnitProfile]) -> tuple[list[UnitProfile], int, int]:
    """One backend's records without those that timed its pool sleeping where others time
    it spinning (the two are different backends, up to 2x apart: profile.py), how many kept
    ones timed it sleeping, and how many were left out. A backend with spinning records
    runs a pool, whatever its name (`edgeplan profile --backend` renames cpu{t}), so there
    every profiled record without the mark timed it sleeping."""
    if any(r.spinning for r in records):
        kept = [r for r in records if not unmarked_profile(r)]
        return kept, 0, len(records) - len(kept)
    return list(records), sum(sleeping_pool(r) for r in records), 0


def fit_model(records: Sequence[UnitProfile], device: str, backend: str) -> LatencyModel:
    """Fit one backend's model on its records: the additive law and the residual model on
    unit records (on all records where too few units were timed alone), the join model on
    stage records whose units were. Records that timed a multi-thread pool sleeping are
    left out where the backend has records that time it spinning."""
    usable, sleeping, left_out = spinning_pool_records([r for r in records if r.time_s > 0])
    if not usable:
        raise PredictorError(f"predictor: no records with a positive time for {device}/{backend}; "
                             f"profile it with `edgeplan profile MODEL --store FILE`")
    alone = [r for r in usable if not r.parts]
    law = alone if len(alone) >= MIN_FIT_RECORDS else usable
    knots = choose_knots(law)
    x = np.array([feature_vector(r.features, knots) for r in law])
    y = np.array([r.time_s for r in law])
    coef = _relative_nnls(x, y)
    kinds = frozenset().union(*(kinds_of(r.features) for r in usable))
    older_records, older_kinds = _older(usable)
    model = LatencyModel(device, backend, coef, kinds, len(usable), size_knots=knots,
                         older_records=older_records, older_kinds=older_kinds,
                         sleeping_records=sleeping, sleeping_left_out=left_out)
    fixed = _reorder_columns(knots, fit_joins(usable, model.run_overhead_s))
    if fixed:
        coef = _relative_nnls(x, y, fixed=fixed)
        model = dataclasses.replace(model, coef=coef)
    # Residuals of unit records only: a stage's summed features are no unit's point.
    units = [r for r in usable if not r.parts]
    additive = np.array([model.additive(r.features) for r in units])
    keep = additive > 0
    residual = ResidualModel.fit(coef, [r.features for r, k in zip(units, keep) if k],
                                 np.log(np.array([r.time_s for r in units])[keep] / additive[keep]),
                                 groups=[model_family(r.model) for r, k in zip(units, keep) if k],
                                 knots=knots)
    join_coef = fit_joins(usable, model.run_overhead_s)  # with the c_run of the law as refit
    return _remember(dataclasses.replace(model, residual=residual, join_coef=join_coef), usable)


def adapt(source: LatencyModel, samples: Sequence[UnitProfile], device: str, backend: str,
          prior_scale: float = 1.0, ridge: float = ADAPT_RIDGE) -> LatencyModel:
    """`source` moved to another backend from a few samples (none: scaled by prior_scale).

    Scale first (the median measured/predicted ratio), then every coefficient refit as a
    multiple of the scaled source, pulled towards it with weight `ridge` per coefficient.
    The source's residual model (how efficiency changes with size) is carried over and the
    coefficients are fitted to what it leaves. Its memory of measured computations (how
    far each ran from its prediction) is carried over too, the samples' own measurements
    replacing it where they timed the same computation (bench/predictor_notes.md:
    neutral within this host, better between machines on three of four backend pairs).
    Its join model is carried over at the samples' scale.
    """
    samples, sleeping, left_out = spinning_pool_records([r for r in samples if r.time_s > 0])
    coef, scale = source.coef * prior_scale, prior_scale
    if samples:
        x = np.array([feature_vector(r.features, source.size_knots) for r in samples])
        # The part of each sample's time the additive law must explain.
        efficiency = np.array([
            source.base_many(parts).sum() / sum(source.additive(p) for p in parts)
            for parts in (r.parts or (r.features,) for r in samples)])
        y = np.array([r.time_s for r in samples]) / efficiency
        scale = float(np.exp(np.median(np.log(y / (x @ source.coef)))))
        coef = _relative_nnls(x, y, prior=source.coef * scale, ridge=ridge)
    older_records, older_kinds = _older(samples)
    model = LatencyModel(device, backend, coef, source.kinds, len(samples),
                         older_records=older_records, older_kinds=older_kinds,
                         sleeping_records=sleeping, sleeping_left_out=left_out,
                         source=f"{source.device}/{source.backend}", residual=source.residual,
                         join_coef=None if source.join_coef is None else source.join_coef * scale,
                         size_knots=source.size_knots)
    measured = _remember(model, samples)
    return dataclasses.replace(
        measured, corrections={**source.corrections, **measured.corrections},
        stage_corrections={**source.stage_corrections, **measured.stage_corrections},
        cut_corrections={**{cut: seconds * scale for cut, seconds in source.cut_corrections.items()},
                         **measured.cut_corrections})


def adapt_from_closest(sources: Sequence[LatencyModel], samples: Sequence[UnitProfile],
                       device: str, backend: str) -> LatencyModel:
    """`adapt` from the source whose rescaled prediction explains `samples` best (the
    closest known backend; a few samples of an unseen device or backend)."""
    source = min(sources, key=lambda m: _scale_residual(m, samples))
    return adapt(source, samples, device, backend)


def _scale_residual(model: LatencyModel, samples: Sequence[UnitProfile]) -> float:
    """Spread of log(measured / predicted) around its median: how well a rescaled model fits."""
    ratios = np.log([r.time_s / max(model.base(r.features), 1e-12) for r in samples])
    return float(np.median(np.abs(ratios - np.median(ratios))))


@dataclass(frozen=True)
class Predictor:
    """One LatencyModel per (device, backend) of a profile store."""

    models: dict[tuple[str, str], LatencyModel]

    @classmethod
    def fit(cls, records: Iterable[UnitProfile], min_records: int = MIN_FIT_RECORDS) -> Predictor:
        """Own fits for backends with >= min_records records; the others adapted from the
        known backend that explains their samples best."""
        by_backend: dict[tuple[str, str], list[UnitProfile]] = {}
        for record in records:
            by_backend.setdefault((record.device, record.backend), []).append(record)
        if not by_backend:
            raise PredictorError("predictor: the profile store has no records; fill it with "
                                 "`edgeplan profile MODEL --store FILE`")
        models = {key: fit_model(rows, *key) for key, rows in by_backend.items()
                  if len(rows) >= min_records}
        if not models:
            counts = ", ".join(f"{d}/{b}: {len(rows)}" for (d, b), rows in by_backend.items())
            raise PredictorError(f"predictor: no backend has the {min_records} records an own fit "
                                 f"needs ({counts}); profile more models or the layer space "
                                 f"(`edgeplan profile --layer-space`)")
        fitted = list(models.values())
        for key, rows in by_backend.items():
            if key not in models:
                models[key] = adapt_from_closest(fitted, rows, *key)
        return cls(models)

    def model_for(self, device, backend: str) -> LatencyModel | None:
        """The model for a fleet Device's backend: by device name, then by preset kind."""
        for name in (device.name, device.kind):
            model = self.models.get((name, backend))
            if model is not None:
                return model
        return None


@dataclass(frozen=True)
class LearnedCostModel:
    """CostModel: the predictor where it has a model that covers the unit, roofline elsewhere.

    Training mode scales the measured forward times by 3, as the roofline does (the store
    holds inference timings only). A cut between two learned units gets the model's join
    (`join_s`); a cut next to a guessed unit joins at 0.
    """

    predictor: Predictor
    fallback: RooflineCostModel = field(default_factory=RooflineCostModel)

    def costs(self, units, fleet, mode="inference", in_flight_microbatches=1) -> CostTables:
        tables = self.fallback.costs(units, fleet, mode, in_flight_microbatches)
        compute = tables.compute_s.copy()
        overhead = tables.stage_overhead_s.copy()
        guessed = np.ones(compute.shape, dtype=bool)
        joins = np.zeros(tables.join_s.shape)
        sources = [""] * len(tables.slots)
        features = [unit_features(u) if getattr(u, "op_mix", ()) else None for u in units]
        for k, (device_name, backend_name) in enumerate(tables.slots):
            model = self.predictor.model_for(fleet.device(device_name), backend_name)
            if model is None:
                continue
            sources[k] = model.provenance + (
                "" if (model.device, model.backend) == (device_name, backend_name)
                else f" of {model.device}/{model.backend}") + model.older_note  # found by preset kind
            rows = [u for u, f in enumerate(features) if f is not None and model.covers(f)]
            if rows:
                # c_run is paid once per stage run: a column of its own, not inside every unit
                times = model.predict_many([features[u] for u in rows], in_stage=True)
                scale = 3.0 if mode == "training" else 1.0
                compute[rows, k] = np.maximum(times - model.run_overhead_s, 0.0) * scale
                overhead[k] = model.run_overhead_s * scale
                guessed[rows, k] = False
                time_of = dict(zip(rows, times))
                for u in (u for u in rows if u + 1 in time_of):
                    pair = [features[u], features[u + 1]]
                    joins[u, k] = model.joins(pair, np.array([time_of[u], time_of[u + 1]]))[0] * scale
        return dataclasses.replace(
            tables, compute_s=compute, stage_overhead_s=overhead, join_s=joins, model="learned", guessed=guessed,
            slot_sources=tuple(sources),
            guessed_units=tuple(name for name, row in zip(tables.unit_names, guessed) if row.any()))



def learned_cost_model(store_path, run_dirs: Sequence = ()) -> LearnedCostModel:
    """A LearnedCostModel trained on a profile store plus the recorded runs of compiled
    directories that the store does not hold yet (`edgeplan compile --replan DIR`)."""
    from edgeplan.planner.profile import ProfileStore, records_from_run

    records = ProfileStore(store_path).load()
    for directory in run_dirs:
        records += records_from_run(directory, records)
    return LearnedCostModel(Predictor.fit(records))


__all__ = [
    "ADAPT_RIDGE",
    "BASIS",
    "JOIN_BASIS",
    "LatencyModel",
    "LearnedCostModel",
    "MIN_FIT_RECORDS",
    "Predictor",
    "PredictorError",
    "RESIDUAL_NEIGHBORS",
    "SIZE_KNOTS",
    "STAGE_CUT_SHARE",
    "ResidualModel",
    "adapt",
    "adapt_from_closest",
    "choose_knots",
    "feature_vector",
    "fit_joins",
    "fit_model",
    "join_features",
    "learned_cost_model",
    "model_family",
    "nnls",
    "older_features",
    "residual_features",
    "spinning_pool_records",
]
