"""What ``bh.explain_generation`` returns: a language model's answer explained, per step and as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch


@dataclass
class AnswerExplanation:
    """A language model's answer explained (``bh.explain_generation``). ``B`` prompts, ``P`` prompt columns
    (left-padded), ``n`` answer steps (``m`` foil steps):

    * ``total`` (B, P + n): the whole answer's target (the sum of the step targets; with a foil, its prompt
      columns hold ``answer − foil``) attributed to every token, from one backward pass;
    * ``matrix`` (B, n, P + n) or None (``per_step=False``): row ``j``, answer token ``j``'s target over every
      token before it (exactly zero from column ``P + j`` on);
    * ``input_ids``/``attention_mask`` (B, P + n): prompt and answer as the model read them; ``answer_ids``,
      ``answer_mask`` (B, n); ``probabilities`` (B, n): ``p(a_j | prefix)``; ``step_potentials`` (B, n): each
      step's target value (for ``log_softmax``: ``log p(a_j | prefix)``), ``potential`` (B,) their sum (minus
      the foil's);
    * with ``foil_ids``: ``foil_total`` (B, P + m), the foil's part (negated) over its own sequence (its prompt
      columns are included in ``total``), ``foil_matrix`` (B, m, P + m), ``foil_input_ids``, ``foil_ids``,
      ``foil_mask``, ``foil_probabilities``, ``foil_step_potentials``.

    ``linear``: whether the method and reduction are linear in the seed, so that ``total == matrix.sum(1)``
    (and, with a foil, ``total[:, :P] == matrix.sum(1)[:, :P] − foil_matrix.sum(1)[:, :P]``). ``plot()`` draws
    the step × token heat-map under the answer-level row; a notebook shows it inline.
    """

    total: torch.Tensor
    matrix: Optional[torch.Tensor]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    answer_ids: torch.Tensor
    answer_mask: torch.Tensor
    probabilities: torch.Tensor
    step_potentials: torch.Tensor
    method: str
    target: str
    linear: bool
    reduce: str
    foil_total: Optional[torch.Tensor] = None
    foil_matrix: Optional[torch.Tensor] = None
    foil_input_ids: Optional[torch.Tensor] = None
    foil_attention_mask: Optional[torch.Tensor] = None
    foil_ids: Optional[torch.Tensor] = None
    foil_mask: Optional[torch.Tensor] = None
    foil_probabilities: Optional[torch.Tensor] = None
    foil_step_potentials: Optional[torch.Tensor] = None
    tokenizer: Any = field(default=None, repr=False)

    @classmethod
    def assemble(cls, lay, total, matrix, probabilities, potentials, *, method, target, linear, reduce, tokenizer):
        """Split the rows of the teacher-forced batch (answers, then foils) into the answer's and the foil's parts.
        ``total`` (R, T), ``matrix`` (c, R, T) or None, ``probabilities``/``potentials`` (R, c)."""
        b, p = lay.answers, lay.prompt
        lengths = lay.step_mask.sum(dim=1)
        n = int(lengths[:b].max())
        answer_total = total[:b, : p + n].clone()
        parts = dict(
            matrix=None if matrix is None else matrix[:n, :b, : p + n].permute(1, 0, 2),
            input_ids=lay.ids[:b, : p + n],
            attention_mask=lay.mask[:b, : p + n],
            answer_ids=lay.steps[:b, :n],
            answer_mask=lay.step_mask[:b, :n],
            probabilities=probabilities[:b, :n],
            step_potentials=potentials[:b, :n],
        )
        if lay.ids.shape[0] > b:  # the foils' rows
            m = int(lengths[b:].max())
            answer_total[:, :p] += total[b:, :p]
            parts.update(
                foil_total=total[b:, : p + m],
                foil_matrix=None if matrix is None else matrix[:m, b:, : p + m].permute(1, 0, 2),
                foil_input_ids=lay.ids[b:, : p + m],
                foil_attention_mask=lay.mask[b:, : p + m],
                foil_ids=lay.steps[b:, :m],
                foil_mask=lay.step_mask[b:, :m],
                foil_probabilities=probabilities[b:, :m],
                foil_step_potentials=potentials[b:, :m],
            )
        parts = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in parts.items()}
        return cls(
            total=answer_total.detach(),
            prompt_length=p,
            method=method,
            target=target.name,
            linear=linear,
            reduce=reduce,
            tokenizer=tokenizer,
            **parts,
        )

    @property
    def potential(self) -> torch.Tensor:
        """(B,) the answer's objective: the sum of its step targets (minus the foil's), e.g. ``log p(answer)``."""
        value = self.step_potentials.sum(dim=1)
        return value if self.foil_step_potentials is None else value - self.foil_step_potentials.sum(dim=1)

    def tokens(self, foil: bool = False) -> List[List[str]]:
        """Each sequence's tokens as text (the tokenizer's decoding of each id; its id without a tokenizer);
        padding is ``""``."""
        ids, mask = (self.foil_input_ids, self.foil_attention_mask) if foil else (self.input_ids, self.attention_mask)
        if ids is None:
            return []
        decode = getattr(self.tokenizer, "decode", None)
        return [
            [(decode([t]) if decode is not None else str(t)) if real else "" for t, real in zip(row, keep)]
            for row, keep in zip(ids.tolist(), mask.tolist())
        ]

    def to_dict(self) -> Dict[str, Any]:
        """The numbers as plain lists (JSON): tokens, ``total``, ``matrix``, probabilities, potentials, the
        foil's, and what was explained; padding columns included (``attention_mask``)."""

        def plain(value: Any) -> Any:
            return value.tolist() if isinstance(value, torch.Tensor) else value

        out = {k: plain(v) for k, v in vars(self).items() if k != "tokenizer" and v is not None}
        out.update(tokens=self.tokens(), potential=plain(self.potential))
        if self.foil_input_ids is not None:
            out["foil_tokens"] = self.tokens(foil=True)
        return out

    def plot(self, index: int = 0, **options: Any):
        """The step × token heat-map of sample ``index`` under its answer-level row (matplotlib ``Figure``; the
        ``cli`` extra). ``options``: ``percentile`` (the colour scale's limit, default 99), ``max_tokens`` (the
        last columns drawn), ``dpi``."""
        from .plotting.answers import answer_figure

        return answer_figure(self, index, **options)

    def _repr_html_(self) -> Optional[str]:
        try:
            from .plotting.answers import answer_html

            return answer_html(self)
        except Exception:  # a notebook's view must never raise: the text repr shows instead
            return None

    def __repr__(self) -> str:
        foil = "" if self.foil_ids is None else f", foil steps={self.foil_ids.shape[1]}"
        return (
            f"AnswerExplanation(method={self.method!r}, target={self.target!r}, linear={self.linear}, "
            f"total={tuple(self.total.shape)}, steps={self.answer_ids.shape[1]}{foil}, "
            f"potential={[round(v, 4) for v in self.potential.tolist()]})"
        )
