"""Shared fixtures: the embedded tiny pipeline and a small slice of real Fashion-MNIST, built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from dp_sapf import prepare_data, tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """The embedded default model, built from seeded configs (a few seconds)."""
    return tiny_pipeline.build_tiny_pipeline(str(tmp_path_factory.mktemp("model") / "tiny-sd"), seed=0)


@pytest.fixture(scope="session")
def fashion_data_dir(tmp_path_factory):
    """Real Fashion-MNIST, 4 train and 2 test images per class (N = 40)."""
    path = str(tmp_path_factory.mktemp("data") / "fashion")
    prepare_data.prepare("fashion_mnist", path, max_per_class=4, test_max_per_class=2)
    return path


@pytest.fixture(scope="session")
def tiny_backbone_dirs(tmp_path_factory):
    """The transformer backbones' tiny folders (DiTPipeline, StableDiffusion3Pipeline), built on first use."""
    built = {}

    def get(architecture: str) -> str:
        if architecture not in built:
            built[architecture] = tiny_pipeline.build_tiny_pipeline(
                str(tmp_path_factory.mktemp("model") / architecture), seed=0, architecture=architecture)
        return built[architecture]

    return get
