"""train_dp_sapf.py end to end on the tiny pipeline: outputs, reload, resume, 2 processes, modes, bad inputs."""

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

from dp_sapf import data, saliency
from dp_sapf.seeding import seeded_generator

from helpers import accelerate_two_processes, lora_tensors, run_script, train_args


@pytest.fixture(scope="module")
def mask_path(tiny_pipeline_dir, fashion_data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mask") / "mask.json")
    res = run_script("select_salient.py", [
        "--pretrained_model_name_or_path", tiny_pipeline_dir, "--train_data_dir", fashion_data_dir, "--resolution",
        "32", "--class_prompts", "fashion_mnist", "--output", out, "--dp_seed", "0"])
    assert res.returncode == 0, res.stderr[-3000:]
    timings = json.load(open(out.replace(".json", ".timings.json")))  # beside the mask, read by the bench
    assert timings["saliency_images_per_s"] > 0 and timings["encode_images_per_s"] > 0
    return out


def test_end_to_end_outputs_and_reload(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, set_peft_model_state_dict

    out = str(tmp_path / "run")
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, out, "--saliency_mask",
                                                    mask_path, "--target_epsilon", "8", "--rank", "4",
                                                    "--lora_alpha", "8"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(os.path.join(out, "privacy_report.json")))
    assert report["epsilon"] <= 8 and report["steps"] == 4 and report["dataset_size"] == 40
    assert report["sample_rate"] == pytest.approx(8 / 40) and report["delta"] == pytest.approx(1 / 40)
    assert report["budget_split"]["epsilon_selection_only"] > 0
    status = json.load(open(os.path.join(out, "run_status.json")))
    assert status["status"] == "complete" and status["timings"]["encode_images_per_s"] > 0  # read by the bench
    card = open(os.path.join(out, "README.md")).read()
    assert "differential-privacy" in card and "dp-sapf" in card and "epsilon:" in card and "load_lora_weights" in card
    mask = saliency.read_mask(mask_path)
    tensors = lora_tensors(out)
    assert {k.split(".lora")[0].removeprefix("unet.") for k in tensors} == set(mask["target_modules"])

    # a fresh pipeline + load_lora_weights changes the images ...
    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe("An image of a dress", num_inference_steps=2, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    before = render(base)
    base.load_lora_weights(out)
    after = render(base)
    assert np.abs(after - before).max() > 1e-4
    # ... and equals the adapted model built in memory from the same tensors (alpha != rank reloads right)
    ref = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    ref.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                    target_modules=mask["target_modules"]))
    set_peft_model_state_dict(ref.unet, convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in tensors.items()}), adapter_name="default")
    assert np.allclose(render(ref), after, atol=1e-5)


def test_resume_equals_uninterrupted_run(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = ["--saliency_mask", mask_path, "--target_epsilon", "8", "--checkpointing_steps", "2"]
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, full, *common))
    assert res.returncode == 0, res.stderr[-3000:]
    # a finished run keeps its checkpoints' weights but not the secret seed, and they cannot be resumed
    assert json.load(open(os.path.join(full, "checkpoint-2", "ledger.json")))["dp_seed"] is None
    # a run stopped after step 2: its checkpoint holds the secret DP seed, owner-only
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, resumed, *common,
                                                    "--stop_after_steps", "2"))
    assert res.returncode == 0 and "Stopped after step 2" in res.stdout, res.stderr[-3000:]
    checkpoint = os.path.join(resumed, "checkpoint-2")
    assert stat.S_IMODE(os.stat(checkpoint).st_mode) == 0o700
    assert json.load(open(os.path.join(checkpoint, "ledger.json")))["dp_seed"] == 3
    for name in os.listdir(checkpoint):
        assert stat.S_IMODE(os.stat(os.path.join(checkpoint, name)).st_mode) == 0o600, name
    assert not os.path.isfile(os.path.join(resumed, "pytorch_lora_weights.safetensors"))
    killed = str(tmp_path / "killed")
    shutil.copytree(checkpoint, os.path.join(killed, "checkpoint-2"))
    # resuming it must give the same result as the uninterrupted run (the seed comes from the checkpoint)
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, resumed, *common,
                                                    "--resume_from_checkpoint", "latest", "--dp_seed", "999"))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = lora_tensors(full), lora_tensors(resumed)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ra = json.load(open(os.path.join(full, "privacy_report.json")))
    rb = json.load(open(os.path.join(resumed, "privacy_report.json")))
    assert ra["epsilon"] == rb["epsilon"] and rb["steps"] == 4
    # changing a privacy flag on resume is refused, before the killed run's folder is touched
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, killed, *common,
                                                    "--resume_from_checkpoint", "latest", "--max_grad_norm", "0.5"))
    assert res.returncode == 2 and "max_grad_norm" in res.stderr.strip().splitlines()[-1]
    assert os.listdir(killed) == ["checkpoint-2"]


