"""The run report: one self-contained HTML file that a person opens in a browser.

``fedseg report RUN_DIR`` (and ``fedseg simulate`` at its end) reads a run folder
and writes ``report.html``: Dice and training loss per round and site as plots, the
per-site table, the privacy budget spent, which sites failed or refused which
rounds, phase times, the plan, and, where the run folder holds them, the cross-site
evaluation and overlays of predicted masks.

The file has no scripts and loads nothing: styles are inline and plots are PNG
images embedded as ``data:`` URIs, so it can be mailed, archived or opened on a
machine without network access. Only what the run folder holds is shown; a section
whose data the run does not have says so rather than being filled in.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.history import MetricsHistory, RoundRecord, SiteRound
from server.report import by_class
from shared.atomic import write_text_atomic
from shared.errors import FedsegError
from shared.run_files import RunFiles

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# More overlays make the file large without telling a reader more.
MAX_OVERLAYS = 12
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; }
td { white-space: nowrap; }
td.text, th.text { text-align: left; white-space: normal; }
img { max-width: 100%; height: auto; }
figure { display: inline-block; margin: 0.4em; vertical-align: top; }
figcaption { font-size: 0.8em; color: #555; }
.note { color: #555; font-style: italic; }
.facts td, .facts th { text-align: left; }
"""


@dataclass(frozen=True)
class CrossSite:
    """A cross-site evaluation: ``dice[i][j]`` is model ``j`` on site ``i``'s cases."""

    sites: list[str]
    models: list[str]
    dice: list[list[float | None]]


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    """Write the report of the run in ``run_dir``; return the file written.

    Parameters
    ----------
    run_dir : Path
        A run folder: it holds ``metrics.json`` and may hold ``plan.json``,
        ``cross-site.json`` and ``overlays/``.
    output : Path or None
        The HTML file to write (default ``RUN_DIR/report.html``).

    Returns
    -------
    Path
        The file written.

    Raises
    ------
    FedsegError
        ``run_dir`` is not a run folder, one of its files cannot be read, or
        ``output`` cannot be written.
    """
    files = RunFiles(run_dir)
    text = render_report(files)
    target = output if output is not None else files.report_html
    if target.is_dir():
        raise FedsegError(f"--output {target}: is a folder; give a file name, "
                          "e.g. report.html")
    if not target.parent.is_dir():
        raise FedsegError(f"--output {target}: folder {target.parent} does not exist; "
                          "create it or give a file in an existing folder")
    write_text_atomic(target, text)
    return target


def render_report(files: RunFiles) -> str:
    """Return the report of the run folder ``files`` as one HTML document."""
    history = read_history(files)
    plan = _read_json_object(files.plan_json) if files.plan_json.is_file() else None
    cross = read_cross_site(files.cross_site_json) if files.cross_site_json.is_file() else None
    sites = sorted({s.site for r in history.rounds for s in r.sites})
    body = [
        _header(files, history, sites),
        _section("dice", "Validation Dice per round",
                 _series_plot(history, sites, "val_dice", "validation Dice",
                              "mean_val_dice", "no site reported a validation Dice")),
        _section("loss", "Training loss per round",
                 _series_plot(history, sites, "train_loss", "training loss",
                              "mean_train_loss", "no site reported a training loss")),
        _section("sites", "Per site", _site_table(history, sites)),
        _section("privacy", "Privacy budget spent", _privacy(history, sites)),
        _section("failures", "Failures and refusals", _failures(history)),
        _section("cross-site", "Cross-site evaluation", _cross_site(cross)),
        _section("overlays", "Predicted masks on validation images", _overlays(files)),
        _section("rounds", "Rounds and phase times", _rounds_table(history)),
        _section("plan", "Plan from the sites' data fingerprints", _plan(plan)),
        _section("config", "Run configuration", _config_table(history.run_config)),
    ]
    title = f"fedseg run report: {files.path.name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def read_history(files: RunFiles) -> MetricsHistory:
    """Read the run's ``metrics.json``, refusing a folder that is not a run folder."""
    if not files.path.is_dir():
        raise FedsegError(f"{files.path}: is not a folder; give a run folder (it holds "
                          f"{files.metrics_json.name}), e.g. runs/run-20250101-120000")
    if not files.metrics_json.is_file():
        raise FedsegError(f"{files.path}: has no {files.metrics_json.name}, so it is not a "
                          "run folder; give the folder a simulation or the ServerApp wrote")
    try:
        return MetricsHistory.read(files.metrics_json)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FedsegError(f"{files.metrics_json}: is not a fedseg metrics history "
                          f"({type(exc).__name__}: {exc}); give the metrics.json a fedseg "
                          "run wrote") from None


