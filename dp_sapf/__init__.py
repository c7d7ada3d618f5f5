"""DP-SAPF: differentially private saliency-aware parameter fine-tuning for diffusers pipelines."""

__version__ = "0.1.0"
