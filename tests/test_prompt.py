"""
The reference experiment's own method, input-embedding prompts, beside the key/value prefixes:
the same training path, the same file format, the identities each initialisation promises.
"""

import pytest
import torch

import prefix
import train
from machinery.learned_file import check_fits
from methods import METHODS, prompt
from mini_gpt2 import EOT, encode, from_pretrained, generate
from prefix import NAMES, Example, Prefixes, init_from_words, init_word_ids
from methods.prompt import prompt_hidden
from train import make_batch, target_loss
from tests.conftest import load_learned, one_line_error, train_args, translate
from tests.test_prefix import examples, train_on_examples

prompt_from_words, prompt_random, prompt_translate_ids = prompt.init_from_words, prompt.init_random, prompt.translate_ids


def positions(method, P):
    """The positions a translation takes beyond its sentences' tokens, with prefixes or prompts of P."""
    return method.POSITIONS_PER_VIRTUAL_TOKEN * P + method.PROMPT_POSITIONS


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return from_pretrained(tiny_ckpt[0], device="cpu").requires_grad_(False)


@pytest.fixture(scope="module")
def prompts(model):
    return prompt_random(model, NAMES, 4, torch.Generator().manual_seed(0))  # (2, 4, C)


def test_prompt_shape_is_input_embeddings(model, prompts):
    assert prompts.shape == (2, 4, model.config.n_embd)
    assert positions(METHODS["prompt"], 4) == 8 and positions(METHODS["prefix"], 4) == 0


def test_batched_prompt_forward_equals_decoding_through_the_cache(model, prompts):
    batch = make_batch(examples(), "cpu")
    with torch.no_grad():
        h, laid_out = prompt_hidden(model, prompts, batch)
        src_len, seq_len = laid_out.src_len, laid_out.seq_len
        batched = model.logits(h)  # (B, T + 2P, vocab)
        P = prompts.size(1)
        for b, (s, t, si, ti) in enumerate(examples()):
            # reading order, one slot at a time: [source prompt] source [target prompt] target
            slots = [prompts[si, j] for j in range(P)] + s + [prompts[ti, j] for j in range(P)] + t
            cache = None
            for pos, slot in enumerate(slots):
                tok = torch.tensor([[0 if torch.is_tensor(slot) else slot]])
                emb = slot.view(1, 1, -1) if torch.is_tensor(slot) else None
                h1, cache = model.hidden(tok, cache, position_ids=torch.tensor([[pos]]), embeds=emb)
                assert (model.logits(h1)[0, 0] - batched[b, pos]).abs().max().item() <= 1e-5
            assert src_len[b] == len(s) + 2 * P and seq_len[b] == len(s) + len(t) + 2 * P


def test_prompt_loss_counts_the_target_tokens_predicted_after_the_target_prompt(model, prompts):
    batch = make_batch(examples(), "cpu")
    with torch.no_grad():
        h, laid_out = prompt_hidden(model, prompts, batch)
        logits = model.logits(h)
        P, total = prompts.size(1), 0.0
        for b, (s, t, _, _) in enumerate(examples()):
            first = 2 * P + len(s) - 1  # the target prompt's last vector predicts the first target token
            total += torch.nn.functional.cross_entropy(logits[b, first:first + len(t)], torch.tensor(t), reduction="sum")
        assert torch.allclose(target_loss(model, h, laid_out), total, atol=1e-4)


# What each prompt starts from, written out here rather than read from prefix.py: the text's first P tokens.
WORDS = {"[start_french]": " French: French: French:", "[start_english]": " English: English: English:"}


def test_the_words_are_the_documented_ones():
    assert [init_word_ids(name, 4) for name in NAMES] == [encode(WORDS[name])[:4] for name in NAMES]


