"""Masked-autoencoder (MAE) pretraining, a sibling of ``pretrain/``: the trainer (``trainer.run``), its
single-view batches, the reconstructions it draws and its config check. The model is
``medjax.models.mae`` (medjax's ViT as the encoder) and the loss ``medjax.objectives.mae``."""
