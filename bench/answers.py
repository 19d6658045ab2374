"""Language models' answers (``bh.explain_generation``): time and memory as ratios to the model's own passes.

    python -m bench.answers [--quick] [--device cpu|cuda] [--out DIR] [--goals] [--lengths 512 2048 8192 16384]
                            [--steps 16] [--checkpointing] [--repeats 3]

``--goals`` (the bundled language model and its tokenizer, a prompt of the help text, an answer of ``--steps``
tokens): ``total`` ÷ the model's own forward+backward over prompt + answer (``F+B``: one forward with the
embeddings requiring grad, the logits the answer needs, one backward of the answer's summed log-probability to
the embeddings; with a foil, both sequences in one batch); ``matrix`` ÷ ``F + n·B`` (one forward, ``n``
backward passes through the retained graph: the floor for exact rows), in a loop and with the steps' seeds
batched (``batch_steps=True``); Inseq 0.7.1 (its time ÷ ours, same model, prompt and answer: it re-runs the
``n`` growing prefixes, one forward and backward each) and Captum's ``LLMGradientAttribution`` (one call per
answer token).

``--lengths`` (a small random-init Llama: grouped-query attention, RMSNorm, gated MLP, sdpa; batch 1): prompts
of each length and an answer of ``--steps`` tokens; ``total`` and the ``n``-step ``matrix`` of ``gradient``,
``input_x_gradient`` and ``attnlrp``, as ratios to ``F+B`` / ``F+n·B`` at that length, and peak tensor memory
(MiB, and ÷ the ``F+B`` floor's); ``--checkpointing`` adds the same with Hugging Face's gradient checkpointing
(``model.gradient_checkpointing_enable()``, train mode, no dropout). Memory must grow linearly with the length:
``DIR/answers_memory.png`` plots it. Output: ``DIR/answers.json``, ``DIR/answers.md``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch

import backprop_hooks as bh

from .memory import peak_mib
from .timing import compare, machine, markdown

METHODS = ("gradient", "input_x_gradient", "attnlrp")
GOALS = {"total": 1.3, "matrix": 1.3}  # ÷ F+B and ÷ F+n·B
PROMPT = (
    "The break statement, like continue, may only occur syntactically nested in a for or while loop, but not "
    "nested in a function or class definition within that loop. It terminates the nearest enclosing loop, skipping "
    "the optional else clause if the loop has one. If a for loop is terminated by"
)


def floors(model, embeds: torch.Tensor, mask: torch.Tensor, answer: torch.Tensor, steps: int) -> Dict[str, Callable]:
    """The model's own passes over prompt + answer: ``F+B`` (the answer's summed log-probability back to the
    embeddings) and ``F+n·B`` (one forward, a backward per answer token through the retained graph)."""
    kwargs = dict(attention_mask=mask, use_cache=False, logits_to_keep=steps + 1)

    def log_probs():
        x = embeds.detach().requires_grad_(True)
        logits = model(inputs_embeds=x, **kwargs).logits[:, :-1].float()
        return x, logits.log_softmax(-1).gather(2, answer[..., None]).squeeze(2)  # (B, n)

    def fb():
        x, lp = log_probs()
        return torch.autograd.grad(lp.sum(), x)[0]

    def fnb():
        x, lp = log_probs()
        return [torch.autograd.grad(lp[:, j].sum(), x, retain_graph=True)[0] for j in range(steps)]

    return {"F+B": fb, "F+n·B": fnb}


def small_llama(layers: int = 2, hidden: int = 128, vocab: int = 32000, positions: int = 32768):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions, attention_dropout=0.0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    return model.eval()


def length_rows(lengths: List[int], steps: int, device, repeats: int, checkpointing: bool) -> List[dict]:
    model = small_llama().to(device)
    if checkpointing:
        # transformers 5 renames gradient_checkpointing_enable (still there, with a FutureWarning)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()  # checkpointing runs in train mode; the config has no dropout
    g = torch.Generator().manual_seed(1)
    rows = []
    for length in lengths:
        ids = torch.randint(3, model.config.vocab_size, (1, length + steps), generator=g).to(device)
        prompt, answer = ids[:, :length], ids[:, length:]
        mask = torch.ones_like(ids)
        embeds = model.get_input_embeddings()(ids).detach()
        base = floors(model, embeds, mask, answer, steps)
        candidates = dict(base)
        for method in METHODS:
            for part in ("total", "matrix"):
                per_step = part == "matrix"
                candidates[f"{method} {part}"] = lambda m=method, s=per_step: bh.explain_generation(
                    model, prompt, answer, method=m, per_step=s
                )
        reps = repeats if length <= 2048 else 1
        times = compare(candidates, device, repeats=reps, warmup=1 if length <= 2048 else 0)
        memory = {name: peak_mib(fn, device) for name, fn in candidates.items()}
        for name, seconds in times.items():
            floor = "F+n·B" if name.endswith("matrix") or name == "F+n·B" else "F+B"
            rows.append(
                dict(
                    bench="length",
                    length=length,
                    steps=steps,
                    checkpointing=checkpointing,
                    candidate=name,
                    seconds=seconds,
                    ratio=seconds / times[floor],
                    floor=floor,
                    memory_mib=memory[name],
                    memory_ratio=memory[name] / memory["F+B"],
                )  # fmt: skip
            )
        print(f"length {length}{' checkpointed' if checkpointing else ''}: done", flush=True)
    return rows


def goal_rows(steps: int, device, repeats: int, with_peers: bool) -> List[dict]:
    from backprop_hooks.models import python_docs_lm

    model, tokenizer = python_docs_lm.load()
    model = model.to(device)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids], device=device), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    answer = out[:, len(prompt_ids) :]
    prompt = torch.tensor([prompt_ids], device=device)
    foil = answer.roll(1, dims=1)  # another answer of the same length, scored in its own context
    ids = torch.cat([prompt, answer], 1)
    embeds = model.get_input_embeddings()(ids).detach()
    base = floors(model, embeds, torch.ones_like(ids), answer, steps)
    both = torch.cat([ids, torch.cat([prompt, foil], 1)])
    base["F+B (answer and foil)"] = floors(
        model, model.get_input_embeddings()(both).detach(), torch.ones_like(both), torch.cat([answer, foil]), steps
    )["F+B"]
    candidates: Dict[str, Callable] = dict(base)
    for method in METHODS:
        run = lambda m=method, **kw: bh.explain_generation(model, prompt, answer, method=m, **kw)  # noqa: E731
        candidates[f"{method} total"] = lambda run=run: run(per_step=False)
        candidates[f"{method} matrix"] = lambda run=run: run()
        candidates[f"{method} matrix, batch_steps"] = lambda run=run: run(batch_steps=True)
        candidates[f"{method} total, foil"] = lambda run=run: run(per_step=False, foil_ids=foil)
    text = tokenizer.decode(ids[0], skip_special_tokens=True)
    if with_peers:
        candidates.update(peers(model, tokenizer, PROMPT, text, answer))
    times = compare(candidates, device, repeats=repeats)
    rows = []
    for name, seconds in times.items():
        floor = "F+n·B" if "matrix" in name or name == "F+n·B" else "F+B"
        floor = "F+B (answer and foil)" if "foil" in name else floor
        row = dict(bench="goals", steps=steps, prompt=len(prompt_ids), candidate=name, seconds=seconds)
        row.update(floor=floor, ratio=seconds / times[floor])
        part = "matrix" if "matrix" in name or name.startswith(("inseq", "captum")) else "total"
        if name.startswith(("inseq", "captum")):
            method = "gradient" if "saliency" in name else "input_x_gradient"
            row["peer ÷ ours (matrix)"] = seconds / times[f"{method} matrix"]
            row["peer ÷ ours (total)"] = seconds / times[f"{method} total"]
        row["goal"] = GOALS.get(part) if not name.startswith(("inseq", "captum", "F+")) else None
        rows.append(row)
    return rows


def peers(model, tokenizer, prompt: str, text: str, answer: torch.Tensor) -> Dict[str, Callable]:
    """Inseq's saliency and input×gradient (n forward and backward passes of growing prefixes) and Captum's
    LLMGradientAttribution (one call per answer token) on the same model, prompt and answer."""
    out: Dict[str, Callable] = {}
    try:
        import inseq

        for method in ("saliency", "input_x_gradient"):
            wrapped = inseq.load_model(model, method, tokenizer=tokenizer)
            out[f"inseq {method}"] = lambda w=wrapped: w.attribute(prompt, generated_texts=text, show_progress=False)
    except ImportError:
        warnings.warn("Inseq is not installed: its rows are left out")
    try:
        from captum.attr import LayerGradientXActivation, LLMGradientAttribution, TextTokenInput

        llm = LLMGradientAttribution(LayerGradientXActivation(model, model.get_input_embeddings()), tokenizer)
        inp = TextTokenInput(prompt, tokenizer)
        target = answer[0].cpu()
        out["captum LLMGradientAttribution (input_x_gradient)"] = lambda: llm.attribute(inp, target=target)
    except ImportError:
        warnings.warn("Captum's LLM attribution is not installed: its row is left out")
    return out


def memory_figure(rows: List[dict], path: Path) -> None:
    """Peak memory vs prompt length (log-log) for every candidate, with and without checkpointing."""
    from backprop_hooks.plotting.maps import new_figure, save

    modes = sorted({r["checkpointing"] for r in rows if r["bench"] == "length"})
    fig = new_figure(figsize=(4.5 * len(modes), 4), layout="constrained")
    axes = fig.subplots(1, len(modes), sharey=True, squeeze=False)[0]
    for ax, ckpt in zip(axes, modes):
        chosen = [r for r in rows if r["bench"] == "length" and r["checkpointing"] == ckpt]
        for name in dict.fromkeys(r["candidate"] for r in chosen):
            pts = sorted((r["length"], r["memory_mib"]) for r in chosen if r["candidate"] == name)
            style = {"F+B": "k--", "F+n·B": "k:"}.get(name, "-o")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name, markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title("gradient checkpointing" if ckpt else "no checkpointing", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("peak tensor memory (MiB)")
    axes[-1].legend(fontsize=6, loc="upper left")
    save(fig, path)


def slope(rows: List[dict], candidate: str, checkpointing: bool) -> float:
    """The log-log slope of memory vs length between the shortest and longest prompt (1: linear)."""
    import math

    pts = sorted(
        (r["length"], r["memory_mib"])
        for r in rows
        if r["bench"] == "length" and r["candidate"] == candidate and r["checkpointing"] == checkpointing
    )
    (l0, m0), (l1, m1) = pts[0], pts[-1]
    return math.log(m1 / m0) / math.log(l1 / l0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.answers", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short prompts, one repeat: checks that everything runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results_answers"))
    p.add_argument("--goals", action="store_true", help="the speed goals and the peers (bundled model)")
    p.add_argument("--lengths", type=int, nargs="*", default=[], help="prompt lengths for the small Llama")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--checkpointing", action="store_true", help="also with gradient checkpointing")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    repeats = 1 if a.quick else a.repeats
    lengths = [64, 128] if a.quick and not a.lengths else a.lengths
    warnings.simplefilter("ignore", bh.errors.NonLinearContrastWarning)
    rows: List[dict] = []
    if a.goals or a.quick:
        rows += goal_rows(4 if a.quick else a.steps, device, repeats, not a.no_peers)
    for ckpt in (False, True) if a.checkpointing else (False,):
        rows += length_rows(lengths, 4 if a.quick else a.steps, device, repeats, ckpt)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "answers.json").write_text(json.dumps(dict(machine=machine(device), rows=rows), indent=1) + "\n")
    columns = ["bench", "length", "steps", "checkpointing", "candidate", "seconds", "floor", "ratio", "goal"]
    columns += ["memory_mib", "memory_ratio", "peer ÷ ours (matrix)", "peer ÷ ours (total)"]
    table = markdown(rows, [c for c in columns if any(c in r for r in rows)])
    (a.out / "answers.md").write_text(f"{machine(device)}\n\n{table}\n")
    print(table)
    if any(r["bench"] == "length" for r in rows):
        memory_figure(rows, a.out / "answers_memory.png")
        for ckpt in (False, True) if a.checkpointing else (False,):
            for name in ["F+B", *(f"{m} {part}" for m in METHODS for part in ("total", "matrix"))]:
                print(
                    f"memory slope vs length, {name}{', checkpointing' if ckpt else ''}: {slope(rows, name, ckpt):.2f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
