"""Known-harmless library messages are dropped at their source loggers; everything else still reaches the user."""

import logging

import dp_sapf  # noqa: F401  (installs the filters)


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_the_known_harmless_messages_are_dropped():
    import diffusers  # noqa: F401  (the libraries configure their loggers on import: test them as configured)
    import transformers  # noqa: F401

    collect = Collect()
    loggers = [logging.getLogger(n) for n in ("transformers.utils.import_utils", "diffusers.loaders.lora_base")]
    for logger in loggers:  # the libraries' loggers do not propagate to the root: listen on them directly
        logger.addHandler(collect)
    try:
        loggers[0].warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                           "`CLIPImageProcessorPil`")
        loggers[1].warning("No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
        loggers[0].warning("another transformers warning")
        loggers[1].warning("No LoRA keys associated to UNet2DConditionModel")
    finally:
        for logger in loggers:
            logger.removeHandler(collect)
    assert collect.messages == ["another transformers warning", "No LoRA keys associated to UNet2DConditionModel"]
