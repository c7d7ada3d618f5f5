"""DP-SAPF: differentially private saliency-aware parameter fine-tuning for diffusers pipelines."""

import logging as _logging

__version__ = "0.1.0"


class _DropKnownHarmless(_logging.Filter):
    """Drops one library message that is harmless here and alarming to a newcomer; every other message passes."""

    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: _logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


# At their source loggers, never globally: transformers falls back to the PIL image processors without torchvision
# (which must not be installed beside the CPU torch: docs/design.md), and diffusers notes that our LoRA files carry no
# text-encoder keys (they never do: only the denoiser is trained).
_logging.getLogger("transformers.utils.import_utils").addFilter(
    _DropKnownHarmless("requires torchvision (not installed)"))
_logging.getLogger("diffusers.loaders.lora_base").addFilter(_DropKnownHarmless("No LoRA keys associated to CLIPTextModel"))
