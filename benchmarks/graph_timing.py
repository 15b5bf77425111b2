"""GPU time of a small op without Python launch costs, as inside a graph-captured decode step (benchmark helper).

Each captured graph calls the op on several copies of its weights in turn, more bytes in all than twice the L2
cache (50 MB on an H100), so every call reads its weights from HBM as a real decode step does.
"""

from __future__ import annotations

import torch

ROTATE_BYTES = 128 << 20  # bytes of weight copies cycled through in one graph: over twice the L2 of an H100/H200


def rotations(nbytes: int) -> int:
    """How many copies of `nbytes` of weights cover ROTATE_BYTES (two at least)."""
    return max(2, -(-ROTATE_BYTES // nbytes))


def graph_time(fn, items: list, calls: int = 64) -> float:
    """Microseconds per fn(item) call, the median of 5 replays of a CUDA graph calling fn on the items in turn.

    The warm-up and the capture run on the same side stream: kernels that keep per-stream state made on their
    first eager call (split-K counters) find it there during capture."""
    calls = max(calls, len(items))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles, allocates counters and workspaces outside the graph
        for item in items[:2]:
            fn(item)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(calls):
            fn(items[i % len(items)])
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]