def read_cross_site(path: Path) -> CrossSite:
    """Read and check a cross-site evaluation file (format: ``RunFiles.cross_site_json``)."""
    raw = _read_json_object(path)
    fix = 'write {"sites": [...], "models": [...], "dice": [[...], ...]}, one row per site'
    sites, models, dice = raw.get("sites"), raw.get("models"), raw.get("dice")
    for key, value in (("sites", sites), ("models", models)):
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise FedsegError(f"{path}: '{key}' is not a non-empty list of names; {fix}")
    assert isinstance(sites, list) and isinstance(models, list)
    if not isinstance(dice, list) or len(dice) != len(sites):
        raise FedsegError(f"{path}: 'dice' needs {len(sites)} rows (one per site); {fix}")
    rows: list[list[float | None]] = []
    for site, row in zip(sites, dice, strict=True):
        if not isinstance(row, list) or len(row) != len(models):
            raise FedsegError(f"{path}: the row of site '{site}' needs {len(models)} values "
                              f"(one per model); {fix}")
        values: list[float | None] = []
        for model, value in zip(models, row, strict=True):
            ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool)
                                   and math.isfinite(value) and 0.0 <= value <= 1.0)
            if not ok:
                raise FedsegError(f"{path}: Dice of model '{model}' on site '{site}' is "
                                  f"{value!r}; give a number in [0, 1] or null")
            values.append(None if value is None else float(value))
        rows.append(values)
    return CrossSite(list(sites), list(models), rows)


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FedsegError(f"{path}: cannot be read as JSON ({exc}); fix or remove the "
                          "file") from None
    if not isinstance(raw, dict):
        raise FedsegError(f"{path}: holds a JSON {type(raw).__name__}, not an object; "
                          "fix or remove the file")
    return raw


# -- pieces of HTML -------------------------------------------------------------------


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "–" if value is None else format(value, fmt)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _section(anchor: str, title: str, content: str) -> str:
    return f'<section id="{anchor}">\n<h2>{_esc(title)}</h2>\n{content}\n</section>'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1,
           css: str = "") -> str:
    """Return a table; the first ``text_columns`` columns are left-aligned text.

    Cells are HTML already (callers escape), so a cell may carry markup.
    """
    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(f'<{tag} class="text">{c}</{tag}>' if i < text_columns
                       else f"<{tag}>{c}</{tag}>" for i, c in enumerate(row))

    klass = f' class="{css}"' if css else ""
    lines = [f"<table{klass}>", f"<thead><tr>{cells('th', head)}</tr></thead>", "<tbody>"]
    lines += [f"<tr>{cells('td', row)}</tr>" for row in rows]
    lines += ["</tbody>", "</table>"]
    return "\n".join(lines)


def _header(files: RunFiles, history: MetricsHistory, sites: list[str]) -> str:
    cfg = history.run_config
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    assert isinstance(model, dict)
    planned = cfg.get("num_server_rounds")
    rounds = f"{len(history.rounds)}" + (f" of {planned}" if planned else "")
    last = history.rounds[-1] if history.rounds else None
    described = [str(model["model-network"])] if model.get("model-network") else []
    if model.get("model-norm"):
        described.append(f"({model['model-norm']} norm)")
    if model.get("model-patch-size"):
        described.append(f"patch {model['model-patch-size']}")
    if model.get("model-adaptation") not in (None, "none"):
        described.append(f"adaptation {model['model-adaptation']}")
    facts = [
        ("run folder", _esc(files.path.name)),
        ("rounds completed", _esc(rounds)),
        ("sites", _esc(f"{len(sites)}: {', '.join(sites)}" if sites else "none reported")),
        ("strategy", _esc(cfg.get("strategy", "–"))),
        ("model", _esc(" ".join(described) or "–")),
        ("final mean validation Dice", _esc(_num(last.mean_val_dice if last else None))),
    ]
    rows = "\n".join(f'<tr><th class="text">{k}</th><td class="text">{v}</td></tr>'
                     for k, v in facts)
    return (f"<h1>fedseg run report: {_esc(files.path.name)}</h1>\n"
            f'<table class="facts">\n{rows}\n</table>')


def _field(entry: SiteRound | None, field: str) -> float | None:
    value = None if entry is None else getattr(entry, field)
    return None if value is None else float(value)


def _value(entry: SiteRound | None, field: str) -> float:
    """Return the field as a plot value: NaN (a gap in the line) where not reported."""
    value = _field(entry, field)
    return math.nan if value is None else value


def _entry(record: RoundRecord, site: str) -> SiteRound | None:
    return next((s for s in record.sites if s.site == site), None)


