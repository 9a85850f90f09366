"""The DMD3C paper's training setting, with BP-Net's optimiser where the paper is silent.

Paper: BP-Net, AdamW, weight decay 0.05, gradient clipping 0.1, batch 16 (4 x A100: 4 per GPU under
torchrun --nproc_per_node 4). BP-Net's config (configs/): peak lr 1e-3, betas (0.9, 0.999), one-cycle
cosine with 10% warm-up, div_factor 40 and final_div_factor 0.1 (start at lr/40, end at lr/4), EMA
decay 0.9999, training crops 256 x 1216 (KITTI), 30 epochs of KITTI DC's 85,898 frames at batch 16 =
161,000 steps. Not reproduced: BP-Net's beta1 cycling (0.85..0.95) and its lr noise. The paper gives
no pre-training length; the same step count is used. Pre-training images narrower than 1216 are
padded to the crop: pass --crop to match your data (e.g. 256x640 for COCO-sized images).
"""

from trainer.train import TrainConfig

PRETRAIN = TrainConfig(
    stage="pretrain", model="bpnet", out="runs/paper-pretrain",
    steps=161_000, batch_size=16, crop="256x1216",
    lr=1e-3, lr_start_frac=1 / 40, lr_end_frac=1 / 4, warmup_frac=0.1,
    weight_decay=0.05, betas=(0.9, 0.999), grad_clip=0.1,
    ema_decay=0.9999, ema_warmup=False,
    workers=4, shuffle_buffer=1000, log_every=50, ckpt_every=2000, keep=5,
)

FINETUNE = TrainConfig(
    stage="finetune", model=None, out="runs/paper-finetune",
    steps=161_000, batch_size=16, crop="256x1216",
    lr=1e-3, lr_start_frac=1 / 40, lr_end_frac=1 / 4, warmup_frac=0.1,
    weight_decay=0.05, betas=(0.9, 0.999), grad_clip=0.1,
    ema_decay=0.9999, ema_warmup=False,
    lambda_ssi=1.0, lambda_reg=0.5, space="disparity",
    workers=4, shuffle_buffer=1000, log_every=50, ckpt_every=2000, keep=5,
)
