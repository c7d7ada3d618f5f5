"""docs/results.md from the comparison's per-run records (results/*.json): table, ρ sweep, plot, sample grids.

    python experiments/compare.py report
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections import defaultdict

ORDER = ("no_finetune", "nonprivate_lora", "dp_sapf", "dp_lora", "random_selection", "layer_selection", "wo_lora",
         "dp_finetune", "exponential_selection", "ptr_selection", "snip_selection", "synflow_selection", "debiased_selection", "free_selection",
         "free_selection_reset", "pe", "dp_mepf")
LABELS = {"no_finetune": "no fine-tuning (public model)", "nonprivate_lora": "LoRA, all attention, no DP",
          "dp_sapf": "**DP-SAPF** (ρ = {rho:g})", "dp_lora": "DP-LoRA (all attention)",
          "random_selection": "random selection (ρ = {rho:g})", "layer_selection": "layer-level selection",
          "wo_lora": "DP-SAPF w/o LoRA (direct)", "dp_finetune": "DP-Finetune (all UNet)",
          "exponential_selection": "DP-SAPF, exponential mechanism", "ptr_selection": "DP-SAPF, propose-test-release",
          "snip_selection": "DP-SAPF, SNIP score", "synflow_selection": "DP-SAPF, SynFlow score (data-free)",
          "debiased_selection": "DP-SAPF, debiased Gaussian score",
          "free_selection": "warm-up selection from DP-SGD's noisy gradients (ρ = {rho:g}, no extra ε)",
          "free_selection_reset": "warm-up selection, dropped warm-up LoRA removed (ρ = {rho:g})", "pe": "PE (Private Evolution, no fine-tuning)",
          "dp_mepf": "DP-MEPF (feature-mean release + generator, no diffusion model)"}
METRICS = (("fid_train", "FID ↓"), ("accuracy_wrn", "WRN acc ↑"), ("accuracy_resnet", "ResNet acc ↑"))


def load(results_dir: str) -> list[dict]:
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(results_dir, "*.json")))]


def mean_std(values: list[float], decimals: int | None = None) -> str:
    """mean ± sample standard deviation; 3 decimals under 10 and 1 above unless `decimals` is given."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    d = decimals if decimals is not None else (3 if mean < 10 else 1)
    if len(values) == 1:
        return f"{mean:.{d}f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.{d}f} ± {std:.{d}f}"


def main_table(records: list[dict], rho: float) -> list[str]:
    groups = defaultdict(list)
    for r in records:
        if r["rho"] in (None, rho):
            groups[(r["method"], r["epsilon"])].append(r)
    metrics = [(key, name) for key, name in METRICS if any(r["metrics"].get(key) is not None for r in records)]
    lines = ["| method | target ε | seeds | " + " | ".join(name for _, name in metrics) +
             " | ε achieved | selection share of ε | wall time (min) |", "|---" * (6 + len(metrics)) + "|"]
    for (method, eps), rs in sorted(groups.items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1] or math.inf)):
        share = [r["budget_split"].get("selection_share") for r in rs if r.get("budget_split")]
        lines.append(
            f"| {label(method, rho)} | {'∞' if eps is None else f'{eps:g}'} | {len(rs)} | "
            + " | ".join(mean_std([r["metrics"].get(key) for r in rs]) for key, _ in metrics)
            + f" | {mean_std([r['epsilon_achieved'] for r in rs if r['epsilon_achieved'] not in (None, math.inf)])}"
            + f" | {mean_std([s * 100 for s in share]) + ' %' if share else '–'}"
            + f" | {mean_std([sum(r['wall_time_s'].values()) / 60 for r in rs], decimals=1)} |")
    return lines


README_START, README_END = "<!-- headline table: experiments/results_report.py -->", "<!-- end of headline table -->"


def headline_block(results_dir: str) -> str:
    """The README's results table: the headline methods' rows of `results_dir` (mean ± s over seeds), generated
    so that the README can never quote other numbers than the records (tests/test_compare.py checks it)."""
    records = [r for r in load(results_dir) if r["method"] in HEADLINE + ("free_selection",)]
    rho = next((r["settings"].get("select_ratio", 0.3) for r in records), 0.3)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in main_table(records, rho)]
    wanted = ("method", "target ε", "seeds", "FID ↓", "WRN acc ↑", "ε achieved")
    columns = [rows[0].index(name) for name in wanted]
    keep = [[row[i] for i in columns] for row in rows]
    lines = ["| " + " | ".join(row) + " |" for row in keep[:1]] + ["|---" * len(columns) + "|"] + \
            ["| " + " | ".join(row) + " |" for row in keep[2:]]
    return "\n".join([README_START, *lines, README_END])


