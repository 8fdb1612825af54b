"""The `ngram-rules` section of `harness report`: models x N tables, the staircase (valid rate
against N for every model), training curves and what the models learned (the bigram's table, the
MLP's hidden layer, the transformer's attention), each picture followed by a reading whose numbers
are computed from the rows. A causal LM's `n=N icl` and `n=N ft` rows (tasks/ngram_rules_llm.py)
are two lines of their own, labelled e.g. "llama-hf icl" and "llama-hf ft"."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import torch

from tasks.common import LADDER_ORDER
from tasks.ngram_rules import RATES, rule_of  # RATES: clipped to [0, 1], drawn with their intervals

SOLVED = 0.5  # valid rate at which the summary counts an order as learned
MODES = ("", "icl", "ft")  # a subtask's mode: the ladder's `n=N`, then an LLM's `n=N icl` and `n=N ft`
LINESTYLES = {"": "-", "icl": "--", "ft": ":"}


def ngram_rules_section(history: pd.DataFrame, fig_dir: Path, report_dir: Path) -> str:
    """Markdown: models x N tables, valid rate against N, training curves and model internals,
    each picture followed by a short reading (numbers in it are computed from the rows)."""
    from harness.api import latest

    if "config" in history.columns:  # one rule per section: the lag rule's runs when there are any
        rules = history["config"].map(rule_of)
        history = history[rules == ("lag" if (rules == "lag").any() else "table")]
    rows = latest(history)
    if rows.empty:
        return ""
    one_weights = rows["weights"].nunique() == 1
    base = rows["model"] if one_weights else rows["model"] + " (" + rows["weights"] + ")"
    mode = rows["subtask"].map(_mode)
    rows = rows.assign(label=base + mode.map(lambda m: f" {m}" if m else ""), base=base, mode=mode,
                       order=rows["subtask"].map(_order))
    fig_dir.mkdir(parents=True, exist_ok=True)
    nll = ["### Held-out nll (nats per token) and the bounds", "", _nll_table(rows), ""]
    parts = ["### Valid rate (share of sampled sequences that obey the rule everywhere)", "",
             _table(rows, "valid_rate"), "", *(nll if (rows["metric"] == "nll").any() else []),
             summary_reading(rows), "", *llm_reading(rows)]
    for name, picture in (("by_order", plot_by_order), ("curves", plot_curves), ("bigram", plot_bigram),
                          ("mlp", plot_mlp), ("attention", plot_attention)):
        drawn = picture(rows, fig_dir / f"ngram_rules_{name}.png")
        if drawn is not None:
            path, reading = drawn
            parts += [f"![ngram-rules {name}]({_rel(path, report_dir)})", "", reading, ""]
    return "\n".join(parts)


def summary_reading(rows: pd.DataFrame) -> str:
    valid = _metric(rows, "valid_rate")
    solved = []
    for label in [lab for lab in _labels(rows) if lab in valid.index]:
        orders = [n for n, v in valid.loc[label].dropna().items() if v >= SOLVED]
        solved.append(f"{label} N <= {max(orders)}" if orders else f"{label} none")
    ends = [f"{label} {row[min(row.index)]:.3f} -> {row[max(row.index)]:.3f}" for label, row in
            ((lab, valid.loc[lab].dropna()) for lab in _labels(rows) if lab in valid.index)
            if len(row) > 1 and (row >= SOLVED).all()]
    span = (f" Valid rate from the smallest to the largest N for the models that learn every order: "
            f"{'; '.join(ends)}." if ends else "")
    return ("**Reading.** A model that sees fewer than N-1 previous symbols cannot beat the last row "
            "(log V: the balanced rule makes every shorter context uninformative), so its constrained "
            f"symbols are coin flips and its valid rate is about (k/V)^(L-N+1), i.e. 0. Orders learned "
            f"(valid rate >= {SOLVED}): {'; '.join(solved)}. By construction a counting model cannot pass "
            "its order and the MLP its window (context + 1 symbols); recurrent and attention models have "
            "no such limit and are held back by optimisation, memory and the budget: see the training "
            f"curves.{span}")


def llm_reading(rows: pd.DataFrame) -> list[str]:
    """A paragraph on the LLMs' icl and ft lines, or nothing when there are none."""
    block = rows[(rows["metric"] == "valid_rate") & (rows["mode"] != "")]
    if block.empty:
        return []
    extras = [e for e in block["extra"] if isinstance(e, dict)]
    examples = next((e["icl_examples"] for e in extras if e.get("mode") == "icl"), "K")
    steps, batch = next(((e["ft_steps"], e["ft_batch_size"]) for e in extras if e.get("mode") == "ft"), ("?", "?"))
    return [f"**Pretrained LLMs.** The `icl` lines give the LLM {examples} training sequences in its prompt, "
            "one per line, each symbol a word (\" a\", \" b\", ...); `ft` lines fine-tune a copy of it "
            f"({steps} AdamW steps of {batch} sequences) and sample after the start token alone. Sampling is "
            "restricted to the V symbol tokens, so these measure knowledge of the rule, not of the format; "
            "intervals are 95% Wilson intervals over the samples.", ""]


