"""Fine-tuning from an existing model: the base, LoRA/LoCon adapters, frozen layers, DreamBooth,
textual inversion, early stopping, and LoRA files in the layouts other tools load."""
