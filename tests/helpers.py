"""What the test modules share: running the scripts as a user does, and the tiny runs' common flags."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, args, cwd=None, timeout=900):
    """`python <script> args...` from the repo, offline; returns the CompletedProcess (text output)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def run_module(module, args, timeout=900):
    """`python -m <module> args...` (e.g. dp_sapf.privacy)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def accelerate_two_processes(script, args, cwd):
    """Two CPU processes under accelerate (gloo), as docs/design.md §4 says they must be launched here."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(29500 + os.getpid() % 1000), os.path.join(REPO, script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def select_args(model, data_dir, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data_dir, "--resolution", "32",
            "--class_prompts", "fashion_mnist", "--selection_batch_size", "8", "--output", out, *extra]


def train_args(model, data_dir, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data_dir, "--resolution", "32",
            "--class_prompts", "fashion_mnist", "--output_dir", out, "--train_batch_size", "8",
            "--max_physical_batch_size", "4", "--max_train_steps", "4", "--validation_inference_steps", "2",
            "--report_to", "none", "--dp_seed", "3", "--learning_rate", "1e-2", *extra]


def lora_tensors(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))


def write_fake_corpus(directory, n=12, seed=0):
    """A built-corpus folder (dp_sapf/public_corpus.py's format) of n random 32-px images, a third of them digits."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(directory, "images", "x"), exist_ok=True)
    with open(os.path.join(directory, "metadata.jsonl"), "w") as f:
        for i in range(n):
            name = f"images/x/{i:05d}.png"
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(os.path.join(directory, name))
            digit = i % 3 == 0
            f.write(json.dumps({"file_name": name, "source": "mnist5k" if digit else "openclipart", "category": "x",
                                "origin": str(i), "text": f"An image of a handwritten digit {i % 10}" if digit
                                else f"An image of a red thing number {i}"}) + "\n")
    return directory
