"""stablediff: Stable Diffusion training, fine-tuning and inference that never loses work."""

__version__ = "0.1.0"
