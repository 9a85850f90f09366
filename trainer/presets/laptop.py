"""Defaults that finish on a laptop CPU: the small network (bpnet-s) and 128 x 256 crops, which fit
inside both families of the synthetic world (street 192 x 608, room 192 x 256) without padding.
Time per step on a small CPU: docs/trainer.md (presets) and bench/RESULTS.md ("Training step")."""

from trainer.train import TrainConfig

PRETRAIN = TrainConfig(
    stage="pretrain", model="bpnet-s", out="runs/pretrain",
    steps=1000, batch_size=4, crop="128x256",
    lr=1e-3, weight_decay=0.05, grad_clip=0.1, warmup_frac=0.1,
    ema_decay=0.999, ema_warmup=True,
    workers=2, shuffle_buffer=256, log_every=10, ckpt_every=250,
)

FINETUNE = TrainConfig(
    stage="finetune", model=None, out="runs/finetune",
    steps=500, batch_size=4, crop="128x256",
    lr=5e-4, weight_decay=0.05, grad_clip=0.1, warmup_frac=0.1,
    ema_decay=0.999, ema_warmup=True,
    lambda_ssi=1.0, lambda_reg=0.5, space="disparity",
    workers=2, shuffle_buffer=256, log_every=10, ckpt_every=250,
)
