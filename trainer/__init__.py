"""Depth-completion trainer: BP-Net, losses, metrics, the pre-training and fine-tuning loops."""
