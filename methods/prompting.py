"""
Prompting the frozen model: zero-shot and few-shot prompts, the baselines of the comparison, and
the layout LoRA and full fine-tuning train and decode in, for methods without learned tokens read
a translation as the zero-shot prompt continued:

    fr: <French>
    en: <English>

    fr: <French>          (as many examples as --shots; none for zero-shot)
    en: <English>

    fr: <the sentence>
    en:

(with en/fr swapped for English to French). The answer ends with its line.
"""

import torch

from mini_gpt2 import EOT, decode, encode
from mini_gpt2.generate import generate
from mini_gpt2.tokenizer import ids_containing
from prefix import LANGUAGES, Example

DIRECTIONS = (("fr", "en"), ("en", "fr"))  # (source, target)


def few_shot_prompt(examples, text, source, target):
    """The prompt for one sentence: the examples ({"en": ..., "fr": ...}), then the sentence, each as `xx: ...` lines."""
    return few_shot_head(examples, source, target) + few_shot_tail(text, target)


def few_shot_head(examples, source, target):
    """The part of the prompt that is the same for every sentence: the examples, then `xx:`."""
    return "".join(f"{source}: {ex[source]}\n{target}: {ex[target]}\n\n" for ex in examples) + f"{source}:"


def few_shot_tail(text, target):
    return f" {text.strip()}\n{target}:"


def zero_shot_ids(text, source, target):
    """The tokens of the zero-shot prompt for `text`: what LoRA and fine-tuning read before the translation."""
    return encode(few_shot_prompt([], text, source, target))


# How many positions the zero-shot prompt adds to a sentence's own tokens at most: "fr", ":", " ",
# "\n", "en", ":" (a real sentence's space joins its first word: 5). A test counts them again.
ZERO_SHOT_TOKENS = 6


def zero_shot_example(source, target, source_lang, target_lang):
    """
    The training sequence of a prefix.Sentence translated into another, for the methods without
    learned tokens (lora.py, finetune.py): the zero-shot prompt, then the target and <|endoftext|>.
    """
    return Example(zero_shot_ids(source.text, source_lang, target_lang), target.ids + [EOT],
                   LANGUAGES.index(source_lang), LANGUAGES.index(target_lang))


def causal_hidden(model, batch, grad_checkpoint=False):
    """
    The training forward of the methods without learned tokens: a right-padded Batch of zero-shot
    prompts, each followed by its target; plain causal attention that never sees padding;
    positions 0, 1, 2, ... Returns what prefix.hidden does: the hidden states (B, T, C), and the
    Batch as it is.
    """
    t = torch.arange(batch.idx.size(1), device=batch.idx.device)
    query, key = t[None, :, None], t[None, None, :]
    mask = (key <= query) & (key < batch.seq_len[:, None, None])  # (B, T, T)
    h, _ = model.hidden(batch.idx, None, mask, t, grad_checkpoint=grad_checkpoint)
    return h, batch


class FewShot:
    """
    Few-shot prompting. The examples open every prompt of a direction, so they run through the
    model once per direction and their keys/values are reused as a cache before each sentence:
    the door prefix-tuning walks through, with keys/values of real tokens.
    """

    def __init__(self, model, examples):
        self.model = model
        self.examples = [{"en": en, "fr": fr} for en, fr in examples]
        self.stop = ids_containing("\n") + [EOT]  # the answer ends with its line
        self.heads = {}  # (source, target) -> (token ids, per layer (k, v) each (1, nh, S, hd))

    def prompt(self, source, target):
        """The text every prompt of a direction starts with: the examples, then `xx:`."""
        return few_shot_head(self.examples, source, target)

    def head(self, source, target):
        if (source, target) not in self.heads:
            ids = encode(self.prompt(source, target))
            _, kv = self.model.hidden(torch.tensor([ids], device=self.model.wte.weight.device))
            self.heads[(source, target)] = ids, kv
        return self.heads[(source, target)]

    @torch.no_grad()
    def __call__(self, texts, source, target, limits, **decoding):
        """Translate texts (all from `source` into `target`), at most limits[i] tokens each."""
        head, kv = self.head(source, target)
        # BPE never merges across ": " (a word's leading space starts a new piece), so the whole
        # prompt's tokens are exactly the head's tokens followed by the tail's.
        tails = [encode(few_shot_tail(t, target)) for t in texts]
        past = [(k.expand(len(texts), -1, -1, -1), v.expand(len(texts), -1, -1, -1)) for k, v in kv]
        out = generate(self.model, tails, limits, stop_ids=self.stop, past_kv=past, past_positions=[len(head)] * len(texts),
                       **decoding)
        return [decode(o).strip() for o in out]
