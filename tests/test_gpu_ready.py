"""
What the GPU run relies on, checked on the CPU: token-budget micro-batches, a token-weighted loss,
bfloat16 weights with float32 logits, the shared few-shot cache, out-of-memory handling, and
activation checkpointing that keeps what it promises.
"""

import csv
import gc
import re
import weakref

import pytest
import torch

from machinery import comparison
import methods
from methods import prompting
from methods import prompt
import train
import prefix
from mini_gpt2 import decode, encode, from_pretrained, generate
from prefix import NAMES, Example, Prefixes, init_random, prefix_hidden
from train import make_batch
from tests.conftest import one_line_error, run, train_args, translate


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    """The tiny checkpoint in float32 and in bfloat16, frozen."""
    return {dt: from_pretrained(tiny_ckpt[0], device="cpu", dtype=dt).requires_grad_(False)
            for dt in (torch.float32, torch.bfloat16)}


@pytest.fixture(scope="module")
def kv(models):
    return init_random(models[torch.float32], NAMES, 4, torch.Generator().manual_seed(0))


def some_examples(n=12):
    """Examples of different lengths, both directions, as train.make_examples builds them."""
    pairs = [("Hello! My name is Sully.", "Bonjour! Je m'appelle Sully."), ("Thank you.", "Merci."),
             ("Where is the station, please? I am lost.", "Où est la gare, s'il vous plaît ? Je suis perdu."),
             ("Good night.", "Bonne nuit."), ("The sea is blue today.", "La mer est bleue aujourd'hui."),
             ("We are late.", "Nous sommes en retard.")]
    return train.make_examples(pairs, 128, prefix)[0][:n]


def gradient(model, learned, examples, max_batch_tokens, method="prefix", reparam=False):
    torch.manual_seed(0)  # the MLP of --reparam starts random: the same each time
    prefixes = Prefixes(learned, reparam=reparam)
    M = methods.METHODS[method]
    packing = train.Packing(max_batch_tokens, M.POSITIONS_PER_VIRTUAL_TOKEN * learned.size(1))
    loss = train.mean_loss(model, M, prefixes, examples, packing, backward=True)
    return loss, torch.cat([p.grad.flatten() for p in prefixes.parameters()])


def test_micro_batches_fit_the_budget():
    examples = some_examples()
    lengths = sorted(len(s) + len(t) for s, t, _, _ in examples)
    passes = train.micro_batches(examples, 3 * lengths[-1])
    assert sorted(ex for p in passes for ex in p) == sorted(examples)  # each example exactly once
    assert all(len(p) * max(len(s) + len(t) for s, t, _, _ in p) <= 3 * lengths[-1] for p in passes)
    assert len(train.micro_batches(examples, 10**6)) == 1
    assert [len(p) for p in train.micro_batches(examples, 1)] == [1] * len(examples)  # too long: one pass each