def update_readme(readme: str, results_dir: str) -> bool:
    """Rewrite the README's generated block (between its markers) from the records; False when it has none."""
    text = open(readme, encoding="utf-8").read()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    with open(readme, "w", encoding="utf-8") as f:
        f.write(head + headline_block(results_dir) + tail)
    return True


def rho_table(records: list[dict]) -> list[str]:
    sweep = sorted((r for r in records if r["method"] == "dp_sapf" and r["rho"] is not None
                    and r["epsilon"] == max(x["epsilon"] for x in records if x["epsilon"] is not None)),
                   key=lambda r: (r["rho"], r["seed"]))
    if len({r["rho"] for r in sweep}) < 2:
        return []
    lines = ["| ρ | seeds | selected / candidates | selection share of ε | FID ↓ | WRN acc ↑ | selected matrices (first seed) |",
             "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in sweep:
        if r["rho"] in seen:
            continue
        seen.add(r["rho"])
        same = [x for x in sweep if x["rho"] == r["rho"]]
        chosen = ", ".join(short_name(n) for n in r["selected_matrices"])
        lines.append(f"| {r['rho']:g} | {len(same)} | {len(r['selected_matrices'])} / {r['num_candidates']} | "
                     f"{100 * r['budget_split']['selection_share']:.1f} % | "
                     f"{mean_std([x['metrics'].get('fid_train') for x in same])} | "
                     f"{mean_std([x['metrics'].get('accuracy_wrn') for x in same])} | {chosen} |")
    return lines


PAIRS = (("dp_sapf", "dp_lora"), ("dp_sapf", "random_selection"), ("free_selection", "dp_sapf"),
         ("free_selection", "dp_lora"))


def pairwise_table(records: list[dict], rho: float, key: str = "accuracy_wrn") -> list[str]:
    """The headline comparisons at each ε by a rule fixed before the runs: the difference of the two means counts
    when it exceeds 2 s, s = √(s_a²/n_a + s_b²/n_b) (each method's sample standard deviation over its seeds);
    otherwise it is not resolved. Pairs where either side has fewer than two seeds are listed as not testable."""
    def values(method, eps):
        return [r["metrics"][key] for r in records if r["method"] == method and r["epsilon"] == eps
                and r["rho"] in (None, rho) and r["metrics"].get(key) is not None]

    def stats(v):
        m = sum(v) / len(v)
        return m, (sum((x - m) ** 2 for x in v) / (len(v) - 1) if len(v) > 1 else math.nan)

    lines = []
    for eps in sorted({r["epsilon"] for r in records if r["epsilon"] is not None}):
        for a, b in PAIRS:
            va, vb = values(a, eps), values(b, eps)
            if not va or not vb:
                continue
            (ma, vara), (mb, varb) = stats(va), stats(vb)
            diff = ma - mb
            if len(va) < 2 or len(vb) < 2:
                verdict, spread = f"not testable ({len(va)} and {len(vb)} seeds)", "–"
            else:
                s_diff = math.sqrt(vara / len(va) + varb / len(vb))
                spread = f"{s_diff:.3f}"
                verdict = (f"**{label(a, rho).replace('*', '')} higher**" if diff > 2 * s_diff else
                           f"**{label(b, rho).replace('*', '')} higher**" if -diff > 2 * s_diff else "not resolved")
            lines.append(f"| {eps:g} | {label(a, rho).replace('*', '')} − {label(b, rho).replace('*', '')} | "
                         f"{len(va)} / {len(vb)} | {diff:+.3f} | {spread} | {verdict} |")
    if not lines:
        return []
    return ["| target ε | difference of WRN accuracy | seeds | mean difference | "
            "s of the difference, √(s_a²/n_a + s_b²/n_b) | verdict (counts when the absolute difference > 2 s) |",
            "|---|---|---|---|---|---|", *lines]


def overlap_table(records: list[dict], rho: float) -> list[str]:
    """What the warm-up selection (free_selection) keeps against DP-SAPF's Gaussian-query mask of the same seed and
    ε: shared matrices out of k, beside the k²/M two random masks of size k share on average."""
    def masks(method):
        return {(r["epsilon"], r["seed"]): r for r in records
                if r["method"] == method and r["rho"] == rho and r.get("selected_matrices")}

    # the kept variant's mask where it has a record, else the other variant's (a run of its own: another secret draw)
    free, sapf = {**masks("free_selection_reset"), **masks("free_selection")}, masks("dp_sapf")
    pairs = sorted(set(free) & set(sapf))
    if not pairs:
        return []
    lines = ["| target ε | seed | shared / k | random masks share (k²/M) | only in the warm-up mask (first 6) |",
             "|---|---|---|---|---|"]
    for eps, seed in pairs:
        a, b = set(free[eps, seed]["selected_matrices"]), set(sapf[eps, seed]["selected_matrices"])
        k, m = len(a), free[eps, seed]["num_candidates"]
        only = ", ".join(short_name(n) for n in sorted(a - b)[:6])
        lines.append(f"| {eps:g} | {seed} | {len(a & b)} / {k} | {k * k / m:.1f} | {only or '–'} |")
    return lines


def short_name(module: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k' -> 'down1.0.attn2.k'; mid block: 'mid.0.attn1.q'."""
    parts = module.split(".")
    block = parts[0].replace("_blocks", "").replace("_block", "")
    index = parts[1] if parts[1].isdigit() else ""
    attention = parts[parts.index("attentions") + 1] if "attentions" in parts[:-1] else ""
    layer = next((p for p in parts if p.startswith("attn")), "?")
    return f"{block}{index}.{attention}.{layer}.{parts[-1][-1]}"


def versions_line(records: list[dict]) -> str:
    """Each package's versions over all runs ("accelerate 1.15.0 / 1.16.0" when runs used different ones)."""
    seen: dict[str, list[str]] = {}
    for r in records:
        for package, version in r.get("versions", {}).items():
            if version not in seen.setdefault(package, []):
                seen[package].append(version)
    return ", ".join(f"{package} {' / '.join(v)}" for package, v in seen.items()) or "not recorded"


def label(method: str, rho: float) -> str:
    return LABELS.get(method, method).format(rho=rho)


def plot(records: list[dict], path: str, rho: float) -> None:
    """Accuracy and FID against ε: one distinct colour and marker per method (tab20, fixed by ORDER, so a method
    keeps its colour on every page), mean over seeds with ± s error bars, the privacy-free rows as grey lines, the
    legend below the axes (never over the data)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    by_method = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["rho"] in (None, rho) and r["epsilon"] is not None:
            by_method[r["method"]][r["epsilon"]].append(r)
    palette = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    for ax, (key, title) in zip(axes, (METRICS[1], METRICS[0])):
        for method in ORDER:
            if method not in by_method:
                continue
            eps = sorted(by_method[method])
            values = [[r["metrics"][key] for r in by_method[method][e] if r["metrics"].get(key) is not None]
                      for e in eps]
            kept = [(e, v) for e, v in zip(eps, values) if v]
            if not kept:
                continue
            means = [sum(v) / len(v) for _, v in kept]
            spreads = [math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
                       for (_, v), m in zip(kept, means)]
            i = ORDER.index(method)
            ax.errorbar([e for e, _ in kept], means, yerr=spreads, marker=markers[i % len(markers)], capsize=3,
                        color=palette[(2 * i) % 20 if i < 10 else (2 * (i - 10) + 1) % 20],
                        label=label(method, rho).replace("*", ""))
        for method, style in (("no_finetune", ":"), ("nonprivate_lora", "--")):
            ref = [r["metrics"].get(key) for r in records if r["method"] == method]
            if ref and ref[0] is not None:
                ax.axhline(ref[0], linestyle=style, color="grey", label=label(method, rho))
        ax.set_xscale("log")
        ax.set_xlabel("ε")
        ax.set_title(title + " (mean ± s over seeds)", fontsize=9)
    handles, labels_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels_, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.03 + 0.035 * math.ceil(len(handles) / 2), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


DATASETS = {"fashion_mnist": "Fashion-MNIST", "mnist5k": "MNIST-5k (public stand-in)"}
STAGES = ("select", "train", "pe", "mepf", "sample", "evaluate")


def stage_table(records: list[dict]) -> list[str]:
    """Mean wall time of each script stage per method: where the compute goes."""
    lines = ["| method | " + " | ".join(STAGES) + " |", "|---" * (1 + len(STAGES)) + "|"]
    for method in [m for m in ORDER if any(r["method"] == m for r in records)]:
        rs = [r for r in records if r["method"] == method]
        cells = []
        for stage in STAGES:
            values = [r["wall_time_s"][stage] / 60 for r in rs if stage in r.get("wall_time_s", {})]
            cells.append(f"{sum(values) / len(values):.1f} ({len(values)})" if values else "–")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def labelled_grids(records: list[dict], method: str, rho: float, results_dir: str) -> str | None:
    """<results_dir>/grids/labelled/<method>.png: the method's first-seed preview grid at every ε side by side, each
    panel titled with its ε and each row with its class name (the previews themselves carry no text)."""
    from PIL import Image

    rs = [r for r in records if r["method"] == method and r["rho"] in (None, rho)]
    panels = []
    for eps in sorted({r["epsilon"] for r in rs}, key=lambda e: math.inf if e is None else e):
        first = sorted((r for r in rs if r["epsilon"] == eps), key=lambda r: r["seed"])[0]
        path = os.path.join(results_dir, "grids", f"{first['name']}.png")
        if os.path.isfile(path):
            caption = ("no private data" if method == "no_finetune" else "no DP") if eps is None else f"ε = {eps:g}"
            panels.append((caption, Image.open(path).convert("RGB")))
    if not panels:
        return None
    from dp_sapf.data import resolve_classes

    names = resolve_classes(CLASS_SETS.get(rs[0]["settings"].get("dataset", "fashion_mnist"), "fashion_mnist"))[0]
    return labelled_panels(panels, names, os.path.join(results_dir, "grids", "labelled", f"{method}.png"))


def labelled_panels(panels: list[tuple], class_names: list[str], out: str) -> str:
    """Preview grids (one row per class) side by side, each titled with its caption, each row with its class name."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    # PIL's built-in font has no ε: matplotlib's bundled DejaVu Sans has every glyph the captions use
    font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), 11)
    margin, title, gap = 78, 16, 8
    height = max(grid.height for _, grid in panels)
    canvas = Image.new("RGB", (margin + sum(grid.width + gap for _, grid in panels), title + height), "white")
    draw = ImageDraw.Draw(canvas)
    row = height / len(class_names)
    for c, name in enumerate(class_names):
        draw.text((2, title + row * c + row / 2 - 6), name, fill="black", font=font)
    x = margin
    for caption, grid in panels:
        canvas.paste(grid, (x, title))
        draw.text((x + 2, 1), caption, fill="black", font=font)
        x += grid.width + gap
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    canvas.save(out)
    return out