def test_two_processes_equal_one_process(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    extra = ["--saliency_mask", mask_path, "--noise_multiplier", "1.0", "--max_train_steps", "3"]
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, one, *extra))
    assert res.returncode == 0, res.stderr[-3000:]
    res = accelerate_two_processes("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, two, *extra),
                                   tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = lora_tensors(one), lora_tensors(two)
    for k in a:  # same Poisson sample, same clipped sum, the noise added once: same weights
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.parametrize("multiplicity", ["1", "2"])
def test_micro_batch_size_changes_nothing(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path, multiplicity):
    """--max_physical_batch_size is memory only: 1, 3 or 16 rows a micro-batch train the same weights (the draws are
    keyed per image, the clipped sum is a sum, the noise is added once per logical step)."""
    outs = {}
    for rows in ("2", "3", "16"):
        outs[rows] = str(tmp_path / rows)
        res = run_script("train_dp_sapf.py", train_args(
            tiny_pipeline_dir, fashion_data_dir, outs[rows], "--saliency_mask", mask_path, "--noise_multiplier", "1.0",
            "--max_train_steps", "2", "--clipping", "automatic", "--noise_multiplicity", multiplicity,
            "--max_physical_batch_size", rows))
        assert res.returncode == 0, res.stderr[-3000:]
    a = lora_tensors(outs["16"])
    for rows in ("2", "3"):
        b = lora_tensors(outs[rows])
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-5), (rows, k)


def test_probes_engine_equals_hooks(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    """The compile-friendly engine trains the same weights as the hooks (same Poisson batches, same noise)."""
    outs = {}
    for engine in ("hooks", "probes"):
        outs[engine] = str(tmp_path / engine)
        res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, outs[engine], "--saliency_mask",
                                                        mask_path, "--noise_multiplier", "1.0", "--max_train_steps", "2",
                                                        "--per_sample_engine", engine))
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = lora_tensors(outs["hooks"]), lora_tensors(outs["probes"])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.parametrize("extra", [
    ["--lora_target", "all_attention", "--target_epsilon", "8"],
    ["--train_mode", "direct", "--lora_target", "all_attention", "--target_epsilon", "8"],
    ["--train_mode", "full", "--lora_target", "all_attention", "--target_epsilon", "8", "--max_train_steps", "1"],
    ["--target_epsilon", "8", "--mixed_precision", "bf16"],
])
def test_every_mode_runs(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path, extra):
    if "--lora_target" not in extra:
        extra = ["--saliency_mask", mask_path, *extra]
    out = str(tmp_path / "run")
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, out, *extra,
                                                    "--max_train_steps", "2"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(os.path.join(out, "privacy_report.json")))
    assert report["private"] and report["epsilon"] <= 8


