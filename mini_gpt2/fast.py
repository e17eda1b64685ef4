"""
Speed, in one place: what it takes to run close to what a GPU can do, kept out of the files that
explain the model. Three tricks, each checked against the plain code by the tests.

1. Compiled training passes (train.py --compile; `compile_training`). A transformer block is
   dozens of small operations (LayerNorm, the attention's reshapes, GELU, residual adds), each a
   kernel launch that reads and writes whole activations. torch.compile traces a block once and
   emits a few fused kernels instead. Each new input shape compiles anew, which takes seconds to a
   minute, so a pass's rows and length are padded to few shapes (lengths a multiple of ROUND,
   rows up to the token budget), and all the blocks share one compiled function (their weights
   are its inputs; every block's input needs a gradient, the first one's made to): one
   compilation a shape. A failure to compile is a note, and the training goes on uncompiled.

2. float32 logits from bfloat16 weights (`float32_logits`, under GPT.logits). On a GPU the
   bfloat16 weights are multiplied as they are, the products summed and returned in float32
   (products of bfloat16 numbers are exact in float32), with no float32 copy of wte (321 MB at
   XL); on the CPU, a float32 copy kept while wte stays as it is, not made anew at every token.

3. Decoding with static shapes (`decode`, under mini_gpt2.generate on a GPU). A decoding step
   feeds one token per row; it is bound by launching ~20 kernels per layer, not by arithmetic.
   With a cache of fixed capacity, a mask over all of it and the write position held in a tensor,
   every step has the same shapes and touches the same memory, so on CUDA the whole step is
   captured once as a CUDA graph and replayed per token: one launch instead of a thousand. The
   loop also asks the GPU only every CHECK_EVERY steps whether every row has finished, never per
   token. generate.py's plain loop is what it computes, token for token (the tests hold them).
"""

import contextlib
import functools
import time
import warnings

import torch
import torch.nn.functional as F

from . import generate as plain  # the plain decoding this replaces: its choice of token
from .model import Block, KVCache, mask_bias
from .tokenizer import EOT

ROUND = 16  # compiled training passes: lengths padded to a multiple of this (a handful of shapes)
BACKEND = "inductor"  # torch.compile's; the tests use a lighter one
CHECK_EVERY = 8  # decoding: steps between looks at whether every row has finished (each look waits for the GPU)
GRAPHS = True  # decoding through CUDA graphs, on CUDA (False: never; the benchmarks compare the two)


# ----------------------------------------------------------------------------- 1. compiled training passes

@functools.cache
def compile_problem(device, backend):
    """
    None if torch.compile works on `device` with `backend`, else why not in a line: a tiny function
    compiled and run forward and backward, once (a C compiler, Python's headers, Triton on a GPU).
    """
    try:
        f = torch.compile(lambda x: torch.sin(2 * x).sum(), backend=backend, dynamic=False)
        f(torch.ones(8, device=device, requires_grad=True)).backward()
        return None
    except Exception as e:  # whatever it raises: a missing compiler, headers, an inductor error
        return why(e)


def why(e):
    """What went wrong, in a line: the innermost cause (torch.compile wraps the backend's own error), its type and words."""
    while getattr(e, "inner_exception", None) or e.__cause__:
        e = getattr(e, "inner_exception", None) or e.__cause__
    line = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def compile_training(model, max_tokens, max_rows, say=print, backend=None):
    """
    From here on, `model`'s training passes (those autograd records) run its blocks through one
    compiled Block.forward, padded to few shapes: the length to a multiple of ROUND, the rows up to
    what `max_tokens` allows (at most `max_rows`, a step's sequences). Validation and decoding run
    as they are. -> the CompiledBlocks, or None if torch.compile does not work here (said).
    """
    backend = backend or BACKEND
    problem = compile_problem(str(model.wte.weight.device), backend)
    if problem:
        say(f"note: --compile: torch.compile does not work here ({problem}); the training runs uncompiled")
        return None
    compiled = CompiledBlocks(model, max_tokens, max_rows, say, backend)
    for block in model.h:
        block.forward = functools.partial(compiled, block)  # this block's forward, through the compiled one
    return compiled


def backward_compiled_now():
    """Compile a pass's backward with its forward, not at its first use: a failure then shows where it can be caught."""
    config = torch._functorch.config
    if hasattr(config, "force_non_lazy_backward_lowering"):
        return config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


