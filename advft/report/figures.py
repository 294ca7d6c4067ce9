"""The report's PNGs (matplotlib, Agg backend, imported only when drawing): the final clean-vs-robust
trade-off (one point per alpha with its 95 % intervals, one colour per lr, or per loss when the sweep has
several), accuracy and training loss vs step, one line per alpha (panels per lr) and, when the sweep has
several lrs, per lr (panels per alpha), and final alpha x lr heatmaps whose colour scale spans the values
shown; with several losses, these per loss, plus accuracy vs step with one line per (loss, weight).

Lines are means over seeds with a ±std band; finished points are solid, running ones dashed, failed ones
dotted and end in a cross; points with nothing to draw are named under the figure. Strong-attack markers
carry their 95 % intervals (advft.report.stats).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

from advft.report.markdown import ACC_KEYS, num, weight_axis
from advft.report.runs import Sweep
from advft.report.stats import Point, Stat, aggregate, curve

LOSS_KEYS = (("adv_loss", "adversarial loss"), ("clean_loss", "clean loss"))


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: no display, works on a headless node
    import matplotlib.pyplot as plt

    return plt


def _margins(fig: Any, bottom: float, left: float = 0.7, right: float = 0.15, top: float = 0.35,
             wspace: float = 0.25, hspace: float = 0.3) -> None:
    """Fixed margins in inches: tight_layout would measure every tick label and doubles the drawing time."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=wspace, hspace=hspace)


def _style(p: Point) -> tuple[str, bool]:
    """(line style, cross at the end): finished -> solid; still running -> dashed; failed -> dotted + cross."""
    c = p.counts()
    if "finished" in c:
        return "-", False
    if "running" in c:
        return "--", False
    return ":", True


def _line_key(p: Point, by: str) -> Any:
    """What one line of a curve figure stands for: a value of alpha or lr, or a (loss, weight) point."""
    return p.name() if by == "loss" else getattr(p, by)


def _name(p: Point, by: str) -> str:
    return p.name() if by == "loss" else f"{by}={num(getattr(p, by))}"


def _label(p: Point, by: str) -> str:
    base = _name(p, by)
    n = len([r for r in p.runs if r.status != "missing"])
    extra = p.status_text()
    return base + (f" (n={n})" if n > 1 else "") + (f" [{extra}]" if extra else "")


