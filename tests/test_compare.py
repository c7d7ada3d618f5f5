"""experiments/compare.py --quick: every stage through the real scripts, records, the report, and resume."""

import json
import os
import shutil

from helpers import run_script


def test_quick_comparison_runs_reports_and_resumes(tiny_pipeline_dir, tmp_path):
    args = ["run", "--quick", "--public_model", tiny_pipeline_dir, "--work_dir", str(tmp_path / "work"),
            "--results_dir", str(tmp_path / "results"), "--results_md", str(tmp_path / "results.md")]
    res = run_script("experiments/compare.py", args, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = {r["name"]: r for r in (json.load(open(tmp_path / "results" / f))
                                      for f in os.listdir(tmp_path / "results") if f.endswith(".json"))}
    assert set(records) == {"no_finetune_seed0", "dp_sapf_eps10_seed0", "dp_lora_eps10_seed0", "pe_eps10_seed0",
                            "dp_mepf_eps10_seed0"}
    sapf, lora, base = records["dp_sapf_eps10_seed0"], records["dp_lora_eps10_seed0"], records["no_finetune_seed0"]
    assert sapf["private"] and sapf["epsilon_achieved"] <= 10 and len(sapf["selected_matrices"]) == 20
    assert 0 < sapf["budget_split"]["selection_share"] < 0.05 and lora["budget_split"]["selection_share"] == 0
    assert base["epsilon_achieved"] is None and base["selected_matrices"] is None
    pe = records["pe_eps10_seed0"]
    assert pe["private"] and pe["epsilon_achieved"] <= 10 and pe["selected_matrices"] is None and "pe" in pe["wall_time_s"]
    mepf = records["dp_mepf_eps10_seed0"]
    assert mepf["private"] and mepf["epsilon_achieved"] <= 10 and "mepf" in mepf["wall_time_s"]
    assert mepf["settings"]["mepf_iterations"] == 2 and mepf["selected_matrices"] is None
    for r in records.values():
        assert r["metrics"]["fid_train"] > 0 and 0 <= r["metrics"]["accuracy_wrn"] <= 1
        assert os.path.isfile(tmp_path / "results" / "grids" / f"{r['name']}.png")
    report = open(tmp_path / "results.md").read()
    assert "real_reference_accuracy_wrn" in base["metrics"] and "real_reference_accuracy_wrn" not in sapf["metrics"]
    assert "reference (same classifier trained on the real train set): accuracy_wrn 0." in report  # computed once
    assert "DP-SAPF" in report and "DP-LoRA" in report and "PE (Private Evolution" in report and os.path.isfile(tmp_path / "results_privacy_utility.png")
    assert "- PE (no training): a population of" in report and "img2img strength" in report
    assert "- DP-MEPF (no diffusion model): one Gaussian release" in report and "DP-MEPF (feature-mean" in report
    for method in ("no_finetune", "dp_sapf", "dp_lora", "pe", "dp_mepf"):  # one labelled panel per ε
        assert f"grids/labelled/{method}.png" in report
        assert os.path.isfile(tmp_path / "results" / "grids" / "labelled" / f"{method}.png")
    # a record lost with a fresh work tree, its folder complete on the same machine: written anew from the folder,
    # every stage skipped, the wall times kept
    lost = tmp_path / "results" / "dp_lora_eps10_seed0.json"
    os.remove(lost)
    trained = os.path.getmtime(tmp_path / "work" / "dp_lora_eps10_seed0" / "model" / "pytorch_lora_weights.safetensors")
    res = run_script("experiments/compare.py", args, timeout=600)
    assert res.returncode == 0 and "5 runs, 4 complete, 1 to do" in res.stdout, res.stdout[-2000:]
    again = json.load(open(lost))
    assert again["metrics"] == lora["metrics"] and again["wall_time_s"] == lora["wall_time_s"]
    assert os.path.getmtime(tmp_path / "work" / "dp_lora_eps10_seed0" / "model" /
                            "pytorch_lora_weights.safetensors") == trained
    # every run's record is there: a second call does nothing but the report, also on a fresh machine
    # where only the (committed) records are left
    shutil.rmtree(tmp_path / "work")
    (tmp_path / "results" / "NOTES.md").write_text("The DP rows sit near the public model: see the probe below.\n")
    res = run_script("experiments/compare.py", args, timeout=600)
    assert res.returncode == 0 and "5 runs, 5 complete, 0 to do" in res.stdout
    assert "## Reading the table\n\nThe DP rows sit near the public model" in open(tmp_path / "results.md").read()


def test_results_name_matrices_the_same_way_for_every_block():
    from experiments.results_report import short_name

    assert short_name("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "down1.0.attn2.k"
    assert short_name("mid_block.attentions.0.transformer_blocks.0.attn1.to_q") == "mid.0.attn1.q"


def test_the_selection_variants_spend_the_same_total_epsilon():
    """Issue #15's rows: each variant is DP-SAPF with another selection at every ε of the comparison; the exponential
    and PTR selections spend --selection_share of that ε, the others their usual (or no) cost."""
    from experiments import compare

    args = compare.parse_args(["plan", "--epsilons", "1", "10", "--selection_share", "0.2", "--rho_sweep"])
    runs = {r["name"]: r for r in compare.plan(args)}
    for method in ("exponential_selection", "ptr_selection", "snip_selection", "synflow_selection"):
        assert {f"{method}_eps1_seed0", f"{method}_eps10_seed0"} <= set(runs)
    assert compare.selection_budget(runs["ptr_selection_eps10_seed0"], args) == ["--selection_epsilon", 2.0]
    assert compare.selection_budget(runs["exponential_selection_eps1_seed0"], args) == ["--selection_epsilon", 0.2]
    assert compare.selection_budget(runs["snip_selection_eps1_seed0"], args) == []


def test_the_plan_runs_the_most_informative_rows_first():
    """A partial table compares every method: seed 0 at the largest ε first, then the other ε, the ρ sweep, and the
    extra seeds last."""
    from experiments import compare

    names = [r["name"] for r in compare.plan(compare.parse_args(["plan", "--scale", "cpu"]))]
    assert names[:4] == ["no_finetune_seed0", "nonprivate_lora_seed0", "dp_sapf_eps10_seed0", "dp_lora_eps10_seed0"]
    first_eps1 = names.index("dp_sapf_eps1_seed0")
    assert all("eps10_seed0" in n for n in names[2:first_eps1]) and "pe_eps10_seed0" in names[:first_eps1]
    first_sweep, first_extra = names.index("dp_sapf_rho0.1_eps10_seed0"), names.index("dp_sapf_eps10_seed1")
    assert all(n.endswith("eps1_seed0") for n in names[first_eps1:first_sweep])
    assert first_sweep < first_extra and all(not n.endswith("seed0") for n in names[first_extra:])
    assert len(names) == len(set(names)) == 36


def test_one_selection_release_serves_every_run_that_can_share_it():
    """The Gaussian selection (σ_s fixed) of a seed serves both ε and the w/o-LoRA run; the exponential and PTR
    selections spend a share of each run's ε, and other seeds, scorers or ρ are other releases."""
    from experiments import compare

    args = compare.parse_args(["plan", "--scale", "cpu"])
    assert (args.train_batch_size, args.max_train_steps, args.num_synthetic) == (500, 100, 1000)
    assert compare.parse_args(["plan", "--scale", "cpu", "--max_train_steps", "7"]).max_train_steps == 7  # flag wins
    runs = {r["name"]: r for r in compare.plan(args)}
    key = {name: compare.selection_key(run) for name, run in runs.items() if run["method"] in compare.SELECTION}
    assert key["dp_sapf_eps1_seed0"] == key["dp_sapf_eps10_seed0"] == key["wo_lora_eps1_seed0"]
    assert key["dp_sapf_eps10_seed0"] != key["dp_sapf_eps10_seed1"] != key["dp_sapf_rho0.1_eps10_seed0"]
    assert key["snip_selection_eps10_seed0"] != key["dp_sapf_eps10_seed0"]
    assert key["ptr_selection_eps1_seed0"] != key["ptr_selection_eps10_seed0"]
    derived = {name for name, run in runs.items() if compare.derivation(run, args)}
    assert derived == {"dp_sapf_rho0.1_eps10_seed0", "dp_sapf_rho0.5_eps10_seed0", "layer_selection_eps1_seed0",
                       "layer_selection_eps10_seed0", "debiased_selection_eps1_seed0", "debiased_selection_eps10_seed0"}
    passes = {key[n] for n in key if n not in derived} - {key["random_selection_eps10_seed0"], key["synflow_selection_eps10_seed0"]}
    assert len(passes) == 8  # over the data: dp_sapf × 3 seeds, snip, exponential × 2 ε, PTR × 2 ε


def test_full_fine_tuning_has_its_own_learning_rate():
    """DP-Finetune moves every UNet weight: the LoRA rate (2e-2 at the cpu scale) makes it diverge, so it has its own."""
    from experiments import compare

    args = compare.parse_args(["plan", "--scale", "cpu", "--finetune_learning_rate", "3e-4"])
    assert compare.learning_rate("dp_finetune", args) == 3e-4
    assert {compare.learning_rate(m, args) for m in compare.TRAINING if m != "dp_finetune"} == {args.learning_rate}
    assert compare.settings(args)["finetune_learning_rate"] == 3e-4
    from experiments.results_report import finetune_rate

    records = [{"method": "dp_finetune", "settings": compare.settings(args)}, {"method": "dp_sapf", "settings": {}}]
    assert finetune_rate(records) == " (DP-Finetune, which updates every UNet weight: 0.0003)"
    assert finetune_rate(records[1:]) == ""


def test_the_page_names_every_version_the_runs_used():
    """Runs finished over several sessions may use different library versions: the page lists each one."""
    from experiments.results_report import versions_line

    records = [{"versions": {"torch": "2.13.0", "accelerate": "1.15.0"}},
               {"versions": {"torch": "2.13.0", "accelerate": "1.16.0"}}, {}]
    assert versions_line(records) == "torch 2.13.0, accelerate 1.15.0 / 1.16.0"
    assert versions_line([{}]) == "not recorded"


def test_the_rho_sweep_counts_its_seeds_and_lists_the_first_seeds_mask():
    """Seeds of one ρ draw different masks: the sweep averages their scores, says how many, and lists seed 0's."""
    from experiments.results_report import rho_table

    def record(rho, seed, matrices, accuracy):
        return {"method": "dp_sapf", "rho": rho, "seed": seed, "epsilon": 10, "selected_matrices": matrices,
                "num_candidates": 42, "budget_split": {"selection_share": 0.011},
                "metrics": {"fid_train": 100.0, "accuracy_wrn": accuracy}}

    q, v = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"
    rows = rho_table([record(0.3, 1, [v], 0.3), record(0.1, 0, [q], 0.2), record(0.3, 0, [q, v], 0.1)])
    assert rows[2] == "| 0.1 | 1 | 1 / 42 | 1.1 % | 100.0 | 0.200 | mid.0.attn1.q |"
    assert rows[3] == "| 0.3 | 2 | 2 / 42 | 1.1 % | 100.0 ± 0.0 | 0.200 ± 0.141 | mid.0.attn1.q, mid.0.attn1.v |"


def test_a_run_another_process_holds_is_skipped_not_failed_or_touched(tmp_path, monkeypatch, capsys):
    """Two compare.py processes on one --work_dir split the runs: a run whose folder lock is held elsewhere is
    skipped (no stage starts, nothing written), the others go on, and the call does not fail."""
    import subprocess
    import sys

    from experiments import compare

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    args = compare.parse_args(["run", "--scale", "cpu", "--methods", "no_finetune", "random_selection",
                               "--epsilons", "10", "--public_model", str(model), "--work_dir", str(tmp_path / "work"),
                               "--results_dir", str(tmp_path / "results")])
    monkeypatch.setattr(compare, "prepare_data", lambda args: None)
    ran = []
    monkeypatch.setattr(compare, "_execute_locked", lambda run, args, folder: ran.append(run["name"]) or
                        {"metrics": {}})
    busy = tmp_path / "work" / "no_finetune_seed0"
    busy.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import filelock, sys, time\n"
                               f"lock = filelock.FileLock({str(busy / '.lock')!r}); lock.acquire()\n"
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        compare.run_all(args)  # raises SystemExit on a failed run
    finally:
        holder.kill()
        holder.wait()  # its lock is released when it is gone
    assert ran == ["random_selection_eps10_seed0"]
    assert "skipped no_finetune_seed0: another compare.py is running it" in capsys.readouterr().out
    assert os.listdir(busy) == [".lock"]
    compare.run_all(args)  # the holder is gone: the lock is free again
    assert ran == ["random_selection_eps10_seed0", "no_finetune_seed0", "random_selection_eps10_seed0"]


def test_the_readme_quotes_the_committed_records():
    """The README's headline table is generated from the records (results_report.headline_block), so it cannot drift:
    after new records, `python experiments/compare.py report --scale cpu_r2` rewrites it."""
    from experiments import compare, results_report

    readme = open(os.path.join(compare.REPO, "README.md"), encoding="utf-8").read()
    assert results_report.headline_block(compare.SCALES[compare.README_SCALE]["results_dir"]) in readme


def test_the_readme_quotes_the_quick_starts_record():
    """The README's quick-start output is the newest record's printed lines, verbatim, and the record's numbers are
    the ones printed (results/quickstart/quickstart_<date>.json, written from the run by bench_quickstart's run)."""
    from experiments import compare

    folder = os.path.join(compare.REPO, "results", "quickstart")
    newest = sorted(f for f in os.listdir(folder) if f.startswith("quickstart_") and f.endswith(".json"))[-1]
    record = json.load(open(os.path.join(folder, newest), encoding="utf-8"))
    readme = open(os.path.join(compare.REPO, "README.md"), encoding="utf-8").read()
    assert "```\n" + "\n".join(record["printed"]) + "\n```" in readme and f"results/quickstart/{newest}" in readme
    run = record["quickstart"]
    assert f"{run['fid_train']:.1f}" in record["printed"][3] and f"{run['accuracy_wrn']:.3f}" in record["printed"][3]
    assert f"{run['public_model_alone_accuracy_wrn']:.3f}" in record["printed"][2]
    assert f"wall time {run['wall_s']['total_s']:.0f} s" in record["printed"][-1]
