"""A small network outside trainer/, for `--model plugin_net:PluginNet` (tests/trainer/test_plugin.py): the
plugin contract of docs/trainer.md ("Any network") and nothing more."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PluginNet(nn.Module):
    """forward(rgb, sparse, K): the scan's mean depth plus a learned residual; `outputs` 1 returns one map,
    2 a list coarse (1/4, upsampled) to fine."""

    def __init__(self, width: int = 8, outputs: int = 2):
        super().__init__()
        self.outputs = outputs
        self.enc = nn.Sequential(nn.Conv2d(5, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Conv2d(width + 1, 1, 3, padding=1)

    def forward(self, rgb: torch.Tensor, sparse: torch.Tensor, K: torch.Tensor):
        valid = (sparse > 0).to(sparse.dtype)
        mean = (sparse.sum((2, 3), keepdim=True) / valid.sum((2, 3), keepdim=True).clamp(min=1))
        f = self.enc(torch.cat([rgb, sparse, valid], 1))
        fx = (K[:, 0, 0] / 100).view(-1, 1, 1, 1).expand_as(sparse)  # K reaches the network
        fine = mean + self.head(torch.cat([f, fx], 1))
        if self.outputs == 1:
            return fine
        coarse = F.interpolate(F.avg_pool2d(fine, 4), size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return [coarse, fine]
