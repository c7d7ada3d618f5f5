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
