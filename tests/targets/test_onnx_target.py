"""ONNX target details: operators torch's exporter lacks, exported and run by the runtime."""

import numpy as np
import torch
from torch import nn

import edgeplan


class Differences(nn.Module):
    """torch.diff on floats and on a bool mask with prepend, and cumsum of bool, as HF mask code does."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(5, 5)

    def forward(self, x):
        values = torch.diff(self.proj(x), dim=1)
        flips = torch.diff(x > 0, dim=-1, prepend=(x > 0)[:, :1])
        positives = torch.cumsum(x > 0, dim=-1)  # bool cumsum: ORT has no bool CumSum
        return values, flips.to(torch.float32), positives


def test_diff_exports_and_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = Differences().eval()
    x = torch.randn(2, 5)
    edgeplan.compile(model, (x,), fleet="pi-cluster", out_dir=tmp_path, num_stages=1, time_limit_s=5)
    pipe = edgeplan.runtime.load(tmp_path)
    outputs = pipe.run({pipe.input_names[0]: x.numpy()})
    values, flips, positives = model(x)
    assert np.abs(outputs["output_0"] - values.detach().numpy()).max() < 1e-6
    assert np.array_equal(outputs["output_1"], flips.numpy())
    assert np.array_equal(outputs["output_2"], positives.numpy())