class CompiledBlocks:
    """
    The compiled Block.forward of compile_training, and each shape it has met: (rows, length) ->
    the seconds its first pass took, compilation and backward included (None until its backward ends).
    """

    def __init__(self, model, max_tokens, max_rows, say, backend):
        self.first, self.max_tokens, self.max_rows, self.say = model.h[0], max_tokens, max_rows, say
        self.forward = torch.compile(Block.forward, backend=backend, dynamic=False)  # a new shape, a new compilation
        self.shapes, self.failed = {}, None
        for name in ("recompile_limit", "cache_size_limit"):  # torch's cap on recompilations, renamed in 2.6
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)

    def __call__(self, block, x, past=None, mask=None):
        if self.failed or mask is None or not torch.is_grad_enabled():
            return Block.forward(block, x, past, mask)
        B, T, _ = x.shape
        P = 0 if past is None else past[0].size(2)
        length = -(-T // ROUND) * ROUND
        rows = max(B, min(self.max_tokens // length, self.max_rows))
        xp = F.pad(x, (0, 0, 0, length - T, 0, rows - B))
        if not xp.requires_grad:  # the first block's input: made to need a gradient as the others do
            xp.requires_grad_()
        past_p = None if past is None else tuple(F.pad(t, (0, 0, 0, 0, 0, 0, 0, rows - B)) for t in past)
        keys = torch.arange(length, device=x.device)
        sees = torch.zeros(rows, 1, length, P + length, dtype=torch.bool, device=x.device)
        sees[:, :, keys, P + keys] = True  # a padding or filler query sees its own key, never nothing
        mask_p = mask_bias(sees, mask.dtype)
        mask_p[:B, :, :T, :P + T] = mask
        if block is self.first and (rows, length) not in self.shapes:
            self.shapes[(rows, length)] = None
            xp.register_hook(functools.partial(self.compiled, (rows, length), time.time()))
        try:
            with backward_compiled_now():
                y, (k, v) = self.forward(block, xp, past_p, mask_p)
        except torch._dynamo.exc.TorchDynamoException as e:  # compile never ends a run: the rest of it runs uncompiled
            self.failed = why(e)
            self.say(f"note: --compile: compiling the training pass failed ({self.failed}); it runs uncompiled")
            return Block.forward(block, x, past, mask)
        return y[:B, :T], (k[:B, :, :P + T], v[:B, :, :P + T])

    def compiled(self, shape, t0, grad):
        """The first pass of a shape is through (its backward reached the first block): say what compiling it took."""
        self.shapes[shape] = time.time() - t0
        self.say(f"compiled the training pass for {shape[0]} x {shape[1]} tokens in {self.shapes[shape]:.1f} s")


# ----------------------------------------------------------------------------- 2. float32 logits from bfloat16 weights

@functools.cache
def float32_products(device):
    """Whether torch.mm on `device` gives bfloat16 products in float32, gradients included (PyTorch 2.8 on, CUDA)."""
    try:
        with torch.enable_grad():
            a = torch.ones(2, 2, device=device, dtype=torch.bfloat16, requires_grad=True)
            torch.mm(a, a.t(), out_dtype=torch.float32).sum().backward()
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def float32_logits(model, h):
    """model.logits(h) for weights that are not float32: the same numbers, without a float32 copy of wte per call."""
    w = model.lm_head.weight
    if h.is_cuda and w.dtype == torch.bfloat16 and float32_products(h.device):
        return torch.mm(h.reshape(-1, h.size(-1)), w.t(), out_dtype=torch.float32).view(*h.shape[:-1], -1)
    if torch.is_grad_enabled() and w.requires_grad:  # fine-tuning: the copy must carry the gradient back
        return F.linear(h.float(), w.float())
    if getattr(model, "wte_float32", (None,))[0] != (w.data_ptr(), w._version):  # made again once wte changes
        model.wte_float32 = (w.data_ptr(), w._version), w.detach().float()
    return F.linear(h.float(), model.wte_float32[1])


# ----------------------------------------------------------------------------- 3. decoding with static shapes

CAPACITY = 64  # a captured step's cache holds a multiple of this many entries: calls of similar lengths share it


def uses_graphs(device):
    """Whether decoding on `device` runs its steps as captured CUDA graphs (only CUDA has them)."""
    return device.type == "cuda" and GRAPHS


class StaticKVCache(KVCache):
    """A layer's cache of fixed capacity that writes at the position held in `at` (a tensor) and returns all of it."""

    def __init__(self, k, v, at):
        self.k, self.v, self.at, self.len = k, v, at, 0

    def update(self, k, v):
        self.k.index_copy_(2, self.at, k)
        self.v.index_copy_(2, self.at, v)
        return self.k, self.v


class Step:
    """
    One decoding step of static shapes for `rows` rows and a cache of `capacity` entries: the
    buffers it reads and writes in place (each layer's keys and values, the new token, its
    position, which entries are real, where this step writes), and its output, the logits.
    Captured as a CUDA graph at its first run, replayed at every later one, across calls.
    """

    def __init__(self, model, rows, capacity):
        c, w = model.config, model.wte.weight
        self.model, self.graph = model, None
        self.k = torch.zeros(c.n_layer, rows, c.n_head, capacity, c.head_dim, device=w.device, dtype=w.dtype)
        self.v = torch.zeros_like(self.k)  # zeros: attention reads all of it, and masking cannot cancel a NaN
        self.tok = torch.zeros(rows, 1, dtype=torch.long, device=w.device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=w.device)
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=w.device)
        self.at = torch.zeros(1, dtype=torch.long, device=w.device)

    def load(self, cache, keys_valid, next_pos):
        """A prefill's cache, which of its keys are real and each row's next position, into the buffers."""
        n = cache[0].len
        for layer, c in enumerate(cache):
            self.k[layer, :, :, :n] = c.k[:, :, :n]
            self.v[layer, :, :, :n] = c.v[:, :, :n]
        self.valid.zero_()
        self.valid[:, :keys_valid.size(1)] = keys_valid
        self.pos.copy_(next_pos[:, None])
        self.at.fill_(n)

    def run(self):
        """The step on the buffers as they are now -> the logits (rows, vocab): from the graph, once it is captured."""
        if self.graph:
            self.graph.replay()  # computes the captured step anew into the same output tensor
            return self.out
        if self.graph is None and uses_graphs(self.tok.device):
            try:
                self.graph, self.out = capture(compute_step, self.model, self.k, self.v, self.tok, self.pos, self.valid,
                                               self.at)
                return self.out
            except RuntimeError as e:  # a GPU or driver that cannot capture this: on without graphs, as on a CPU
                warnings.warn(f"decoding without CUDA graphs ({next(iter(str(e).splitlines()), type(e).__name__)})")
                self.graph = False
        return compute_step(self.model, self.k, self.v, self.tok, self.pos, self.valid, self.at)


def compute_step(model, k, v, tok, pos, valid, at):
    """One new token per row (tok at pos), written into the caches at `at`, attending to every real entry: -> logits."""
    caches = [StaticKVCache(k[layer], v[layer], at) for layer in range(k.size(0))]
    out, _ = model.hidden(tok, caches, valid[:, None, :], pos)
    return model.logits(out[:, -1])


class Graphs:
    """
    The captured steps of decoding, kept for the calls that follow: one per (rows, capacity), the
    `keep` used last (each holds a cache of its own). A translator's life (an evaluation's
    batches, translate.py's inputs) captures a handful of times, not once a batch.
    """

    def __init__(self, keep=2):
        self.steps, self.keep = {}, keep

    def step(self, model, rows, capacity):
        key = (rows, capacity)
        step = self.steps.pop(key, None) or Step(model, rows, capacity)
        self.steps[key] = step  # the latest last
        while len(self.steps) > self.keep:
            del self.steps[next(iter(self.steps))]
        return step


@torch.no_grad()
def decode(model, h, cache, keys_valid, next_pos, limits, stop_ids, temperature=0.0, top_k=None, generator=None,
           graphs=None):
    """
    generate.decode with static shapes: the same arguments and tokens, the steps run on the
    buffers of a Step from `graphs` (a Graphs; None: one for this call). Returns one list of new
    token ids per row.
    """
    B, device, steps = h.size(0), h.device, max(limits)
    step = (graphs or Graphs()).step(model, B, -(-(cache[0].len + steps) // CAPACITY) * CAPACITY)
    step.load(cache, keys_valid, next_pos)
    logits = model.logits(h)

    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    limit = torch.tensor(limits, device=device)
    new = torch.zeros(B, steps, dtype=torch.long, device=device)  # what each step picked
    alive = torch.zeros(B, steps, dtype=torch.bool, device=device)  # whether that row still counted it
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rng = generator or default_generator(device)
    states = []  # the generator before each draw: once every row has finished, later draws are undone (below)
    for t in range(steps):
        if temperature and rng is not None:
            states.append(rng.get_state())
        new[:, t] = plain.pick(logits, temperature, top_k, generator)
        done |= torch.isin(new[:, t], stop) | (limit <= t)
        alive[:, t] = ~done
        if t == steps - 1 or ((t + 1) % CHECK_EVERY == 0 and bool(done.all())):
            break
        # Written into the step's buffers, never rebound: a captured graph reads them where they were.
        step.tok.copy_(new[:, t:t + 1].masked_fill(done[:, None], EOT))  # finished rows run on a harmless token
        step.valid.index_fill_(1, step.at, True)  # the new token sees itself
        logits = step.run()
        step.at += 1
        step.pos += (~done & (limit > t + 1))[:, None]  # a row finished, or at its limit, stays: never past GPT-2's positions

    # Draws after the step at which every row had finished are undone, so that the generator ends
    # where a loop that looked every step would have left it (the next call draws the same).
    all_done = (~alive).all(0).nonzero()
    if states and len(all_done) and int(all_done[0]) + 1 < len(states):
        rng.set_state(states[int(all_done[0]) + 1])
    lengths, picked = alive.sum(1).tolist(), new.tolist()  # the loop's one read of the tokens
    return [row[:n] for row, n in zip(picked, lengths)]


def default_generator(device):
    """The generator torch draws from on `device` when given none (None where we cannot say: mps)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator if device.type == "cpu" else None


def capture(fn, *buffers):
    """
    fn(*buffers) as a CUDA graph: run once on a side stream (CUDA graphs want that warm-up), then
    captured; -> (graph, its output). Replaying it computes fn anew on the same buffers, wherever
    their contents changed in place, into the same output. All on the buffers' GPU's own streams.
    """
    device = buffers[-1].device
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn(*buffers)  # writes the same keys/values the captured step will
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
            out = fn(*buffers)
        graph.replay()
    return graph, out