CLASS_SETS = {"fashion_mnist": "fashion_mnist", "mnist5k": "mnist"}  # a record's dataset -> its built-in class list


def pending_line(records: list[dict], planned: list[str] | None) -> list[str]:
    """The runs of the plan without a record yet: a page written while the comparison runs says it is partial."""
    done = {r["name"] for r in records}
    missing = [name for name in planned or [] if name not in done]
    if not missing:
        return []
    return [f"**Partial: {len(planned) - len(missing)} of {len(planned)} runs have a record.** Still to come: "
            + ", ".join(f"`{name}`" for name in missing) + ".", ""]


def pe_line(records: list[dict]) -> list[str]:
    """PE's own settings, as its first record has them (it trains nothing: B, T and lr do not apply)."""
    pe = next((r["settings"] for r in records if r["method"] == "pe"), None)
    if pe is None:
        return []
    return [f"- PE (no training): a population of {pe['num_synthetic']} images, {pe['pe_iterations']} iterations of "
            f"noisy nearest-neighbour votes on {pe.get('pe_embedding', 'inception')} embeddings, img2img strength "
            f"{pe['pe_strength_start']} → {pe['pe_strength_end']}, count threshold "
            f"{pe.get('pe_count_threshold') or 'private_evolution.py default (2σ)'}; the same sampler settings."]


