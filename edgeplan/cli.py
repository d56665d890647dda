"""The `edgeplan` command: compile, inspect, run, fleets.

    edgeplan compile examples/gpt.py:build --fleet home-lab -o out/gpt
    edgeplan inspect out/gpt [--json]
    edgeplan run out/gpt --inputs x.npz [-o outputs.npz]
    edgeplan worker --listen 0.0.0.0:7000 --token-file fleet.token
    edgeplan deploy out/gpt --fleet fleet.toml --token-file fleet.token
    edgeplan run out/gpt --remote --inputs x.npz
    edgeplan fleets [NAME]
    edgeplan codecs          (on a device: its codec speed, codec_gbs in the fleet file)

Errors edgeplan raises on bad input print as one line (`edgeplan: error: ...`), exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from edgeplan.errors import EdgeplanError

EXIT_USAGE = 2


def load_module(path: str | Path, name: str | None = None):
    """Import a Python file by path, as `edgeplan compile FILE:FACTORY` does.

    The module is registered in sys.modules (dataclasses look it up) and may import the
    files next to it; a second call with the same file returns the same module.
    """
    path = Path(path).resolve()
    name = name or path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path:
        return loaded
    if not path.is_file():
        raise EdgeplanError(f"no file {path}")
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))  # let the file import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(str(path.parent))
    return module


def load_factory(spec: str):
    """FILE_OR_MODULE:FACTORY -> the factory callable."""
    if ":" not in spec:
        raise EdgeplanError(f"model {spec!r}: expected FILE_OR_MODULE:FACTORY, e.g. examples/gpt.py:build")
    source, _, attribute = spec.rpartition(":")
    if source.endswith(".py") or Path(source).exists():
        if not Path(source).is_file():
            raise EdgeplanError(f"model {spec!r}: no file {source}")
        module = load_module(source)
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise EdgeplanError(f"model {spec!r}: cannot import {source}: {exc}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise EdgeplanError(f"model {spec!r}: {source} has no callable {attribute!r}")
    return factory


def progress_bar(done: int, total: int, label: str) -> None:
    """A one-line progress bar on stderr (profiling units, building and tuning TVM stages)."""
    filled = int(30 * done / total) if total else 30
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {label[:40]:<40}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def cmd_compile(args) -> int:
    import edgeplan
    from edgeplan.targets.tvm import TvmTarget

    factory = load_factory(args.model)
    built = factory()
    is_workload = isinstance(built, dict)  # {name: (model, example_inputs)}: several models
    if not (is_workload or (isinstance(built, tuple) and len(built) == 2)):
        raise EdgeplanError(f"model {args.model!r}: the factory must return (model, example_inputs) "
                            f"or a workload {{name: (model, example_inputs)}}")
    model, example_inputs = (built, None) if is_workload else built
    out_dir = Path(args.output)
    options = {"merge": args.merge} if is_workload else {}
    if args.cost_model == "learned" or args.replan:
        from edgeplan.planner.predictor import learned_cost_model

        options["cost_model"] = learned_cost_model(args.store, [args.replan] if args.replan else [])
    plan = edgeplan.compile(
        model, example_inputs, fleet=args.fleet, out_dir=None if args.plan_only else out_dir,
        objective=args.objective, mode=args.mode, granularity=args.granularity,
        num_stages=args.stages, time_limit_s=args.time_limit, plan_from=args.plan_from,
        max_error=args.max_error, min_agreement=args.min_agreement,
        name=args.model.rpartition(":")[0].rpartition("/")[2].removesuffix(".py") or None,
        targets=args.targets,
        tvm=TvmTarget(target=args.tvm_target, schedule=args.tvm_schedule, trials=args.tvm_trials,
                      cache=args.tvm_cache_dir, progress=progress_bar),
        **options,
    )
    if args.plan_only:
        out_dir.mkdir(parents=True, exist_ok=True)
        plan.to_json(out_dir / "plan.json")
    from edgeplan.planner.report import format_plan

    print(format_plan(plan))
    if args.plan_only:
        written = ["plan.json"]
    else:
        from edgeplan.runtime.manifest import read_manifest

        stages = read_manifest(out_dir, verify=False).stages
        written = ["plan.json", "manifest.json", *(s.artifact.path for s in stages),
                   *(s.artifact.weights.path for s in stages if s.artifact.weights is not None)]
    print(f"\nwrote {out_dir}/: {', '.join(written)}")
    return 0


def cmd_inspect(args) -> int:
    from edgeplan.planner.plan import Plan
    from edgeplan.planner.report import format_plan
    from edgeplan.runtime.manifest import MANIFEST_FILE, read_manifest
    from edgeplan.runtime.pipeline import latest_run

    plan = Plan.from_json(args.directory)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    directory = Path(args.directory)
    compiled = directory.is_dir() and (directory / MANIFEST_FILE).is_file()
    manifest = read_manifest(directory, verify=False) if compiled else None
    print(format_plan(plan, manifest, latest_run(directory) if compiled else None))
    return 0


def cmd_run(args) -> int:
    import numpy as np

    from edgeplan.runtime import load, record_run

    if args.remote and args.emulate_links:
        raise EdgeplanError("run: --remote runs on the real links; drop --emulate-links")
    if args.remote:
        from edgeplan.runtime.deploy import connect

        pipe = connect(args.directory, token_file=args.token_file, timeout_s=args.timeout, tls=_tls(args))
    else:
        from edgeplan.runtime import WeightStore

        pipe = load(args.directory, emulate_links=args.emulate_links, weights=WeightStore(args.prepacking))
    try:
        with np.load(args.inputs) as archive:
            inputs = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise EdgeplanError(f"inputs {args.inputs}: no such file") from None
    except (OSError, ValueError) as exc:
        raise EdgeplanError(f"inputs {args.inputs}: not a .npz archive ({exc}); write one with "
                            f"numpy.savez(path, {pipe.input_names[0]}=array)") from None
    try:
        outputs = pipe.run(inputs)
    finally:
        if args.remote:
            pipe.close()
    output_path = Path(args.output or Path(args.directory) / "outputs.npz")
    np.savez(output_path, **outputs)
    stats = pipe.last_stats
    shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in outputs.items())
    links = (f"; emulated link ms/microbatch: {', '.join(f'{t * 1e3:.2f}' for t in stats.link_mean_s)}"
             if stats.link_mean_s else "")
    print(f"ran {stats.microbatches} microbatch(es) through {len(pipe.manifest.stages)} "
          f"{'remote ' if args.remote else ''}stage(s) in "
          f"{stats.wall_s * 1e3:.1f} ms ({stats.throughput_per_s:.1f} microbatches/s); stage busy "
          f"ms/microbatch: {', '.join(f'{t * 1e3:.2f}' for t in stats.stage_mean_s)}{links}")
    record_run(args.directory, stats, args.emulate_links, remote=args.remote)
    print(f"wrote {output_path}: {shapes}; measurements appended to {args.directory}/runs.jsonl")
    return 0


def cmd_profile(args) -> int:
    from edgeplan.planner.profile import (
        ProfileStore,
        fastest_reference_of,
        format_profiles,
        profile_units,
        records_from_run,
    )

    if not (args.model or args.layer_space or args.from_run):
        raise EdgeplanError("profile: nothing to measure; give a model (FILE:FACTORY), "
                            "--layer-space, or --from-run DIR")
    if args.backend is not None and (len(args.threads) != 1 or args.tvm):
        raise EdgeplanError(f"profile: --backend {args.backend} names one backend, but --threads "
                            f"{' '.join(map(str, args.threads))}{' --tvm' if args.tvm else ''} "
                            f"measures {len(args.threads) + bool(args.tvm)}; give one thread count "
                            f"(the threads that fleet backend runs with) and no --tvm")
    store = ProfileStore(args.store)
    # Slow spells of the machine are judged against the fastest this host's records saw.
    measured = store.load() if store.path.is_file() and (args.model or args.layer_space) else []
    renamed = {} if args.backend is None else {args.backend: args.threads[0]}

    def tvm_failure(unit: str, reason: str) -> None:
        print(f"\nprofile: TVM cannot build {unit}, timed on ONNX Runtime only: {reason}", file=sys.stderr)

    # How every model and layer bank is timed; the store's fastest reference so far comes with each call.
    timing = dict(threads=args.threads, warmup=args.warmup, repeats=args.repeats, rounds=args.rounds,
                  extra_rounds=args.retries, tvm=args.tvm, on_tvm_failure=tvm_failure, progress=progress_bar,
                  device=args.device)
    records = []
    if args.model:
        factory = load_factory(args.model)
        built = factory()
        if not (isinstance(built, tuple) and len(built) == 2):
            raise EdgeplanError(f"model {args.model!r}: the factory must return (model, example_inputs)")
        model, example_inputs = built
        records += profile_units(
            model, example_inputs, **timing,
            name=args.model.rpartition(":")[0].rpartition("/")[2].removesuffix(".py") or None,
            fastest_reference=fastest_reference_of(measured, device=args.device, backend_threads=renamed))
    if args.layer_space:
        from edgeplan.planner.layer_space import layer_space

        for name, bank, inputs, _ in layer_space(samples=args.samples, seed=args.seed):
            records += profile_units(bank, inputs, **timing, name=name,
                                     fastest_reference=fastest_reference_of(
                                         [*measured, *records], device=args.device, backend_threads=renamed))
    if records:
        if args.backend is not None:
            records = [dataclasses.replace(r, backend=args.backend) for r in records]
        print(format_profiles(records))
    if args.from_run:
        known = store.load() if store.path.is_file() else []
        from_run = records_from_run(args.from_run, known)
        records += from_run
        print(f"{len(from_run)} stage measurement(s) from {args.from_run}/runs.jsonl"
              + ("" if from_run else " (all of them are in the store already)"))
    written = store.append(records)
    print(f"\nappended {written} record(s) to {args.store}")
    _report_sleeping_pools(measured, records, args.store)
    if args.from_run:
        _print_refit(store, args.from_run)
    return 0


def _report_sleeping_pools(measured, records, store_path) -> None:
    """Say which backends' older records, which timed a multi-thread pool sleeping, the
    predictor leaves out now that new records time it spinning (planner/predictor.py)."""
    from edgeplan.planner.predictor import spinning_pool_records

    for device, backend in dict.fromkeys((r.device, r.backend) for r in records if r.spinning):
        _, _, older = spinning_pool_records(
            [r for r in (*measured, *records) if (r.device, r.backend) == (device, backend)])
        if older:
            print(f"profile: {store_path} holds {older} older record(s) of {device}/{backend} that "
                  f"timed its thread pool sleeping; the predictor leaves them out now that the "
                  f"backend has records timed spinning, as the runtime runs it", file=sys.stderr)


def _print_refit(store, directory) -> None:
    """The refitted predictor's view of a recorded plan: planned vs measured vs predicted now."""
    from edgeplan.planner.fleet import load_fleet
    from edgeplan.planner.plan import Plan
    from edgeplan.planner.predictor import Predictor
    from edgeplan.planner.profile import DEVICE, backend_name
    from edgeplan.runtime.pipeline import latest_run

    plan, run = Plan.from_json(directory), latest_run(directory)
    records = store.load()
    predictor = Predictor.fit(records)
    fleet = load_fleet(plan.fleet)
    print(f"refitted on {len(records)} record(s); latest run of {directory} (ms; a run's error is "
          f"learned as far as the runs show more than a run's noise, so 'predicted now' nears "
          f"'measured' as more runs agree):")
    for stage in plan.stages:
        model = (predictor.model_for(fleet.device(stage.device), stage.backend) if run.get("remote")
                 else predictor.models.get((DEVICE, backend_name(run.get("threads_per_stage", 0)))))
        features = [plan.units[u].features for u in range(stage.unit_start, stage.unit_end)]
        now = "-" if model is None else f"{model.predict_stage(features) * 1e3:.3f}"
        print(f"  stage {stage.index} {stage.device}/{stage.backend}: planned {stage.compute_s * 1e3:.3f}, "
              f"measured {run['stage_mean_s'][stage.index] * 1e3:.3f}, predicted now {now}")