def _order(subtask: str) -> int:
    head = subtask.split(" ", 1)[0]
    return int(head[2:]) if head.startswith("n=") and head[2:].isdigit() else -1


def _mode(subtask: str) -> str:
    """"" for the ladder's `n=N`, "icl" / "ft" for an LLM's `n=N icl` / `n=N ft`."""
    parts = subtask.split(" ", 1)
    return parts[1] if len(parts) == 2 else ""


def _rel(path: Path, report_dir: Path) -> str:
    return (path.relative_to(report_dir) if path.is_relative_to(report_dir) else path).as_posix()


def _labels(rows: pd.DataFrame) -> list[str]:
    """Row labels in ladder order (bigram first, the transformers last), then each LLM's icl and ft."""
    ladder = list(LADDER_ORDER)
    first = rows.drop_duplicates("label").set_index("label")
    rank = {label: ladder.index(m) if m in ladder else len(ladder) for label, m in first["model"].items()}
    mode = first["mode"] if "mode" in first else pd.Series("", index=first.index)
    base = first["base"] if "base" in first else first.index.to_series()
    return sorted(first.index, key=lambda label: (rank[label], base[label], MODES.index(mode[label])
                                                  if mode[label] in MODES else len(MODES), label))


def _metric(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """label x N values of one metric."""
    block = rows[rows["metric"] == metric]
    return block.pivot_table(index="label", columns="order", values="value", aggfunc="last")


def _bounds(rows: pd.DataFrame, metric: str, side: str) -> pd.DataFrame:
    """label x N of `extra.ci_low` or `extra.ci_high` (NaN for single-seed rows)."""
    block = rows[rows["metric"] == metric]
    block = block.assign(bound=block["extra"].map(lambda e: e.get(side) if isinstance(e, dict) else None))
    return block.pivot_table(index="label", columns="order", values="bound", aggfunc="last", dropna=False)


def _table(rows: pd.DataFrame, metric: str) -> str:
    """Markdown label x N; cells of multi-seed rows read `mean [ci_low, ci_high]`."""
    values, low, high = _metric(rows, metric), _bounds(rows, metric, "ci_low"), _bounds(rows, metric, "ci_high")
    orders = sorted(values.columns)

    def cell(label: str, n: int) -> str:
        lo = low.loc[label].get(n) if label in low.index and n in low.columns else None
        hi = high.loc[label].get(n) if label in high.index and n in high.columns else None
        ci = "" if lo is None or hi is None or math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"
        return _fmt(values.loc[label].get(n)) + ci

    lines = ["| model | " + " | ".join(f"N={n}" for n in orders) + " |", "|---|" + "---|" * len(orders)]
    for label in [lab for lab in _labels(rows) if lab in values.index]:
        lines.append(f"| {label} | " + " | ".join(cell(label, n) for n in orders) + " |")
    return "\n".join(lines)


def _nll_table(rows: pd.DataFrame) -> str:
    bounds = rows[rows["metric"] == "entropy_bound"].groupby("order")
    bound = bounds["value"].last()
    short = bounds["extra"].last().map(lambda e: e.get("short_context_nll"))
    orders = sorted(_metric(rows, "nll").columns)
    return "\n".join([_table(rows, "nll"),
                      "| *entropy bound* | " + " | ".join(_fmt(bound.get(n)) for n in orders) + " |",
                      "| *best with N-2 symbols* | " + " | ".join(_fmt(short.get(n)) for n in orders) + " |"])


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _internals(rows: pd.DataFrame, model: str) -> dict[int, dict]:
    """N -> the `internals` dict of `model`'s valid_rate rows (orders without one are left out)."""
    block = rows[(rows["model"] == model) & (rows["metric"] == "valid_rate")].sort_values("order")
    found = {int(o): e.get("internals") for o, e in zip(block["order"], block["extra"]) if isinstance(e, dict)}
    return {n: info for n, info in found.items() if info}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


Drawn = tuple[Path, str] | None  # (figure, reading)


def plot_by_order(rows: pd.DataFrame, path: Path) -> Drawn:
    plt, labels = _plt(), _labels(rows)
    excess = _metric(rows, "nll").sub(_metric(rows, "entropy_bound").mean(), axis=1)
    panels = [("valid_rate", _metric(rows, "valid_rate")), ("token_valid_rate", _metric(rows, "token_valid_rate")),
              ("nll - entropy bound (nats)", excess)]
    mode_of = rows.drop_duplicates("label").set_index("label")["mode"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 0.55]})
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("tab20b").colors[::4]]  # 15 distinct hues
    colours = {label: palette[i % len(palette)] for i, label in enumerate(labels)}
    intervals = {metric: (_bounds(rows, metric, "ci_low"), _bounds(rows, metric, "ci_high")) for metric in RATES}
    for ax, (title, values) in zip(axes, panels):
        low, high = intervals.get(title, (None, None))
        for label in [lab for lab in labels if lab in values.index]:
            series = values.loc[label].dropna()
            line, = ax.plot(series.index, series.values, marker="o", label=label, ls=LINESTYLES[mode_of[label]],
                            color=colours[label])
            if low is not None and label in low.index:
                lo, hi = low.loc[label].reindex(series.index), high.loc[label].reindex(series.index)
                ax.fill_between(series.index, lo.values.astype(float), hi.values.astype(float),
                                color=line.get_color(), alpha=0.15, lw=0)
        ax.set(title=title, xlabel="rule order N", xticks=sorted(values.columns))
    axes[3].axis("off")  # the legend gets its own panel: with an LLM beside the ladder it would cover lines
    axes[3].legend(*axes[0].get_legend_handles_labels(), loc="center left", fontsize=7, frameon=False)
    seeds = {len(e.get("seeds", [0])) for e in rows["extra"] if isinstance(e, dict)}
    band = (f" Shaded: 95% Student-t interval over {max(seeds)} seeds (rule table, data, init and sampling "
            "all change with the seed); lines: the mean." if max(seeds, default=1) > 1 else "")
    if (mode_of != "").any():
        band += (" Dashed: an LLM in context (`icl`), dotted: fine-tuned (`ft`), shaded with 95% Wilson "
                 "intervals over their samples.")
    return _save(fig, path), (
        "Valid rate, token valid rate and excess nll against the rule order N, one line per model. A model "
        "past its reach sits at token valid rate k/V and excess nll log V - entropy bound; the valid rate, "
        "which needs every constrained symbol right, falls before the token valid rate does." + band)


