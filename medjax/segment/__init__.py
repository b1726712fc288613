"""Segmentation and multi-task (2D slices, 3D volumes): heads on backbone patch tokens, Dice and HD95 per
patient; the trainer (``trainer.run``), data, models, evaluation, report and config check."""
