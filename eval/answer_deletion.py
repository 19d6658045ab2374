r"""Deletion check of a language model's answer explained against a foil answer (``bh.explain_generation``):
remove the prompt tokens that speak most for the answer first, and ``log p(answer) − log p(foil)`` should fall
faster than in a random order.

    python -m backprop_hooks.eval.deletion --model python_docs_lm --out eval/results/deletion_answers

Model: the bundled language model (:mod:`backprop_hooks.models.python_docs_lm`). Samples, from its held-out
sentences (never seen in training), one prompt per sentence at most:

* a **cut** is a word boundary of the sentence: the next token starts a word (a space, then a letter), with at
  least ``MIN_PROMPT`` tokens before it (BOS not counted) and at most ``MAX_PROMPT``;
* the **answer** is the sentence's true next word: that token and the tokens that continue it (no space, a
  letter, digit or ``_`` first), at most ``MAX_WORD`` tokens. The true word, not the model's own greedy
  one, so that every answer is a fact of the held-out text rather than a choice of the model's;
* the **foil** is the word the model itself would write from its most likely *other* word-starting token:
  that token, then the model's greedy next tokens while they continue the word (at most ``MAX_WORD``);
* kept: cuts where the answer's first token is the model's most likely word-starting token and the model
  prefers the answer by at least ``MARGIN`` nats, ``log p(answer) − log p(foil) ≥ MARGIN`` (each scored in
  its own context). One passing cut is drawn per sentence (seeded).

Relevance per prompt token, from ``.total`` over the prompt: ``logit`` (``target="logit"``, no foil: the
answer's own summed logits), ``log_softmax`` (no foil: ``log p(answer)``) and ``contrast`` (``foil_ids=`` and
``target="log_softmax"``: ``log p(answer) − log p(foil)``, the quantity the curves measure). Summed over the
hidden size (signed, ``reduce="sum"``) for ``input_x_gradient`` and ``attnlrp``; the ``gradient``'s L2 norm
(``reduce="l2"``, no sign: the most sensitive tokens first), because its signed sum is zero on this model: the
token embeddings reach the rest of GPT-2 only through LayerNorms, which ignore a shift along ``(1, …, 1)``, so
``Σ_d ∂f/∂e_d = 0`` up to rounding and ranking by it is ranking by rounding noise.

Deletion removes a token from the sequence (the prompt gets shorter, the later tokens move up): a causal LM
reads any shorter text, so nothing out of distribution (no mask token, no zero embedding) is put in. BOS is
never removed. The curves and their areas are those of :mod:`backprop_hooks.eval.deletion`, over the fraction
of each prompt's tokens removed, so prompts of different lengths compare.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

import backprop_hooks as bh
from backprop_hooks.errors import UsageError
from backprop_hooks.generation import step_logits
from backprop_hooks.generation_inputs import layout

from . import report
from .deletion_curves import Task, area_between

METHODS = ("gradient", "input_x_gradient", "attnlrp")
TARGETS = ("logit", "log_softmax", "contrast")
RECENCY = ("recency", "last first")  # no explanation: the prompt's last tokens first, a reference beside random
REDUCE = {"gradient": "l2", "input_x_gradient": "sum", "attnlrp": "sum"}  # see the module docstring
MIN_PROMPT, MAX_PROMPT, MAX_WORD, MARGIN = 8, 64, 6, 1.0
Rows = List[List[int]]


def word_kinds(tokenizer) -> Tuple[torch.Tensor, torch.Tensor]:
    """(V,) bool each: tokens that start a word (a space, then a letter) and tokens that continue one (no space; a
    letter, a digit or ``_`` first), read from the byte-level BPE's token strings (``Ġ`` is the space)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    starts = [p.startswith("Ġ") and p[1:2].isalpha() for p in pieces]
    continues = [not p.startswith("Ġ") and (p[:1].isalnum() or p[:1] == "_") for p in pieces]
    return torch.tensor(starts), torch.tensor(continues)


