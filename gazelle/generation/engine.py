"""The generation engine: batched sampling over a static KV cache, decode steps replayed from CUDA graphs.

It speaks token ids and knows nothing of tokenizers. It runs on the model being trained (no second copy
of the weights): LoRA adapters apply unmerged, and because optimizers update parameters in place, a
captured graph reads the new adapter values on its next replay without being captured again.

A call: the distinct prompts are prefilled once (in chunks), their cache rows copied for the n samples
of each, then one token per step for every live sequence. Every `sync_every` steps the host looks at
which sequences finished and compacts the live ones into the smallest captured batch size, so a long
tail does not hold the whole batch. The look is the loop's only wait for the GPU, and it waits for the
step before the one just launched, so the GPU always has work queued.

The cache and the graphs stay allocated between calls, also between training steps. Giving the cache back after
each GRPO rollout saved 0.46 GiB but cost 0.4 to 2.2 s a step (qwen-1.5B shape, H200): recapturing goes through
torch.cuda.graph, which empties the device and pinned-host allocator caches, so the next training step allocated
all its blocks and its offload buffers again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gazelle.generation.kv_cache import StaticKVCache
from gazelle.generation.sampling import SamplingParams, mark_seen, sample
from gazelle.models.tiling import tile_tokens

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PREFILL_GROUP = 4  # a prefill forward's tokens, in MLP tiles (Engine._prefill)


def bucket(n: int) -> int:
    return next((b for b in BUCKETS if b >= n), n)


class Engine:
    def __init__(self, model, prefill_chunk: int = 1024, sync_every: int = 16, cuda_graphs: bool | None = None,
                 compile: bool | None = None, prefill_tokens: int = 2048):
        self.model = model
        self.config = model.config
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = prefill_tokens
        self.sync_every = sync_every
        self.device = next(model.parameters()).device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.cache: StaticKVCache | None = None
        self._no_masks = dict.fromkeys(self.config.window(i) for i in range(self.config.num_layers))
        self._graphs: dict = {}
        # torch.compile fuses the decode step's many small kernels (norms, rotary, activations) before the
        # step is captured in a CUDA graph; shapes are fixed per batch bucket, so it compiles once per bucket.
        # On by default with CUDA graphs; the first call of each batch size then compiles (about a minute).
        compile = self.cuda_graphs if compile is None else compile
        self._step_fn = torch.compile(self._decode_step, dynamic=False) if compile else self._decode_step

    # -- memory ------------------------------------------------------------------------------
    def _ensure_cache(self, rows: int, max_len: int) -> None:
        cache = self.cache
        if cache is not None and cache.rows >= rows and cache.max_len >= max_len:
            return
        cfg = self.config
        self.cache, self._graphs = None, {}  # graphs hold pointers into the old cache
        rows = max(rows, cache.rows if cache else 0)
        max_len = max(max_len, cache.max_len if cache else 0)
        self.cache = StaticKVCache(cfg.num_layers, rows, cfg.num_kv_heads, max_len, cfg.head_dim, self.dtype,
                                   self.device)
        self._tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self._lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self._seen = torch.zeros(rows, cfg.vocab_size, dtype=torch.bool, device=self.device)

    # -- masks -------------------------------------------------------------------------------
    def _masks(self, slots: torch.Tensor, ends: torch.Tensor) -> dict:
        """Per sliding window, (B, 1, T, max_len): a query at slot q sees written slots s <= q (s < end).

        Every query also sees its own slot: a padding query past its row's end would otherwise see nothing,
        and the NaN of an empty softmax would reach real tokens through its cached value (0 * NaN)."""
        s = torch.arange(self.cache.max_len, device=self.device)[None, None, :]  # (1, 1, S)
        q = slots[:, :, None]  # (B, T, 1)
        visible = (s <= q) & (s < ends[:, None, None])
        masks = {}
        for window in {self.config.window(i) for i in range(self.config.num_layers)}:
            allowed = visible if window is None else visible & (s > q - window)
            masks[window] = (allowed | (s == q))[:, None]
        return masks

    def _forward(self, tokens: torch.Tensor, slots: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        self.cache.slots, self.cache.decoding = slots, False
        with tile_tokens(self.prefill_tokens):  # (_prefill's docstring)
            return self.model.run_layers(tokens, slots, self._masks(slots, ends), self.cache)

    # -- prefill -----------------------------------------------------------------------------
    def _prefill(self, sequences: list[list[int]]) -> torch.Tensor:
        """Write the sequences into cache rows 0..P-1 (in chunks); returns their last logits (P, vocab).

        A forward takes rows up to PREFILL_GROUP x prefill_tokens tokens (rows x chunk), and its MLP runs in tiles
        of prefill_tokens tokens (gazelle.models.tiling.tile_tokens): the MLP intermediates, the largest
        activations, stay those of prefill_tokens tokens, so the activations of a large batch of prompts never
        outgrow the KV cache they fill, while the eager prefill launches its other kernels once for all those
        rows (its launches, not the GPU, set its time)."""
        P, longest = len(sequences), max(len(s) for s in sequences)
        tokens = torch.zeros(P, longest, dtype=torch.long, device=self.device)
        for row, seq in enumerate(sequences):
            tokens[row, : len(seq)] = torch.tensor(seq, device=self.device)
        lengths = torch.tensor([len(s) for s in sequences], device=self.device)
        last = torch.zeros(P, self.config.hidden_size, dtype=self.dtype, device=self.device)
        # LongRoPE picks its factors from the longest position of a call: one forward over every row keeps them
        # consistent.
        longrope = self.config.rope.rope_type == "longrope"
        size = longest if longrope else min(self.prefill_chunk, longest)
        group = P if longrope else max(1, PREFILL_GROUP * self.prefill_tokens // size)
        for first in range(0, P, group):
            rows = slice(first, min(first + group, P))
            B, reach = rows.stop - first, max(len(s) for s in sequences[rows])
            self.cache.row_offset = first
            try:
                for start in range(0, reach, size):
                    chunk = tokens[rows, start : start + size]
                    slots = torch.arange(start, start + chunk.shape[1], device=self.device).expand(B, -1)
                    hidden = self._forward(chunk, slots, lengths[rows])
                    # Keep the hidden state of each row's last real token when it falls in this chunk.
                    end = lengths[rows] - 1 - start
                    inside = (end >= 0) & (end < chunk.shape[1])
                    picked = hidden[torch.arange(B, device=self.device), end.clamp(0, chunk.shape[1] - 1)]
                    last[rows] = torch.where(inside[:, None], picked, last[rows])
            finally:
                self.cache.row_offset = 0
        return self.model.logits(last)

    # -- decode ------------------------------------------------------------------------------
    def _decode_step(self, B: int, params: SamplingParams, generator) -> torch.Tensor:
        """One token for rows 0..B-1 from self._tokens / self._lengths; writes the new tokens back."""
        tokens, lengths = self._tokens[:B], self._lengths[:B]
        # Row b's new token goes to slot lengths[b] and sees the slots up to it: no mask to build.
        self.cache.slots, self.cache.decoding = lengths[:, None], True
        hidden = self.model.run_layers(tokens, self.cache.slots, self._no_masks, self.cache)
        logits = self.model.logits(hidden[:, -1])
        new = self._sample(logits, params, generator)
        tokens.copy_(new[:, None])
        lengths.add_(1)
        return new

    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
        """Next tokens of rows 0..B-1 (B = len(logits)), recording them for the repetition penalty."""
        seen = self._seen[: logits.shape[0]] if params.repetition_penalty != 1.0 else None
        new = sample(logits, params, generator, seen)
        if seen is not None:
            mark_seen(seen, new)
        return new

    def _graph_step(self, B: int, params: SamplingParams) -> Callable[[], torch.Tensor]:
        """A CUDA-graph replay of _decode_step for bucket size B (captured on first use)."""
        key = (B, params)
        if key not in self._graphs:
            saved = (self._tokens[:B].clone(), self._lengths[:B].clone(), self._seen[:B].clone())
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside capture (lazy inits, autotuning, compilation)
                for _ in range(2):
                    self._step_fn(B, params, None)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._step_fn(B, params, None)
            self._graphs[key] = (graph, out)
            for buf, value in zip((self._tokens[:B], self._lengths[:B], self._seen[:B]), saved):
                buf.copy_(value)  # the warm-up and capture must not have advanced the real state
        graph, out = self._graphs[key]

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    # -- the call ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams = SamplingParams(),
        n: int = 1,
        eos_token_ids: Sequence[int] = (),
        seed: int | None = None,
        on_tokens: Callable[[list[int], torch.Tensor], None] | None = None,
    ) -> list[list[int]]:
        """Completions (token ids, EOS included when emitted) for each prompt x n samples, prompt-major.

        on_tokens(sequence_ids, tokens) receives each step's new tokens of the live sequences.
        """
        prompts = [list(p) for p in prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling, even between training steps
        try:
            return self._generate(prompts, max_new_tokens, params, n, eos_token_ids, seed, on_tokens)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts, max_new_tokens, params, n, eos_token_ids, seed, on_tokens) -> list[list[int]]:
        total = len(prompts) * n
        rows = bucket(total) if self.cuda_graphs else total
        self._ensure_cache(rows, max(len(p) for p in prompts) + max_new_tokens)
        generator = None
        if seed is not None:
            if self.cuda_graphs:
                torch.cuda.manual_seed(seed)  # graphs draw from the default CUDA generator
            else:
                generator = torch.Generator(self.device).manual_seed(seed)
        eos = torch.tensor(list(eos_token_ids) or [-1], device=self.device)

        # Made before the prefill: a copy from the host waits for the work queued on the GPU.
        lengths = torch.tensor([len(p) for p in prompts], device=self.device).repeat_interleave(n)
        logits = self._prefill(prompts).repeat_interleave(n, 0)  # (total, vocab)
        if n > 1:
            self.cache.reorder(torch.arange(len(prompts), device=self.device).repeat_interleave(n))
        self._lengths[:total] = lengths
        self._seen[:total] = False
        if params.repetition_penalty != 1.0:
            for row, p in enumerate(prompts):
                self._seen[row * n : (row + 1) * n, p] = True
        first = self._sample(logits, params, generator)
        self._tokens[:total, 0] = first

        alive = list(range(total))  # sequence id held by each live row
        outputs: list[list[torch.Tensor]] = [[] for _ in range(total)]
        steps: list[tuple[list[int], torch.Tensor]] = [(alive, first)]
        finished = torch.isin(first, eos)
        longest_prompt = max(len(p) for p in prompts)
        look = None  # the flags and tokens on their way to the host, copied one step earlier
        for step in range(1, max_new_tokens):
            if look is not None:
                alive, finished = self._compact(alive, finished, steps, outputs, look)
                look = None
                if not alive:
                    break
            crosses = self._crosses_longrope(longest_prompt + step)
            if step % self.sync_every == 0 and not crosses:  # (a re-prefill hands out every step's tokens itself)
                look = self._look(steps, finished)
            B = len(alive)
            if crosses:
                new = self._reprefill(alive, prompts, n, steps, outputs, params, generator)
            elif self.cuda_graphs:
                new = self._graph_step(bucket(B), params)()[:B].clone()
            else:
                new = self._decode_step(B, params, generator)
            steps.append((alive, new))
            if on_tokens is not None:
                on_tokens(alive, new)
            finished = finished | torch.isin(new, eos)
        self._flush(steps, outputs)
        return [_until_eos(out, eos_token_ids) for out in outputs]

    # -- bookkeeping -------------------------------------------------------------------------
    def _flush(self, steps: list, outputs: list) -> None:
        """Append the tokens of the steps since the last flush to their sequences: one copy to the host."""
        if steps:
            _hand_out(steps, torch.cat([tokens for _, tokens in steps]).tolist(), outputs)
        steps.clear()

    def _look(self, steps: list, finished: torch.Tensor) -> tuple:
        """Start copying the tokens of `steps` and the finished flags to the host, without waiting for them.

        The next step is launched before the host reads them (_compact), so the GPU never runs dry while the
        host looks: a plain .tolist() here would wait for every launched step and leave the GPU idle until the
        next launch (a CUDA-graph launch costs the host about half a millisecond)."""
        values = torch.cat([tokens for _, tokens in steps] + [finished.long()])
        event = None
        if values.is_cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        return values, event, len(steps), finished

    def _compact(self, alive: list[int], finished: torch.Tensor, steps: list, outputs: list, look: tuple):
        """Hand the looked-at steps' tokens to their sequences and move the rows that had not finished then to the
        front; returns the new alive list and flags. Rows that finished after the look stay for the next one (a
        token past EOS is cut by _until_eos)."""
        host, event, upto, flags = look
        if event is not None:
            event.synchronize()
        values = host.tolist()
        at = _hand_out(steps[:upto], values, outputs)
        del steps[:upto]
        index = [i for i, done in enumerate(values[at:]) if not done]
        if len(index) == len(alive):
            return alive, finished
        # The rows to keep, in order, found on the device (no copy from the host): a stable sort puts the
        # unfinished rows (0) first.
        keep = torch.argsort(flags.to(torch.int32), stable=True)[: len(index)]
        self.cache.reorder(keep)
        for buf in (self._tokens, self._lengths, self._seen):
            buf[: len(index)] = buf.index_select(0, keep)
        return [alive[i] for i in index], finished[keep]

    def _crosses_longrope(self, total_len: int) -> bool:
        rope = self.config.rope
        return rope.rope_type == "longrope" and total_len == rope.original_max_position_embeddings + 1

    def _reprefill(self, alive: list[int], prompts, n: int, steps: list, outputs: list, params, generator):
        """LongRoPE switches every position to its long factors once the sequence passes the original length:
        keys cached under the short factors are stale, so the live sequences run again from the start (the
        newest token included) and their next tokens are sampled from that pass."""
        self._flush(steps, outputs)
        sequences = [prompts[i // n] + outputs[i] for i in alive]
        B = len(alive)
        new = self._sample(self._prefill(sequences), params, generator)
        self._lengths[:B] = torch.tensor([len(s) for s in sequences], device=self.device)
        self._tokens[:B, 0] = new
        return new


def _hand_out(steps: list, values: list[int], outputs: list) -> int:
    """Append each step's tokens (consecutive in `values`) to the sequences of its ids; returns the values used."""
    at = 0
    for ids, _ in steps:
        for i, token in zip(ids, values[at : at + len(ids)]):
            outputs[i].append(token)
        at += len(ids)
    return at


def stop_token_ids(tokenizer, config) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and every eos_token_id the model config names."""
    ids = {tokenizer.eos_token_id}
    ids.update(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    return sorted(i for i in ids if i is not None)


def _until_eos(tokens: list[int], eos_token_ids: Sequence[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: i + 1]
    return tokens
