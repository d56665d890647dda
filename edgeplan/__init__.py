"""edgeplan: plan and compile PyTorch models into per-device pipeline stages.

`import edgeplan` stays light (no torch): `edgeplan.compile` and `edgeplan.runtime`
load their dependencies on first use, so a device can import the runtime alone.
"""

__version__ = "0.1.0"

__all__ = ["compile", "compile_workload", "runtime", "__version__"]


def compile(model, example_inputs=None, fleet="home-lab", out_dir=None, **options):
    """Capture `model`, plan it onto `fleet`, and emit per-stage artifacts into `out_dir`.

    See `edgeplan.planner.compile.compile_model` for the options. A dict
    `{name: (model, example_inputs)}` in place of the model (and no example inputs) is a
    multi-model workload: see `compile_workload`.
    """
    if isinstance(model, dict) and example_inputs is None:
        return compile_workload(model, fleet=fleet, out_dir=out_dir, **options)
    from edgeplan.planner.compile import compile_model

    return compile_model(model, example_inputs, fleet=fleet, out_dir=out_dir, **options)


def compile_workload(workload, fleet="home-lab", out_dir=None, merge="identical", **options):
    """Plan several models `{name: (model, example_inputs)}` onto one fleet together.

    merge="identical" shares layers with equal architecture and weights (lossless);
    "none" keeps the models as given. See `edgeplan.planner.workload.compile_workload`.
    """
    from edgeplan.planner.workload import compile_workload as compile_many

    return compile_many(workload, fleet=fleet, out_dir=out_dir, merge=merge, **options)


def __getattr__(name):
    if name == "runtime":
        import importlib

        return importlib.import_module("edgeplan.runtime")
    raise AttributeError(f"module 'edgeplan' has no attribute {name!r}")