def plot_curves(points: Sequence[Point], path: Path, *, by: str, kind: str,
                keys: Sequence[tuple[str, str]]) -> Path | None:
    """One panel per (quantity, value of the other axis); one line per value of ``by`` (alpha | lr | loss:
    one line per (loss, weight), panels per lr), mean over seeds with a ±std band. kind 'eval' adds the
    strong-attack initial/final as hollow markers."""
    other = "alpha" if by == "lr" else "lr"
    columns = sorted({getattr(p, other) for p in points})
    lines = sorted({_line_key(p, by) for p in points}, key=str if by == "loss" else None)
    if not columns:
        return None
    plt = _plt()
    from matplotlib.ticker import LogFormatter

    class PlainLog(LogFormatter):
        """LogFormatter's choice of which ticks get a label, written 0.03 rather than 3e-02."""

        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:.3g}" if super().__call__(x, pos) else ""

    fig, axes = plt.subplots(len(keys), len(columns), figsize=(4.2 * len(columns), 3.2 * len(keys) + 0.4),
                             squeeze=False, sharex="col")
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(lines)}
    not_drawn = []
    for row, (key, label) in enumerate(keys):
        for col, cv in enumerate(columns):
            ax = axes[row][col]
            for p in (p for p in points if getattr(p, other) == cv):
                runs = [r for r in p.runs if r.status != "missing"]
                steps, mean, std = curve(runs, kind, key)
                colour, (linestyle, cross) = colours[_line_key(p, by)], _style(p)
                if not steps:
                    if row == 0:
                        not_drawn.append(f"{_name(p, by)}, {other}={num(cv)}: "
                                         f"{p.status_text() or 'no records'}")
                    continue
                ax.plot(steps, mean, color=colour, linestyle=linestyle, label=_label(p, by))
                lo = [m - (s or 0.0) for m, s in zip(mean, std)]
                hi = [m + (s or 0.0) for m, s in zip(mean, std)]
                if any(s for s in std):
                    ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, linewidth=0)
                if cross:
                    ax.plot(steps[-1:], mean[-1:], marker="x", markersize=9, color=colour)
                if kind == "eval":
                    end = max(r.steps or steps[-1] for r in runs)
                    for when, st in ((0, p.initial(key)), (end, p.final(key))):
                        if st is not None:
                            ax.errorbar([when], [st.mean], yerr=_err(st), marker="o", markerfacecolor="none",
                                        color=colour, capsize=3, linestyle="none")
            ax.set_title(f"{label}, {other}={num(cv)}", fontsize=9)
            if row == len(keys) - 1:
                ax.set_xlabel("step")
            ys = [v for ln in ax.get_lines() for v in ln.get_ydata()]
            if key.endswith("loss") and ys and min(ys) > 0:
                ax.set_yscale("log")  # the losses fall over orders of magnitude
                # plain labels (0.3, not 3x10^-1): easier to read, and mathtext layout is slow
                ax.yaxis.set_major_formatter(PlainLog())
                ax.yaxis.set_minor_formatter(PlainLog(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
            if ax.get_lines():
                ax.legend(fontsize=7)
            else:
                alphas = {p.alpha for p in points if getattr(p, other) == cv}
                why = "no clean term at alpha = 0" if key == "clean_loss" and alphas == {0.0} else "nothing logged yet"
                ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="grey")
                ax.set_yticks([])
            ax.grid(alpha=0.3)
    notes = []
    if kind == "eval":
        notes.append("lines: routine attack; hollow circles: strong attack at step 0 and at the end, bars: 95 % "
                     "interval")
    elif any(p.alpha == 0 for p in points):
        notes.append("runs at alpha = 0 have no clean term, hence no clean-loss line")
    notes.append("solid: finished, dashed: running, dotted + x: failed; band: ±std over seeds")
    if not_drawn:
        notes.append("not drawn: " + "; ".join(sorted(set(not_drawn))))
    # ~17 characters per inch at 7 pt: wrap so a long "not drawn" list stays inside the figure
    text = "\n".join(textwrap.fill(n, width=int(fig.get_size_inches()[0] * 17)) for n in notes)
    fig.text(0.01, 0.005, text, fontsize=7, va="bottom")
    _margins(fig, bottom=0.5 + 0.13 * (text.count("\n") + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _err(st: Stat) -> list[list[float]]:
    """Asymmetric error bar of a 95 % interval (zero length when the interval is unknown)."""
    if not st.has_interval:
        return [[0.0], [0.0]]
    return [[st.mean - st.lo], [st.hi - st.mean]]  # type: ignore[operator]


def tradeoff_series(points: Sequence[Point]) -> list[tuple[str, Any, str, list[Point]]]:
    """The trade-off figure's series: (legend label, colour key, marker, finished points ordered by weight),
    one per (loss, lr). Coloured by lr (label ``lr=...``) when the points share one loss, else by loss (label
    the loss name, plus the lr when there are several, each lr its own marker shape)."""
    done = [p for p in points if p.final("clean_acc") is not None and p.final("robust_acc") is not None]
    lrs = sorted({p.lr for p in done})
    by_loss = len({p.loss for p in done}) > 1
    out = []
    for loss, lr in sorted({(p.loss, p.lr) for p in done}):
        line = sorted((p for p in done if p.lr == lr and p.loss == loss),
                      key=lambda p: p.alpha if p.alpha is not None else p.beta or 0.0)
        if by_loss:
            label = loss + (f", lr={num(lr)}" if len(lrs) > 1 else "")
            out.append((label, loss, "osD^v<>ph"[lrs.index(lr) % 9], line))
        else:
            out.append((f"lr={num(lr)}", lr, "o", line))
    return out


def plot_tradeoff(points: Sequence[Point], path: Path) -> Path | None:
    """Final clean (x) against final robust (y) accuracy, strong attack: one marker per (loss, weight, lr) with
    its 95 % intervals on both axes, its weight written next to it, a line through the weights of one loss at
    one lr (series: :func:`tradeoff_series`). Step 0 (the base encoder, the same for every loss) is a grey
    star per lr. None when no point has finished."""
    series = tradeoff_series(points)
    if not series:
        return None
    plt = _plt()
    keys = list(dict.fromkeys(key for _, key, _, _ in series))
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(keys)}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, key, marker, line in series:
        c_r = [(p, p.final("clean_acc"), p.final("robust_acc")) for p in line]
        for p, c, r in c_r:
            ax.errorbar([c.mean], [r.mean], xerr=_err(c), yerr=_err(r), marker=marker, color=colours[key],
                        capsize=3, linestyle="none")
            ax.annotate(p.weight() or p.loss, (c.mean, r.mean), textcoords="offset points", xytext=(5, 5), fontsize=8,
                        color=colours[key])
        ax.plot([c.mean for _, c, _ in c_r], [r.mean for _, _, r in c_r], color=colours[key], alpha=0.4,
                marker=marker, label=label)
    for lr in sorted({p.lr for _, _, _, line in series for p in line}):
        base = [(p.initial("clean_acc"), p.initial("robust_acc")) for _, _, _, line in series for p in line
                if p.lr == lr]
        base = [(c, r) for c, r in base if c is not None and r is not None]
        if base:
            c0, r0 = base[0]
            ax.errorbar([c0.mean], [r0.mean], xerr=_err(c0), yerr=_err(r0), marker="*", markersize=11, color="grey",
                        capsize=3, linestyle="none")
    ax.plot([], [], marker="*", color="grey", linestyle="none", label="step 0 (base encoder)")
    ax.set_xlabel("final clean accuracy (%)")
    ax.set_ylabel("final robust accuracy (%)")
    ax.set_title("clean vs robust accuracy (strong attack), bars: 95 % intervals", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _margins(fig, bottom=0.6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def colour_range(values: Sequence[float]) -> tuple[float, float]:
    """The heatmap's colour scale: the values' own range (a few points of margin when they are all equal),
    so that differences of a few points are visible instead of lost on a 0-100 scale."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        return lo - 1.0, hi + 1.0
    return lo, hi


def plot_heatmaps(points: Sequence[Point], path: Path) -> Path | None:
    """Final strong-attack clean and robust accuracy over alpha (rows; beta for trades and deacl) x lr (columns), mean and 95 % interval
    over finished seeds, each panel's colour scale fitted to its values; a cell without a finished run shows
    its status instead."""
    w = weight_axis(points)  # alpha, or beta for a loss without alpha
    alphas = sorted({getattr(p, w) for p in points}, key=lambda v: -1.0 if v is None else v)
    lrs = sorted({p.lr for p in points})
    if not alphas:
        return None
    plt = _plt()
    import numpy as np

    at = {(getattr(p, w), p.lr): p for p in points}
    width, height = max(4.0, 1.7 * len(lrs) + 1.8), max(3.0, 0.9 * len(alphas) + 1.8)
    fig, axes = plt.subplots(1, len(ACC_KEYS), figsize=(width * len(ACC_KEYS), height), squeeze=False)
    for ax, (key, label) in zip(axes[0], ACC_KEYS):
        grid = np.full((len(alphas), len(lrs)), np.nan)
        for i, a in enumerate(alphas):
            for j, lr in enumerate(lrs):
                p = at.get((a, lr))
                st = p.final(key) if p else None
                if st is not None:
                    grid[i, j] = st.mean
        cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")  # no finished run: grey, status written in
        finite = [float(v) for v in grid.ravel() if np.isfinite(v)]
        vmin, vmax = colour_range(finite) if finite else (0.0, 100.0)
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for i, a in enumerate(alphas):
            for j, lr in enumerate(lrs):
                p = at.get((a, lr))
                st = p.final(key) if p else None
                if st is None:
                    text, colour = (p.status_text() if p else "not in grid").replace(", ", "\n"), "black"
                else:
                    text = f"{st.mean:.1f}" + (f"\n{st.interval_text()}" if st.has_interval else "")
                    text += f"\n({st.n} seeds)" if st.n > 1 else ""
                    if p.status_text():
                        text += f"\n[{p.status_text()}]"
                    # viridis is dark in its lower half: white text there
                    colour = "white" if (st.mean - vmin) < 0.5 * (vmax - vmin) else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
        ax.set_xticks(range(len(lrs)), [num(v) for v in lrs])
        ax.set_yticks(range(len(alphas)), [num(v) for v in alphas])
        ax.set_xlabel("lr")
        ax.set_ylabel(w)
        ax.set_title(f"final {label}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _margins(fig, bottom=0.6, right=0.5, wspace=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _slug(setting: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in setting)


def render_figures(sweep: Sweep, fig_dir: Path) -> list[Path]:
    """All PNGs of the report, per setting: the clean-vs-robust trade-off (every loss in one figure) and,
    with several losses, accuracy vs step by (loss, weight); per setting and loss: accuracy and loss vs step
    by alpha (and by lr when there are several lrs) and the final heatmaps. The loss curves stay per loss:
    each loss defines its own terms, so their values are not comparable across losses."""
    points = aggregate(sweep.runs)
    many = len({p.loss for p in points}) > 1
    out: list[Path] = []
    for setting in sorted({p.setting for p in points}):
        sub = [p for p in points if p.setting == setting]
        pre = f"{_slug(setting)}_" if setting else ""
        out.append(plot_tradeoff(sub, fig_dir / f"{pre}tradeoff.png"))
        if many:
            out.append(plot_curves(sub, fig_dir / f"{pre}accuracy_by_loss.png", by="loss", kind="eval", keys=ACC_KEYS))
        for loss in sorted({p.loss for p in sub}):
            one = [p for p in sub if p.loss == loss]
            lpre = pre + (f"{_slug(loss)}_" if many else "")
            for by in ("alpha", "lr") if len({p.lr for p in one}) > 1 else ("alpha",):
                out.append(plot_curves(one, fig_dir / f"{lpre}accuracy_by_{by}.png", by=by, kind="eval", keys=ACC_KEYS))
                out.append(plot_curves(one, fig_dir / f"{lpre}loss_by_{by}.png", by=by, kind="train", keys=LOSS_KEYS))
            out.append(plot_heatmaps(one, fig_dir / f"{lpre}final_heatmaps.png"))
    return [p for p in out if p is not None]
