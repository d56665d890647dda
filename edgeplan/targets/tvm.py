"""TVM target: one stage's ONNX file -> one TVM Relax VM library (`stage_<i>.tvm.so`) and its record.

Import: `relax.frontend.onnx.from_onnx` on the stage's ONNX file, the one the ONNX target
wrote and checked against torch. The exported-program importer fails on HF stages here
(bool cumsum in the mask code, views of transposed tensors), the ONNX file already carries
the fixes (targets/onnx.py), and hashing its bytes gives the cache key.

Targets (`TARGETS`, or a TVM target dict): `host` (llvm for this machine), `aarch64`
(llvm with mtriple aarch64-linux-gnu, linked with Debian's `aarch64-linux-gnu-g++`: built
and checked to be an aarch64 ELF, not run here), `cuda`, `opencl`, `vulkan` (GPU kernels
with host code for this machine; built here, never run: there is no GPU. The apache-tvm
wheel generates CUDA and OpenCL code but has no Vulkan (SPIR-V) code generator, so
`vulkan` needs a TVM built from source with USE_VULKAN=ON).

Schedules (`SCHEDULES`):
  none          TVM's default lowering, no schedule: naive loops.
  dlight        rule-based schedules from `tvm.s_tir.dlight`, no tuning (the CPU set has
                GEMV and reduction rules; GPU targets get the GPU set, whose Fallback rule
                binds threads so every kernel builds).
  metaschedule  MetaSchedule tuning of every kernel, `trials` measurements in all, then
                dlight for whatever tuning left alone. Candidates are built and timed in
                this process and records stay in memory: the stock builder and runner
                pickle modules into worker processes (30 s timeouts on 2 busy cores), and
                apache-tvm-ffi 0.1.15 segfaults serializing a module with TIR functions,
                which the tuner does for every task. The `tvm` extra pins
                apache-tvm-ffi 0.1.14.post1, where that works; other versions are probed
                in a child process first, so a crash becomes an ArtifactError.

Cache: the compiled library for (ONNX bytes, target, schedule, trials, TVM version) is kept
under `cache_dir()` (`~/.cache/edgeplan/tvm`, or $EDGEPLAN_CACHE_DIR, or the `cache_dir`
option), so a second compile of the same stage copies it instead of scheduling again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeplan.errors import ArtifactError
from edgeplan.runtime.manifest import Artifact, sha256_of

INSTALL_HINT = ("install it with `pip install 'edgeplan[tvm]'` (apache-tvm 0.27.0.post1 with "
                "apache-tvm-ffi 0.1.14.post1), or compile with --targets onnx")
SCHEDULES = ("none", "dlight", "metaschedule")
# The `target` that means "each stage for its backend's tvm_target in the fleet" (compile only).
FLEET_TARGETS = "fleet"
TARGETS = {
    "host": {"kind": "llvm"},
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
    "cuda": {"kind": "cuda"},
    "opencl": {"kind": "opencl"},
    "vulkan": {"kind": "vulkan"},
}
# Where `export_library` finds a linker for a cross target (Debian package names in the error).
CROSS_COMPILERS = {"aarch64-linux-gnu": ("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu")}
# apache-tvm-ffi versions where tvm.ir.save_json of a TIR module works (probed on this stack).
SAVE_JSON_OK = ("0.1.14.post0", "0.1.14.post1")
CACHE_ENV = "EDGEPLAN_CACHE_DIR"

Progress = Callable[[int, int, str], None]


def require_tvm():
    """The tvm module, or an ArtifactError saying how to install it."""
    try:
        import tvm
    except ImportError:
        raise ArtifactError(f"tvm target: TVM is not installed; {INSTALL_HINT}") from None
    return tvm


def resolve_target(spec: str | dict) -> dict:
    """A TVM target dict from a `TARGETS` name, a dict, or a JSON object string."""
    if isinstance(spec, dict):
        return dict(spec)
    if spec in TARGETS:
        return dict(TARGETS[spec])
    if spec.lstrip().startswith("{"):
        try:
            return dict(json.loads(spec))
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"tvm target {spec!r}: not valid JSON ({exc.msg})") from None
    raise ArtifactError(
        f"tvm target {spec!r}: unknown; use one of {sorted(TARGETS)} or a TVM target as JSON, "
        f"e.g. '{{\"kind\": \"llvm\", \"mcpu\": \"cortex-a76\", \"mtriple\": \"aarch64-linux-gnu\"}}' "
        f"(TVM rejects the 'llvm -mcpu=...' string form)")


def is_host(target: dict) -> bool:
    """Whether code for `target` runs on this machine (llvm for the host's own triple)."""
    return target.get("kind") == "llvm" and "mtriple" not in target


def target_string(target: dict) -> str:
    return json.dumps(target, sort_keys=True)


def cache_dir(override: str | Path | None = None) -> Path:
    """The compiled-stage cache: `override`, else $EDGEPLAN_CACHE_DIR, else ~/.cache/edgeplan/tvm."""
    if override is not None:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path.home() / ".cache" / "edgeplan" / "tvm"


@dataclass(frozen=True)
class TvmBuild:
    """What one TVM emit did: the artifact, whether it came from the cache, and the seconds
    it took (scheduling and compiling, or copying from the cache)."""

    artifact: Artifact
    cache_hit: bool
    seconds: float


@dataclass(frozen=True)
class TvmTarget:
    name: str = "tvm"
    target: str | dict = "host"
    schedule: str = "dlight"
    trials: int = 64
    cache: str | Path | None = None
    progress: Progress | None = None

    def emit(self, onnx_path: Path, stage_index: int, out_dir: Path) -> TvmBuild:
        """Write `stage_<i>.tvm.so` for the stage whose ONNX file is `onnx_path`."""
        started = time.perf_counter()
        tvm = require_tvm()
        target = resolve_target(self.target)
        if self.schedule == "metaschedule" and is_host(target):
            target.setdefault("num-cores", os.cpu_count() or 1)  # the tuner needs the core count
        if self.schedule not in SCHEDULES:
            raise ArtifactError(f"tvm target: schedule {self.schedule!r} is unknown; use one of {SCHEDULES}")
        if self.schedule == "metaschedule" and self.trials < 1:
            raise ArtifactError(f"tvm target: metaschedule needs a trial budget >= 1, got {self.trials}")
        key = self.cache_key(Path(onnx_path).read_bytes(), target, tvm.__version__)
        cached = cache_dir(self.cache) / f"{key}.so"
        filename = f"stage_{stage_index}.tvm.so"
        path = Path(out_dir) / filename
        hit = cached.is_file()
        if not hit:
            library = self._compile(onnx_path, stage_index, target)
            cached.parent.mkdir(parents=True, exist_ok=True)
            # Export next to the cache entry, then rename: a crash never leaves half a library.
            partial = cached.with_suffix(f".{os.getpid()}.partial.so")
            _export(library, partial, target, stage_index)
            partial.replace(cached)
        shutil.copyfile(cached, path)
        artifact = Artifact(path=filename, sha256=sha256_of(path), nbytes=path.stat().st_size,
                            format="tvm", target=target_string(target))
        return TvmBuild(artifact, hit, time.perf_counter() - started)

    def cache_key(self, onnx_bytes: bytes, target: dict, tvm_version: str) -> str:
        digest = hashlib.sha256(onnx_bytes)
        trials = self.trials if self.schedule == "metaschedule" else 0
        digest.update(f"|{target_string(target)}|{self.schedule}|{trials}|tvm {tvm_version}".encode())
        return digest.hexdigest()

    def _compile(self, onnx_path: Path, stage_index: int, target: dict):
        import onnx
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        try:
            module = from_onnx(onnx.load(str(onnx_path)), keep_params_in_input=False)
        except Exception as exc:  # the importer raises many types; name the stage and operator
            raise ArtifactError(
                f"tvm target: importing stage {stage_index} ({onnx_path}) failed: "
                f"{exc.__class__.__name__}: {_first_line(exc)}; compile with --targets onnx") from exc
        tvm_target = tvm.target.Target(target)
        try:
            with tvm_target:
                module = relax.transform.DecomposeOpsForInference()(module)
                if self.schedule != "none":
                    module = relax.get_pipeline("zero")(module)  # legalize + fuse into TIR kernels
                if self.schedule == "metaschedule":
                    module = _tune(module, target, self.trials, stage_index, self.progress)
                if self.schedule in ("dlight", "metaschedule"):
                    module = _dlight(tvm_target)(module)
            return tvm.compile(module, target=tvm_target)
        except ArtifactError:
            raise
        except Exception as exc:
            raise ArtifactError(
                f"tvm target: compiling stage {stage_index} for {target_string(target)} with "
                f"schedule {self.schedule!r} failed: {exc.__class__.__name__}: {_first_line(exc)}"
                f"{_codegen_hint(target)}") from exc


def _dlight(tvm_target):
    import tvm.s_tir.dlight as dl

    if "gpu" in tvm_target.keys:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    return dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction())


