"""Training one config: data, augmentation, models, optimizers and the training loop (never Ray)."""
