"""One self-contained HTML page per run (runs/<name>/report.html) built from whatever the run folder holds."""
from __future__ import annotations

import base64
import glob
import html
import json
import os
import tempfile
import time
import traceback

import numpy as np

from . import files, gradcam, heldout, medmnist_c, medmnist_c_eval, plots
from .config import Config
from .runs import benchmark_of, duration, read_history, read_json, run_date

# The sections in page order: (id, title). Each appears only when the run has what it shows.
SECTIONS = [("summary", "Summary"), ("config", "Config"), ("cleaning", "Cleaning"),
            ("augmentation", "Augmentation"), ("curves", "Training curves"), ("confusion", "Confusion matrix"),
            ("per-class", "Per-class precision, recall and F1"), ("robustness", "Robustness"),
            ("benchmark", "Benchmark"), ("export", "Export and checks"), ("gradcam", "Grad-CAM: worst mistakes")]

# Files a finished run has; the ones missing say how far a stopped run got.
EXPECTED = ("config.json", "cleaning.json", "split.npz", "history.json", "model.keras", "metrics.json", "model.onnx")

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; color: #1d2433; background: #f4f5f8;
       margin: 0; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 24px; margin: 12px 0 4px; }
h2 { font-size: 18px; margin: 0 0 10px; border-bottom: 2px solid #e2e5ec; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 12px 0 6px; color: #4a5468; }
section { background: #fff; border-radius: 8px; padding: 14px 18px; margin: 14px 0;
          box-shadow: 0 1px 3px rgba(0, 0, 0, .08); }
nav a { margin-right: 12px; color: #2856b6; text-decoration: none; white-space: nowrap; }
.muted { color: #6b7385; }
.warn { background: #fff4e0; border-left: 4px solid #f0a020; padding: 6px 10px; margin: 8px 0; }
.error { background: #fdeaea; border-left: 4px solid #d33; padding: 6px 10px; white-space: pre-wrap;
         font-family: monospace; font-size: 12px; }
table { border-collapse: collapse; margin: 4px 0 10px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid #e6e8ee; padding: 3px 10px; text-align: left; vertical-align: top; }
th { background: #f0f2f6; font-weight: 600; }
td.num, th.num { text-align: right; }
tr.changed td { background: #fff8d6; font-weight: 600; }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
.row > .figure { flex: 1 1 0; min-width: 320px; }
.figure img { max-width: 100%; height: auto; border: 1px solid #e6e8ee; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin-bottom: 4px; }
.card { background: #f7f8fb; border: 1px solid #e2e5ec; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.card b { display: block; font-size: 20px; }
.card.pass b { color: #18794e; }
.card.fail b { color: #c4320a; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(272px, 1fr)); gap: 10px; }
.mistake { border: 1px solid #e2e5ec; border-radius: 6px; padding: 6px; background: #fafbfc; }
.mistake img { width: 128px; height: 128px; }
.mistake .pred { color: #c4320a; font-weight: 600; }
.bar { display: block; min-width: 64px; background-repeat: no-repeat; }
.scroll { overflow-x: auto; }
details { margin: 6px 0; }
pre { background: #f7f8fb; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


# ---- entry point -------------------------------------------------------------------------------------

def write_report(run_dir: str, n_mistakes: int = 32, mistakes=None) -> str:
    """Write run_dir/report.html atomically from what the folder holds; return its path, or "" if it failed.

    Never raises: train.py calls it in a `finally:`, where an error here would hide the one that stopped the run.
    `mistakes` takes gradcam.Mistake objects already computed (the gradcam command), to skip recomputing them.
    """
    try:
        page = render(run_dir, n_mistakes, mistakes)
        path = os.path.join(run_dir, "report.html")
        files.write_bytes(path, page.encode("utf-8"))
        print(f"report: {path}", flush=True)
        return path
    except Exception as err:  # noqa: BLE001  see the docstring
        print(f"report: could not write the page for {run_dir}: {type(err).__name__}: {err}", flush=True)
        return ""


def render(run_dir: str, n_mistakes: int = 32, mistakes=None) -> str:
    run = RunFolder(run_dir)
    builders = {"summary": summary, "config": config_section, "cleaning": cleaning, "augmentation": augmentation,
                "curves": curves, "confusion": confusion, "per-class": per_class, "robustness": robustness,
                "benchmark": benchmark, "export": export_and_checks,
                "gradcam": lambda r: gradcam_gallery(r, n_mistakes, mistakes)}
    sections = []
    for sid, title in SECTIONS:
        body = guarded(builders[sid], run)
        if body:
            sections.append((sid, title, body))
    nav = " ".join(f'<a href="#{sid}">{esc(title.split(":")[0])}</a>' for sid, title, _ in sections)
    parts = [f'<section id="{sid}"><h2>{esc(title)}</h2>\n{body}\n</section>' for sid, title, body in sections]
    return page(f"Run {run.name}", f"<h1>Run {esc(run.name)}</h1>\n<nav>{nav}</nav>\n" + "\n".join(parts))


def guarded(build, run) -> str:
    """A section's HTML, or an error box in its place: one broken file must not cost the whole page."""
    try:
        return build(run)
    except Exception as err:  # noqa: BLE001
        tail = "".join(traceback.format_exception_only(type(err), err)).strip()
        return f'<div class="error">this section failed: {esc(tail)}</div>'


def page(title: str, body: str) -> str:
    # Written as well-formed XHTML-compatible HTML5 (closed void tags) so an XML parser can check it.
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\" />\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\" />\n"
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n{body}\n"
            f"<p class=\"muted\">Written {time.strftime('%Y-%m-%d %H:%M:%S')} by trainer/report.py.</p>\n"
            "</main>\n</body>\n</html>\n")


class RunFolder:
    """The run folder's files, read once; missing or half-written JSON reads as {}."""

    def __init__(self, run_dir: str):
        self.dir = run_dir
        self.name = os.path.basename(os.path.normpath(run_dir))
        self.config = read_json(self.path("config.json"))
        self.metrics = read_json(self.path("metrics.json"))
        self.cleaning = read_json(self.path("cleaning.json"))
        self.benchmark = benchmark_of(run_dir)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def has(self, name: str) -> bool:
        return os.path.exists(self.path(name))

    def scored(self) -> tuple[str, dict]:
        """The split the headline figures come from: test, else val."""
        for split in ("test", "val"):
            if self.metrics.get(split):
                return split, self.metrics[split]
        return "", {}


# ---- small HTML pieces -------------------------------------------------------------------------------

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def image_tag(path_or_bytes, alt: str, width: int | None = None) -> str:
    """An <img> with the PNG embedded as a data URI: the page needs no other file and no network."""
    if isinstance(path_or_bytes, bytes):
        data = path_or_bytes
    else:
        with open(path_or_bytes, "rb") as fh:
            data = fh.read()
    size = f' width="{width}"' if width else ""
    return (f'<img src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}" alt="{esc(alt)}"'
            f"{size} />")


def figure(run: RunFolder, name: str, caption: str) -> str:
    if not run.has(name):
        return ""
    return f'<div class="figure">{image_tag(run.path(name), caption)}<div class="muted">{esc(caption)}</div></div>'


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "-" if value is None else str(value)


def table(header: list[str] | None, rows: list[list], numeric: set[int] = frozenset(), row_class=None) -> str:
    """An HTML table of already-escaped cells; header None for a plain key-value list."""
    def td(i, v, tag="td"):
        return f'<{tag} class="num">{v}</{tag}>' if i in numeric else f"<{tag}>{v}</{tag}>"
    head = "<tr>" + "".join(td(i, esc(h), "th") for i, h in enumerate(header)) + "</tr>" if header else ""
    body = []
    for k, row in enumerate(rows):
        cls = row_class(k) if row_class else ""
        attr = f' class="{cls}"' if cls else ""
        body.append(f"<tr{attr}>" + "".join(td(i, v) for i, v in enumerate(row)) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def card(label: str, value: str, cls: str = "") -> str:
    return f'<div class="card {cls}"><span class="muted">{esc(label)}</span><b>{esc(value)}</b></div>'


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


# ---- sections ----------------------------------------------------------------------------------------

def summary(run: RunFolder) -> str:
    cfg, m = run.config, run.metrics
    split, scores = run.scored()
    corrupted = (m.get("robustness") or {}).get("corrupted", {})
    held = (m.get("heldout") or {}).get("corrupted", {})
    mmc = m.get("medmnist_c") or {}
    served = m.get("submission") or {}
    cards = [card(f"{split} accuracy", pct(scores["accuracy"])) if scores else "",
             card(f"{split} accuracy, as the zip serves it ({served['views']} views)", pct(served["clean"]))
             if served else "",
             card(f"{split} macro F1", f"{scores['macro_f1']:.4f}") if scores else "",
             card("held-out corrupted accuracy", pct(held["accuracy"])) if held else "",
             card(f"held-out, as the zip serves it ({served['views']} views)", pct(served["heldout"]))
             if served else "",
             card("MedMNIST-C accuracy", pct(mmc["overall"])) if mmc.get("overall") is not None else "",
             card(f"MedMNIST-C, as the zip serves it ({served['views']} views)",
                  pct(served["medmnist_c"]["overall"])) if served.get("medmnist_c", {}).get("overall") is not None
             else "",
             card("in-distribution corrupted accuracy", pct(corrupted["accuracy"])) if corrupted else "",
             card("epochs", fmt(m["epochs"])) if "epochs" in m else "",
             card("training time", duration(m["train_seconds"])) if "train_seconds" in m else ""]
    if not m:
        cards += progress_cards(run.dir)
    if run.has("model.onnx"):
        cards.append(card("ONNX size", f"{os.path.getsize(run.path('model.onnx')) / 1e6:.1f} MB"))
    if run.benchmark.get("verdict"):
        verdict = str(run.benchmark["verdict"])
        cards.append(card("benchmark", verdict, "pass" if verdict.upper() == "PASS" else "fail"))
    facts = (f"model <b>{esc(cfg.get('model') or m.get('model', '?'))}</b>, profile {esc(cfg.get('profile', '?'))}, "
             f"optimizer {esc(cfg.get('optimizer', '?'))}, started "
             f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(run_date(run.dir)))}")
    missing = [name for name in EXPECTED if not run.has(name)]
    if cfg.get("export") is False:
        missing = [name for name in missing if name != "model.onnx"]
    status = (f'<div class="warn">This run stopped early or is still running: no {esc(", ".join(missing))}. '
              f"The page shows what it has; resume with <code>python -m trainer train --resume {esc(run.dir)}</code>."
              "</div>") if missing else ""
    if split == "val":
        status += '<div class="muted">No test split (the test images were trained on): figures are on val.</div>'
    return f'<p>{facts}</p>{status}<div class="cards">{"".join(cards)}</div>'


def progress_cards(run_dir: str) -> list[str]:
    """How far a stopped run got: epochs logged and the best val accuracy its checkpoints saved."""
    epochs = len(partial_history(run_dir).get("accuracy", []))
    best = [read_json(p).get("val_accuracy") for p in glob.glob(os.path.join(run_dir, "**", "best.json"),
                                                                 recursive=True)]
    best = [b for b in best if isinstance(b, (int, float))]
    return ([card("epochs so far", str(epochs))] if epochs else []) + \
        ([card("best val accuracy so far", pct(max(best)))] if best else [])


def config_section(run: RunFolder) -> str:
    if not run.config:
        return ""
    defaults = Config().to_dict()
    items = sorted(run.config.items(), key=lambda kv: list(defaults).index(kv[0]) if kv[0] in defaults else 999)
    changed = [k for k, v in items if k in defaults and defaults[k] != v]
    chunk = -(-len(items) // 3)
    tables = []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        rows = [[esc(k), esc(fmt(v))] for k, v in part]
        marked = [k in changed for k, _ in part]
        tables.append(table(["key", "value"], rows, row_class=lambda i, m=marked: "changed" if m[i] else ""))
    return ('<p class="muted">Highlighted: differs from the Config default (set by the profile or a flag).</p>'
            f'<div class="row">{"".join(tables)}</div>')


def cleaning(run: RunFolder) -> str:
    c = run.cleaning
    if not c and not run.has("removed.png"):
        return ""
    reasons = [(k[len("removed_"):], v) for k, v in c.items() if k.startswith("removed_") and k != "removed_indices"]
    removed = sum(v for _, v in reasons)
    rows = [[esc("kept"), fmt(c.get("kept"))]] + [[esc(f"removed: {r.replace('_', ' ')}"), fmt(v)] for r, v in reasons]
    rows.append([esc("removed in all"), fmt(removed)])
    note = (f"Rare-colour threshold {fmt(c.get('rare_colour_threshold'))}; highest score among kept images "
            f"{fmt(c.get('rare_colour_max_kept'))}.") if "rare_colour_threshold" in c else ""
    # the contact sheet below the counts, at full width: its thumbnails are small already
    return (f'{table(["", "images"], rows, {1})}<p class="muted">{esc(note)}</p>'
            f'{figure(run, "removed.png", "Contact sheet of removed images")}')


def augmentation(run: RunFolder) -> str:
    return figure(run, "augmented.png", "Augmented training samples, under the originals they came from")


def curves(run: RunFolder) -> str:
    """curves.png of a finished run; for a stopped one, curves drawn now from the per-epoch CSV logs."""
    if run.has("history.json") and run.has("curves.png"):
        return figure(run, "curves.png", "Accuracy and loss per epoch, train and val")
    history = partial_history(run.dir)
    if not history:
        return ""
    from . import plots
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "curves.png")
        plots.curves(history, path)
        img = image_tag(path, "training curves so far")
    epochs = len(history.get("accuracy", []))
    return (f'<div class="figure">{img}<div class="muted">Accuracy and loss per epoch so far ({epochs} epochs, '
            f"from the phase logs)</div></div>")


def partial_history(run_dir: str) -> dict:
    """The phases' history.csv logs joined, of the run or (K-fold) of its first fold."""
    history: dict[str, list] = {}
    for base in (run_dir, os.path.join(run_dir, "fold0")):
        for phase in ("phase_train", "phase_finetune"):
            for k, v in read_history(os.path.join(base, phase, "history.csv")).items():
                history.setdefault(k, []).extend(v)
        if history:
            break
    return history


def confusion(run: RunFolder) -> str:
    figs = [figure(run, f"confusion_{s}.png", f"{s} split (rows: true class)") for s in ("test", "val")]
    return f'<div class="row">{"".join(figs)}</div>' if any(figs) else ""


def per_class(run: RunFolder) -> str:
    blocks = [class_table(split, run.metrics[split]) for split in ("test", "val") if run.metrics.get(split)]
    return f'<div class="row">{"".join(blocks)}</div>' if blocks else ""


def class_table(split: str, scores: dict) -> str:
    def bar(v):  # a cell shaded in proportion to the score, to spot the weak classes at a glance
        return (f'<span class="bar" style="background-image: linear-gradient(90deg, #cfe0ff {100 * v:.0f}%, '
                f'transparent {100 * v:.0f}%)">{v:.3f}</span>')
    rows = [[esc(name), bar(c["precision"]), bar(c["recall"]), bar(c["f1"]), str(c["support"])]
            for name, c in scores.get("per_class", {}).items()]
    rows.append(["<b>macro</b>", f"{scores['macro_precision']:.3f}", f"{scores['macro_recall']:.3f}",
                 f"{scores['macro_f1']:.3f}", str(scores.get("n", ""))])
    title = f"{split}: accuracy {scores['accuracy']:.4f} on {scores.get('n', '?')} images"
    header = ["class", "precision", "recall", "F1", "support"]
    return f"<div><h3>{esc(title)}</h3>{table(header, rows, {1, 2, 3, 4})}</div>"


def robustness(run: RunFolder) -> str:
    rob, held, mmc = run.metrics.get("robustness"), run.metrics.get("heldout"), run.metrics.get("medmnist_c")
    if not rob and not held and not mmc:
        return ""
    split, scores = run.scored()
    rows = [[esc(f"clean {split}"), pct(scores.get("accuracy")), fmt(scores.get("macro_f1"))]]
    parts = []
    if held:
        h = held.get("corrupted", {})
        rows.append([esc(f"held-out corrupted {split} (1-3 corruptions no training setting reaches)"),
                     pct(h.get("accuracy")), fmt(h.get("macro_f1"))])
        per_name = held.get("per_corruption", {})
        severities = list(next(iter(per_name.values()), {}))
        held_rows = [[esc(name), esc(heldout.FAMILY_OF.get(name, "?"))] + [f"{row[s]:.3f}" for s in severities]
                     for name, row in per_name.items()]
        parts.append("<h3>Accuracy per held-out corruption and severity</h3>"
                     + table(["corruption", "family"] + [f"severity {s}" for s in severities], held_rows,
                             set(range(2, 2 + len(severities))))
                     + f'<p class="muted">{esc(str(held.get("per_corruption_images", "?")))} images per corruption '
                       "and severity; corruptions and severities: docs/robustness.md.</p>")
    if mmc:
        unseen = sum(row.get("split") == "unseen" for row in mmc.get("per_corruption", {}).values())
        rows.append([esc(f"MedMNIST-C bloodmnist corruptions of {split}, mean of the 11 (published by others; "
                         f"{unseen} kinds unseen in this run's training)"), pct(mmc.get("overall")), "-"])
        parts.append(medmnist_c_table(mmc))
    if rob:
        corrupted = rob.get("corrupted", {})
        rows.append([esc(f"in-distribution corrupted {split} (1-3 suite corruptions, mostly seen in training)"),
                     pct(corrupted.get("accuracy")), fmt(corrupted.get("macro_f1"))])
        families = rob.get("per_family", {})
        levels = max((len(v) for v in families.values()), default=0)
        fam_rows = [[esc(f)] + [f"{a:.3f}" for a in accs] for f, accs in families.items()]
        fam_table = table(["family"] + [f"severity {s}" if s else "clean" for s in range(levels)], fam_rows,
                          set(range(1, levels + 1)))
        note = f"{rob['per_family_images']} images per family and severity." if "per_family_images" in rob else ""
        parts.append(f'<h3>In-distribution: accuracy per corruption family and severity</h3>{fam_table}'
                     f'<p class="muted">{esc(note)}</p>')
    plot = figure(run, "robustness.png", "In-distribution: accuracy against corruption severity, per family") \
        if rob else ""
    if (held or mmc) and corruption_gallery(run):
        parts.append(figure(run, GALLERY, "What the model is scored on: each held-out and MedMNIST-C corruption at "
                                          "severities 1, 3 and 5 on the same test cell, with the model's accuracy "
                                          "under that corruption and severity"))
    return (f'<div class="row"><div>{table(["images", "accuracy", "macro F1"], rows, {1, 2})}{"".join(parts)}</div>'
            f"{plot}</div>")


GALLERY = "corruption_gallery.png"


def corruption_gallery(run: RunFolder, severities=(1, 3, 5)) -> bool:
    """Draw GALLERY once, from the first cell of holdout.npz and the accuracies in metrics.json; False when the
    run has no holdout images. Stain deposit is left out when its inks are missing (the MedMNIST-C table says so)."""
    if run.has(GALLERY):
        return True
    if not run.has("holdout.npz"):
        return False
    with np.load(run.path("holdout.npz")) as data:
        cell = data["images"][0]
    keys = [str(s) for s in severities]
    rows = []
    held = (run.metrics.get("heldout") or {}).get("per_corruption", {})
    for name, family, images in heldout.preview_rows(cell, severities):
        rows.append((name, f"held-out {family}", images, [held.get(name, {}).get(k) for k in keys]))
    mmc = (run.metrics.get("medmnist_c") or {}).get("per_corruption", {})
    inks = medmnist_c.load_inks() if medmnist_c.inks_path() else None
    for kind in medmnist_c.KINDS:
        if kind == "stain_deposit" and inks is None:
            continue
        images = [medmnist_c.apply(cell[None], kind, s, np.random.default_rng(s), inks)[0] for s in severities]
        accuracies = [mmc.get(kind, {}).get("severities", {}).get(k) for k in keys]
        split = mmc.get(kind, {}).get("split") or medmnist_c.SPLIT[kind]  # the run's own, when its metrics have it
        rows.append((kind, f"MedMNIST-C {split}", images, accuracies))
    plots.corruption_preview(cell, rows, run.path(GALLERY), severities)
    return True


def medmnist_c_table(mmc: dict) -> str:
    """The MedMNIST-C figures: a row per corruption (seen or unseen in training, each severity, mean), the mean of
    the kinds per severity, and the overall, unseen and seen means."""
    severities = ["1", "2", "3", "4", "5"]

    def cells(values: dict) -> list[str]:
        return [f"{values[s]:.3f}" if s in values else "-" for s in severities]
    rows = [[esc(kind), esc(row.get("split", "?"))] + cells(row.get("severities", {})) + [f"{row['accuracy']:.3f}"]
            + [esc(medmnist_c_eval.first_turn(row))] for kind, row in mmc.get("per_corruption", {}).items()]
    rows.append(["<b>all kinds</b>", ""] + cells(mmc.get("per_severity", {}))
                + [f"<b>{mmc['overall']:.3f}</b>" if mmc.get("overall") is not None else "-", ""])
    means = (f"overall {pct(mmc.get('overall'))}, unseen kinds {pct(mmc.get('unseen'))}, seen kinds "
             f"{pct(mmc.get('seen'))}; the same images clean {pct(mmc.get('clean'))}")
    skipped = "".join(f'<div class="warn">{esc(kind)}: {esc(why)}</div>' for kind, why in
                      (mmc.get("skipped") or {}).items())
    return ("<h3>MedMNIST-C: accuracy per corruption and severity</h3>"
            + table(["corruption", "split"] + [f"severity {s}" for s in severities] + ["mean", "commonest new error"],
                    rows, set(range(2, 8)))
            + f'<p class="muted">{esc(means)}. {esc(str(mmc.get("images", "?")))} images, each under every '
              "corruption at one severity, severities in turn (a fifth of them at each); seen: training draws the "
              "same operation (docs/robustness.md). The commonest new error is the class pair that most of the "
              f"cells right clean and wrong under that corruption went to.</p>{skipped}")


def benchmark(run: RunFolder) -> str:
    """The benchmark's figures as they come: verdict and projection up top, its rows as a table with the union of
    their keys, other plain values as key-value pairs and nested ones as JSON under a fold."""
    b = run.benchmark
    if not b:
        return ""
    headline = {"verdict": b.get("verdict"), "projected_s": b.get("projected_s"), "limit_s": b.get("limit_s"),
                "margin": b.get("margin")}
    verdict = str(headline["verdict"] or "")
    cards = [card("verdict", verdict, "pass" if verdict.upper() == "PASS" else "fail")] if verdict else []
    cards += [card(k, fmt(v)) for k, v in headline.items() if k != "verdict" and v is not None]
    out = [f'<div class="cards">{"".join(cards)}</div>']
    rows = [r for r in b.get("rows") or [] if isinstance(r, dict)]
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        numeric = {i for i, k in enumerate(keys) if all(isinstance(r.get(k), (int, float)) for r in rows)}
        cells = [[esc(fmt(r.get(k))) for k in keys] for r in rows]
        out.append(f'<div class="scroll">{table(keys, cells, numeric)}</div>')
    rest = {k: v for k, v in b.items() if k not in headline and k != "rows"}
    plain = {k: v for k, v in rest.items() if not isinstance(v, (dict, list))}
    nested = {k: v for k, v in rest.items() if isinstance(v, (dict, list))}
    if plain:
        out.append(table(None, [[esc(k), esc(fmt(v))] for k, v in plain.items()]))
    if nested:
        out.append(f"<details><summary>More figures: {esc(', '.join(nested))}</summary>"
                   f"<pre>{esc(json.dumps(nested, indent=1, default=str))}</pre></details>")
    return "".join(out)


def export_and_checks(run: RunFolder) -> str:
    m = run.metrics
    rows = []
    export = m.get("export") or {}
    if export:
        parity = export.get("parity", {})
        rows.append(["ONNX model", esc(f"{export.get('bytes', 0) / 1e6:.2f} MB, opset {export.get('opset', '?')}, "
                                       f"{export.get('weights', 'float32')} weights")])
        rows.append(["ONNX parity with Keras", esc(f"max diff {fmt(parity.get('max_abs_diff'))} on "
                                                   f"{parity.get('images', '?')} images, same argmax "
                                                   f"{parity.get('same_argmax', '?')}")])
    if run.has("settings.json"):
        settings = {k: v for k, v in read_json(run.path("settings.json")).items() if k != "class_names"}
        rows.append(["settings.json", esc(json.dumps(settings))])
    bn = m.get("batchnorm_check")
    if bn and "skipped" in bn:
        rows.append(["BatchNorm check", esc(f"skipped: {bn['skipped']}")])
    elif bn:
        rows.append(["BatchNorm check", esc(f"training-mode accuracy {bn['training_mode_accuracy']:.4f}, "
                                            f"inference-mode {bn['inference_mode_accuracy']:.4f} "
                                            f"(gap {bn['gap']:+.4f} on {bn.get('images', '?')} train images)")])
    cv = m.get("cross_validation")
    if cv:
        folds = ", ".join(f"{a:.4f}" for a in cv.get("fold_val_accuracy", []))
        rows.append(["cross-validation", esc(f"{cv['mean']:.4f} +- {cv['std']:.4f} (folds: {folds})")])
    if m.get("train_images") is not None:
        rows.append(["training images", esc(m["train_images"])])
    return table(None, rows) if rows else ""


def gradcam_gallery(run: RunFolder, n: int, mistakes=None) -> str:
    """Cards of the worst mistakes on the holdout images: image, Grad-CAM overlay, true and predicted class."""
    from . import plots  # matplotlib, only for a page that has mistakes to draw
    if mistakes is None:
        if not run.has("holdout.npz") or n <= 0:
            return ""
        model = gradcam.load_run_model(run.dir)
        if model is None:
            return ""
        mistakes = gradcam.run_mistakes(run.dir, n, model)
    split = gradcam.holdout_split(run.dir)
    if not mistakes:
        return f"<p>No mistakes on the {esc(split)} images.</p>"
    cards = []
    for m in mistakes:
        cards.append(
            '<div class="mistake">'
            f'{image_tag(gradcam.png_bytes(m.image), f"{split} image {m.index}", 128)} '
            f'{image_tag(gradcam.png_bytes(plots.overlay(m.image, m.heatmap)), "Grad-CAM overlay", 128)}'
            f'<div>true <b>{esc(m.true_name)}</b></div>'
            f'<div class="pred">predicted {esc(m.predicted_name)} ({m.confidence:.1%})</div>'
            f'<div class="muted">{esc(split)} image #{m.index}</div></div>')
    grid = mistakes[0].grid
    coarse = ('<div class="warn">The last feature map is 1x1: these heatmaps cannot say where the model looked. '
              "Train with a larger --input-size for a spatial map.</div>") if grid and min(grid) < 2 else ""
    size = f" ({grid[0]}x{grid[1]}, upsampled to 96x96)" if grid else ""
    return (f'<p class="muted">The {len(mistakes)} wrong predictions made with the highest confidence on the '
            f"{esc(split)} images. Right: Grad-CAM of the predicted class over the last convolutional feature map"
            f"{size}; red = the regions that raised the wrong class's score most. Larger set: "
            f"<code>python -m trainer gradcam --run {esc(run.dir)} --n 64</code>.</p>"
            f'{coarse}<div class="gallery">{"".join(cards)}</div>')

