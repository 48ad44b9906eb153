"""Trainer for the AN2DL blood-cell challenge: data, augmentation, models, training, evaluation, export."""