def _series_plot(history: MetricsHistory, sites: list[str], field: str, label: str,
                 mean_field: str | None, empty: str) -> str:
    rounds = [r.round for r in history.rounds]
    series = {site: [_value(_entry(r, site), field) for r in history.rounds] for site in sites}
    if not any(not math.isnan(v) for values in series.values() for v in values):
        return _note(empty)

    def draw(ax: Axes) -> None:
        for i, (site, values) in enumerate(series.items()):
            ax.plot(rounds, values, marker="o", color=f"C{i % 10}", label=site)
        if mean_field is not None:
            means = [math.nan if getattr(r, mean_field) is None else getattr(r, mean_field)
                     for r in history.rounds]
            ax.plot(rounds, means, color="black", linestyle="--", linewidth=2,
                    label="mean (case-weighted)")

    alt = f"{label} per round, one line per site"
    caption = ("A gap is a round in which the site reported no value (it failed, refused "
               "or was not selected).")
    return _plot(draw, label, alt) + "\n" + _note(caption)


def _plot(draw: Callable[[Axes], None], ylabel: str, alt: str) -> str:
    """Return an ``<img>`` with the figure ``draw`` makes, embedded as PNG."""
    # Imported here: matplotlib takes a second to load and only the report needs it.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A bare Figure renders with Agg and touches no global pyplot state or display.
    fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    draw(ax)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    width, height = (int(v) for v in fig.get_size_inches() * fig.dpi)
    return (f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}" '
            f'width="{width}" height="{height}">')


def _site_table(history: MetricsHistory, sites: list[str]) -> str:
    if not sites:
        return _note("No site reported in any round.")
    rows = []
    for name in sites:
        series = [(r.round, s) for r in history.rounds for s in r.sites if s.site == name]
        dices = [(rnd, s.val_dice) for rnd, s in series if s.val_dice is not None]
        best = max(dices, key=lambda d: d[1]) if dices else None
        final = series[-1][1]
        spent = [s for _, s in series if s.epsilon is not None]
        eps = "–" if not spent else _num(spent[-1].epsilon, ".2f") + (
            "" if spent[-1].delta is None else f" (δ {spent[-1].delta:g})")
        train_cases = max((s.num_train_cases or 0 for _, s in series), default=0)
        rows.append([
            _esc(name),
            _num(dices[0][1] if dices else None),
            f"{_num(best[1])} (round {best[0]})" if best else "–",
            _num(final.val_dice) + (f" (by class {by_class(final.val_dice_per_class)})"
                                    if final.val_dice_per_class else ""),
            str(final.num_val_cases or 0),
            str(train_cases),
            str(sum(s.train_steps or 0 for _, s in series)),
            _esc(eps),
            str(sum(1 for _, s in series if s.error)),
            str(sum(1 for _, s in series if s.refused)),
        ])
    last = history.rounds[-1]
    rows.append(["<b>mean (cases)</b>", "", "", _num(last.mean_val_dice), "", "", "", "", "",
                 ""])
    head = ["site", "first Dice", "best Dice", "final Dice", "val cases", "train cases",
            "steps (all rounds)", "final ε", "rounds failed", "rounds refused"]
    note = _note("Dice: foreground, per validation case at full resolution, averaged over "
                 "the site's cases (over the structures too where the labels code several; "
                 "each one's follows, in class order). Final: the site's last reported round.")
    return _table(head, rows) + "\n" + note


def _privacy(history: MetricsHistory, sites: list[str]) -> str:
    if not any(s.epsilon is not None for r in history.rounds for s in r.sites):
        return _note("No site reported a privacy budget: DP-SGD was off for this run.")
    head = ["round", *(_esc(s) for s in sites)]
    rows = [[str(r.round), *(_num(_field(_entry(r, s), "epsilon"), ".2f") for s in sites)]
            for r in history.rounds]
    deltas = sorted({f"{s.delta:g}" for r in history.rounds for s in r.sites
                     if s.delta is not None})
    note = _note("ε spent by each site so far (its privacy ledger, over all runs that used "
                 f"its data), at δ {', '.join(deltas) or '–'}. – : not reported that round.")

    def draw(ax: Axes) -> None:
        rounds = [r.round for r in history.rounds]
        for i, site in enumerate(sites):
            ax.plot(rounds, [_value(_entry(r, site), "epsilon") for r in history.rounds],
                    marker="o", color=f"C{i % 10}", label=site)

    return "\n".join([_plot(draw, "ε spent", "privacy budget spent per site per round"),
                      _table(head, rows), note])


