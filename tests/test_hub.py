"""--push_to_hub uploads the release files of a run and never its checkpoints or logs (no network: the Hub
client is replaced by a recorder)."""

import fnmatch
import os

import huggingface_hub

from dp_sapf import hub


def test_push_uploads_release_files_only(tmp_path, monkeypatch):
    out = tmp_path / "run"
    for rel in ["pytorch_lora_weights.safetensors", "privacy_report.json", "README.md", "validation_grid.png",
                "saliency_mask.json", "checkpoint-2/trainable.safetensors", "checkpoint-2/ledger.json",
                "logs/dp_sapf/events.out.tfevents.1", "run_status.json"]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"x")
    calls = {}

    class Repo:
        repo_id = "someone/dp-run"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", repo_id) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    assert hub.push_to_hub(str(out), "someone/dp-run") == "someone/dp-run"
    patterns = calls["upload"]["allow_patterns"]
    every_file = [os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs]
    uploaded = {f for f in every_file if any(fnmatch.fnmatch(f, p) for p in patterns)}
    assert {"pytorch_lora_weights.safetensors", "privacy_report.json", "README.md"} <= uploaded
    assert not any(f.startswith(("checkpoint-", "logs")) for f in uploaded), uploaded


def test_the_card_carries_the_base_models_own_licence(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a base model\n")
    report = {"private": False, "epsilon": None, "budget_split": {}, "noise_multiplier": 0.0, "dataset_size": 40,
              "train_mode": "lora", "lora_target": "all_attention", "max_grad_norm": None, "sample_rate": 0.1,
              "steps": 2}
    for model, expected in ((str(base), "apache-2.0"), (str(tmp_path / "no-card"), "other")):
        out = tmp_path / f"run-{expected}"
        out.mkdir()
        card = open(hub.write_model_card(str(out), repo_id=None, base_model=model, report=report,
                                         class_prompts=["An image of a bag"], has_lora=True)).read()
        assert f"license: {expected}" in card and "openrail" not in card
        assert ("check it before you publish" in card) == (expected == "other")