def mepf_line(records: list[dict]) -> list[str]:
    """DP-MEPF's own settings, as its first record has them (no diffusion model, no DP-SGD)."""
    mepf = next((r["settings"] for r in records if r["method"] == "dp_mepf"), None)
    if mepf is None:
        return []
    return [f"- DP-MEPF (no diffusion model): one Gaussian release of per-class means of unit-norm pooled TF-Inception "
            f"features (75 px) with noisy class counts, then a generator trained on that release alone: "
            f"{mepf['mepf_iterations']} Adam updates of {mepf['mepf_batch_size']} images, lr "
            f"{mepf['mepf_learning_rate']}; {mepf['num_synthetic']} released images."]


def finetune_rate(records: list[dict]) -> str:
    """DP-Finetune's own learning rate (every UNet weight moves; the LoRA rate diverges there), when it ran."""
    rates = sorted({r["settings"]["finetune_learning_rate"] for r in records if r["method"] == "dp_finetune"})
    return f" (DP-Finetune, which updates every UNet weight: {', '.join(map(str, rates))})" if rates else ""


NOTES_FILE = "NOTES.md"  # <results_dir>/NOTES.md: the reading of the table, included as it is
RECIPE_FILE = "RECIPE.md"  # <results_dir>/RECIPE.md: how the settings were fixed before the runs
REPLACED = {  # a results folder whose recipe another replaced: the older page, linked and summarised
    "compare_cpu_r2": ("compare_cpu", "results_recipe1.md",
                       "Recipe 1 clipped at C = 1 (flat) while the per-sample LoRA gradient norms are about 0.04: "
                       "nothing was clipped, the noise was scaled to 7-25x every gradient, and every DP row stayed at "
                       "the public model's accuracy. Its headline rows:")}
