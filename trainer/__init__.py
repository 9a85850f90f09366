"""Depth-completion trainer: BP-Net, losses, metrics, the pre-training and fine-tuning loops.

`from trainer import load_completer` runs a checkpoint on your own frames (trainer.complete); it is
imported on first use, so that `import trainer` stays free of torch.
"""


def __getattr__(name: str):
    if name == "load_completer":
        from trainer.complete import load_completer

        return load_completer
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