def plot_curves(rows: pd.DataFrame, path: Path) -> Drawn:
    block = rows[rows["metric"] == "nll"]
    curves = [(r["label"], r["order"], r["extra"].get("loss_curve") or {}) for _, r in block.iterrows()]
    curves = [c for c in curves if c[2].get("step")]
    if not curves:
        return None
    plt, orders = _plt(), sorted({o for _, o, _ in curves})
    bound = rows[rows["metric"] == "entropy_bound"].groupby("order")["value"].last()
    fig, axes = plt.subplots(1, len(orders), figsize=(3.4 * len(orders), 3.2), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], orders):
        for label in _labels(rows):
            for curve in [c for lab, o, c in curves if lab == label and o == n]:
                ax.plot(curve["step"], curve["loss"], label=label, lw=1)
        ax.axhline(bound.get(n, float("nan")), color="k", ls="--", lw=0.8, label="entropy bound")
        ax.set(title=f"N={n}: training loss", xlabel="step")
    axes[0][0].legend(fontsize=6)
    return _save(fig, path), (
        "Training loss of the neural models (dashed: the entropy bound). Learning is a plateau at log V "
        "followed by a drop, not a gradual descent: every context shorter than N-1 symbols is exactly "
        "uninformative, so there is no partial credit for a partial context. Under the table rule the "
        "plateau is long and lengthens fast with N (every subset of the N-1 symbols is uninformative "
        "too, as with sparse parities: Barak et al. 2022, \"Hidden Progress in Deep Learning\"); under "
        "the lag rule one symbol is the whole context, and the plateau stays short. A model still on "
        "it at the last step scores like a count model; a training loss below the bound is a model "
        "memorising its training sequences.")