def test_typical_steps_take_one_or_two_passes():
    """32 sequences of 40 to 100 tokens (both sides with <|endoftext|>) at the default budget."""
    args = train.parse_args(["--no-eval"])
    for length in (40, 64, 96):
        examples = [Example([1] * (length // 2), [2] * (length - length // 2), 0, 1)] * args.batch_size
        assert len(train.micro_batches(examples, args.max_batch_tokens)) <= 2


@pytest.mark.parametrize("method,reparam", [("prefix", False), ("prefix", True), ("prompt", False)])
def test_packing_gives_the_gradient_of_one_pass(models, kv, method, reparam):
    model, examples = models[torch.float32], some_examples()
    learned = kv if method == "prefix" else prompt.init_random(model, NAMES, 4, torch.Generator().manual_seed(0))
    one_loss, one = gradient(model, learned, examples, 10**6, method, reparam)
    loss, packed = gradient(model, learned, examples, 40, method, reparam)
    assert len(train.micro_batches(examples, 40)) >= 4
    assert torch.allclose(loss, one_loss, atol=1e-5) and torch.allclose(packed, one, atol=1e-6, rtol=1e-4)


def test_the_loss_is_the_mean_over_all_target_tokens(models, kv):
    model, examples = models[torch.float32], some_examples()
    loss, _ = gradient(model, kv, examples, 40)
    with torch.no_grad():  # one big batch, by hand: every target token's cross-entropy, averaged
        batch = make_batch(examples, "cpu")
        logits = model.logits(prefix_hidden(model, kv, batch))
        idx, src_len, seq_len = batch[:3]
        terms = [torch.nn.functional.cross_entropy(logits[b, src_len[b] - 1:seq_len[b] - 1], idx[b, src_len[b]:seq_len[b]],
                                                   reduction="none") for b in range(len(examples))]
        by_hand = torch.cat(terms).mean()
    assert torch.allclose(loss, by_hand, atol=1e-5)
    assert sum(len(t) for t in terms) == sum(len(tgt) for _, tgt, _, _ in examples)


def test_bfloat16_training_step_is_close_to_float32(models, kv):
    examples = some_examples()
    loss32, g32 = gradient(models[torch.float32], kv, examples, 10**6)
    loss16, g16 = gradient(models[torch.bfloat16], kv, examples, 10**6)
    assert torch.isfinite(loss16) and torch.isfinite(g16).all() and g16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) <= 0.01 * loss32.item()
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99


def test_logits_are_float32_even_with_bfloat16_weights(models):
    model = models[torch.bfloat16]
    h, _ = model.hidden(torch.tensor([encode(" Bonjour")]))
    assert h.dtype == torch.bfloat16 and model.logits(h).dtype == torch.float32
    exact = h.float() @ model.wte.weight.float().T  # no rounding of the logits to bfloat16
    assert torch.equal(model.logits(h), exact)


def test_the_kept_float32_copy_of_wte_follows_wte(tiny_ckpt):
    """Decoding's float32 copy of bfloat16 weights is made again once wte changes (as fine-tuning changes it in place)."""
    model = from_pretrained(tiny_ckpt[0], device="cpu", dtype=torch.bfloat16)
    h, _ = model.hidden(torch.tensor([encode(" Bonjour")]))
    with torch.no_grad():
        before = model.logits(h)
        model.wte.weight.copy_(model.wte.weight.flip(0))  # FullModel puts the masters in this way
        after = model.logits(h)
    assert not torch.equal(after, before) and torch.equal(after, h.float() @ model.wte.weight.float().T)


def test_bfloat16_generation_and_translation_run(models, kv):
    model = models[torch.bfloat16]
    out = generate(model, [encode(" The cat"), encode(" Bonjour, je")], 5, stop_ids=())
    assert [len(o) for o in out] == [5, 5]
    texts = translate(model, kv, "prefix", ["Bonjour!", "Hello there."], ["en", "fr"], [4, 4])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_train_and_translate_in_bfloat16(tiny_ckpt, csv_file, tmp_path, call):
    import translate as translate_script

    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--dtype", "bfloat16", "--steps", 2, "--no-eval"))
    assert r.returncode == 0, r.stderr
    assert "in bfloat16" in r.stdout
    losses = [float(row["loss"]) for row in csv.DictReader(open(out / "log.csv")) if row["loss"]]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)
    r = call(translate_script.main, "--prefix", out / "prefix.safetensors", "--dtype", "bfloat16",
             "--max-new-tokens", 3, "Bonjour")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1, r.stderr


def test_shared_few_shot_cache_gives_the_plain_prompts_tokens(models, csv_file):
    model = models[torch.float32]
    shots = [("Thank you.", "Merci."), ("The cat sleeps.", "Le chat dort."), ("Good night.", "Bonne nuit.")]
    few = prompting.FewShot(model, shots)
    texts = ["Où est la gare ?", "Il pleut aujourd'hui, et il fait froid.", "'s 42 « oui »", "Bonjour"]
    limits = [12, 12, 12, 12]
    shared = few(texts, "fr", "en", limits)
    plain = [encode(prompting.few_shot_prompt(few.examples, t, "fr", "en")) for t in texts]
    expected = [decode(o).strip() for o in generate(model, plain, limits, stop_ids=few.stop)]
    assert shared == expected
    assert any(shared)  # something was generated to compare


@pytest.mark.parametrize("text", ["Le chat dort.", "'s", "« Oui »", "42 ans", "  espaces", "é", "\t(tab)", "-x"])
def test_few_shot_prompt_tokens_split_at_the_head(text):
    examples = [{"en": "Thank you.", "fr": "Merci."}]
    head = prompting.few_shot_head(examples, "fr", "en")
    tail = prompting.few_shot_tail(text, "en")
    assert encode(head) + encode(tail) == encode(head + tail)


def test_evaluation_puts_results_back_in_order():
    # in length order: 3, 1, 0, 2 (batches [3, 1], [0, 2]): neither the data's order nor its reverse
    pairs = [("Medium length here, yes.", "Longueur moyenne ici, oui."), ("Short one.", "Court un."),
             ("A rather long English sentence with many words in it.", "Une phrase française plutôt longue et pleine."),
             ("Hi.", "Oh.")]
    seen = []

    def spy(texts, source, target, limits, **decoding):  # a translator that says what it was given
        seen.append(list(limits))
        return [f"[{t}]" for t in texts]

    rows = {"prefix": spy, "1-shot": spy}
    scores, outputs = comparison.evaluate(rows, comparison.evaluation_pairs(pairs, 128, 4), 2)
    assert outputs[("prefix", "fr", "en")] == [f"[{fr}]" for _, fr in pairs]  # back in the data's order
    assert all(batch == sorted(batch) for batch in seen) and seen[0][0] == min(seen[0] + seen[1])


def test_out_of_memory_is_one_line_and_keeps_the_last_step(tiny_ckpt, csv_file, tmp_path, call, monkeypatch):
    real, calls = train.target_loss, {"n": 0}

    def target_loss(*args):  # the third training pass (step 3) runs out of memory, where it would: in the forward
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 3 and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args)

    monkeypatch.setattr(train, "target_loss", target_loss)
    out = tmp_path / "run"
    line = one_line_error(call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--no-eval", "--save-every", 100)))
    assert re.search(r"out of GPU memory in a forward pass of \d+ x \d+ = \d+ tokens; "
                     r"try --max-batch-tokens 1536, or --grad-checkpoint", line), line
    assert f"{out / 'checkpoint.pt'} holds step 2" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_activation_checkpointing_does_not_hold_every_layers_keys(models, kv):
    """While the checkpointed forward runs, the layers before do not keep their keys/values alive."""
    model = models[torch.float32]
    alive = []

    def keep_weakref(module, inputs, output):
        alive.append(weakref.ref(output[1][0]))  # this layer's keys

    def count_alive(module, inputs):
        gc.collect()
        counts.append(sum(ref() is not None for ref in alive))

    batch = make_batch(some_examples(4), "cpu")
    hooks = [block.attn.register_forward_hook(keep_weakref) for block in model.h]
    hooks.append(model.ln_f.register_forward_pre_hook(count_alive))
    try:
        for ckpt in (False, True):
            alive, counts = [], []
            prefix_hidden(model, kv.clone().requires_grad_(), batch, grad_checkpoint=ckpt)
            assert counts[0] == (0 if ckpt else model.config.n_layer), (ckpt, counts)
    finally:
        for h in hooks:
            h.remove()


def test_bench_gpu_runs_tiny_on_the_cpu(tmp_path):
    # As little as runs every row once, on one thread (two spin-waiting threads on two busy cores crawl),
    # with no deadline: a slow machine takes longer, that is all.
    r = run("benchmarks/bench_gpu.py", "--size", "tiny", "--device", "cpu", "--out", tmp_path / "bench.md", "--threads", 1,
            "--repeats", 1, "--new-tokens", 4, "--eval-sentences", 2, "--seq-len", 8, "--compile-backend", "aot_eager",
            "--e2e-steps", 2, timeout=None)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "bench.md").read_text()
    for row in ("bf16 vs fp32 logits", "prefix training", "PEFT", "prefix training, --compile", "compiling took",
                "greedy decoding", "no CUDA graph", "evaluation", "translations differ", "steady state", "(the slope)",
                "a query that sees nothing", "this project's masks", "| the default run end to end |",
                "| the default run end to end, --compile |", "extrapolated to 5,000 steps"):
        assert row in table, table
    e2e = [line for line in table.splitlines() if line.startswith("| the default run end to end")]
    assert all(re.search(r"s: loading \d+, compiling \d+, training \d+ \(\d+ ms a step\), evaluating \d+", line)
               for line in e2e), e2e
    assert table in r.stdout