def test_public_seed_changes_no_private_randomness(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    """With the secret --dp_seed fixed, --seed (public) leaves the trained weights unchanged: the per-sample
    draws, the Poisson sample and the noise all come from the secret seed. (--train_mode direct: no random
    LoRA initialisation, which is the one thing --seed does seed.)"""
    outs = []
    for seed in ("0", "5"):
        outs.append(str(tmp_path / f"seed{seed}"))
        res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, outs[-1], "--saliency_mask",
                                                        mask_path, "--train_mode", "direct", "--noise_multiplier", "1",
                                                        "--max_train_steps", "2", "--seed", seed))
        assert res.returncode == 0, res.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = (load_file(os.path.join(o, "unet", "diffusion_pytorch_model.safetensors")) for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags", [["--no_dp"], ["--target_epsilon", "+inf"], ["--target_epsilon", "1e999"]])
def test_non_private_runs_say_so(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path, flags):
    out = str(tmp_path / "run")
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, out, "--saliency_mask",
                                                    mask_path, *flags, "--max_train_steps", "1"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(os.path.join(out, "privacy_report.json")))
    assert report["private"] is False and report["epsilon"] is None and report["noise_multiplier"] == 0
    card = open(os.path.join(out, "README.md")).read()
    assert "NOT differentially private" in card and "not-differentially-private" in card
    assert "- differential-privacy" not in card and "Trained with differential privacy" not in card
    assert "private: false" in card


@pytest.mark.parametrize("extra, message", [
    (["--target_epsilon", "0.05"], "selection alone"),
    (["--target_epsilon", "8", "--train_batch_size", "41"], "exceeds the dataset size"),
    (["--target_epsilon", "8", "--max_train_samples", "30"], "N = 40 images but training data has N = 30"),
    (["--noise_multiplier", "1", "--target_epsilon", "3"], "exactly one of"),
    (["--no_dp", "--target_epsilon", "3"], "exactly one of"),
    (["--target_epsilon", "nan"], "--target_epsilon must be > 0"),
    (["--target_epsilon=-inf"], "--target_epsilon must be > 0"),
    (["--target_epsilon", "0"], "--target_epsilon must be > 0"),
    (["--noise_multiplier", "0"], "--noise_multiplier must be a finite number > 0"),
    (["--noise_multiplier", "-1"], "--noise_multiplier must be a finite number > 0"),
    (["--target_epsilon", "8", "--target_delta", "1"], "--target_delta must be in (0, 1)"),
    (["--target_epsilon", "8", "--target_delta", "1.5"], "--target_delta must be in (0, 1)"),
    (["--target_epsilon", "8", "--target_delta", "0"], "--target_delta must be in (0, 1)"),
    (["--target_epsilon", "8", "--target_delta", "-0.1"], "--target_delta must be in (0, 1)"),
])
def test_bad_inputs_fail_before_training(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path, extra, message):
    out = str(tmp_path / "run")
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, out, "--saliency_mask",
                                                    mask_path, *extra))
    assert res.returncode == 2 and message in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not os.path.exists(out)


def test_unreadable_image_or_mask_is_one_clear_error(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(fashion_data_dir, data_dir)
    (data_dir / "train" / "coat" / "99999.png").write_bytes(b"truncated")
    out = str(tmp_path / "run")
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, str(data_dir), out, "--lora_target",
                                                    "all_attention", "--target_epsilon", "8"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "99999.png" in lines[-1] and lines[-1].startswith("error:"), res.stderr[-3000:]
    assert "Traceback" not in res.stderr and not os.path.exists(out)

    not_json = tmp_path / "mask.json"
    not_json.write_text("{target_modules: oops")
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, out, "--saliency_mask",
                                                    str(not_json), "--target_epsilon", "8"))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and str(not_json) in lines[-1] and lines[-1].startswith("error:"), res.stderr[-3000:]
    assert not os.path.exists(out)


def test_mask_for_another_model_is_refused(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    mask = json.load(open(mask_path))
    mask["candidates"] = {k: [v[0] * 2, v[1]] for k, v in mask["candidates"].items()}
    mask["candidate_fingerprint"] = "0" * 64  # what a mask made on another architecture carries
    other = str(tmp_path / "other.json")
    json.dump(mask, open(other, "w"))
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, str(tmp_path / "r"),
                                                    "--saliency_mask", other, "--target_epsilon", "8"))
    assert res.returncode == 2 and "another model" in res.stderr


