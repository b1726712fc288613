"""DINOv2 pretraining: the trainer (``trainer.run``), its student/teacher loss model, its multi-crop batches and
its config check. A run's backbone is opened by other jobs through ``medjax.runs``."""
