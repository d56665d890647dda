"""edgeplan: plan and compile PyTorch models into per-device pipeline stages.

`import edgeplan` stays light (no torch): `edgeplan.compile` and `edgeplan.runtime`
load their dependencies on first use, so a device can import the runtime alone.
"""

__version__ = "0.1.0"

__all__ = ["compile", "runtime", "__version__"]


def compile(model, example_inputs, fleet="home-lab", out_dir=None, **options):
    """Capture `model`, plan it onto `fleet`, and emit per-stage artifacts into `out_dir`.

    See `edgeplan.planner.compile.compile_model` for the options.
    """
    from edgeplan.planner.compile import compile_model

    return compile_model(model, example_inputs, fleet=fleet, out_dir=out_dir, **options)


def __getattr__(name):
    if name == "runtime":
        import importlib

        return importlib.import_module("edgeplan.runtime")
    raise AttributeError(f"module 'edgeplan' has no attribute {name!r}")