def _tune(module, target: dict, trials: int, stage_index: int, progress: Progress | None):
    """MetaSchedule over the module's kernels with `trials` measurements; the best schedules
    applied. Builder and runner work in this process (see the module docstring)."""
    import tvm
    import tvm.s_tir.meta_schedule as ms
    from tvm import relax

    if not is_host(target):
        raise ArtifactError(
            f"tvm target: metaschedule times candidates on this machine, so it tunes host llvm "
            f"only, not {target_string(target)}; use --tvm-schedule dlight for this target")
    _check_save_json()
    builder_class, runner_class, callback_class = _make_tuning_classes()
    tvm_target = tvm.target.Target(target)
    store: dict = {}
    with tempfile.TemporaryDirectory(prefix="edgeplan-tune-") as work_dir:
        # Few candidates per round, so a small budget still reaches every kernel; random
        # replay needs no cost model (xgboost) and is cheap to search on 2 cores.
        database = ms.relax_integration.tune_relax(
            module, {}, tvm_target, work_dir, trials,
            num_trials_per_iter=4, strategy="replay-trace", cost_model="random",
            builder=builder_class(work_dir, store), runner=runner_class(store),
            database=ms.database.MemoryDatabase(),
            measure_callbacks=[*ms.MeasureCallback.create("default"),
                               callback_class(trials, f"stage {stage_index} tuning",
                                              progress or _no_progress)],
            seed=0)
    with tvm_target, database, tvm.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(module)


