"""mini_gpt2 held to transformers' GPT-2 on random weights in the official file format: logits, loading, decoding, sampling."""

import pytest
import torch

import mini_gpt2
from mini_gpt2 import from_pretrained, generate
from tests.conftest import make_checkpoint


@pytest.mark.parametrize("layout", ["save_pretrained", "hub"])
@pytest.mark.parametrize("n_head,n_embd", [(5, 80), (4, 64)])  # 5 heads of 16: an odd count, like XL's 25
def test_logits_match_transformers(tmp_path, layout, n_head, n_embd):
    ref = make_checkpoint(tmp_path, n_head=n_head, n_embd=n_embd, layout=layout, seed=n_head)
    model = from_pretrained(tmp_path, device="cpu")
    idx = torch.randint(0, 50257, (3, 37))
    with torch.no_grad():
        ours, theirs = model(idx), ref(idx).logits
    assert ours.shape == (3, 37, 50257)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert theirs.std() > 1  # the weights are wide enough that a wrong transpose could not hide


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_attention_is_the_written_out_arithmetic(dtype, tol):
    # On a GPU the model calls PyTorch's fused attention instead of `attention`: the same numbers
    # for every mask the model makes (none, a causal one after a past, a padded batch whose first
    # query sees nothing), and the same gradients into the keys/values (a prefix learns through them).
    from mini_gpt2.model import attention, mask_bias

    g = torch.Generator().manual_seed(0)
    B, nh, P, T, hd = 3, 5, 4, 6, 16
    q, k, v = (torch.randn(B, nh, n, hd, generator=g).to(dtype) for n in (T, P + T, P + T))
    causal = torch.ones(T, P + T, dtype=torch.bool).tril(diagonal=P)
    padded = causal.expand(B, T, P + T).clone()
    padded[0, 0] = False
    for mask in (None, mask_bias(causal, dtype), mask_bias(padded[:, None], dtype)):
        outs, grads = [], []
        for fn in (attention, lambda *a: torch.nn.functional.scaled_dot_product_attention(*a[:3], attn_mask=a[3])):
            kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
            y = fn(q, kk, vv, mask)
            # a query that sees nothing is padding: training never reads it, so neither does the loss
            y.float()[:, :, 1:].square().sum().backward()
            outs.append(y.float())
            grads += [kk.grad.float(), vv.grad.float()]
        assert (outs[0] - outs[1]).abs().max() <= tol * outs[0].abs().max()
        for a, b in zip(grads[:2], grads[2:]):
            assert (a - b).abs().max() <= tol * a.abs().max()


def test_hub_layout_file_loads_without_config(tmp_path):
    # A bare .safetensors of a released size: the sizes are read off the tensors.
    make_checkpoint(tmp_path, n_layer=12, n_head=12, n_embd=768, n_positions=1024, layout="hub")
    (tmp_path / "config.json").unlink()
    model = from_pretrained(tmp_path / "model.safetensors", device="cpu")
    assert model.config == mini_gpt2.CONFIGS["gpt2"]


def test_loads_into_requested_dtype(tiny_ckpt):
    model = from_pretrained(tiny_ckpt[0], device="cpu", dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors)
    assert model.lm_head.weight is model.wte.weight


def test_bad_checkpoints_name_the_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    make_checkpoint(tmp_path)
    path = tmp_path / "model.safetensors"
    good = load_file(path)

    sd = dict(good)
    del sd["transformer.h.1.mlp.c_fc.weight"]
    sd["transformer.h.1.mlp.extra"] = torch.zeros(3)
    save_file(sd, path)
    with pytest.raises(mini_gpt2.UserError, match=r"missing tensors h\.1\.mlp\.c_fc\.weight.*unexpected tensors h\.1\.mlp\.extra"):
        from_pretrained(tmp_path, device="cpu")

    sd = dict(good)
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(80, 81)
    save_file(sd, path)
    with pytest.raises(mini_gpt2.UserError, match=r"transformer\.h\.0\.attn\.c_proj\.weight has shape \(81, 80\)"):
        from_pretrained(tmp_path, device="cpu")


