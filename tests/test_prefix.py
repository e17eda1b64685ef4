"""The prefix method: its training forward against decoding through the cache and against transformers, the loss, the file."""

import inspect

import pytest
import torch

import prefix
from mini_gpt2 import EOT, UserError, encode, from_pretrained
from prefix import (NAMES, Example, Prefixes, as_past, encode_sentence, init_from_words, init_random, max_new_tokens_for,
                    prefix_hidden, translate_ids)
from machinery.learned_file import check_fits
from train import make_batch, target_loss
from tests.conftest import load_learned, make_checkpoint, translate


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    m = from_pretrained(tiny_ckpt[0], device="cpu")
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def kv(model):
    return init_random(model, NAMES, 4, torch.Generator().manual_seed(0))  # (2, L, 2, nh, 4, hd)


def examples():
    fr, en = encode(" Bonjour! Je m'appelle Sully."), encode(" Hello! My name is Sully.")
    return [Example(fr, en + [EOT], 0, 1), Example(en[:3], fr + [EOT], 1, 0), Example(fr[:1], en[:2] + [EOT], 0, 1)]


def test_prefix_shape_is_per_layer_keys_and_values(model, kv):
    c = model.config
    assert kv.shape == (2, c.n_layer, 2, c.n_head, 4, c.head_dim)
    words = init_from_words(model, NAMES, 4)
    assert not torch.equal(words[0], words[1])  # "French:" and "English:" start apart


def test_batched_training_forward_equals_decoding_through_the_cache(model, kv):
    batch = make_batch(examples(), "cpu")
    with torch.no_grad():
        batched = model.logits(prefix_hidden(model, kv, batch))  # (B, T, vocab)
        for b, (s, t, si, ti) in enumerate(examples()):
            # reading order: [source prefix] source[:-1], then [target prefix], then the rest
            cache = as_past(kv[si][None])
            for pos, tok in enumerate(s + t):
                if pos == len(s) - 1:
                    target_prefix = as_past(kv[ti][None])
                    cache = [(torch.cat([k, tk], 2), torch.cat([v, tv], 2)) for (k, v), (tk, tv) in zip(cache, target_prefix)]
                h, cache = model.hidden(torch.tensor([[tok]]), cache, position_ids=torch.tensor([[pos]]))
                assert (model.logits(h)[0, 0] - batched[b, pos]).abs().max().item() <= 1e-5


def test_single_leading_prefix_matches_transformers_past_key_values(tiny_ckpt, model, kv):
    """With only a source prefix, our forward is GPT-2 given that prefix as past_key_values (what PEFT does)."""
    from transformers import DynamicCache

    ref = tiny_ckpt[1]
    idx = torch.tensor([encode(" Bonjour! Je m'appelle Sully.")])
    T, P = idx.size(1), kv.size(4)
    past = as_past(kv[0][None])
    with torch.no_grad():
        ours = model(idx, past_kv=past, position_ids=torch.arange(T))  # real tokens start at position 0
        cache = DynamicCache([(k.clone(), v.clone()) for k, v in past])
        # transformers renamed past_key_values to cache in version 5
        name = "cache" if "cache" in inspect.signature(ref.forward).parameters else "past_key_values"
        theirs = ref(idx, attention_mask=torch.ones(1, P + T), position_ids=torch.arange(T)[None], **{name: cache}).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_translation_follows_the_training_forward(model, kv):
    """Batched decoding of different-length inputs picks each token the training forward ranks first."""
    sources = [encode(" Bonjour! Je m'appelle Sully."), encode(" Merci"), encode(" Hello! My name is Sully, hi.")]
    src, tgt = [0, 0, 1], [1, 1, 0]
    out = translate_ids(model, kv, sources, src, tgt, max_new_tokens=6)
    assert all(len(o) > 0 for o in out)
    for s, si, ti, gen in zip(sources, src, tgt, out):
        batch = make_batch([Example(s, gen, si, ti)], "cpu")
        with torch.no_grad():
            logits = model.logits(prefix_hidden(model, kv, batch))[0]
        assert logits[len(s) - 1:len(s) - 1 + len(gen)].argmax(-1).tolist() == gen


def test_translate_gives_text(model, kv):
    out = translate(model, kv, "prefix", ["Bonjour!", "Hello"], ["en", "fr"], [4, 4])
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


def test_loss_counts_target_tokens_only(model, kv):
    batch = make_batch(examples(), "cpu")
    idx, src_len, seq_len = batch.idx, batch.src_len, batch.seq_len
    h = prefix_hidden(model, kv, batch)
    h2 = h.clone()
    for b in range(3):  # scramble what lies outside the target predictions: the loss must not move
        h2[b, : src_len[b] - 1] = torch.randn_like(h2[b, : src_len[b] - 1])
        h2[b, seq_len[b] - 1:] = torch.randn_like(h2[b, seq_len[b] - 1:])
    assert torch.equal(target_loss(model, h, batch), target_loss(model, h2, batch))
    logits = model.logits(h)
    manual = sum(torch.nn.functional.cross_entropy(logits[b, src_len[b] - 1:seq_len[b] - 1], idx[b, src_len[b]:seq_len[b]],
                                                   reduction="sum") for b in range(3))
    assert torch.allclose(target_loss(model, h, batch), manual, atol=1e-4)


