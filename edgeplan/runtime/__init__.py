"""edgeplan runtime: load compiled stages and run them. Needs only numpy and onnxruntime.

    pipe = edgeplan.runtime.load("out/gpt")
    outputs = pipe.run({"input_ids": ids})
"""

from edgeplan.runtime.manifest import Manifest, read_manifest
from edgeplan.runtime.pipeline import Pipeline, RunStats, latest_run, load, record_run
from edgeplan.runtime.weights import WeightStore

__all__ = ["Manifest", "Pipeline", "RunStats", "WeightStore", "latest_run", "load", "read_manifest",
           "record_run"]
