"""Wrap a plain PyTorch model with tessera.graphs. Runs on a GPU, or on CPU with the emulated backend."""

import torch

from tessera.graphs import GraphConfig, PiecewiseGraphRunner
from tessera.testing.toy import ToyModel  # attention is a split op: `tessera.graphs.split_op`

device = "cuda" if torch.cuda.is_available() else "cpu"
model = ToyModel().to(device).eval()
runner = PiecewiseGraphRunner(model, GraphConfig(strategy="breakable", max_tokens=256))
with torch.no_grad():
    runner.capture([torch.randint(0, 512, (8,), device=device)])  # start-up: every size captured
    ids = torch.randint(0, 512, (37,), device=device)  # 37 tokens replay the 48-token graphs
    out = runner(ids)
    print(f"{device}: max |pcg - eager| = {(out - model(ids)).abs().max().item():.2e}")
print(runner.report.summary(), runner.stats.as_dict(), sep="\n")
