"""The training output folder: its file names, the run status, checkpoints, and the report other scripts read.

    <output_dir>/pytorch_lora_weights.safetensors   release (pipe.load_lora_weights)
                 privacy_report.json                 release: every figure of the guarantee (privacy.py schema)
                 saliency_mask.json, README.md, validation_grid.png    release
                 run_status.json                      running | failed | complete (a result only when complete)
                 checkpoint-<step>/                   private: weights, optimizer, RNG, ledger and the secret DP seed
                 logs/                                private: the logged loss is not differentially private
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import torch

from . import atomic

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
REPORT_FILE = "privacy_report.json"
MASK_FILE = "saliency_mask.json"
STATUS_FILE = "run_status.json"
GRID_FILE = "validation_grid.png"
CHECKPOINT_PREFIX = "checkpoint-"


def write_status(output_dir: str, status: str, **extra) -> None:
    """run_status.json says whether the folder is a finished result, still running, or failed (atomic)."""
    atomic.write_json(os.path.join(output_dir, STATUS_FILE), {"status": status, **extra})


def read_status(output_dir: str) -> str | None:
    """'running', 'failed', 'complete', or None when the folder holds no status."""
    path = os.path.join(output_dir, STATUS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        record = atomic.load_json(path)
    except ValueError as err:
        raise ValueError(f"{path} is not a run status written by train_dp_sapf.py: {err}") from None
    return record.get("status") if isinstance(record, dict) else None


def write_json(output_dir: str, name: str, record: dict) -> str:
    """A JSON file of the run folder, strict and atomic (`atomic.write_json`)."""
    return atomic.write_json(os.path.join(output_dir, name), record)


def check_not_finished(output_dir: str, overwrite: bool = False) -> None:
    """A folder that holds a finished run is a result: a new run goes elsewhere unless told to replace it."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file, not a folder.")
    status = read_status(output_dir) if os.path.isdir(output_dir) else None
    if not overwrite and status == "complete":
        raise ValueError(f"--output_dir {output_dir!r} already holds a finished run ({STATUS_FILE}: complete). "
                         "Choose another folder, delete it, or pass --overwrite_output_dir to replace it.")
    if status == "failed":  # a failed run is no result: the folder is reused, and the user is told so
        print(f"note: --output_dir {output_dir!r} holds a run that failed ({STATUS_FILE}); this run replaces its "
              "outputs (its checkpoints, if any, resume with --resume_from_checkpoint latest).", file=sys.stderr)


def read_training_report(*folders: str | None) -> dict | None:
    """The privacy report of the first local folder that has one; refuses a run that did not finish."""
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        status = read_status(folder)
        if status not in (None, "complete"):
            raise ValueError(f"{folder} is not a finished training run (run_status.json says {status!r}).")
        path = os.path.join(folder, REPORT_FILE)
        if os.path.isfile(path):
            try:
                report = atomic.load_json(path)
            except ValueError as err:
                raise ValueError(f"{path} is not a privacy report written by train_dp_sapf.py: {err}") from None
            if not isinstance(report, dict):
                raise ValueError(f"{path} is not a privacy report written by train_dp_sapf.py.")
            return report
    return None


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoint folders, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir)
             if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit()]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(d[len(CHECKPOINT_PREFIX):]))]


def resolve_checkpoint(output_dir: str, which: str | None) -> str | None:
    """--resume_from_checkpoint: 'latest' (None when there is none yet) or a folder."""
    if not which:
        return None
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isdir(which) or not os.path.isfile(os.path.join(which, "ledger.json")):
        raise FileNotFoundError(f"--resume_from_checkpoint {which!r} is not a checkpoint folder (no ledger.json).")
    return which