def test_the_prompt_methods_passes_count_its_2p_positions_in_the_budget(models, monkeypatch):
    model, examples = models[torch.float32], some_examples()
    prompts = prompt.init_random(model, NAMES, 8, torch.Generator().manual_seed(0))  # 2P = 16 positions a row
    shapes, real = [], model.hidden
    monkeypatch.setattr(model, "hidden", lambda idx, *a, **k: shapes.append(tuple(idx.shape)) or real(idx, *a, **k))
    budget = 120
    with torch.no_grad():
        train.mean_loss(model, prompt, Prefixes(prompts), examples, train.Packing(budget, 16))
    assert len(shapes) > 1 and all(rows * length <= budget or rows == 1 for rows, length in shapes), shapes
    assert sum(rows for rows, _ in shapes) == len(examples)


def test_no_query_ever_sees_nothing_and_every_mask_is_aligned(tiny_ckpt, monkeypatch):
    """
    Every mask the project builds: the training and validation passes of each method, compiled
    passes with their padding and filler rows, prefills with left pads (with a cache before them
    or none), decoding steps plain and static. Each query sees at least one key (fused kernels can
    give NaN for one that sees none), and each mask's rows lie a multiple of 16 numbers apart.
    """
    import mini_gpt2.model
    from methods import METHODS
    from mini_gpt2 import fast
    from prefix import Start
    from tests.test_fast import Counting, ReplayedGraph

    seen = []

    def check(mask):
        sees = mask > torch.finfo(mask.dtype).min
        seen.append((bool(sees.any(-1).all()), mask.stride(-2) % 16 == 0, tuple(mask.shape)))

    real = mini_gpt2.model.attention
    monkeypatch.setattr(mini_gpt2.model, "attention", lambda q, k, v, mask=None: (
        mask is None or check(mask), real(q, k, v, mask))[1])
    examples = some_examples()
    for method, M in METHODS.items():
        for compiled in (False, True):
            model = from_pretrained(tiny_ckpt[0], device="cpu").requires_grad_(False)
            if compiled:  # the compiled block's masks, checked as it receives them
                blocks = fast.compile_training(model, 200, len(examples), say=lambda line: None, backend=Counting())
                inner = blocks.forward
                blocks.forward = lambda block, x, past, mask, inner=inner: (check(mask), inner(block, x, past, mask))[1]
            learned = M.start(model, Start(4, "random", False, 0))
            packing = train.Packing(200, M.POSITIONS_PER_VIRTUAL_TOKEN * 4, fast.ROUND if compiled else 1)
            train.mean_loss(model, M, learned, examples, packing, backward=True)
            with torch.no_grad():  # a validation pass
                train.mean_loss(model, M, learned, examples, packing)
        assert len(seen) > 0
    model = from_pretrained(tiny_ckpt[0], device="cpu").requires_grad_(False)
    texts = ["Bonjour! Je m'appelle Sully.", "Merci", "Où est la gare, s'il vous plaît ?"]  # of three lengths: left pads
    translators = [METHODS[m].translator(model, METHODS[m].init_random(model, NAMES, 4)) for m in ("prefix", "prompt")]
    translators += [prompting.FewShot(model, []), lambda *a, **k: [generate(model, [encode(t) for t in texts], 6)]]
    for graphs in (False, True):  # decoding plain, then static as on a GPU (captured steps replayed on the CPU)
        with monkeypatch.context() as m:
            if graphs:
                m.setattr(fast, "uses_graphs", lambda device: True)
                m.setattr(fast, "capture", lambda fn, *b: (lambda g: (g, g.out))(ReplayedGraph(fn, b)))
            for translate in translators:
                translate(texts, "fr", "en", [6, 6, 6])
    assert len(seen) > 100 and all(ok for ok, _, _ in seen), [shape for ok, _, shape in seen if not ok][:5]
    assert all(aligned for _, aligned, _ in seen), [shape for _, aligned, shape in seen if not aligned][:5]


def test_every_pass_of_every_budget_fits_it_and_takes_as_many_rows_as_fit():
    """Packed for each budget from 10 to 400 tokens: no pass over it (unless a lone row), none that could take the next."""
    examples = some_examples()
    size = lambda ex: len(ex.source) + len(ex.target)  # noqa: E731
    for budget in range(10, 400, 3):
        passes = train.micro_batches(examples, budget)
        assert sorted(ex for p in passes for ex in p) == sorted(examples)
        for p, after in zip(passes, passes[1:] + [None]):
            assert len(p) * max(map(size, p)) <= budget or len(p) == 1, (budget, [size(ex) for ex in p])
            if after:  # the next example would not have fitted
                assert (len(p) + 1) * size(after[0]) > budget, (budget, [size(ex) for ex in p], size(after[0]))
