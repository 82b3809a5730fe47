"""A model's one-token decode step over a `StaticSparseMemCache`, captured once in a CUDA graph and replayed.

At decode a small or long-context model spends most of a step launching kernels from Python (hundreds per
step), not computing. Over a static cache every step issues the same kernels on the same buffers, reading its
position from the cache's device-side length, so the whole forward pass is captured once and each later step is
one graph replay: copy the new token ids in, replay, read the logits out.

With `compile=True` the forward is first run through `torch.compile` (no CUDA graphs of its own: the capture
here records what it launches). It fuses what runs between the attention calls (norms, rotary embedding,
activations, residual adds), which eagerly is a few dozen small kernels per layer; the sparse attention step
runs as written (`torch.compiler.disable`), since it launches its own kernels.
"""

import contextlib

import torch


class DecodeGraph:
    """The one-token forward of a model over a fixed-shape cache, for `batch_size` sequences on `device`.

    Captured at the first call (after a warm-up on a side stream, as CUDA graphs need); the warm-up and capture
    steps write at the current position, which the first replay rewrites, and the cache is rewound after them.
    `eager_forward` is the model's forward over that cache, run as Python (the capture records it). `cache` is
    what the runner needs of it: `device_length()` (the held tokens as a [1] device tensor, where the new token
    goes), `get_seq_length()`, `rewind(length)` and `advance(steps)` (steps that ran on the device only).
    `compile`: compile the forward before capturing it (see the module docstring); the warm-up steps compile.
    """

    def __init__(self, eager_forward, cache, batch_size: int, device: torch.device, compile: bool = False):
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device; the cache is on {device}")
        self.forward = torch.compile(eager_forward, dynamic=False) if compile else eager_forward
        self.compiled = compile
        self.cache = cache
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.busy = False  # capturing: the model's forward must run eagerly, not replay this graph

    def _step(self) -> torch.Tensor:
        # the new token's logical position is the device-side length: read in the graph, not baked into it
        position_ids = self.cache.device_length().view(1, 1).expand(self.input_ids.shape[0], 1).clone()
        return self.forward(input_ids=self.input_ids, position_ids=position_ids, use_cache=True).logits

    def capture(self) -> None:
        length = self.cache.get_seq_length()
        self.busy = True
        try:
            with compiling(self.compiled):
                self._warm_up_and_capture(length)
        finally:
            self.busy = False

    def _warm_up_and_capture(self, length: int) -> None:
        side = torch.cuda.Stream(device=self.input_ids.device)
        side.wait_stream(torch.cuda.current_stream(self.input_ids.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy allocations, autotuning and cuBLAS workspaces before the capture
                self._step()
                self.cache.rewind(length)
        torch.cuda.current_stream(self.input_ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.cache.rewind(length)
        self.graph = graph

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, V] of the next token after `input_ids` [B, 1]; the cache advances by one token."""
        if tuple(input_ids.shape) != tuple(self.input_ids.shape):
            raise ValueError(f"the captured decode step takes input_ids of shape {tuple(self.input_ids.shape)}, got "
                             f"{tuple(input_ids.shape)}")
        if self.graph is None:
            self.capture()
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        self.cache.advance(1)
        return self.logits.clone()  # the next replay rewrites the captured output


def compiling(enabled: bool):
    """Room for one compiled variant per layer: layers share their forward's code but differ in constants (their
    index), and Dynamo's default of 8 variants per code object would run the rest eagerly."""
    if not enabled:
        return contextlib.nullcontext()
    import torch._dynamo

    layers = 512
    return torch._dynamo.config.patch(recompile_limit=layers, accumulated_recompile_limit=max(layers * 8, 4096))
