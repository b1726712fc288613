"""Classification fine-tuning of a backbone (2D slices, 3D volumes), with random-init baselines and few labels:
the trainer (``trainer.run``), its model and optimiser, its data, its report and its config check."""