HEADLINE = ("no_finetune", "nonprivate_lora", "dp_sapf", "dp_lora", "random_selection", "pe", "dp_mepf")


def write(results_dir: str, path: str, quick: bool = False, how_chosen: str | None = None,
          planned: list[str] | None = None) -> str:
    """how_chosen: today's account of how the settings were chosen (default: the one the records carry);
    planned: the names of every run of the plan, so that a page written mid-way says which are still to come.
    A <results_dir>/NOTES.md (how to read the numbers, diagnostics with their commands) goes in under the table."""
    records = load(results_dir)
    if not records:
        raise SystemExit(f"error: no results in {results_dir}: run `experiments/compare.py run` first.")
    # the training settings as a trained run recorded them (no_finetune's record predates the choice of lr, B, T)
    settings = next((r["settings"] for r in records if r["method"] not in ("no_finetune", "pe", "dp_mepf")),
                    records[0]["settings"])
    devices = sorted({r["device"] for r in records})
    reference = {k: v for r in records for k, v in r["metrics"].items() if k.startswith("real_reference")}
    reference_note = ""
    replaced = REPLACED.get(os.path.basename(os.path.normpath(results_dir)))
    if not reference and replaced:  # the same protocol's real -> real run, made once for the replaced recipe
        old = load(os.path.join(os.path.dirname(os.path.normpath(results_dir)), replaced[0]))
        reference = {k: v for r in old for k, v in r["metrics"].items() if k.startswith("real_reference")}
        reference_note = f" (measured once, by the `{replaced[0]}` run of the same protocol)"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure = os.path.splitext(path)[0] + "_privacy_utility.png"
    rho = settings.get("select_ratio", 0.3)
    plot(records, figure, rho)
    rel = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(path)))
    dataset = DATASETS.get(settings.get("dataset", "fashion_mnist"), settings.get("dataset"))
    scale = settings.get("scale", "paper")
    scale_flag = "" if scale == "paper" else f" --scale {scale}"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results_dir_name = os.path.relpath(os.path.abspath(results_dir), repo)
    page = os.path.relpath(os.path.abspath(path), repo)
    page_flag = "" if page == os.path.join("docs", "results.md") else f" --results_md {page}"
    lines = [
        f"# Results: DP-SAPF against its baselines on {dataset}" + (" (quick CPU run)" if quick else ""),
        "",
        f"Written by `python experiments/compare.py report{scale_flag}{page_flag}` from `{results_dir_name}/*.json` "
        "(one record per run). Settings and how they were chosen: the section after the table.",
        "",
        *main_table(records, rho),
        "",
        *pending_line(records, planned),
        "Real → real reference (same classifier trained on the real train set): "
        + (", ".join(f"{k.removeprefix('real_reference_')} {v:.3f}" for k, v in reference.items()) or "–")
        + reference_note + ". Wall time: the stages of the attempt that finished (a resumed run counts only its "
        "last attempt).",
        "",
        f"![privacy-utility]({os.path.basename(figure)})",
        "",
        "## Settings",
        "",
        f"- Public model: `{settings['public_model']}` (pretrained on public data only). Sensitive set: {dataset} "
        f"train ({records[0]['num_real_train']} images), its test split for accuracy. δ = 1/N.",
        "- Every DP-SGD method (a method without DP-SGD has its own line below): "
        f"B = {settings['train_batch_size']}, T = {settings['max_train_steps']}, C = 1 "
        f"({settings.get('clipping', 'flat')} clipping), noise multiplicity K = {settings.get('noise_multiplicity', 1)}, AdamW "
        f"lr {settings['learning_rate']}{finetune_rate(records)}, LoRA rank {settings['rank']}, σ calibrated to the "
        "target ε with the "
        "selection's cost composed in (Gaussian σ_s = 5; the exponential and PTR variants spend "
        f"{settings.get('selection_share', 0.1):.0%} of the ε on the selection; SynFlow and random masks nothing). "
        "The paper's scale is B = 4096, T = 1000.",
        f"- Synthetic sets: {settings['num_synthetic']} images, {settings['sampling_steps']} denoising steps, "
        f"guidance {settings['guidance_scale']}; FID against the sensitive train set; classifiers "
        f"({settings['classifier']}, {settings['classifier_epochs']} epochs) trained on the synthetic set, "
        "selected on a synthetic held-out split, tested on the real test split.",
        f"- Device: {', '.join(devices)}. Versions: {versions_line(records)}.",
        *pe_line(records),
        *mepf_line(records),
        f"- How the settings were chosen: {how_chosen or settings.get('how_chosen', 'not recorded')}",
        "",
    ]
    pairs = pairwise_table(records, rho)
    if pairs:
        lines += ["## Does DP-SAPF beat DP-LoRA and the random mask? (rule fixed before the runs)", "", *pairs, ""]
    recipe = os.path.join(results_dir, RECIPE_FILE)
    if os.path.isfile(recipe):  # how the settings were fixed, written (and committed) before the runs
        lines += [open(recipe).read().strip(), ""]
    notes = os.path.join(results_dir, NOTES_FILE)
    if os.path.isfile(notes):  # hand-written, each number beside the command that produced it; kept with the records
        lines += ["## Reading the table", "", open(notes).read().strip(), ""]
    overlap = overlap_table(records, rho)
    if overlap:
        lines += ["## Which matrices the warm-up selection keeps, against DP-SAPF's mask of the same seed", "",
                  "The warm-up selection ranks the matrices by DP-SGD's own noisy gradients (no extra ε); DP-SAPF by "
                  "one Gaussian query over the whole set before training.", "", *overlap, ""]
    sweep = rho_table(records)
    if sweep:
        lines += ["## ρ sweep (DP-SAPF at the largest ε): which matrices are selected", "", *sweep, ""]
    if replaced:
        old_dir, old_page, why = replaced
        old_records = [r for r in load(os.path.join(os.path.dirname(os.path.normpath(results_dir)), old_dir))
                       if r["method"] in HEADLINE and r["rho"] in (None, rho)]
        if old_records:
            lines += ["## Recipe 1 (replaced)", "", f"{why} (full page: [{old_page}]({old_page}))", "",
                      *main_table(old_records, rho), ""]
    lines += ["## Wall time per stage (minutes, mean over the runs that ran it)", "", *stage_table(records), ""]
    lines += ["## Samples (first seed; rows = classes, one panel per ε)", ""]
    for method in ORDER:
        shown = labelled_grids(records, method, rho, results_dir)
        if shown:
            lines += [f"**{label(method, rho).replace('*', '')}**", "",
                      f"![{method}]({rel}/grids/labelled/{os.path.basename(shown)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"Wrote {path} ({len(records)} runs)")
    return path