def check_checkpoint(path: str, tensors: dict[str, torch.Tensor], check_ledger) -> dict:
    """Before anything is written: the checkpoint must be readable, hold this run's privacy parameters
    (`check_ledger(saved_ledger_state)` raises otherwise) and exactly this run's trainable tensors and shapes."""
    from safetensors import safe_open

    try:
        saved = atomic.load_json(os.path.join(path, "ledger.json"))
        check = {k: saved[k] for k in ("step", "dp_seed", "ledger")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"Checkpoint {path} is unreadable or incomplete ({type(err).__name__}: {err}).") from None
    check_ledger(check["ledger"])
    if check["dp_seed"] is None:
        raise ValueError(f"Checkpoint {path} belongs to a finished run: its secret DP seed was removed at the end, so "
                         "it cannot be resumed. Start a new run (or sample from its weights).")
    weights = os.path.join(path, "trainable.safetensors")
    try:
        with safe_open(weights, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"Checkpoint {path}: {weights} is unreadable ({type(err).__name__}: {err}).") from None
    wanted = {k: tuple(p.shape) for k, p in tensors.items()}
    if shapes != wanted:
        other = sorted(set(shapes) ^ set(wanted)) or sorted(k for k in wanted if shapes[k] != wanted[k])
        raise ValueError(f"Checkpoint {path} holds other trainable tensors than this run (another mask, --rank or "
                         f"--train_mode?), e.g. {other[0]!r}. Resume with the same flags, or start a new run.")
    return saved


def save_checkpoint(output_dir: str, step: int, tensors: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    ledger_state: dict, dp_seed: int, public_seed: int, keep: int | None = None,
                    extra: dict | None = None) -> str:
    """Write checkpoint-{step} atomically: everything needed to continue bit for bit.

    It holds the secret DP seed (whoever has it can recompute every step's noise and sample), so the folder and
    its files are readable by their owner only, and checkpoints are never pushed to the Hub.
    """
    from safetensors.torch import save_file

    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, mode=0o700)
    os.chmod(tmp, 0o700)  # makedirs' mode is masked by the umask
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, os.path.join(tmp, "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}},
               os.path.join(tmp, "training_state.pt"))
    ledger_path = os.path.join(tmp, "ledger.json")
    fd = os.open(ledger_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(atomic.dumps_json({"step": step, "dp_seed": dp_seed, "seed": public_seed, "ledger": ledger_state,
                                   "extra": extra or {}}))
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o600)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep is not None:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def forget_checkpoint_secrets(output_dir: str) -> None:
    """At the end of a run: take the secret DP seed out of every checkpoint (whoever holds it can recompute every
    step's noise and Poisson sample). The intermediate weights stay (post-processing of DP steps, like the final
    ones); a checkpoint without its seed can no longer be resumed, which a finished run does not need."""
    for folder in list_checkpoints(output_dir):
        path = os.path.join(folder, "ledger.json")
        try:
            saved = atomic.load_json(path)
        except (OSError, ValueError):
            continue  # unreadable: it holds nothing we can read either; shutil would be next
        if saved.get("dp_seed") is None:
            continue
        saved["dp_seed"] = None
        saved["note"] = "the secret DP seed was removed when the run finished; this checkpoint cannot be resumed"
        atomic.write_json(path, saved, mode=0o600)


def read_checkpoint_extra(path: str) -> dict:
    """What a run stored beside its ledger (e.g. the warm-up selection's scores and kept matrices)."""
    try:
        return atomic.load_json(os.path.join(path, "ledger.json")).get("extra") or {}
    except (OSError, ValueError) as err:
        raise ValueError(f"Checkpoint {path} is unreadable ({type(err).__name__}: {err}).") from None


def load_checkpoint(path: str, tensors: dict[str, torch.Tensor], optimizer, lr_scheduler, check_ledger) -> dict:
    """Restore tensors, optimizer, scheduler and RNG in place; return the saved {step, dp_seed, seed, ledger}.

    `check_ledger(saved_ledger_state)` runs first and raises if the privacy parameters changed.
    """
    from safetensors.torch import load_file

    saved = atomic.load_json(os.path.join(path, "ledger.json"))
    check_ledger(saved["ledger"])
    if saved.get("dp_seed") is None:
        raise ValueError(f"Checkpoint {path} belongs to a finished run: its secret DP seed was removed at the end, so "
                         "it cannot be resumed. Start a new run (or sample from its weights).")
    stored = load_file(os.path.join(path, "trainable.safetensors"))
    if set(stored) != set(tensors):
        raise ValueError(f"Checkpoint {path} holds other trainable tensors than this run (another mask or mode?).")
    with torch.no_grad():
        for k, p in tensors.items():
            p.copy_(stored[k])
    state = torch.load(os.path.join(path, "training_state.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    return saved
