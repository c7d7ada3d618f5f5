"""Crash-safe outputs: every file a script writes is written to a temporary file beside it, then renamed.

A kill -9 (or a full disk, or an exception) at any moment leaves either the old file or the new one, never a
truncated file that a later step would trust. Temporary names start with '.' and contain '.tmp.' (readers
and hub.release_files skip them). JSON is strict: NaN and infinity are refused (`allow_nan=False`) before any
file is touched, so every JSON the project writes is valid JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

TMP_MARK = ".tmp."


def is_temporary(name: str) -> bool:
    """True for the temporary files (and folders) of an unfinished write."""
    return os.path.basename(name).startswith(".") and TMP_MARK in os.path.basename(name)


@contextlib.contextmanager
def replacing(path: str, mode: int = 0o644):
    """Yield a temporary path beside `path`; when the block succeeds it is fsync'ed and renamed onto `path`.

    On an exception the temporary file is removed and `path` keeps its old content (or stays absent).
    `mode` is the final file's permission (release files 0o644; files holding secrets 0o600).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    suffix = os.path.splitext(name)[1]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f"{TMP_MARK}{suffix.lstrip('.') or 'part'}")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def dumps_json(record, indent: int | None = 2) -> str:
    """Strict JSON text: a NaN or an infinity is a ValueError naming where it sits, never `NaN`/`Infinity`."""
    try:
        return json.dumps(record, indent=indent, allow_nan=False)
    except ValueError:
        raise ValueError(f"Refusing to write non-finite numbers as JSON (at {_non_finite_path(record)}); JSON has "
                         "no NaN or infinity.") from None


def _non_finite_path(value, where: str = "$") -> str:
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} = {value}"
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite_path(v, f"{where}.{k}")
            if found:
                return found
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_finite_path(v, f"{where}[{i}]")
            if found:
                return found
    return ""


def load_json(path: str):
    """Read strict JSON: `NaN`, `Infinity` and `-Infinity` (which Python's json accepts) are a ValueError."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f, parse_constant=refuse)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(str(err)) from None


def write_text(path: str, text: str, mode: int = 0o644) -> str:
    """Write `text` (UTF-8) atomically."""
    with replacing(path, mode) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return path


def write_json(path: str, record, mode: int = 0o644, indent: int | None = 2) -> str:
    """Write strict JSON atomically (the text is built first: a NaN fails before the file is touched)."""
    return write_text(path, dumps_json(record, indent) + "\n", mode)


def save_image(image, path: str, **kwargs) -> str:
    """PIL `image.save` atomically, in the format of `path`'s extension."""
    from PIL import Image

    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    with replacing(path) as tmp:
        image.save(tmp, format=fmt, **kwargs)
    return path


@contextlib.contextmanager
def staged_folder(output_dir: str):
    """Yield an empty temporary folder inside `output_dir`; on success move each file it holds into `output_dir`
    (same relative path) with one atomic rename per file, then remove it. For writers that only take a folder
    (diffusers' save_lora_weights, save_pretrained): every file in `output_dir` is then old or new, never partial.
    """
    os.makedirs(output_dir, exist_ok=True)
    stage = tempfile.mkdtemp(dir=output_dir, prefix=".staged", suffix=TMP_MARK + "d")
    try:
        yield stage
        for root, _, files in os.walk(stage):
            rel = os.path.relpath(root, stage)
            target_dir = os.path.normpath(os.path.join(output_dir, rel))
            os.makedirs(target_dir, exist_ok=True)
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
                os.replace(os.path.join(root, name), os.path.join(target_dir, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def replace_folder(built: str, output_dir: str) -> str:
    """Put the finished folder `built` at `output_dir`: copied to a staging name beside it, then renamed into place
    (an old `output_dir` is removed just before), so a reader never sees a half-written folder there."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    staged = os.path.join(parent, f".{os.path.basename(os.path.abspath(output_dir))}.staged")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(built, staged)
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(staged, output_dir)
    return output_dir
