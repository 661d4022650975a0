"""Prints Dynamo's recompile reasons for the compile strategy on the toy (debug aid)."""

import logging

import torch

from tessera.graphs import GraphConfig, PiecewiseGraphRunner
from tessera.graphs.toy import ToyConfig, ToyModel

logging.basicConfig(level=logging.WARNING)
for compiler in ("eager", "inductor"):
    m = ToyModel(ToyConfig(num_layers=2)).cuda().bfloat16().eval()
    r = PiecewiseGraphRunner(m, GraphConfig(strategy="compile", compiler=compiler,
                                            capture_sizes=[16, 32, 48, 64, 96], progress=False))
    with torch.no_grad():
        try:
            r.capture([torch.randint(0, 512, (8,), device="cuda")])
            for n in (5, 40, 90):
                r(torch.randint(0, 512, (n,), device="cuda"))
        except Exception as e:
            print("FAILED", compiler, type(e).__name__, str(e)[:300])
    print(compiler, r.stats.as_dict())
