"""A micro-batch's forward, loss and backward as a CUDA graph: captured once per batch shape, then replayed.

Why: LoRA training of a small model is bound by the host, not the GPU. The qwen-1.5B shape at 8 x 1024 queued
3,716 kernels a step for 163 ms of GPU work, and the eager step took 260 to 290 ms (benchmarks/NOTES.md, sections
11 and 12). A replay queues the same kernels in one call.

How, for each batch shape (the tensors' names, shapes and dtypes):
- its first `warmup` micro-batches run eagerly, on a side stream, as the torch documentation asks before a
  capture (Triton compiles and tunes, cuBLAS makes its workspace, the adapter casts are made);
- the next one is captured: static device copies of the batch and of the loss scale are the graph's inputs,
  forward, loss and backward are recorded. Every trainable parameter has its .grad before the capture, so the
  recorded backward adds into it in place, as an eager backward does: replays accumulate micro-batches;
- later micro-batches of that shape are copied into the static inputs and the graph replayed. The graph reads
  gazelle.kernels.lora's kept adapter casts, and writes them first from the adapters (which an optimizer step
  between replays changed): about 350 small kernels inside the graph at the llama-8B shape, instead of as many
  launches, and their host work, between steps.
All graphs share one memory pool (they never run at once); at most `max_graphs` shapes are captured, the rest
run eagerly, so a stream of ever-new padded lengths costs nothing but the eager step.

The loss must be free of host syncs and data-dependent shapes (SFTTrainer.graph_loss sends every position
through the head, ignored targets included, instead of selecting the trained ones), and the model must not draw
random numbers (active LoRA dropout: the recomputation in backward could not restore the generator's state
inside a graph). A capture that fails is logged once and that step, and every later one, runs eagerly.

The returned loss and count are the graph's output tensors: the next replay overwrites them, so read them first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gazelle.kernels import lora
from gazelle.utils.logging import get_logger

log = get_logger(__name__)


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict, scale: torch.Tensor, outputs: tuple):
        self.graph, self.inputs, self.scale, self.outputs = graph, inputs, scale, outputs

    def replay(self, batch: dict, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        for name, value in batch.items():
            self.inputs[name].copy_(value, non_blocking=True)
        self.scale.fill_(scale)
        self.graph.replay()
        return self.outputs


class GraphedStep:
    """step(batch, scale): loss(batch) -> (loss_sum, count), then backward of loss_sum * scale into .grad.

    loss: batch (dict of device tensors) -> (loss_sum, count), capturable as the module docstring says.
    params: the trainable parameters; their .grad tensors are the graph's, zero them in place (zero_grad with
    set_to_none=False). A .grad set to None or replaced between steps is put back (zeroed, or copied) before a
    replay, so the result is right either way.
    """

    def __init__(self, loss: Callable[[dict], tuple[torch.Tensor, torch.Tensor]], params, warmup: int = 2,
                 max_graphs: int = 4):
        self.loss = loss
        self.params = list(params)
        self.warmup, self.max_graphs = warmup, max_graphs
        self._seen: dict[tuple, int] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._grads: list[torch.Tensor] | None = None  # the .grad tensors the graphs add into
        self._storage: list[int] | None = None  # the parameters' storage when the graphs were captured
        self._pool = None
        self.failure: str | None = None  # why graphs are off, after a failed capture
        self.replays = 0  # micro-batches run from a graph

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def __call__(self, batch: dict[str, torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.params[0].device
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(batch.items()))
        graph = self._graphs.get(key)
        if graph is not None and self._check():
            self.replays += 1
            return graph.replay(batch, scale)
        batch = {name: t.to(device, non_blocking=True) for name, t in batch.items()}
        if device.type != "cuda" or self.failure is not None or len(self._graphs) >= self.max_graphs:
            return self._eager(batch, scale)
        seen = self._seen[key] = self._seen.get(key, 0) + 1
        if seen <= self.warmup:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                out = self._eager(batch, scale)
            torch.cuda.current_stream(device).wait_stream(side)
            return out
        graph = self._capture(key, batch, device)
        if graph is None:
            return self._eager(batch, scale)
        self.replays += 1
        return graph.replay(batch, scale)

    def _eager(self, batch: dict, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, count = self.loss(batch)
        (loss_sum * torch.tensor(scale, dtype=torch.float32, device=loss_sum.device)).backward()
        return loss_sum.detach(), count

    def _check(self) -> bool:
        """The graphs are still valid (no parameter moved), and every .grad is the tensor they add into."""
        if [p.data_ptr() for p in self.params] != self._storage:
            log.info("CUDA graphs: a trainable parameter moved since the capture; capturing again")
            self._graphs.clear()
            self._seen.clear()
            return False
        for p, g in zip(self.params, self._grads):
            if p.grad is None:
                p.grad = g.zero_()
            elif p.grad is not g:
                p.grad = g.copy_(p.grad)
        return True

    def _capture(self, key: tuple, batch: dict, device: torch.device) -> _Graph | None:
        if self._graphs and not self._check():
            return None
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        lora.refresh_casts()  # else a cast made stale by the last optimizer step is written inside the graph
        inputs = {name: t.clone() for name, t in batch.items()}
        scale = torch.ones((), dtype=torch.float32, device=device)
        graph = torch.cuda.CUDAGraph()
        try:
            with lora.casts_kept_in_capture(), torch.cuda.graph(graph, pool=self._pool):
                lora.refresh_casts(every=True)  # each replay: the casts from the adapters of that moment
                loss_sum, count = self.loss(inputs)
                (loss_sum * scale).backward()
        except Exception as e:  # an op the capture refused: train on, eagerly
            self.failure = f"{type(e).__name__}: {e}"
            log.warning("CUDA graphs off, the capture failed (%s); training goes on without them", self.failure)
            torch.cuda.synchronize(device)
            return None
        if any(p.grad is not g for p, g in zip(self.params, grads)):
            self.failure = "backward replaced a parameter's .grad instead of adding into it"
            log.warning("CUDA graphs off: %s", self.failure)
            return None
        self._pool = graph.pool()
        self._grads, self._storage = grads, [p.data_ptr() for p in self.params]
        captured = self._graphs[key] = _Graph(graph, inputs, scale, (loss_sum.detach(), count))
        log.info("CUDA graphs: captured the training step for batch shape %s",
                 ", ".join(f"{name} {tuple(shape)}" for name, shape, _ in key))
        return captured
