"""The HTML of RUN_DIR/report.html: one function per section, every string from a file escaped.

The page is self-contained: images are `data:image/png;base64,...` URIs, the
style sheet is inline, there is no script and nothing is fetched, so the file
can be mailed, archived or opened offline. Captions, config values, quarantine
keys and checkpoint ids are whatever the run's files hold, so each goes through
`html.escape` (`esc`) before it reaches the page. A section whose input is
absent says what is missing and how to produce it.
"""

from __future__ import annotations

import base64
import html
import math

from stablediff.evaluation.report_data import ReportData
from stablediff.run_schema import METRIC_MODES, metric_mode

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.missing { color: #8a5a00; background: #fff6e0; padding: .4em .7em; border-left: 3px solid #e0a000; }
.best-mark { color: #b00020; font-weight: bold; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f4f4f4; text-align: left; } tr.best td { background: #ffecec; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots img { max-width: 100%; margin: .5em 0; display: block; }
.plot-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: .5em; }
.grids { display: flex; gap: 1em; overflow-x: auto; align-items: flex-start; padding-bottom: .5em; }
.grids figure { margin: 0; padding: .3em; border: 2px solid transparent; flex: none; }
.grids figure.best { border-color: #b00020; }
.grids img { width: 220px; image-rendering: pixelated; display: block; }
figcaption { text-align: center; font-size: .9em; margin-top: .2em; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: .85em; }
"""


def esc(value: object) -> str:
    """Any value as text safe inside HTML (element content and quoted attributes)."""
    return html.escape(str(value), quote=True)


def img(png: bytes, alt: str, css_class: str = "") -> str:
    """An <img> whose source is the PNG itself, inline."""
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    klass = f' class="{esc(css_class)}"' if css_class else ""
    return f'<img{klass} src="{uri}" alt="{esc(alt)}">'


def missing(text: str) -> str:
    return f'<p class="missing">{esc(text)}</p>'


def page(data: ReportData, sections: list[str], written_at: str) -> str:
    title = f"stablediff report: {data.run_dir.name}"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
        f"<h1>{esc(title)}</h1>", f'<p>Run directory <code>{esc(data.run_dir)}</code>, report written {esc(written_at)}.</p>',
        *sections, "</body>", "</html>", ""])


def summary_section(data: ReportData) -> str:
    parts = ['<section id="summary">', "<h2>Summary</h2>"]
    if data.best is not None:
        best = data.best
        metric = str(best.get("metric", ""))
        direction = f" ({'lower' if metric_mode(metric) == 'min' else 'higher'} is better)" \
            if metric in METRIC_MODES else ""
        parts.append(f'<p id="best" class="best-mark" data-step="{esc(data.best_step)}">Best checkpoint: step '
                     f'{esc(data.best_step)}, by {esc(metric)} = {esc(_number(best.get("value")))}{direction}.</p>')
    else:
        parts.append(missing("No best checkpoint is marked yet: `stablediff eval RUN_DIR` (or evaluation "
                             "during training) writes the mark to eval.json."))
    if data.missing:
        parts.append("<p>Not found in the run directory yet:</p><ul>"
                     + "".join(f"<li>{esc(item)}</li>" for item in data.missing) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def losses_section(png: bytes | None) -> str:
    body = img(png, "training and validation loss against step") if png else \
        missing("No losses logged yet: metrics.jsonl has no training or validation step.")
    return f'<section id="losses" class="plots"><h2>Training and validation loss</h2>\n{body}\n</section>'


def metrics_section(data: ReportData, plots: dict[str, bytes]) -> str:
    parts = ['<section id="metrics" class="plots">', "<h2>Evaluation metrics</h2>"]
    if data.eval_rows:
        parts.append(_metrics_table(data))
    else:
        parts.append(missing("No checkpoint evaluated yet: run `stablediff eval RUN_DIR` to write eval.json."))
    if plots:
        parts += ['<div class="plot-grid">', *(img(png, f"{name} against step") for name, png in plots.items()), "</div>"]
    else:
        parts.append(missing("No evaluation metric against step to plot yet."))
    parts.append("</section>")
    return "\n".join(parts)


def _metrics_table(data: ReportData) -> str:
    names = [name for name in METRIC_MODES if any(name in row.get("metrics", {}) for row in data.eval_rows.values())]
    head = "".join(f"<th>{esc(name)}<br><small>{esc(_better(name))}</small></th>" for name in names)
    rows = []
    for step, entry in data.eval_rows.items():
        best = step == data.best_step
        cells = "".join(f'<td class="num">{esc(_result(entry.get("metrics", {}).get(name)))}</td>' for name in names)
        mark = '<span class="best-mark">&#9733; best</span>' if best else ""
        klass = ' class="best"' if best else ""
        rows.append(f'<tr data-step="{step}"{klass}><td>{step} {mark}</td>'
                    f'<td><code>{esc(entry.get("checkpoint", ""))}</code></td>{cells}</tr>')
    return ('<table id="eval-table"><tr><th>step</th><th>checkpoint</th>' + head + "</tr>\n"
            + "\n".join(rows) + "</table><p><small>value &plusmn; spread (n = sample count)</small></p>")


def samples_section(data: ReportData) -> str:
    parts = ['<section id="samples">', "<h2>Samples per checkpoint</h2>"]
    if not data.samples:
        parts += [missing("No sample grids yet: training writes samples/step-N.png every sample.every_steps steps."),
                  "</section>"]
        return "\n".join(parts)
    sample = data.config.get("sample") if isinstance(data.config.get("sample"), dict) else {}
    prompts = sample.get("prompts") if isinstance(sample.get("prompts"), list) else []
    parts.append(f"<p>The same prompts and seeds at every checkpoint (seed {esc(sample.get('seed', '?'))}, "
                 f"{esc(sample.get('per_prompt', '?'))} per prompt)" + ("; rows, top to bottom:</p>" if prompts else ".</p>"))
    if prompts:
        parts.append('<ol id="prompts">' + "".join(f"<li>{esc(prompt)}</li>" for prompt in prompts) + "</ol>")
    figures = []
    for step, path in data.samples:
        best = step == data.best_step
        caption = f"step {step}" + (' <span class="best-mark">&#9733; best</span>' if best else "")
        klass = ' class="best"' if best else ""
        figures.append(f'<figure data-step="{step}"{klass}>'
                       f'{img(path.read_bytes(), f"samples at step {step}")}<figcaption>{caption}</figcaption></figure>')
    parts += ['<div class="grids">', *figures, "</div>", "</section>"]
    return "\n".join(parts)


def confusion_section(data: ReportData, png: bytes | None) -> str:
    parts = ['<section id="confusion" class="plots">', "<h2>Digits confusion matrix</h2>"]
    if data.confusion is None or png is None:
        parts.append(missing("Adherence has not been evaluated yet: `stablediff eval RUN_DIR --metrics adherence` "
                             "writes the confusion matrix."))
    else:
        step = data.confusion.step
        which = "the best checkpoint" if step == data.best_step else "the newest checkpoint evaluated for adherence"
        result = data.eval_rows[step]["metrics"]["adherence"]
        scores = ", ".join(f"{name} {esc(_number(result.get(name)))}" for name in ("precision", "recall", "f1")
                           if name in result)
        parts.append(f"<p>Step {step} ({which}): rows are the digit asked for, columns the digit the classifier "
                     f"read. Adherence {esc(_number(result.get('value')))}"
                     + (f"; macro {scores}" if scores else "") + ".</p>")
        parts.append(img(png, f"confusion matrix at step {step}"))
    parts.append("</section>")
    return "\n".join(parts)


def data_section(data: ReportData) -> str:
    parts = ['<section id="data">', "<h2>Data</h2>"]
    config_data = data.config.get("data") if isinstance(data.config.get("data"), dict) else {}
    facts = [(key, config_data[key]) for key in ("source", "validation_source", "resolution", "held_out_fraction")
             if config_data.get(key) is not None]
    facts += [(key.replace("_", " "), value) for key, value in data.counts.items()]
    facts.append(("rejected samples (quarantine.jsonl)", sum(data.rejects.values())))
    parts.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts) + "</table>")
    if data.rejects:
        rows = "".join(f"<tr><td>{esc(reason)}</td><td class=\"num\">{count}</td>"
                       f"<td>{esc(', '.join(data.reject_examples.get(reason, [])))}</td></tr>"
                       for reason, count in data.rejects.most_common())
        parts.append('<table id="quarantine"><tr><th>reason</th><th>samples</th><th>for example</th></tr>'
                     + rows + "</table>")
    else:
        parts.append("<p>No sample was rejected (quarantine.jsonl is empty or absent).</p>")
    parts.append("</section>")
    return "\n".join(parts)


def config_section(data: ReportData) -> str:
    body = f"<pre>{esc(data.config_text)}</pre>" if data.config_text is not None else \
        missing("No config.yaml in the run directory yet: training writes the resolved config there.")
    return f'<section id="config"><h2>Resolved config</h2>\n{body}\n</section>'


def _better(name: str) -> str:
    return "lower is better" if metric_mode(name) == "min" else "higher is better"


def _result(result: object) -> str:
    """"value ± spread (n = count)" of one eval.json metric entry; "" when absent."""
    if not isinstance(result, dict):
        return ""
    text = _number(result.get("value"))
    if _is_number(result.get("spread")):
        text += f" \u00b1 {_number(result['spread'])}"
    if isinstance(result.get("count"), int):
        text += f" (n = {result['count']})"
    return text


def _number(value: object) -> str:
    return f"{value:.4g}" if _is_number(value) else str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
