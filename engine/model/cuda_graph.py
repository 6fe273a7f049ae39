"""CUDA-graph capture, the one way the engine and the benchmarks do it."""

from __future__ import annotations

import torch


def capture(run, warmup: int = 2):
    """Run ``run`` ``warmup`` times on a side stream (lazy initialisation, autotuning), then
    capture one call as a CUDA graph. Returns (graph, run's outputs inside the graph's memory):
    replaying the graph recomputes those outputs in place from the same input buffers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out
