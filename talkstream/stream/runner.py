"""The DiT passes of one streaming chunk against a context prepared once per chunk, optionally replayed as a CUDA
graph.

``WanDiT.forward_chunk`` rebuilds the context of every pass: it concatenates [sinks | window] keys and values and
rotates all keys (RoPE) again, although within a chunk the context and its positions do not change; the caption
and audio embeddings are also recomputed each pass. ``ChunkRunner.begin`` does that work once per chunk: per layer,
one key buffer and one value buffer [B, (n_prev + k) S, H, D] whose head holds the rotated context and whose tail
each pass overwrites in place with the chunk's own (rotated) keys and values. The arithmetic is the model's own
(tested equal to ``forward_chunk``).

``graphs=True`` (CUDA): once the cache's window is full every chunk has the same shapes, so the pass, with its
inputs, buffers and outputs at fixed addresses, is captured once as a CUDA graph and replayed for every denoising
step and commit pass (only the timestep and the input differ): one launch instead of thousands of kernels. A
stream's first chunk has the same shapes in every stream too, so it gets a graph of its own, captured by the first
stream (a warm-up) and replayed by every later one: the first frame waits for graph replays, not for launches. The
chunks in between (the window or the sinks filling) run eagerly.
"""

from __future__ import annotations

import torch

from ..models.dit import _Grid, _sdpa
from ..models.kv_cache import KVCache
from ..models.rope import apply_rope, rope_cos_sin

RUNNERS = ("plain", "prepared", "graphs")


