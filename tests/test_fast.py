"""
mini_gpt2/fast.py held to the plain code: decoding with static shapes, through captured steps,
gives the tokens of generate.py's plain loop (sampling included), and compiled training passes
give the eager losses and gradients, compiling once for a new shape.

On the CPU a captured step is a ReplayedGraph: it replays on the very tensors it was captured
with, as a CUDA graph does, so a buffer rebound instead of written in place is seen as stale.
"""

import pytest
import torch

import train
from methods import METHODS, prompting
from mini_gpt2 import encode, fast, from_pretrained, generate
from prefix import NAMES, Prefixes, Start, encode_sentence
from tests.conftest import load_learned, train_args
from tests.test_gpu_ready import some_examples


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return from_pretrained(tiny_ckpt[0], device="cpu").requires_grad_(False)


PROMPTS = [encode(" The cat sat on"), encode(" Bonjour, je m'appelle Sully et"), encode(" 42")]  # a left-padded batch


class ReplayedGraph:
    """
    A captured CUDA graph's semantics, on the CPU: capturing runs fn once on its buffers; replay()
    runs fn again on the very tensors it was captured with, into the same output tensor. What was
    written into those tensors in place is seen; a name rebound to another tensor is not.
    """

    def __init__(self, fn, buffers):
        self.fn, self.buffers, self.replays = fn, buffers, 0
        self.out = fn(*buffers)

    def replay(self):
        self.out.copy_(self.fn(*self.buffers))
        self.replays += 1


@pytest.fixture
def graphs(monkeypatch):
    """Decoding as on a GPU (fast.decode, its steps captured), on the CPU: -> the list of graphs captured."""
    captured = []

    def capture(fn, *buffers):
        captured.append(ReplayedGraph(fn, buffers))
        return captured[-1], captured[-1].out

    monkeypatch.setattr(fast, "uses_graphs", lambda device: True)
    monkeypatch.setattr(fast, "capture", capture)
    return captured


def both(fn, monkeypatch):
    """fn() with generate.py's plain decoding, then with fast.decode's captured steps in its place."""
    plain = fn()
    with monkeypatch.context() as m:
        captured = []
        m.setattr(fast, "uses_graphs", lambda device: True)
        m.setattr(fast, "capture", lambda fn, *b: captured.append(ReplayedGraph(fn, b)) or (captured[-1], captured[-1].out))
        graphed = fn()
    assert captured  # the graph path ran
    return plain, graphed


def test_greedy_and_sampled_tokens_are_the_plain_loops(model, monkeypatch):
    free = generate(model, PROMPTS, 20, stop_ids=())
    stops = (free[0][5], free[2][11])  # rows end at different steps, between two looks and on one
    for kwargs in ({}, {"temperature": 1.3}, {"temperature": 0.8, "top_k": 40}):
        for stop_ids in ((), stops):
            g = torch.Generator()

            def fn():  # twice with one generator: the second call must start where the plain loop's would
                g.manual_seed(7)
                return [generate(model, PROMPTS, [20, 9, 20], stop_ids=stop_ids, generator=g, **kwargs) for _ in range(2)]
            plain, graphed = both(fn, monkeypatch)
            assert plain == graphed, (kwargs, stop_ids)
    assert plain[0] != plain[1]  # the second call drew other tokens: the generator went on


def test_the_generator_ends_where_the_plain_loop_left_it(model, monkeypatch):
    """Every row stops early, between two looks: the draws made after that are undone, so what follows draws the same."""
    free = generate(model, PROMPTS, 20, stop_ids=())
    stops = (free[0][2], free[1][3], free[2][1])

    def fn():
        g = torch.Generator().manual_seed(5)
        first = generate(model, PROMPTS, 20, stop_ids=stops, temperature=1.0, top_k=1, generator=g)  # draws, greedily
        return first, generate(model, PROMPTS, 12, stop_ids=(), temperature=1.5, generator=g)
    plain, graphed = both(fn, monkeypatch)
    assert plain == graphed and max(map(len, plain[0])) < fast.CHECK_EVERY


def test_prefix_and_prompt_translation_are_the_plain_loops(model, monkeypatch):
    sources = [encode_sentence(t) for t in ("Bonjour! Je m'appelle Sully.", "Merci", "Where is the station, please?")]
    g = torch.Generator()
    for method in ("prefix", "prompt"):
        learned = METHODS[method].init_random(model, NAMES, 4, torch.Generator().manual_seed(0))
        for kwargs in ({}, {"temperature": 1.0, "generator": g}):
            def fn():
                g.manual_seed(3)
                return METHODS[method].translate_ids(model, learned, sources, [0, 0, 1], [1, 1, 0], [9, 4, 12], **kwargs)
            plain, graphed = both(fn, monkeypatch)
            assert plain == graphed and any(plain), (method, kwargs)