def _tls(args):
    """mTLS files from --tls-ca/--tls-cert/--tls-key, or None."""
    from edgeplan.runtime.wire import Tls

    return Tls.from_paths(args.tls_ca, args.tls_cert, args.tls_key)


def _add_tls_options(parser, who: str) -> None:
    parser.add_argument("--tls-ca", default=None, help=f"mTLS: the fleet's CA certificate (PEM){who}")
    parser.add_argument("--tls-cert", default=None, help="mTLS: this node's certificate, signed by the CA")
    parser.add_argument("--tls-key", default=None, help="mTLS: this node's private key")


def cmd_worker(args) -> int:
    import logging
    import os
    import signal
    import threading

    from edgeplan.runtime.wire import read_token
    from edgeplan.runtime.worker import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        raise EdgeplanError(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 0.0.0.0:7000")
    directory = Path(args.dir or Path.home() / ".cache" / "edgeplan" / f"worker-{port}")
    server, bound = serve(args.listen, read_token(args.token_file), directory, args.threads, _tls(args))
    print(f"edgeplan worker listening on {host}:{bound} (pid {os.getpid()}), directory {directory}",
          flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    server.stop(grace=2).wait()
    return 0


def cmd_deploy(args) -> int:
    from edgeplan.runtime.deploy import DEPLOYMENT_FILE, deploy

    record = deploy(args.directory, args.fleet, args.token_file, timeout_s=args.timeout, tls=_tls(args))
    for worker in record.workers:
        print(f"  {worker.device:<20} {worker.address:<24} stage(s) {', '.join(map(str, worker.stages))}")
    print(f"deployed {args.directory} (manifest {record.deployment[:12]}) to {len(record.workers)} "
          f"worker(s), health and versions checked; wrote {Path(args.directory) / DEPLOYMENT_FILE}\n"
          f"run it with: edgeplan run {args.directory} --remote --inputs INPUTS.npz")
    return 0


def cmd_codecs(args) -> int:
    from edgeplan.runtime.codec_speed import (
        ACTIVATION_SHAPE,
        codec_speeds,
        reference_gbs,
    )

    if args.repeats < 1:
        raise EdgeplanError(f"--repeats must be at least 1, got {args.repeats}")
    print(f"boundary codecs on one core, float32 activation {list(ACTIVATION_SHAPE)} (16 MB), "
          f"best of {args.repeats}")
    print(f"  {'codec':<18} {'ratio':>7} {'encode GB/s':>12} {'decode GB/s':>12}")
    for speed in codec_speeds(args.repeats):
        print(f"  {speed.codec:<18} {speed.ratio:>6.2f}x {speed.encode_gbs:>12.2f} {speed.decode_gbs:>12.2f}")
    figure = reference_gbs(args.repeats)
    print(f"this machine's codec speed (int8 encode + decode): {figure:.2f} GB/s\n"
          f"put it in this device's [[device]] table of the fleet file: codec_gbs = {figure:.2f}")
    return 0


def cmd_fleets(args) -> int:
    from edgeplan.planner.fleet import list_fleets, list_presets, load_fleet

    if args.name:
        fleet = load_fleet(args.name)
        print(json.dumps(fleet.to_dict(), indent=1))
        return 0
    print("fleets:")
    for name, text in list_fleets().items():
        print(f"  {name:<16} {text}")
    print("devices:")
    for name, text in list_presets().items():
        print(f"  {name:<26} {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from edgeplan.planner.profile import ROUNDS

    parser = argparse.ArgumentParser(prog="edgeplan", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    compile_parser = sub.add_parser("compile", help="plan a model onto a fleet and emit ONNX stages")
    compile_parser.add_argument("model", help="FILE_OR_MODULE:FACTORY returning (model, example_inputs)")
    compile_parser.add_argument("--fleet", default="home-lab", help="preset name or fleet .toml (default home-lab)")
    compile_parser.add_argument("-o", "--output", required=True, help="output directory")
    compile_parser.add_argument("--objective", choices=["bottleneck", "latency"], default="bottleneck")
    compile_parser.add_argument("--mode", choices=["inference", "training"], default="inference")
    compile_parser.add_argument("--granularity", choices=["block", "layer"], default="block")
    compile_parser.add_argument("--stages", type=int, default=None, help="exact number of stages")
    compile_parser.add_argument("--time-limit", type=float, default=10.0, help="solver seconds (default 10)")
    compile_parser.add_argument("--plan-from", default=None, help="replay this plan.json instead of solving")
    compile_parser.add_argument("--max-error", type=float, default=None,
                                help="compress boundaries with codecs whose relative output error "
                                     "stays within this budget (e.g. 0.01); default: send raw")
    compile_parser.add_argument("--min-agreement", type=float, default=None,
                                help="with --max-error: also require this argmax agreement (e.g. 0.995)")
    compile_parser.add_argument("--plan-only", action="store_true", help="write plan.json only (works on meta models)")
    compile_parser.add_argument("--targets", choices=["onnx", "tvm", "auto"], default="onnx",
                                help="stage artifacts: ONNX (default), TVM libraries, or auto: time "
                                     "both per stage on this host and keep the faster (needs the tvm extra)")
    compile_parser.add_argument("--tvm-target", default="host",
                                help="TVM target: host, aarch64, cuda, opencl, vulkan, a TVM target "
                                     "as JSON, or fleet (each stage for its backend's tvm_target; "
                                     "the ARM presets say aarch64) (default host)")
    compile_parser.add_argument("--tvm-schedule", choices=["none", "dlight", "metaschedule"],
                                default="dlight", help="how TVM kernels are scheduled (default dlight)")
    compile_parser.add_argument("--tvm-trials", type=int, default=64,
                                help="metaschedule: measurements per stage (default 64)")
    compile_parser.add_argument("--tvm-cache-dir", default=None,
                                help="compiled-stage cache (default $EDGEPLAN_CACHE_DIR or ~/.cache/edgeplan/tvm)")
    compile_parser.add_argument("--merge", choices=["identical", "none"], default="identical",
                                help="workloads (a factory returning {name: (model, inputs)}): share "
                                     "layers with equal architecture and weights across models "
                                     "(identical, lossless; default) or keep the models as given")
    compile_parser.add_argument("--cost-model", choices=["roofline", "learned"], default="roofline",
                                help="learned: latency predictor trained on --store, roofline where "
                                     "it has no data (the plan lists those units)")
    compile_parser.add_argument("--store", default="profiles.jsonl",
                                help="profile store for the learned cost model (default ./profiles.jsonl)")
    compile_parser.add_argument("--replan", default=None, metavar="DIR",
                                help="learned cost model trained on --store plus the runs recorded "
                                     "in DIR/runs.jsonl (implies --cost-model learned)")
    compile_parser.set_defaults(handler=cmd_compile)

    inspect_parser = sub.add_parser("inspect", help="show a compiled plan")
    inspect_parser.add_argument("directory", help="compile output directory or plan.json")
    inspect_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    inspect_parser.set_defaults(handler=cmd_inspect)

    run_parser = sub.add_parser("run", help="run compiled stages on inputs from a .npz")
    run_parser.add_argument("directory")
    run_parser.add_argument("--inputs", required=True, help=".npz with one array per model input")
    run_parser.add_argument("-o", "--output", default=None, help="outputs .npz (default DIR/outputs.npz)")
    run_parser.add_argument("--emulate-links", action="store_true",
                            help="delay boundaries as the planned links would (timings are emulated)")
    run_parser.add_argument("--prepacking", choices=("auto", "on", "off"), default="auto",
                            help="ONNX Runtime weight prepacking: on is fastest, off holds each weight "
                                 "once across stages; auto turns it off only for stages with shared "
                                 "weights (default)")
    run_parser.add_argument("--remote", action="store_true",
                            help="run on the workers `edgeplan deploy` set up (DIR/deployment.json)")
    run_parser.add_argument("--token-file", default=None,
                            help="with --remote: the fleet token (default: the one given to deploy)")
    run_parser.add_argument("--timeout", type=float, default=30.0,
                            help="with --remote: deadline in seconds for one microbatch through the chain")
    _add_tls_options(run_parser, "; with --remote, default: the files given to deploy")
    run_parser.set_defaults(handler=cmd_run)

    worker_parser = sub.add_parser("worker", help="serve stages to a driver over gRPC (on a device)")
    worker_parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (port 0: any free)")
    worker_parser.add_argument("--token-file", required=True, help="file holding the fleet's shared token")
    worker_parser.add_argument("--dir", default=None,
                               help="where artifacts are stored (default ~/.cache/edgeplan/worker-PORT)")
    worker_parser.add_argument("--threads", type=int, default=0,
                               help="ONNX Runtime intra-op threads per stage (default 0: all cores)")
    _add_tls_options(worker_parser, "; with these, only clients with a certificate it signed get in")
    worker_parser.set_defaults(handler=cmd_worker)

    deploy_parser = sub.add_parser("deploy", help="upload compiled stages to the workers of a fleet")
    deploy_parser.add_argument("directory", help="compile output directory")
    deploy_parser.add_argument("--fleet", required=True, help="fleet .toml whose devices carry address")
    deploy_parser.add_argument("--token-file", required=True, help="file holding the fleet's shared token")
    deploy_parser.add_argument("--timeout", type=float, default=120.0, help="deadline per upload/configure call")
    _add_tls_options(deploy_parser, "; needed when the workers run with mTLS")
    deploy_parser.set_defaults(handler=cmd_deploy)

    profile_parser = sub.add_parser("profile", help="measure per-unit latency on this machine's ONNX Runtime CPU")
    profile_parser.add_argument("model", nargs="?", default=None,
                                help="FILE_OR_MODULE:FACTORY returning (model, example_inputs)")
    profile_parser.add_argument("--layer-space", action="store_true",
                                help="also profile the sampled layer space (planner/layer_space.py)")
    profile_parser.add_argument("--samples", type=int, default=16,
                                help="with --layer-space: layers per family (default 16)")
    profile_parser.add_argument("--seed", type=int, default=0, help="with --layer-space: sampling seed")
    profile_parser.add_argument("--from-run", default=None, metavar="DIR",
                                help="add the measured stage times of DIR/runs.jsonl to the store "
                                     "and show the refitted predictor's view of that plan")
    profile_parser.add_argument("--store", default="profiles.jsonl",
                                help="profile store to append to (default ./profiles.jsonl)")
    profile_parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                                help="intra-op thread counts, one backend cpuN of --device each (default 1 2)")
    profile_parser.add_argument("--device", default="host",
                                help="the fleet device this machine is, as records name it: a fleet file's "
                                     "device name, or its preset kind (which all devices of that kind "
                                     "share); the planner looks a device's records up by name, then by "
                                     "kind, and adapts a device with few records from the closest one "
                                     "profiled (default host: the host preset)")
    profile_parser.add_argument("--backend", default=None,
                                help="record the backend under this fleet backend name instead of "
                                     "cpuN (one --threads value: the threads that backend runs with), "
                                     "e.g. --device pi5 --backend cpu --threads 4 for a Raspberry Pi 5 "
                                     "preset's cpu backend")
    profile_parser.add_argument("--repeats", type=int, default=15, help="timed runs per unit (default 15)")
    profile_parser.add_argument("--rounds", type=int, default=ROUNDS,
                                help=f"interleaved timing rounds per unit, the quietest kept (default "
                                     f"{ROUNDS}; more rounds steady a noisy machine's times)")
    profile_parser.add_argument("--retries", type=int, default=None,
                                help="timing rounds repeated at most while the machine runs slow, each "
                                     "after a longer pause (default: as many as there are rounds; 0 "
                                     "keeps the first rounds whatever the machine's speed)")
    profile_parser.add_argument("--tvm", action="store_true",
                                help="also build every unit as a TVM library for this host (dlight, "
                                     "cached) and time it with one thread: backend tvm1 (needs the "
                                     "tvm extra)")
    profile_parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    profile_parser.set_defaults(handler=cmd_profile)

    codecs_parser = sub.add_parser("codecs", help="time the boundary codecs on this machine (run it on a device: "
                                   "it prints the codec_gbs figure for the fleet file)")
    codecs_parser.add_argument("--repeats", type=int, default=5, help="timed runs per codec, best kept (default 5)")
    codecs_parser.set_defaults(handler=cmd_codecs)

    fleets_parser = sub.add_parser("fleets", help="list fleet and device presets, or show one fleet")
    fleets_parser.add_argument("name", nargs="?")
    fleets_parser.set_defaults(handler=cmd_fleets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except EdgeplanError as exc:
        print(f"edgeplan: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