def test_missing_files_say_what_is_wrong(tmp_path):
    with pytest.raises(mini_gpt2.UserError, match="neither a model size"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(mini_gpt2.UserError, match="no model.safetensors"):
        from_pretrained(tmp_path)


def test_greedy_matches_transformers_generate(tiny_ckpt):
    folder, ref = tiny_ckpt
    model = from_pretrained(folder, device="cpu")
    prompt = [464, 2068, 7586, 21831, 18045, 625]
    ours = generate(model, [prompt], 24, stop_ids=())[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert len(ours) == 24
    assert ours == theirs


def test_cached_decoding_equals_full_recompute(tiny_ckpt):
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full = model(idx)
        h, cache = model.hidden(idx[:, :10])  # a prompt of 10, then one token at a time
        steps = [model.lm_head(h)]
        for t in range(10, 30):
            h, cache = model.hidden(idx[:, t:t + 1], cache)
            steps.append(model.lm_head(h))
    assert cache[0][0].shape == (2, 5, 30, 16)
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


def test_batched_prompts_of_different_lengths_match_one_by_one(tiny_ckpt):
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    prompts = [[10, 20, 30], [5, 6, 7, 8, 9, 10, 11], [42]]
    batched = generate(model, prompts, 12, stop_ids=())
    alone = [generate(model, [p], 12, stop_ids=())[0] for p in prompts]
    assert batched == alone


def test_stop_ids_and_per_row_limits(tiny_ckpt):
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    free = generate(model, [[1, 2, 3]], 10, stop_ids=())[0]
    stop = free[4]
    out = generate(model, [[1, 2, 3], [1, 2, 3]], [10, 2], stop_ids=(stop,))
    assert out[0] == free[:free.index(stop)]  # ends before the stop token, which is not returned
    assert out[1] == free[:2]


def test_sampling(tiny_ckpt):
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    greedy = generate(model, [[1, 2, 3]], 8, stop_ids=())
    assert generate(model, [[1, 2, 3]], 8, temperature=1.0, top_k=1, stop_ids=()) == greedy
    runs = [generate(model, [[1, 2, 3]], 8, temperature=1.5, stop_ids=(), generator=torch.Generator().manual_seed(s))
            for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]


def test_never_runs_past_the_context(tiny_ckpt):
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    with pytest.raises(ValueError, match="more than GPT-2's 1024 positions"):
        generate(model, [[1] * 1000], 25)
    assert len(generate(model, [[1] * 1000], 24, stop_ids=())[0]) == 24
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 1025, dtype=torch.long))


def test_tokenizer_round_trips_french():
    text = "L’été, à l’hôtel « Beauséjour », Noël rêvait : « Où êtes-vous ? » — Ça m’étonne !"
    ids = mini_gpt2.encode(text)
    assert mini_gpt2.decode(ids) == text
    assert mini_gpt2.encode("<|endoftext|>") != [mini_gpt2.EOT]  # special tokens are never made from text
    assert mini_gpt2.decode([mini_gpt2.EOT]) == "<|endoftext|>"


def test_sampling_follows_the_temperature_and_top_k():
    """The frequencies of 20,000 seeded draws are softmax(logits / T), over the top k if given."""
    from mini_gpt2.generate import pick

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    g = torch.Generator().manual_seed(0)

    def expected(T, k):
        p = torch.softmax(logits.double() / T, -1)
        if k:
            p[p.argsort(descending=True)[k:]] = 0
        return p / p.sum()

    for T, k in ((1.0, None), (0.5, None), (2.0, None), (0.7, 3)):
        draws = pick(logits.repeat(20_000, 1), T, k, g)
        seen = torch.bincount(draws, minlength=6).double() / len(draws)
        assert (seen - expected(T, k)).abs().max() < 0.015, (T, k, seen)
        assert (expected(T, k) - expected(1.0, None)).abs().max() > 0.05 or (T, k) == (1.0, None)  # the test can tell


def test_any_positive_temperature_works(tiny_ckpt):
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    greedy = generate(model, [[1, 2, 3], [4, 5]], 6, stop_ids=())
    for T in (1e-320, 5e-324, 1e-30):  # so small that logits / T overflow: greedy, in effect
        assert generate(model, [[1, 2, 3], [4, 5]], 6, temperature=T, stop_ids=(), generator=torch.Generator()) == greedy
        assert generate(model, [[1, 2, 3], [4, 5]], 6, temperature=T, top_k=5, stop_ids=()) == greedy
    assert len(generate(model, [[1, 2, 3]], 6, temperature=1e300, stop_ids=())[0]) == 6  # and so large it is uniform


def test_a_finished_row_stays_within_the_positions(tiny_ckpt):
    """A long prompt that ends early beside a short one that goes on: its positions stop with it."""
    model = from_pretrained(tiny_ckpt[0], device="cpu")
    out = generate(model, [[11] * 1020, [11] * 5], [4, 100], stop_ids=())  # the first fills all 1024 positions
    assert [len(o) for o in out] == [4, 100]