def test_a_prompt_from_words_reads_exactly_as_the_words(model):
    """Initialised from "French:", the prompt gives the logits of the text " French: French:..." itself."""
    P = 4
    learned = prompt_from_words(model, NAMES, P)
    words = encode(WORDS[NAMES[0]])[:P]
    text = encode(" Bonjour, le monde.")
    with torch.no_grad():
        as_text = model(torch.tensor([words + text]))
        tokens = torch.tensor([[0] * P + text])
        embeds = torch.cat([learned[0], model.wte(torch.tensor(text))])[None]
        as_prompt = model.logits(model.hidden(tokens, embeds=embeds)[0])
    assert torch.equal(as_prompt, as_text)
    embeds = [torch.cat([learned[0], model.wte(torch.tensor(text))])]
    assert generate(model, [[0] * P + text], 6, stop_ids=(), embeds=embeds) == generate(model, [words + text], 6, stop_ids=())


def test_a_prefix_from_words_holds_the_words_keys_and_values(tiny_ckpt, model):
    """Initialised from "French:", the prefix is the keys/values transformers' GPT-2 makes for that text."""
    P = 4
    kv = init_from_words(model, NAMES, P)  # (2, L, 2, nh, P, hd)
    ref = tiny_ckpt[1]
    for i, name in enumerate(NAMES):
        with torch.no_grad():
            past = ref(torch.tensor([encode(WORDS[name])[:P]]), use_cache=True).past_key_values
        for layer in range(model.config.n_layer):
            k, v = (past[layer][0], past[layer][1]) if isinstance(past, tuple) else (past.layers[layer].keys,
                                                                                    past.layers[layer].values)
            assert torch.allclose(kv[i, layer, 0], k[0], atol=1e-5) and torch.allclose(kv[i, layer, 1], v[0], atol=1e-5)


def test_training_moves_only_the_prompts(model, prompts):
    losses = train_on_examples(model, Prefixes(prompts), prompt.hidden, 40, lr=0.05)
    assert losses[-1] <= losses[0] * 2 / 3, losses[::10]  # it learns (less than the prefixes do: see test_prefix)


def test_prompt_decoding_follows_the_training_forward(model, prompts):
    sources = [encode(" Bonjour! Je m'appelle Sully."), encode(" Merci"), encode(" Hello! My name is Sully, hi.")]
    src, tgt = [0, 0, 1], [1, 1, 0]
    out = prompt_translate_ids(model, prompts, sources, src, tgt, max_new_tokens=6)
    P = prompts.size(1)
    for s, si, ti, gen in zip(sources, src, tgt, out):
        batch = make_batch([Example(s, gen + [EOT], si, ti)], "cpu")
        with torch.no_grad():
            logits = model.logits(prompt_hidden(model, prompts, batch)[0])[0]
        first = 2 * P + len(s) - 1
        assert logits[first:first + len(gen)].argmax(-1).tolist() == gen


def test_one_file_format_for_both(tmp_path, model, prompts):
    path = tmp_path / "p.safetensors"
    prompt.save(path, Prefixes(prompts), model.config, model="tiny")
    learned, names, meta = load_learned(path)
    check_fits(meta, model.config, path)
    assert torch.equal(learned, prompts) and meta["method"] == "prompt" and meta["prefix_len"] == "4"
    assert len(translate(model, learned, meta["method"], ["Bonjour"], ["en"], [3])) == 1
    kv = init_from_words(model, NAMES, 4)
    prefix.save(path, Prefixes(kv), model.config)
    assert load_learned(path)[2]["method"] == "prefix"


def test_train_and_translate_with_prompts(tiny_ckpt, csv_file, tmp_path, call):
    import translate as translate_script

    out = tmp_path / "run"
    r = call(train.main, *train_args(tiny_ckpt[0], csv_file, out, "--method", "prompt", "--steps", 2))
    assert r.returncode == 0, r.stderr
    assert "input-embedding prompts" in r.stdout and "| prompt | both |" in r.stdout and "| 0-shot | both |" in r.stdout
    assert load_learned(out / "prompt.safetensors")[2]["method"] == "prompt"
    r = call(translate_script.main, "--prefix", out / "prompt.safetensors", "--max-new-tokens", 3, "Bonjour", "Hello")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr


def test_prompt_arguments(call, tmp_path):
    assert train.parse_args(["--method", "prompt"]).lr == prompt.LR
    r = call(train.main, "--method", "prompt", "--reparam", "--out", tmp_path / "o")
    assert "--reparam trains --method prefix through an MLP" in one_line_error(r, status=2)