def _failures(history: MetricsHistory) -> str:
    rows = []
    for r in history.rounds:
        for s in r.sites:
            if s.error:
                rows.append([str(r.round), _esc(s.site), "failed", _esc(s.error)])
            if s.refused:
                rows.append([str(r.round), _esc(s.site), "refused to train", _esc(s.refused)])
        if r.step_refused:
            rows.append([str(r.round), "(server)", "aggregated model refused",
                         _esc(f"{r.step_refused}; the previous global model was kept")])
        elif not r.aggregated:
            rows.append([str(r.round), "(server)", "not aggregated",
                         "too few sites returned usable weights; the previous global model "
                         "was kept"])
    if not rows:
        return _note("No site failed or refused a round, and every round's aggregated model "
                     "was accepted.")
    return _table(["round", "site", "what", "reason"], rows, text_columns=4)


def _cross_site(cross: CrossSite | None) -> str:
    if cross is None:
        return _note("Not available for this run: the run folder has no cross-site.json. "
                     "Evaluating every model on every site's validation cases happens at the "
                     "sites, and this run did not do it.")
    rows = []
    for site, values in zip(cross.sites, cross.dice, strict=True):
        cells = []
        for value in values:
            if value is None:
                cells.append("–")
                continue
            # Greener is better; lightness from 95% (Dice 0) to 55% (Dice 1).
            cells.append(f'<span style="display:block;background:hsl(140,45%,'
                         f'{95 - 40 * value:.0f}%)">{value:.3f}</span>')
        rows.append([_esc(site), *cells])
    head = ["site (validation cases) \\ model", *(_esc(m) for m in cross.models)]
    return (_table(head, rows) + "\n"
            + _note("Each cell: the model's mean foreground Dice on the site's validation "
                    "cases. – : not evaluated."))


def _overlays(files: RunFiles) -> str:
    folder = files.overlays
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pngs:
        return _note("No overlays in this run folder: a site's images never leave it, so "
                     "overlays appear only where a site published some to overlays/.")
    shown: list[str] = []
    skipped: list[str] = []
    for path in pngs:
        data = path.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            skipped.append(path.name)
            continue
        if len(shown) < MAX_OVERLAYS:
            b64 = base64.b64encode(data).decode("ascii")
            shown.append(f'<figure><img src="data:image/png;base64,{b64}" '
                         f'alt="{_esc(path.stem)}" style="max-width:340px">'
                         f"<figcaption>{_esc(path.name)}</figcaption></figure>")
    parts = shown[:]
    parts.append(_note("Predicted mask as contours on the image; uncertainty as a heat map."))
    if len(pngs) - len(skipped) > MAX_OVERLAYS:
        parts.append(_note(f"{len(pngs) - len(skipped) - MAX_OVERLAYS} more in {folder}."))
    if skipped:
        parts.append(_note(f"Not PNG images, left out: {', '.join(skipped)}."))
    return "\n".join(parts)


def _rounds_table(history: MetricsHistory) -> str:
    if not history.rounds:
        return _note("No round completed.")
    rows = []
    for r in history.rounds:
        total = (None if r.train_seconds is None or r.evaluate_seconds is None
                 else r.train_seconds + r.evaluate_seconds)
        model = "refused" if r.step_refused else "updated" if r.aggregated else "kept"
        replied = sum(1 for s in r.sites if not s.error)
        rows.append([str(r.round), f"{replied} of {len(r.sites)}", _num(r.mean_val_dice),
                     _num(r.mean_train_loss), _num(r.train_seconds, ".1f"),
                     _num(r.evaluate_seconds, ".1f"), _num(total, ".1f"), model])
    head = ["round", "sites replied", "mean val Dice", "mean train loss", "train s",
            "evaluate s", "total s", "global model"]
    return _table(head, rows)


def _plan(plan: dict[str, Any] | None) -> str:
    if plan is None:
        return _note("No plan: every planned setting was given in the run config.")
    reasons = plan.get("reasons")
    parts = []
    if isinstance(reasons, list) and reasons:
        parts.append("<ul>\n" + "\n".join(f"<li>{_esc(r)}</li>" for r in reasons) + "\n</ul>")
    config = plan.get("run-config")
    if isinstance(config, dict) and config:
        parts.append(_table(["key", "planned value"],
                            [[_esc(k), _esc(v)] for k, v in config.items()], text_columns=2))
    return "\n".join(parts) or _note("plan.json holds neither reasons nor settings.")


def _config_table(config: dict[str, Any]) -> str:
    if not config:
        return _note("The metrics history holds no run configuration.")
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key.replace("_", "-")] = value
    table = _table(["key", "value"], [[_esc(k), _esc(v)] for k, v in flat.items()],
                   text_columns=2)
    # Long and rarely needed: folded away, without a script (details/summary is HTML).
    return f"<details>\n<summary>All {len(flat)} settings</summary>\n{table}\n</details>"
