"""Learned latency predictor: per-backend models fitted on the profile store, behind CostModel.

Model. A unit's latency on a backend is predicted as a sum over the op kinds it contains,

    t = c_run + sum_kind (c_op[kind] * count + c_flop[kind] * flops + c_byte[kind] * bytes)

with every coefficient >= 0 (an op never saves time), so a unit's prediction adds up from
what its nodes cost: a model never seen in training is predicted from its op-kind mix,
FLOPs and bytes (the `<kind>_count/_flops/_bytes` features of the store). The fit is a
non-negative least squares on relative errors (each record's row divided by its measured
time), so small and large units weigh alike. A stage-level record (a run's measured stage
time, its features summed over the stage's units) is one more row of the same system.

Measured units are remembered: every record leaves a correction factor (measured /
predicted) for the exact computation it timed (its feature vector), the latest record
winning. A unit seen before is predicted as measured, which is how measurements from runs
reach the next plan (`edgeplan profile --from-run`, `edgeplan compile --replan`).

Adaptation. A backend with fewer than MIN_FIT_RECORDS records is not fitted on its own:
it starts from the known backend whose model explains its few samples best, rescales it
by the samples' median ratio, and refits every coefficient from the samples with a ridge
pull towards the rescaled source (ADAPT_RIDGE), so a handful of samples moves the overall
speed and more samples move individual op kinds.

Fallback. `LearnedCostModel` predicts a (unit, slot) pair from the model for the slot's
device (by name or preset kind) and backend, if the model has seen every op kind of the
unit; everything else is costed by the roofline and marked in `CostTables.guessed`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeplan.errors import EdgeplanError
from edgeplan.planner.cost import CostTables, RooflineCostModel
from edgeplan.planner.profile import OP_KINDS, UnitProfile, unit_features

# Kinds whose nodes cost time; views alias and "input"/"param" are not ops.
PREDICTED_KINDS = tuple(kind for kind in OP_KINDS if kind != "view")
BASIS = ("runs",) + tuple(f"{kind}_{quantity}" for kind in PREDICTED_KINDS
                          for quantity in ("count", "flops", "bytes"))
# An own fit needs a few records per coefficient; fewer means adapting a known backend.
MIN_FIT_RECORDS = 3 * len(BASIS)
# Weight of the pull towards the source model per coefficient, in squared relative errors of
# one sample: (sigma / tau)^2 for ~10 % sample error and ~50 % spread of a coefficient
ADAPT_RIDGE = 0.04


class PredictorError(EdgeplanError):
    """The profile store cannot train a predictor (no records, unknown backend)."""


def feature_vector(features: dict[str, float]) -> np.ndarray:
    """The basis values of one record's or unit's features (one session run)."""
    return np.array([1.0] + [float(features.get(name, 0.0)) for name in BASIS[1:]])


def kinds_of(features: dict[str, float]) -> frozenset[str]:
    return frozenset(k for k in PREDICTED_KINDS if features.get(f"{k}_count", 0.0) > 0)


def nnls(a: np.ndarray, b: np.ndarray, max_iterations: int | None = None) -> np.ndarray:
    """min ||a x - b|| subject to x >= 0 (Lawson-Hanson active set)."""
    rows, cols = a.shape
    x = np.zeros(cols)
    passive = np.zeros(cols, dtype=bool)
    tolerance = 10 * np.finfo(float).eps * np.linalg.norm(a, 1) * max(rows, cols)
    for _ in range(max_iterations or 3 * cols):
        gradient = a.T @ (b - a @ x)
        if passive.all() or gradient[~passive].max(initial=-np.inf) <= tolerance:
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            z = np.zeros(cols)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if z[passive].min() > 0:
                x = z
                break
            blocking = passive & (z <= 0)
            alpha = np.min(x[blocking] / (x[blocking] - z[blocking]))
            x = x + alpha * (z - x)
            passive &= x > tolerance
            x[~passive] = 0.0
    return x


def _relative_nnls(x: np.ndarray, y: np.ndarray, prior: np.ndarray | None = None,
                   ridge: float = 0.0) -> np.ndarray:
    """Non-negative coefficients minimizing squared relative errors (+ ridge to a prior).

    Columns are scaled to unit norm (the basis spans FLOPs, bytes and counts, 12 orders of
    magnitude apart); with a prior, coefficients are solved as multiples of it.
    """
    rows = x / y[:, None]
    if prior is not None:
        rows = rows * prior[None, :]
        active = prior > 0
        rows = rows[:, active]
        penalty = math.sqrt(ridge) * np.eye(int(active.sum()))
        solved = nnls(np.vstack([rows, penalty]),
                      np.concatenate([np.ones(len(y)), math.sqrt(ridge) * np.ones(int(active.sum()))]))
        out = np.zeros(len(prior))
        out[active] = solved * prior[active]
        return out
    norms = np.linalg.norm(rows, axis=0)
    used = norms > 0
    solved = nnls(rows[:, used] / norms[used], np.ones(len(y)))
    out = np.zeros(x.shape[1])
    out[used] = solved / norms[used]
    return out


@dataclass(frozen=True)
class LatencyModel:
    """A fitted model of one (device, backend): coefficients over BASIS, the kinds it has
    seen, and per-computation corrections from measurements (see module docstring)."""

    device: str
    backend: str
    coef: np.ndarray
    kinds: frozenset[str]
    records: int
    corrections: dict[tuple[float, ...], float] = field(default_factory=dict)
    source: str = ""  # "device/backend" it was adapted from; "" for an own fit

    def covers(self, features: dict[str, float]) -> bool:
        return kinds_of(features) <= self.kinds

    def base(self, features: dict[str, float]) -> float:
        return float(feature_vector(features) @ self.coef)

    def predict(self, features: dict[str, float]) -> float:
        """Seconds for one run of a unit (or of a stage's summed features)."""
        return self.base(features) * self.corrections.get(_key(features), 1.0)

    def predict_many(self, features: Sequence[dict[str, float]]) -> np.ndarray:
        matrix = np.array([feature_vector(f) for f in features]).reshape(-1, len(BASIS))
        factors = np.array([self.corrections.get(_key(f), 1.0) for f in features])
        return matrix @ self.coef * factors


def _key(features: dict[str, float]) -> tuple[float, ...]:
    return tuple(feature_vector(features)[1:])


def _remember(model: LatencyModel, records: Sequence[UnitProfile]) -> LatencyModel:
    """The model with a correction per measured computation, latest record last."""
    corrections: dict[tuple[float, ...], float] = {}
    for record in records:
        parts = record.parts or (record.features,)
        base = sum(model.base(part) for part in parts)
        if base <= 0 or record.median_s <= 0:
            continue
        for part in parts:
            corrections[_key(part)] = record.median_s / base
    return dataclasses.replace(model, corrections=corrections)


def fit_model(records: Sequence[UnitProfile], device: str, backend: str) -> LatencyModel:
    """Fit one backend's model on its records (unit- and stage-level)."""
    usable = [r for r in records if r.median_s > 0]
    if not usable:
        raise PredictorError(f"predictor: no records with a positive time for {device}/{backend}; "
                             f"profile it with `edgeplan profile MODEL --store FILE`")
    x = np.array([feature_vector(r.features) for r in usable])
    y = np.array([r.median_s for r in usable])
    coef = _relative_nnls(x, y)
    kinds = frozenset().union(*(kinds_of(r.features) for r in usable))
    return _remember(LatencyModel(device, backend, coef, kinds, len(usable)), usable)


def adapt(source: LatencyModel, samples: Sequence[UnitProfile], device: str, backend: str,
          prior_scale: float = 1.0, ridge: float = ADAPT_RIDGE) -> LatencyModel:
    """`source` moved to another backend from a few samples (none: scaled by prior_scale).

    Scale first (the median measured/predicted ratio), then every coefficient refit as a
    multiple of the scaled source, pulled towards it with weight `ridge` per coefficient.
    The source's corrections describe its own backend, so they are not carried over.
    """
    samples = [r for r in samples if r.median_s > 0]
    coef = source.coef * prior_scale
    if samples:
        x = np.array([feature_vector(r.features) for r in samples])
        y = np.array([r.median_s for r in samples])
        scale = float(np.exp(np.median(np.log(y / (x @ source.coef)))))
        coef = _relative_nnls(x, y, prior=source.coef * scale, ridge=ridge)
    model = LatencyModel(device, backend, coef, source.kinds, len(samples),
                         source=f"{source.device}/{source.backend}")
    return _remember(model, samples)


def _scale_residual(model: LatencyModel, samples: Sequence[UnitProfile]) -> float:
    """Spread of log(measured / predicted) around its median: how well a rescaled model fits."""
    ratios = np.log([r.median_s / max(model.base(r.features), 1e-12) for r in samples])
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
        fitted = dict(models)
        for key, rows in by_backend.items():
            if key not in fitted:
                source = min(fitted.values(), key=lambda m: _scale_residual(m, rows))
                models[key] = adapt(source, rows, *key)
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
    holds inference timings only).
    """

    predictor: Predictor
    fallback: RooflineCostModel = field(default_factory=RooflineCostModel)

    def costs(self, units, fleet, mode="inference", in_flight_microbatches=1) -> CostTables:
        tables = self.fallback.costs(units, fleet, mode, in_flight_microbatches)
        compute = tables.compute_s.copy()
        guessed = np.ones(compute.shape, dtype=bool)
        features = [unit_features(u) if getattr(u, "op_mix", ()) else None for u in units]
        for k, (device_name, backend_name) in enumerate(tables.slots):
            model = self.predictor.model_for(fleet.device(device_name), backend_name)
            if model is None:
                continue
            rows = [u for u, f in enumerate(features) if f is not None and model.covers(f)]
            if rows:
                predicted = model.predict_many([features[u] for u in rows])
                compute[rows, k] = predicted * (3.0 if mode == "training" else 1.0)
                guessed[rows, k] = False
        return dataclasses.replace(
            tables, compute_s=compute, model="learned", guessed=guessed,
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
    "LatencyModel",
    "LearnedCostModel",
    "MIN_FIT_RECORDS",
    "Predictor",
    "PredictorError",
    "adapt",
    "feature_vector",
    "fit_model",
    "learned_cost_model",
    "nnls",
]
