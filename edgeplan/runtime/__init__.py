"""edgeplan runtime: load compiled stages and run them. Needs only numpy and onnxruntime.

    pipe = edgeplan.runtime.load("out/gpt")
    outputs = pipe.run({"input_ids": ids})
"""

from edgeplan.runtime.manifest import Manifest, read_manifest
from edgeplan.runtime.pipeline import Pipeline, RunStats, load

__all__ = ["Manifest", "Pipeline", "RunStats", "load", "read_manifest"]