def test_delta_above_one_over_n_warns(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, str(tmp_path / "r"),
                                                    "--saliency_mask", mask_path, "--target_epsilon", "8",
                                                    "--target_delta", "0.1", "--max_train_steps", "1"))
    assert res.returncode == 0 and "exceeds 1/N" in res.stderr


def test_poisson_batches_are_binomial():
    n, q, trials = 500, 0.1, 400
    sizes = np.array([data.poisson_sample(n, q, seeded_generator(0, "poisson", t)).shape[0] for t in range(trials)])
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 4 * np.sqrt(var / trials)
    assert 0.7 * var < sizes.var() < 1.3 * var
    shares = [data.shard(torch.arange(10), r, 3) for r in range(3)]
    assert sorted(torch.cat(shares).tolist()) == list(range(10))


def test_a_mask_selected_without_noise_voids_the_guarantee(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    """σ_s = 0 releases exact scores: whatever the training noise, the release is reported as not private."""
    mask = json.load(open(mask_path))
    mask["privacy"]["noise_multiplier"] = 0.0
    exact = str(tmp_path / "exact_mask.json")
    json.dump(mask, open(exact, "w"))
    out = str(tmp_path / "run")
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, out, "--saliency_mask", exact,
                                                    "--noise_multiplier", "1", "--max_train_steps", "1"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.load(open(os.path.join(out, "privacy_report.json")))
    assert report["private"] is False and report["epsilon"] is None
    card = open(os.path.join(out, "README.md")).read()
    assert "NOT differentially private" in card and "selected without noise" in card
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, str(tmp_path / "r2"),
                                                    "--saliency_mask", exact, "--target_epsilon", "8"))
    assert res.returncode == 2 and "selection alone" in res.stderr


def test_accelerate_launch_on_one_cpu_thread_is_said(monkeypatch, capsys):
    """`accelerate launch` gives a CPU process OMP_NUM_THREADS=1 unless told otherwise: the scripts say so."""
    from types import SimpleNamespace

    from dp_sapf import distributed

    cpu_process = SimpleNamespace(device=torch.device("cpu"), num_processes=1, is_main_process=True)
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        torch.set_num_threads(1)
        distributed.warn_if_cpu_threads_idle(cpu_process)
        assert "uses 1 of 2 cores" in capsys.readouterr().err
        distributed.warn_if_cpu_threads_idle(SimpleNamespace(**{**vars(cpu_process), "num_processes": 2}))
        monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")  # a plain `python script.py`: torch's own default
        distributed.warn_if_cpu_threads_idle(cpu_process)
        assert capsys.readouterr().err == ""
    finally:
        torch.set_num_threads(threads)


def test_a_finished_runs_checkpoint_is_not_resumed(tiny_pipeline_dir, fashion_data_dir, mask_path, tmp_path):
    """Its secret seed was removed when the run finished: a resume from it is refused before anything is written."""
    full, other = str(tmp_path / "full"), str(tmp_path / "other")
    common = ["--saliency_mask", mask_path, "--target_epsilon", "8", "--checkpointing_steps", "2"]
    assert run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, full, *common)).returncode == 0
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(other, "checkpoint-2"))
    res = run_script("train_dp_sapf.py", train_args(tiny_pipeline_dir, fashion_data_dir, other, *common,
                                                    "--resume_from_checkpoint", "latest"))
    assert res.returncode == 2 and "finished run" in res.stderr
    assert os.listdir(other) == ["checkpoint-2"]


def test_a_failed_run_folder_is_reused_with_a_note(tmp_path, capsys):
    from dp_sapf import run_folder

    run_folder.write_status(str(tmp_path), "failed", error="RuntimeError: killed")
    run_folder.check_not_finished(str(tmp_path))  # no error: a failed run is no result
    assert "holds a run that failed" in capsys.readouterr().err
