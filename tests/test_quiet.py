"""Known-harmless library messages are dropped at their source loggers; everything else still reaches the user."""

import logging

import dp_sapf  # noqa: F401  (installs the filters)


def test_only_the_known_harmless_messages_are_dropped(caplog):
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logging.getLogger("diffusers.loaders.lora_base").warning(
            "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
        logging.getLogger("transformers.utils.import_utils").warning("another transformers warning")
        logging.getLogger("diffusers.loaders.lora_base").warning("No LoRA keys associated to UNet2DConditionModel")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["another transformers warning", "No LoRA keys associated to UNet2DConditionModel"]
