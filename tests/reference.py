"""
The layouts README documents, written again on transformers' GPT-2 without any of this project's
code: what train.py's loss and translate.py's output are held to. A bug shared by our training
forward and our decoding (a swapped prefix, keys taken for values) cannot hide from this.

    prefix:  [source-language prefix] source[:-1] [target-language prefix] source[-1] target <|endoftext|>
             the prefixes as past keys/values (n_layer, 2 = key/value, n_head, P, head_dim), without positions
    prompt:  [source-language prompt] source [target-language prompt] target <|endoftext|>
             the prompts as input embeddings, with positions like tokens

A sentence's tokens are GPT-2's of the sentence with a leading space.
"""

import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import mini_gpt2
from mini_gpt2 import decode

EOT = 50256


def sentence(text):
    return mini_gpt2.encode(" " + text.strip())


def _cache_name(ref):
    # transformers renamed past_key_values to cache in version 5
    return "cache" if "cache" in inspect.signature(ref.forward).parameters else "past_key_values"


def _append(cache, kv):
    """Put one prefix (n_layer, 2, nh, P, hd) at the end of every layer's cache."""
    for layer, (k, v) in enumerate(kv):
        cache.update(k[None].clone(), v[None].clone(), layer)


@torch.no_grad()
def prefix_logits(ref, kv, sp, tp, source, continuation):
    """
    Logits of source[-1] and of each continuation token (len(continuation) + 1 rows): row i
    predicts continuation[i]. kv: the prefix file's tensor (n_prefixes, n_layer, 2, nh, P, hd).
    """
    cache, P = DynamicCache(), kv.size(4)
    _append(cache, kv[sp])
    head, rest = source[:-1], [source[-1]] + list(continuation)
    if head:
        ref(input_ids=torch.tensor([head]), position_ids=torch.arange(len(head))[None],
            attention_mask=torch.ones(1, P + len(head), dtype=torch.long), use_cache=True, **{_cache_name(ref): cache})
    _append(cache, kv[tp])
    out = ref(input_ids=torch.tensor([rest]), position_ids=torch.arange(len(head), len(head) + len(rest))[None],
              attention_mask=torch.ones(1, 2 * P + len(head) + len(rest), dtype=torch.long), use_cache=True,
              **{_cache_name(ref): cache})
    return out.logits[0]


@torch.no_grad()
def prompt_logits(ref, prompts, sp, tp, source, continuation):
    """The same for input-embedding prompts (n_prefixes, P, C): row i predicts continuation[i]."""
    wte = ref.transformer.wte
    P = prompts.size(1)
    embeds = torch.cat([prompts[sp], wte(torch.tensor(source)), prompts[tp],
                        wte(torch.tensor(list(continuation), dtype=torch.long))])
    out = ref(inputs_embeds=embeds[None], position_ids=torch.arange(len(embeds))[None])
    return out.logits[0, 2 * P + len(source) - 1:]


LOGITS = {"prefix": prefix_logits, "prompt": prompt_logits}


def target_nll(ref, method, learned, sp, tp, source, target):
    """The summed cross-entropy of the target tokens (ending in <|endoftext|>), teacher-forced."""
    logits = LOGITS[method](ref, learned, sp, tp, source, target[:-1])
    return F.cross_entropy(logits.float(), torch.tensor(target), reduction="sum").item()


def greedy(ref, method, learned, sp, tp, source, max_new_tokens):
    """Greedy decoding to <|endoftext|> (not returned) or the limit, recomputed from scratch at every token."""
    out = []
    while len(out) < max_new_tokens:
        token = LOGITS[method](ref, learned, sp, tp, source, out)[-1].argmax().item()
        if token == EOT:
            break
        out.append(token)
    return out


@torch.no_grad()
def greedy_text(ref, ids, max_new_tokens, stop):
    """Plain greedy continuation of a text's tokens, recomputed from scratch per token; stop(token) ends it (unreturned)."""
    out = []
    while len(out) < max_new_tokens:
        token = ref(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax().item()
        if stop(token):
            break
        out.append(token)
    return out


def near_tie(logits, tol=1e-4):
    """Whether the two most likely next tokens are within `tol`: float32 arithmetic in another order may pick either."""
    top = logits.float().topk(2).values
    return bool(top[0] - top[1] < tol)


def same_up_to_a_tie(want, got, logits_after):
    """
    Two greedy decodings of one row agree: the same tokens, or the same up to a point where the
    model stood at a near-tie (logits_after(tokens so far) -> the next logits). A real fault
    (another prefix, layout, limit) parts them where the choice was clear.
    """
    k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return want == got or near_tie(logits_after(want[:k]))


def same_text_up_to_a_tie(want_ids, got_text, logits_after):
    """
    The same for a decoding known only by its text (stripped, newlines as spaces, as the scripts
    print it): where the text parts from want_ids, a near-tie.
    """
    text = lambda ids: decode(ids).strip().replace("\n", " ")  # noqa: E731
    if text(want_ids) == got_text:
        return True
    k = max(i for i in range(len(want_ids) + 1) if got_text.startswith(text(want_ids[:i])))
    return near_tie(logits_after(want_ids[:k]))


@torch.no_grad()
def zero_shot_nll(ref, source_text, target_text, source, target):
    """
    The summed cross-entropy of a target after the zero-shot prompt, "fr: <source>\\nen:", the
    layout of the methods without learned tokens (LoRA, fine-tuning): the target is its sentence's
    tokens (a leading space) and <|endoftext|>.
    """
    prompt, tgt = mini_gpt2.encode(f"{source}: {source_text.strip()}\n{target}:"), sentence(target_text) + [EOT]
    logits = ref(input_ids=torch.tensor([prompt + tgt[:-1]])).logits[0, len(prompt) - 1:]
    return F.cross_entropy(logits.float(), torch.tensor(tgt), reduction="sum").item()