def score(model, prompts: Rows, answers: Rows, foils: Rows, pad: int, batch_size: int = 256) -> torch.Tensor:
    """(N,) ``log p(answer) − log p(foil)`` after each prompt, answer and foil teacher-forced in their own
    contexts (one left-padded batch, each row at the positions it has alone)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        part = slice(start, start + batch_size)
        lay = layout(prompts[part], answers[part] + foils[part], pad)
        with torch.no_grad():
            output = model(lay.ids, attention_mask=lay.mask, position_ids=lay.positions, use_cache=False)
        logp = step_logits(output, lay.continuation).log_softmax(-1).gather(2, lay.steps[..., None]).squeeze(2)
        total = (logp * lay.step_mask).sum(1)
        out.append(total[: lay.answers] - total[lay.answers :])
    return torch.cat(out)


def greedy_words(model, prompts: Rows, firsts: Sequence[int], continues: torch.Tensor, pad: int) -> Rows:
    """Each prompt's word from ``firsts``: the model's greedy next tokens appended while they continue the word."""
    words = [[f] for f in firsts]
    active = list(range(len(prompts)))
    for _ in range(MAX_WORD - 1):
        if not active:
            break
        rows = [prompts[i] + words[i] for i in active]
        lay = layout(rows, [[pad]] * len(rows), pad)
        with torch.no_grad():
            logits = model(lay.ids, attention_mask=lay.mask, position_ids=lay.positions, use_cache=False).logits
        best = logits[:, lay.prompt - 1].argmax(-1).tolist()
        still = []
        for i, token in zip(active, best):
            if continues[token]:
                words[i].append(token)
                still.append(i)
        active = still
    return words


def candidates(model, tokenizer, sentences: Sequence[str]) -> Dict[str, list]:
    """Every cut of every sentence whose true next word starts with the model's most likely word-starting token,
    with its answer, foil and preference ``log p(answer) − log p(foil)``."""
    starts, continues = word_kinds(tokenizer)
    pad = tokenizer.pad_token_id
    found: Dict[str, list] = dict(sentence=[], prompt=[], answer=[], foil=[])
    for index, text in enumerate(sentences):
        limit = MAX_PROMPT + MAX_WORD + 1  # BOS first: the tokenizer adds it
        ids = tokenizer(text, truncation=True, max_length=limit + 1)["input_ids"]
        truncated, ids = len(ids) > limit, ids[:limit]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        for cut in range(MIN_PROMPT + 1, min(len(ids), MAX_PROMPT + 1)):
            first = ids[cut]
            if not starts[first]:
                continue
            end = cut + 1
            while end < len(ids) and continues[ids[end]]:
                end += 1
            ranked = logits[cut - 1].masked_fill(~starts, float("-inf")).topk(2).indices.tolist()
            cut_off = end == len(ids) and truncated  # the word may go on after the tokens read
            if end - cut > MAX_WORD or cut_off or ranked[0] != first:
                continue
            found["sentence"].append(index)
            found["prompt"].append(ids[:cut])
            found["answer"].append(ids[cut:end])
            found["foil"].append(ranked[1])
    found["foil"] = greedy_words(model, found["prompt"], found["foil"], continues, pad)
    found["preference"] = (
        score(model, found["prompt"], found["answer"], found["foil"], pad).tolist() if found["prompt"] else []
    )
    return found


def select(found: Dict[str, list], seed: int) -> List[int]:
    """One passing cut (preference ≥ ``MARGIN``) per sentence, drawn with ``seed``: indices into ``found``."""
    gen = torch.Generator().manual_seed(seed)
    by_sentence: Dict[int, List[int]] = {}
    for i, (s, value) in enumerate(zip(found["sentence"], found["preference"])):
        if value >= MARGIN:
            by_sentence.setdefault(s, []).append(i)
    return [cuts[int(torch.randint(len(cuts), (1,), generator=gen))] for _, cuts in sorted(by_sentence.items())]


class PythonDocsLM(Task):
    """The bundled language model's answers against foil answers; units: the prompt tokens after BOS."""

    name, units_name = "python_docs_lm", "prompt tokens"
    quantity = curve_name = "log p(answer) − log p(foil)"
    orders = (*((m, t) for m in METHODS for t in TARGETS), RECENCY)

    def __init__(self, n: int, batch_size: int, seed: int = 0) -> None:
        from backprop_hooks.models import python_docs_lm

        self.model, self.tokenizer = python_docs_lm.load()
        self.pad, self.batch_size = self.tokenizer.pad_token_id, batch_size
        sentences = python_docs_lm.dataset()[1][:n]
        found = candidates(self.model, self.tokenizer, sentences)
        chosen = select(found, seed)
        if not chosen:
            raise UsageError(f"none of the first {len(sentences)} held-out sentences gives a prompt; use a larger --n")
        self.prompts = [found["prompt"][i] for i in chosen]
        self.answers = [found["answer"][i] for i in chosen]
        self.foils = [found["foil"][i] for i in chosen]
        self.texts = [sentences[found["sentence"][i]] for i in chosen]
        self.samples = len(chosen)
        lengths = torch.tensor([len(p) - 1 for p in self.prompts])
        self.units = torch.arange(int(lengths.max()))[None] < lengths[:, None]  # (B, K): token k + 1 of the prompt
        self.data = dict(
            sentences=len(sentences),
            sentences_with_a_cut=len(set(found["sentence"])),
            cuts=len(found["sentence"]),
            cuts_passing=sum(v >= MARGIN for v in found["preference"]),
            samples=self.samples,
            prompt_tokens_mean=float(lengths.double().mean()),
            answer_tokens_mean=sum(map(len, self.answers)) / self.samples,
            foil_tokens_mean=sum(map(len, self.foils)) / self.samples,
            preference_mean=sum(found["preference"][i] for i in chosen) / self.samples,
        )

    def examples(self, k: int = 5) -> List[Tuple[str, str, str]]:
        """The first ``k`` samples as text: (prompt, answer, foil)."""
        decode = self.tokenizer.decode
        return [(decode(p[1:]), decode(a), decode(f)) for p, a, f in zip(self.prompts, self.answers, self.foils)][:k]

    def relevance(self, method: str, target: str) -> torch.Tensor:
        """(B, K) relevance of every prompt token after BOS (``.total`` over the prompt, reduced by ``REDUCE``)."""
        if (method, target) == RECENCY:
            return torch.arange(self.units.shape[1], dtype=torch.float64).expand(self.units.shape).clone()
        contrast = target == "contrast"
        parts = []
        for start in range(0, self.samples, self.batch_size):
            part = slice(start, start + self.batch_size)
            e = bh.explain_generation(
                self.model,
                self.prompts[part],
                self.answers[part],
                foil_ids=self.foils[part] if contrast else None,
                method=method,
                target="log_softmax" if contrast else target,
                per_step=False,
                reduce=REDUCE[method],
                model_kwargs=dict(use_cache=False),
            )
            parts.append(self.left_aligned(e.total[:, : e.prompt_length], self.units[part]))
        return torch.cat(parts)

    @staticmethod
    def left_aligned(total: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """(b, K) from left-padded prompt columns (b, P): unit ``k`` is the ``k + 1``-th token after BOS."""
        lengths = units.sum(1)
        columns = total.shape[1] - lengths[:, None] + torch.arange(units.shape[1])[None]
        picked = total.gather(1, columns.clamp(max=total.shape[1] - 1))
        return picked.masked_fill(~units, 0.0)

    def curve(self, removed: torch.Tensor) -> torch.Tensor:
        """(F, B) ``log p(answer) − log p(foil)`` with the removed prompt tokens taken out of the sequence."""
        prompts, answers, foils = [], [], []
        for f in range(removed.shape[0]):
            for b, (prompt, keep) in enumerate(zip(self.prompts, (~removed[f]).tolist())):
                prompts.append([prompt[0]] + [t for t, k in zip(prompt[1:], keep) if k])
                answers.append(self.answers[b])
                foils.append(self.foils[b])
        return score(self.model, prompts, answers, foils, self.pad).view(removed.shape[:2])

    def panels(self) -> Dict[str, List[str]]:
        """The curves drawn together: one panel per method, the recency order in each."""
        return {m: [*(f"{m} ({t})" for t in TARGETS), "recency (last first)"] for m in METHODS}

    def summary(self, curves: Dict[str, torch.Tensor], fractions: Sequence[float]) -> Tuple[str, Dict]:
        """The method × target table of areas, contrast − logit paired per prompt, and the data as Markdown/JSON."""
        areas = {k: area_between(v, curves["random"], fractions) for k, v in curves.items()}
        cells, rows = [], []
        for m in METHODS:
            cell = [report.mean_ci(areas[f"{m} ({t})"]) for t in TARGETS]
            paired = report.mean_ci(areas[f"{m} (contrast)"] - areas[f"{m} (logit)"])
            cells.append([m, *(f"{a:.3f} ± {c:.3f}" for a, c in cell), f"{paired[0]:+.3f} ± {paired[1]:.3f}"])
            rows.append(dict(method=m, **{t: dict(zip(("mean", "ci"), v)) for t, v in zip(TARGETS, cell)},
                             contrast_minus_logit=dict(mean=paired[0], ci=paired[1])))  # fmt: skip
        recency = report.mean_ci(areas["recency (last first)"])
        d = self.data
        table = report.markdown_table(
            ["method", "logit", "log_softmax (no foil)", "contrast (foil)", "contrast − logit, paired"], cells
        )
        examples = "\n".join(f"* `{p[-60:]}` → `{a}` vs `{f}`" for p, a, f in self.examples())
        text = (
            f"## Area between random and relevance order, per method and target (n = {self.samples} prompts)\n\n"
            f"{table}\n\n"
            "The reference that explains nothing, the prompt's last tokens first: "
            f"{recency[0]:.3f} ± {recency[1]:.3f}. Relevance: `.total` over the prompt, summed over the hidden size "
            "(signed) for input_x_gradient and attnlrp; the gradient's L2 norm (no sign), because its signed sum is "
            "zero on GPT-2 (the embeddings reach the model only through LayerNorms). contrast: `foil_ids=` with "
            '`target="log_softmax"`; logit and log_softmax: the answer alone.\n\n'
            f"Data: {d['sentences']} held-out sentences; {d['cuts']} cuts in {d['sentences_with_a_cut']} sentences "
            f"where the true next word starts with the model's most likely word-starting token; {d['cuts_passing']} "
            f"with log p(answer) − log p(foil) ≥ {MARGIN}; one per sentence: {self.samples} prompts "
            f"(mean {d['prompt_tokens_mean']:.1f} tokens after BOS, answers {d['answer_tokens_mean']:.2f} tokens, "
            f"foils {d['foil_tokens_mean']:.2f}, mean preference {d['preference_mean']:.2f} nats). Examples "
            f"(prompt's end → answer vs foil):\n\n{examples}\n"
        )
        extra = dict(recency=dict(mean=recency[0], ci=recency[1]), reduce=REDUCE, margin=MARGIN)
        return text, dict(table=rows, data=d, examples=self.examples(), **extra)