def train_on_examples(model, learned, hidden, steps, lr):
    """
    AdamW on the target loss of examples(), through `hidden` (a method's):
    checks at every step that gradients reach only `learned`, and at the end that the model's
    weights are bit-identical; returns the losses.
    """
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(learned.parameters(), lr=lr, weight_decay=0)
    batch = make_batch(examples(), "cpu")
    losses = []
    for _ in range(steps):
        loss = target_loss(model, *hidden(model, learned, batch))
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(p.grad is not None for p in learned.parameters())
        assert any(p.grad.abs().sum() > 0 for p in learned.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    return losses


@pytest.mark.parametrize("reparam", [False, True])
def test_training_moves_only_the_prefix_and_halves_the_loss(model, kv, reparam):
    prefixes = Prefixes(kv, reparam=reparam)
    assert torch.equal(prefixes.fold(), kv)  # both forms start at the initialisation
    losses = train_on_examples(model, prefixes, prefix.hidden, 60, lr=0.05 if not reparam else 0.01)
    assert losses[-1] <= losses[0] / 2, losses[::10]


def test_activation_checkpointing_gives_the_same_gradients(model, kv):
    batch = make_batch(examples(), "cpu")
    grads = []
    for ckpt in (False, True):
        p = kv.clone().requires_grad_()
        target_loss(model, prefix_hidden(model, p, batch, grad_checkpoint=ckpt), batch).backward()
        grads.append(p.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_save_load_round_trip_and_size_check(tmp_path, model, kv):
    path = tmp_path / "p.safetensors"
    prefix.save(path, Prefixes(kv), model.config, model="tiny")
    kv2, names, meta = load_learned(path)
    check_fits(meta, model.config, path)
    assert torch.equal(kv2, kv) and names == list(NAMES) and meta["model"] == "tiny" and meta["prefix_len"] == "4"
    other = make_checkpoint(tmp_path / "other", n_layer=3, n_head=4, n_embd=64)
    with pytest.raises(UserError, match=r"trained for tiny \(2 layers, 5 heads, width 80\), but this model has 3 layers"):
        check_fits(load_learned(path)[2], from_pretrained(tmp_path / "other").config, path)
    del other


def test_translate_refuses_inputs_past_the_context(model, kv):
    with pytest.raises(UserError, match="input 2 is .* tokens"):
        texts = ["Bonjour", "mot " * 400]
        translate(model, kv, "prefix", texts, ["en", "en"], [max_new_tokens_for(encode_sentence(t)) for t in texts])  # 400 + 808 > 1024


def test_the_length_rule_counts_both_sentences_and_the_end():
    from prefix import fits

    assert fits([1] * 50, [2] * 77, 128) and not fits([1] * 50, [2] * 78, 128)  # 50 + 77 + <|endoftext|> = 128
    import train

    examples, too_long = train.make_examples([("a " * 10, "b " * 10)], 21, prefix)
    assert len(examples) == 2 and too_long == 0 and len(examples[0].source) + len(examples[0].target) == 21
    assert train.make_examples([("a " * 10, "b " * 10)], 20, prefix) == ([], 2)


def test_the_reparameterisation_gives_each_virtual_token_its_own_embedding(kv):
    """The MLP maps virtual token j's embedding to token j's keys/values in every layer, as in the paper."""
    torch.manual_seed(0)
    p = Prefixes(kv, reparam=True)
    torch.nn.init.normal_(p.mlp[2].weight)  # as if trained: the last layer no longer zero
    before = p().detach()
    with torch.no_grad():
        p.embed[1, 2] += 1.0  # prefix 1's virtual token 2
    changed = (p().detach() - before).abs().sum(dim=(1, 2, 3, 5)) > 0  # (n_prefixes, P)
    assert changed.tolist() == [[False] * 4, [False, False, True, False]]


def test_an_example_starts_with_its_source_languages_prefix_and_ends_in_endoftext():
    fr, en = prefix.Sentence("Bonjour.", encode_sentence("Bonjour.")), prefix.Sentence("Hello.", encode_sentence("Hello."))
    ex = prefix.example(fr, en, "fr", "en")
    assert ex == Example(fr.ids, en.ids + [EOT], NAMES.index("[start_french]"), NAMES.index("[start_english]"))
    ex = prefix.example(en, fr, "en", "fr")
    assert ex == Example(en.ids, fr.ids + [EOT], NAMES.index("[start_english]"), NAMES.index("[start_french]"))
    from methods import prompting  # LoRA's and fine-tuning's: the zero-shot prompt before the same target

    ex = prompting.zero_shot_example(fr, en, "fr", "en")
    assert ex.source == encode("fr: Bonjour.\nen:") and ex.target == en.ids + [EOT]


def test_translating_into_english_starts_from_the_french_prefix_and_switches_to_the_english_one(model, kv):
    seen = []

    def translate_ids(model, kv, sources, src_prefix, tgt_prefix, limits, **decoding):
        seen.append((src_prefix, tgt_prefix))
        return [[] for _ in sources]

    for source, target in (("fr", "en"), ("en", "fr")):
        prefix.translator(model, kv, translate_ids)(["une", "deux"], source, target, [3, 3])
    fr, en = NAMES.index("[start_french]"), NAMES.index("[start_english]")
    assert seen == [([fr, fr], [en, en]), ([en, en], [fr, fr])]


def test_as_past_gives_each_layer_its_keys_then_its_values():
    kv_rows = torch.randn(3, 2, 2, 5, 4, 16)  # (B, L, 2 = key/value, nh, P, hd)
    past = as_past(kv_rows)
    assert len(past) == 2
    for layer, (k, v) in enumerate(past):
        assert torch.equal(k, kv_rows[:, layer, 0]) and torch.equal(v, kv_rows[:, layer, 1])