def test_zero_and_few_shot_with_the_examples_cache_are_the_plain_loops(model, monkeypatch):
    texts = ["Où est la gare ?", "Il pleut aujourd'hui, et il fait froid.", "Bonjour"]
    for examples in ([], [("Thank you.", "Merci."), ("The cat sleeps.", "Le chat dort.")]):
        few = prompting.FewShot(model, examples)
        plain, graphed = both(lambda: few(texts, "fr", "en", [10, 6, 10]), monkeypatch)
        assert plain == graphed and any(plain)


def test_bfloat16_decoding_picks_by_float32_logits(tiny_ckpt, monkeypatch):
    """bfloat16 weights, but the logits that choose each token are float32 (rounded to bfloat16, near-ties would flip)."""
    model = from_pretrained(tiny_ckpt[0], device="cpu", dtype=torch.bfloat16)
    prompts = [encode(t) for t in (" The cat", " Bonjour, je", " 42 is", " Où est la gare", " We are late")]
    plain, graphed = both(lambda: generate(model, prompts, 24, stop_ids=()), monkeypatch)
    assert plain == graphed


def test_decoding_looks_at_the_gpu_only_every_few_steps(model, monkeypatch, graphs):
    """Each read of a tensor's value waits for the GPU: 32 more tokens may add 32 / CHECK_EVERY of them, not 32."""
    reads = []
    for name in ("__bool__", "__int__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, real=real: reads.append(1) or real(self, *a))

    def count(n):
        reads.clear()
        generate(model, PROMPTS, n, stop_ids=())
        return len(reads)

    assert count(8 + 32 * fast.CHECK_EVERY // 8) - count(8) == 32 // fast.CHECK_EVERY


def test_the_graph_path_replays_one_step_per_token(model, graphs):
    """Captured at the second step (the first runs on the prefill's logits), replayed for the 18 after it."""
    generate(model, PROMPTS, [20, 9, 20], stop_ids=())
    assert len(graphs) == 1 and graphs[0].replays == 18


def test_captured_steps_are_kept_across_calls(model, graphs):
    """Batches of one size and similar lengths share one capture; another size captures anew; the last two are kept."""
    kept = fast.Graphs(keep=2)
    for limit in (20, 12, 30, 20):  # prompt + limit within one CAPACITY: one cache, one graph
        generate(model, PROMPTS, limit, stop_ids=(), graphs=kept)
    assert len(graphs) == 1
    generate(model, PROMPTS[:2], 20, stop_ids=(), graphs=kept)  # two rows: a step of its own
    generate(model, PROMPTS, fast.CAPACITY + 10, stop_ids=(), graphs=kept)  # a larger cache: another, the first let go
    assert len(graphs) == 3 and len(kept.steps) == 2
    generate(model, PROMPTS, 20, stop_ids=(), graphs=kept)  # captured again: it was let go
    assert len(graphs) == 4
    want = generate(model, PROMPTS, 20, stop_ids=())  # a call of its own
    assert len(graphs) == 5 and generate(model, PROMPTS, 20, stop_ids=(), graphs=kept) == want and len(graphs) == 5


def test_a_gpu_that_cannot_capture_decodes_without_graphs(model, monkeypatch):
    tries = []

    def capture(fn, *buffers):
        tries.append(fn)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    want = generate(model, PROMPTS, 12, stop_ids=())
    monkeypatch.setattr(fast, "uses_graphs", lambda device: True)
    monkeypatch.setattr(fast, "capture", capture)
    with pytest.warns(UserWarning, match=r"decoding without CUDA graphs \(CUDA error: operation not permitted when "
                                         r"stream is capturing\)$") as warned:
        assert generate(model, PROMPTS, 12, stop_ids=()) == want
    assert len(tries) == 1 and len(warned) == 1  # tried once, said once: not at every token



def test_a_capture_failing_without_words_is_named_by_its_type(model, monkeypatch):
    def capture(fn, *buffers):
        raise RuntimeError()

    want = generate(model, PROMPTS, 12, stop_ids=())
    monkeypatch.setattr(fast, "uses_graphs", lambda device: True)
    monkeypatch.setattr(fast, "capture", capture)
    with pytest.warns(UserWarning, match=r"decoding without CUDA graphs \(RuntimeError\)$"):
        assert generate(model, PROMPTS, 12, stop_ids=()) == want


# ----------------------------------------------------------------------------- compiled training passes

class Counting:
    """A torch.compile backend that counts its compilations and runs them through aot_eager (no code generation)."""

    def __init__(self):
        self.compilations = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.compilations += 1
        return lookup_backend("aot_eager")(gm, example_inputs)


def step_gradient(tiny_ckpt, method, learned, examples, compiled, grad_checkpoint=False, n_layer=None, reparam=False):
    """
    The loss and gradient of one training step on a fresh model (compiled with `compiled`, a
    Counting backend, as train.py --compile does, or not: None), and its CompiledBlocks.
    """
    model = from_pretrained(tiny_ckpt, device="cpu").requires_grad_(False)
    M = METHODS[method]
    blocks = fast.compile_training(model, 200, len(examples), say=lambda line: None, backend=compiled) if compiled else None
    torch.manual_seed(0)
    if learned is None:
        learned = M.start(model, Start(4, "random", reparam, 0))
        if method == "lora":
            torch.nn.init.normal_(learned.B, generator=torch.Generator().manual_seed(0))
    else:
        learned = Prefixes(learned, reparam=reparam)
    packing = train.Packing(200, M.POSITIONS_PER_VIRTUAL_TOKEN * 4, fast.ROUND if compiled else 1)  # as train.py packs
    loss = train.mean_loss(model, M, learned, examples, packing, backward=True, grad_checkpoint=grad_checkpoint)
    return loss, torch.cat([p.grad.flatten() for p in learned.parameters()]), blocks


@pytest.mark.parametrize("method,reparam", [("prefix", False), ("prefix", True), ("prompt", False)])
def test_compiled_passes_give_the_eager_loss_and_gradients(tiny_ckpt, model, method, reparam):
    examples = some_examples()
    learned = METHODS[method].init_random(model, NAMES, 4, torch.Generator().manual_seed(0))
    loss, g, _ = step_gradient(tiny_ckpt[0], method, learned, examples, None, reparam=reparam)
    loss_c, g_c, blocks = step_gradient(tiny_ckpt[0], method, learned, examples, Counting(), reparam=reparam)
    assert blocks.shapes and all(s is not None for s in blocks.shapes.values())  # compiled, and each pass's backward done
    assert torch.allclose(loss, loss_c, atol=1e-5) and torch.allclose(g, g_c, atol=1e-6, rtol=1e-4)


def test_compiled_passes_with_activation_checkpointing(tiny_ckpt, model):
    examples = some_examples(6)
    learned = METHODS["prefix"].init_random(model, NAMES, 4, torch.Generator().manual_seed(0))
    _, g, _ = step_gradient(tiny_ckpt[0], "prefix", learned, examples, None, grad_checkpoint=True)
    _, g_c, blocks = step_gradient(tiny_ckpt[0], "prefix", learned, examples, Counting(), grad_checkpoint=True)
    assert blocks.shapes and torch.allclose(g, g_c, atol=1e-6, rtol=1e-4)


def test_a_compiled_run_compiles_once_per_shape_and_resumes_eager(tiny_ckpt, tmp_path, call, monkeypatch):
    """
    Pairs of many lengths, 24 steps: a handful of shapes, each compiled once in the step that first
    meets it (every block's input needs a gradient, the first one's made to) and said once; no
    compilation in any other step.
    """
    import csv

    words = "the cat sat on a mat and then it ran to see the dog who was very happy about it".split()
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("en", "fr")] + [(" ".join(words[:3 + i % 17]) + f" {i}.",
                                                   " ".join(words[:2 + (i * 7) % 17][::-1]) + f" {i}.") for i in range(80)])
    counting, steps, blocks, real = Counting(), [], [], train.mean_loss
    monkeypatch.setattr(fast, "BACKEND", counting)
    real_compile = fast.compile_training
    monkeypatch.setattr(fast, "compile_training", lambda *a, **k: blocks.append(real_compile(*a, **k)) or blocks[-1])

    def spy(*args, backward=False, **kwargs):
        before = counting.compilations, len(blocks[0].shapes) if blocks else 0
        loss = real(*args, backward=backward, **kwargs)
        if backward and blocks:  # a compiled training step: (compilations, new shapes) during it
            steps.append((counting.compilations - before[0], len(blocks[0].shapes) - before[1]))
        return loss

    monkeypatch.setattr(train, "mean_loss", spy)
    out = tmp_path / "run"
    args = train_args(tiny_ckpt[0], path, out, "--no-eval", "--steps", 24, "--save-every", 12, "--max-batch-tokens", 160,
                      "--heldout", 8, "--compile")
    r = call(train.main, *args)
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stdout.splitlines() if line.startswith("compiled the training pass for")]
    shapes = {tuple(int(x) for x in line.split(" for ")[1].split(" tokens")[0].split(" x ")) for line in said}
    assert len(said) == len(shapes) == sum(new for _, new in steps) and len(steps) == 24
    assert all(compilations <= new for compilations, new in steps), steps  # one a new shape, none without one
    assert 2 <= len(shapes) <= 128 // 16 + 1 and all(length % 16 == 0 for _, length in shapes)  # as README says
    # the rows fill the budget, or the step's 4 sequences
    assert all(rows == max(1, min(160 // length, 4)) for rows, length in shapes) and steps[-1] == (0, 0), shapes
    r = call(train.main, *args[:-1], "--resume", "--steps", 26, "--no-compile")  # and on, eager
    assert r.returncode == 0 and "note: resuming with --compile False (the run so far used True)" in r.stdout, r.stderr


@pytest.mark.parametrize("method", ["lora", "finetune"])
def test_compiled_passes_of_lora_and_fine_tuning_are_the_eager_ones(tmp_path, method):
    """The same loss and gradients compiled, weights learning or c_attn changed."""
    from tests.conftest import make_checkpoint

    make_checkpoint(tmp_path, n_layer=4)  # more layers than one: one compilation for all of them
    examples, counting = some_examples(), Counting()
    loss, g, _ = step_gradient(tmp_path, method, None, examples, None)
    loss_c, g_c, blocks = step_gradient(tmp_path, method, None, examples, counting)
    assert torch.allclose(loss, loss_c, atol=1e-5) and torch.allclose(g, g_c, atol=1e-5, rtol=1e-4)
    # one compilation a shape (and the check that compiling works), not one a layer
    assert counting.compilations <= len(blocks.shapes) + 1, (counting.compilations, blocks.shapes)


def test_an_evaluation_captures_a_handful_of_times_not_once_a_batch(model, graphs):
    from machinery import comparison
    from prefix import max_new_tokens_for

    words = "le chat dort sur la chaise et le chien mange dans la cuisine".split()
    texts = [" ".join(words[:1 + i % 12]) + f" {i}." for i in range(42)]  # 11 batches of 4, of many lengths
    limits = [max_new_tokens_for(encode_sentence(t)) for t in texts]
    comparison.translate_all(prompting.FewShot(model, []), texts, "fr", "en", limits, 4)
    assert 1 <= len(graphs) <= 3  # rows of 4, and of 2 for the last batch; caches of one or two capacities
    assert sum(g.replays for g in graphs) > 11 * 4  # and replayed for every batch


class FailingFor:
    """A torch.compile backend that fails for graphs of more than `nodes` nodes, as a missing compiler or an inductor error would."""

    def __init__(self, nodes, error="cc: command not found"):
        self.nodes, self.error = nodes, error

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        if len(gm.graph.nodes) > self.nodes:
            raise RuntimeError(self.error)
        return lookup_backend("aot_eager")(gm, example_inputs)


@pytest.mark.parametrize("nodes,note", [
    (0, "note: --compile: torch.compile does not work here (RuntimeError: cc: command not found); the training runs "
        "uncompiled"),
    (10, "note: --compile: compiling the training pass failed (")])  # the tiny check passes, a block's graph fails
def test_compile_never_ends_a_run(tiny_ckpt, csv_file, tmp_path, call, monkeypatch, nodes, note):
    """Whatever fails to compile, and whenever: one note, and the run goes on uncompiled to the eager run's result."""
    eager = tmp_path / "eager"
    assert call(train.main, *train_args(tiny_ckpt[0], csv_file, eager, "--no-eval")).returncode == 0
    monkeypatch.setattr(fast, "BACKEND", FailingFor(nodes))
    out = tmp_path / "compiled"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--compile"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    notes = [line for line in r.stdout.splitlines() if line.startswith("note: --compile")]
    assert len(notes) == 1 and notes[0].startswith(note), r.stdout
    a, b = (load_learned(d / "prefix.safetensors")[0] for d in (eager, out))
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