def plot_bigram(rows: pd.DataFrame, path: Path) -> Drawn:
    found = _internals(rows, "bigram")
    if not found:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(found), figsize=(2.9 * len(found), 2.9), squeeze=False)
    for ax, (n, info) in zip(axes[0], found.items()):
        probs, rule = torch.tensor(info["probs"]), info.get("rule")
        ax.imshow(probs, vmin=0, vmax=1, cmap="viridis")
        for i, j in torch.cartesian_prod(*map(torch.arange, probs.shape)).tolist():
            mark = "*" if rule is not None and rule[i][j] else ""
            ax.text(j, i, f"{probs[i, j]:.2f}{mark}", ha="center", va="center", fontsize=7,
                    color="w" if probs[i, j] < 0.5 else "k")
        ax.set(title=f"bigram trained on N={n}", xlabel="next symbol", ylabel="previous symbol",
               xticks=range(probs.shape[1]), yticks=range(probs.shape[0]))
    return _save(fig, path), bigram_reading(found)


def bigram_reading(found: dict[int, dict]) -> str:
    parts = []
    for n, info in found.items():
        probs = torch.tensor(info["probs"])
        if info.get("rule") is not None:
            rule = torch.tensor(info["rule"], dtype=torch.double)
            gap = (probs - rule / rule.sum(-1, keepdim=True)).abs().max()
            parts.append(f"N={n}: the table is the rule itself (within {gap:.3f} of 1/k on the allowed "
                         "successors, marked *, and of 0 elsewhere)")
        else:
            parts.append(f"N={n}: flat, every entry within {(probs - 1 / probs.shape[1]).abs().max():.3f} of 1/V")
    return ("The bigram's P(next | previous), read off its counts. " + "; ".join(parts) + ". Above order 2 "
            "the previous symbol alone says nothing about the next one (by construction), so counting "
            "pairs can only learn the uniform law.")


def plot_mlp(rows: pd.DataFrame, path: Path) -> Drawn:
    found = _internals(rows, "mlp-ngram")
    usable = {n: info for n, info in found.items() if info.get("labels") and "?" not in info["labels"]}
    if not found:
        return None
    n, info = max(usable.items()) if usable else max(found.items())
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    emb = torch.tensor(info["embedding_pca"])
    axes[0].scatter(emb[:, 0], emb[:, 1], s=60)
    for i, (x, y) in enumerate(emb.tolist()):
        axes[0].annotate("pad" if i == len(emb) - 1 else str(i), (x, y), textcoords="offset points", xytext=(5, 5))
    axes[0].set(title=f"mlp-ngram trained on N={n}: embeddings C, PCA", xlabel="PC1", ylabel="PC2")
    if info.get("hidden_pca") is None:
        return _save(fig, path), "MLP embeddings; the window is too wide to draw every hidden state."
    hidden, windows = torch.tensor(info["hidden_pca"]), torch.tensor(info["windows"])
    _scatter_by(axes[1], hidden, [str(w[0]) for w in windows.tolist()], "oldest symbol in the window")
    _scatter_by(axes[2], hidden, ["{" + ",".join(lab) + "}" for lab in info["labels"]], "allowed next symbols")
    return _save(fig, path), mlp_reading(n, info, hidden, windows)


def _scatter_by(ax, coords: torch.Tensor, labels: list[str], title: str) -> None:
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        ax.scatter(coords[idx, 0], coords[idx, 1], s=18, label=label)
    ax.legend(fontsize=7, title=title, title_fontsize=7)
    ax.set(title=f"hidden tanh layer, all {len(labels)} windows, PCA", xlabel="PC1", ylabel="PC2")