def _no_progress(done: int, total: int, label: str) -> None:
    del done, total, label


def _check_save_json() -> None:
    """MetaSchedule serializes TIR modules; refuse versions where that segfaults."""
    import tvm_ffi

    version = getattr(tvm_ffi, "__version__", "?")
    if version in SAVE_JSON_OK:
        return
    probe = ("import tvm; from tvm import te; a = te.placeholder((4, 4)); "
             "b = te.compute((4, 4), lambda i, j: a[i, j] * 2); "
             "tvm.ir.save_json(tvm.IRModule({'main': te.create_prim_func([a, b])}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300)
    if result.returncode != 0:
        raise ArtifactError(
            f"tvm target: metaschedule needs tvm.ir.save_json, which crashes with apache-tvm-ffi "
            f"{version} (exit {result.returncode}); `pip install apache-tvm-ffi==0.1.14.post1` "
            f"(the `tvm` extra pins it), or use --tvm-schedule dlight")


def _make_tuning_classes():
    """MetaSchedule's Python-side builder, runner and callback, defined once tvm is imported."""
    import numpy as np
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.s_tir.meta_schedule.runner import PyRunner, PyRunnerFuture, RunnerResult

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Compiles candidates here and hands them to the runner through `store`; the
        'artifact path' is a key inside an empty folder the default callbacks delete."""

        def __init__(self, work_dir: str, store: dict):
            super().__init__()
            self.work_dir, self.store = work_dir, store

        def build(self, build_inputs):
            results = []
            for build_input in build_inputs:
                try:
                    executable = tvm.compile(build_input.mod, target=build_input.target)
                except Exception as exc:  # a candidate that fails to build is a failed trial
                    results.append(BuilderResult(None, f"{exc.__class__.__name__}: {_first_line(exc)}"))
                    continue
                key = os.path.join(tempfile.mkdtemp(dir=self.work_dir), "candidate")
                self.store[key] = executable.mod
                results.append(BuilderResult(key, None))
            return results

    @derived_object
    class Finished(PyRunnerFuture):
        def __init__(self, result):
            super().__init__()
            self._result = result

        def done(self) -> bool:
            return True

        def result(self):
            return self._result

    @derived_object
    class InProcessRunner(PyRunner):
        """Times each candidate on random inputs: median of 3 runs, after one untimed run."""

        def __init__(self, store: dict):
            super().__init__()
            self.store = store
            self.random = np.random.default_rng(0)

        def run(self, runner_inputs):
            futures = []
            for runner_input in runner_inputs:
                module = self.store.pop(runner_input.artifact_path)
                try:
                    arrays = [tvm.runtime.tensor(
                        self.random.uniform(size=[int(d) for d in info.shape]).astype(info.dtype))
                        for info in runner_input.args_info]
                    timer = module.time_evaluator(module.entry_name, tvm.cpu(), number=1, repeat=3,
                                                  min_repeat_ms=0, cooldown_interval_ms=0)
                    module[module.entry_name](*arrays)
                    futures.append(Finished(RunnerResult([float(t) for t in timer(*arrays).results], None)))
                except Exception as exc:
                    futures.append(Finished(RunnerResult(None, f"{exc.__class__.__name__}: {_first_line(exc)}")))
            return futures

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        def __init__(self, total: int, label: str, progress: Progress):
            super().__init__()
            self.total, self.label, self.progress, self.done = total, label, progress, 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.done = min(self.total, self.done + len(runner_results))
            self.progress(self.done, self.total, self.label)

    return InProcessBuilder, InProcessRunner, ProgressCallback


def _export(library, path: Path, target: dict, stage_index: int) -> None:
    triple = target.get("mtriple")
    options = {}
    if triple is not None and triple in CROSS_COMPILERS:
        compiler, package = CROSS_COMPILERS[triple]
        if shutil.which(compiler) is None:
            raise ArtifactError(
                f"tvm target: stage {stage_index} for {triple} needs the cross compiler "
                f"{compiler}; install it (Debian/Ubuntu: apt-get install {package})")
        from tvm.support import cc

        options["fcompile"] = cc.cross_compiler(compiler)
    try:
        library.export_library(str(path), **options)
    except Exception as exc:
        raise ArtifactError(f"tvm target: writing the library of stage {stage_index} failed: "
                            f"{exc.__class__.__name__}: {_first_line(exc)}") from exc


def _codegen_hint(target: dict) -> str:
    kind = target.get("kind")
    if kind == "vulkan":
        return (f"; the apache-tvm wheel is built without {kind} code generation: build TVM from "
                f"source with USE_{kind.upper()}=ON, or use --targets onnx")
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def elf_machine(path: str | Path) -> int:
    """The e_machine field of an ELF file (62 x86-64, 183 aarch64); ArtifactError if not ELF."""
    header = Path(path).read_bytes()[:20]
    if header[:4] != b"\x7fELF":
        raise ArtifactError(f"{path}: not an ELF file")
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