class ChunkRunner:
    _STATE = ("q_rope", "ctx_rope", "keys", "vals", "out_k", "out_v", "static", "grid", "n_prev", "k", "_graph", "_out")
    MAX_GRAPHS = 4  # graphed shapes kept (the first chunk's and the steady one's per stream layout); oldest go first

    def __init__(self, model, graphs: bool = False, max_graphs: int = MAX_GRAPHS, every_shape: bool = False) -> None:
        """``max_graphs``: graphed shapes kept; ``every_shape``: the chunks while the window fills get graphs too (a
        runner shared by batched sessions: sessions join at any time, and each filling level's shape recurs with
        every new session)."""
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.model, self.graphs, self.max_graphs, self.every_shape = model, graphs, max_graphs, every_shape
        self._states: dict[tuple, dict] = {}  # graphed shape -> its buffers, static inputs and graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self.replays = self.captures = 0

    @staticmethod
    def supports(model) -> bool:
        """Every ``WanDiT`` layout (the OmniAvatar one conditions its input through ``WanDiT.chunk_input``)."""
        return hasattr(model, "chunk_input")

    @torch.no_grad()
    def begin(
        self,
        cache: KVCache,
        shape: torch.Size,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        audio: torch.Tensor | None,
    ) -> None:
        """Prepare the passes of a chunk of ``shape`` [B, C, k, H, W] against ``cache`` as it is now."""
        m = self.model
        B, _, k, H, W = shape
        ph, pw = m.cfg.patch_size[1:]
        grid = _Grid(H // ph, W // pw)
        S, n_prev = grid.tokens, cache.n_sink + cache.n_context
        dev = next(m.parameters()).device
        text = m.embed_text(context)
        audio_emb = m.embed_audio(audio, k)
        # the shapes every stream repeats: its first chunk and the full window (steady state)
        fixed = cache.window > 0 and (self.every_shape or cache.next_frame == 0 or cache.n_context == cache.window)
        graphed = self.graphs and fixed
        key = (
            tuple(shape),
            n_prev,
            cache.next_frame == 0,  # (a layout that holds the first latent frame clean treats it apart)
            None if text is None else text.shape,
            None if audio is None else audio.shape,
        )
        if graphed and key in self._states:  # this shape's buffers and graph, as captured (same addresses)
            self.__dict__.update(self._states[key])
        else:  # new buffers (and, for a graphed shape, a new graph at its first pass)
            cos, sin = rope_cos_sin(torch.arange(n_prev + k, device=dev), grid.h, grid.w, m.cfg.head_dim)
            self.q_rope = (cos[n_prev * S :], sin[n_prev * S :])
            self.ctx_rope = (cos[: n_prev * S], sin[: n_prev * S])
            heads, hd = m.cfg.num_heads, m.cfg.head_dim
            dt = next(m.parameters()).dtype
            L = len(m.blocks)
            self.keys = [torch.empty(B, (n_prev + k) * S, heads, hd, device=dev, dtype=dt) for _ in range(L)]
            self.vals = [torch.empty_like(t) for t in self.keys]
            self.out_k = [torch.empty(B, k, S, heads, hd, device=dev, dtype=dt) for _ in range(L)]
            self.out_v = [torch.empty_like(t) for t in self.out_k]
            self.static = dict(
                x=torch.empty(shape, device=dev, dtype=dt),
                t=torch.empty(B, k, device=dev, dtype=torch.float32),
                text=None if text is None else torch.empty_like(text),
                mask=None if context_mask is None else torch.empty_like(context_mask),
                audio=None if audio_emb[0] is None else torch.empty_like(audio_emb[0]),
                audio_emb=None if audio_emb[1] is None else torch.empty_like(audio_emb[1]),
                ref=None if cache.ref_tokens is None else torch.empty_like(cache.ref_tokens),
                reference=None if cache.reference is None else torch.empty_like(cache.reference),
            )
            self._graph, self._out = None, None
            self.grid, self.n_prev, self.k = grid, n_prev, k
        self._current = key if graphed else None
        st = self.static
        for name, value in (
            ("text", text),
            ("mask", context_mask),
            ("audio", audio_emb[0]),
            ("audio_emb", audio_emb[1]),
            ("ref", cache.ref_tokens),
            ("reference", cache.reference),
        ):
            if st[name] is not None:
                st[name].copy_(value)
        for layer in range(len(m.blocks)):
            ck, cv = cache.context(layer)
            if ck is not None:
                self.keys[layer][:, : n_prev * S].copy_(apply_rope(ck.flatten(1, 2), *self.ctx_rope))
                self.vals[layer][:, : n_prev * S].copy_(cv.flatten(1, 2))
        self.graphed, self.first_frame = graphed, cache.next_frame

    def _attend(self, layer: int, q, k, v):
        self.out_k[layer].copy_(k)
        self.out_v[layer].copy_(v)
        tail = self.n_prev * self.grid.tokens
        keys, vals = self.keys[layer], self.vals[layer]
        keys[:, tail:].copy_(apply_rope(k.flatten(1, 2), *self.q_rope))
        vals[:, tail:].copy_(v.flatten(1, 2))
        out = _sdpa(apply_rope(q.flatten(1, 2), *self.q_rope), keys, vals)
        return out.unflatten(1, (q.shape[1], -1))

    def _pass(self) -> torch.Tensor:
        m, st = self.model, self.static
        tokens, grid = m.embed_frames(m.chunk_input(st["x"], st["reference"], self.first_frame))
        if st["ref"] is not None:
            tokens = tokens + st["ref"]
        out = m._run(tokens, grid, st["t"], st["text"], st["mask"], (st["audio"], st["audio_emb"]), self._attend, 0)
        return m.unpatchify(out, grid)

    def _capture(self) -> None:
        self._graph, self._out = self._record()
        self.captures += 1
        while len(self._states) >= self.max_graphs:
            self._states.pop(next(iter(self._states)))
        self._states[self._current] = {name: getattr(self, name) for name in self._STATE}

    def _record(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The pass captured as a CUDA graph over the current buffers, and its output tensor."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS workspaces, autotuning)
            for _ in range(2):
                self._pass()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # the decode thread runs meanwhile
            out = self._pass()
        return graph, out

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t, cache: KVCache, commit: bool = False) -> torch.Tensor:
        """The velocity of ``x`` at timesteps ``t`` (as ``forward_chunk``); ``commit``: this pass's keys/values
        enter ``cache`` (the window then moves on: call ``begin`` again for the next chunk)."""
        m, st = self.model, self.static
        st["x"].copy_(x)
        st["t"].copy_(m._timesteps(t, x.shape[0], x.shape[2], x.device))
        if self.graphed:
            if self._graph is None:
                self._capture()
            self._graph.replay()
            self.replays += 1
            v = self._out.clone()
        else:
            v = self._pass()
        v = m.chunk_velocity(v, x, st["t"], st["reference"], self.first_frame)
        if commit:
            for layer in range(len(m.blocks)):
                cache.append(layer, self.out_k[layer].clone(), self.out_v[layer].clone())
            cache.advance(x.shape[2])
        return v.to(x.dtype)


__all__ = ["RUNNERS", "ChunkRunner"]