def mlp_reading(n: int, info: dict, hidden: torch.Tensor, windows: torch.Tensor) -> str:
    width = windows.shape[1]
    shares = ", ".join(f"{_symbol(width - pos - 1)}: {_explained(hidden, windows[:, pos].tolist()):.0%}"
                       for pos in range(width))
    return (f"Left: the {len(info['embedding_pca']) - 1} symbol vectors and the padding vector of the MLP "
            f"trained on N={n}, on their first two principal components; the rule treats symbols as "
            "arbitrary labels, so (unlike Bengio et al.'s words) there is no similarity between them to "
            "find. Middle and right: the hidden layer on every window of symbols, on its first two "
            "principal components, coloured by one window symbol and by the allowed set. Share of the "
            f"variance in this plane explained by each window symbol ({shares}) and by the allowed set "
            f"({_explained(hidden, info['labels']):.0%}): the leading directions encode the window's "
            "symbols, and the output layer reads the allowed set off them (it is not a cluster in two "
            "dimensions).")


def _symbol(offset: int) -> str:
    return "symbol t" if offset == 0 else f"symbol t-{offset}"


def _explained(coords: torch.Tensor, labels: list) -> float:
    """Between-group share of the variance of `coords` (R^2 of a one-way grouping)."""
    total = ((coords - coords.mean(0)) ** 2).sum()
    within = sum(((coords[idx] - coords[idx].mean(0)) ** 2).sum()
                 for idx in ([i for i, lab in enumerate(labels) if lab == g] for g in set(labels)))
    return float(1 - within / total) if total > 0 else 0.0


def plot_attention(rows: pd.DataFrame, path: Path) -> Drawn:
    found = _internals(rows, "char-gpt-scratch")
    if not found:
        return None
    plt = _plt()
    maps = {n: torch.tensor(info["maps"]) for n, info in found.items()}  # (layer, head, T, T)
    layers, heads = next(iter(maps.values())).shape[:2]
    fig, axes = plt.subplots(len(maps), layers * heads, figsize=(2.6 * layers * heads, 2.6 * len(maps)),
                             squeeze=False)
    for row, (n, m) in enumerate(maps.items()):
        for col in range(layers * heads):
            ax = axes[row][col]
            ax.imshow(m[col // heads, col % heads], vmin=0, vmax=1, cmap="magma")
            ax.set_title(f"N={n} layer {col // heads} head {col % heads}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
        axes[row][0].set_ylabel("query position")
    for ax in axes[-1]:
        ax.set_xlabel("key position")
    return _save(fig, path), attention_reading(maps)


def attention_reading(maps: dict[int, torch.Tensor]) -> str:
    """Which offset each head attends to most, averaged over query positions >= 8."""
    lines = []
    for n, m in maps.items():
        heads = []
        for layer in range(m.shape[0]):
            for head in range(m.shape[1]):
                offset, weight = _favourite_offset(m[layer, head])
                heads.append(f"L{layer}H{head} {_symbol(offset)[7:]} ({weight:.2f})")
        lines.append(f"N={n}: " + ", ".join(heads))
    return ("Attention of char-gpt-scratch on one held-out sequence (rows: rule order N; bright = weight "
            "near 1). The symbol at t is already in the residual stream, so a model of order N needs "
            "the N-2 symbols before it (the lag rule: only the one N-2 back, the symbol that picks the next "
            "one's allowed set); a head that looks d positions back supplies symbol t-d. Favourite "
            "offset of each head (mean weight on it, query positions >= 8): " + "; ".join(lines) + ". "
            "Sharp bands at the needed offsets mean the transformer found the rule's window. At N=2 "
            "nothing has to be fetched, and attention stays diffuse although the model is right; at an "
            "order it has not learned, diffuse rows (or a column on the first position) mean it is still "
            "on the plateau.")


def _favourite_offset(attn: torch.Tensor, start: int = 8, max_offset: int = 8) -> tuple[int, float]:
    t_len = attn.shape[-1]
    means = [float(torch.stack([attn[t, t - d] for t in range(max(start, d), t_len)]).mean())
             for d in range(min(max_offset, t_len - 1) + 1)]
    best = max(range(len(means)), key=means.__getitem__)
    return best, means[best]
