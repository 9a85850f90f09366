"""Input conventions at inference: the original BP-Net NYU checkpoints take ImageNet-normalised RGB and
depth in metres x 10; predictions must still come back in metres."""

import numpy as np
import pytest
import torch
from conftest import write_shards

from trainer.evaluate import iter_predictions
from trainer.model import INPUT_CONVENTIONS, KITTI_RGB_MEAN, KITTI_RGB_STD


class EchoSparse(torch.nn.Module):
    """Predicts its sparse input everywhere (6 times) and records the RGB it was given."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen_rgb = []
        self.seen_sparse = []

    def forward(self, rgb, sparse, K):
        self.seen_rgb.append(rgb.clone())
        self.seen_sparse.append(sparse.clone())
        return [sparse + 0 * self.dummy] * 6


@pytest.mark.parametrize("convention", ["kitti", "nyu"])
def test_inputs_scaled_and_outputs_back_in_metres(tmp_path, convention):
    write_shards(tmp_path / "s", 1, 2)
    model = EchoSparse()
    preds = list(iter_predictions(model, str(tmp_path / "s"), convention=convention))
    conv = INPUT_CONVENTIONS[convention]
    assert len(preds) == 2
    for p, rgb_in, sparse_in in zip(preds, model.seen_rgb, model.seen_sparse, strict=True):
        h, w = p.depth_m.shape
        # the network saw depth x scale, and the prediction is in metres again
        np.testing.assert_allclose(sparse_in[0, 0, :h, :w].numpy(), p.sparse * conv["depth_scale"], rtol=1e-6)
        np.testing.assert_allclose(p.depth_m, p.sparse, rtol=1e-6, atol=1e-7)
        # and the RGB was normalised with this convention's statistics
        raw = torch.from_numpy(p.rgb.astype(np.float64)).permute(2, 0, 1)
        mean = torch.tensor(conv["rgb_mean"], dtype=torch.float64).view(3, 1, 1)
        std = torch.tensor(conv["rgb_std"], dtype=torch.float64).view(3, 1, 1)
        np.testing.assert_allclose(rgb_in[0, :, :h, :w].numpy(), ((raw - mean) / std).float().numpy(), atol=1e-5)


def test_nyu_statistics_are_imagenet_on_the_0_255_scale():
    nyu = INPUT_CONVENTIONS["nyu"]
    np.testing.assert_allclose(np.array(nyu["rgb_mean"]) / 255, [0.485, 0.456, 0.406])
    np.testing.assert_allclose(np.array(nyu["rgb_std"]) / 255, [0.229, 0.224, 0.225])
    assert nyu["depth_scale"] == 10.0
    assert INPUT_CONVENTIONS["kitti"] == {"rgb_mean": KITTI_RGB_MEAN, "rgb_std": KITTI_RGB_STD, "depth_scale": 1.0}


def test_unknown_convention_is_refused(tmp_path):
    write_shards(tmp_path / "s", 1, 1)
    with pytest.raises(ValueError, match="convention"):
        list(iter_predictions(EchoSparse(), str(tmp_path / "s"), convention="imagenet"))


def test_network_inputs_follow_the_convention():
    from trainer.model import network_inputs, normalize_rgb

    rgb = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    sparse = torch.rand(2, 1, 4, 5) * 10
    for name, conv in INPUT_CONVENTIONS.items():
        x, s, scale = network_inputs(rgb, sparse, name)
        torch.testing.assert_close(x, normalize_rgb(rgb, conv["rgb_mean"], conv["rgb_std"]))
        torch.testing.assert_close(s, sparse * conv["depth_scale"])
        assert scale == conv["depth_scale"]


def test_finetune_from_an_original_nyu_pth_feeds_and_records_its_convention(tmp_path, monkeypatch):
    """Fine-tuning an original BP-Net NYU .pth: the network sees ImageNet RGB and depth x 10 during
    training too, the checkpoints record "nyu", and eval/predict then need no --convention (and refuse a
    contradicting one)."""
    import trainer.model as tm
    import trainer.train as tt
    from trainer.checkpoint import export_weights, read_checkpoint, resolve
    from trainer.evaluate import InferenceOptions, evaluate, load_for_inference
    from trainer.train import TrainConfig, train

    write_shards(tmp_path / "s", 1, 4)
    pth = tmp_path / "nyu.pth"
    torch.save({"net": tm.build_model("tiny").state_dict()}, pth)
    seen = []
    real = tm.network_inputs

    def spy(rgb_raw, sparse, convention="kitti"):
        seen.append(convention)
        return real(rgb_raw, sparse, convention)

    monkeypatch.setattr(tt, "network_inputs", spy)  # the name the training loop calls
    cfg = TrainConfig(stage="finetune", shards=str(tmp_path / "s"), out=str(tmp_path / "ft"), init=str(pth),
                      model="tiny", convention="nyu", steps=2, batch_size=2, crop="64x96", workers=0,
                      log_every=1, ckpt_every=10_000, progress=False)
    summary = train(cfg)
    assert seen == ["nyu", "nyu"] and np.isfinite(summary["final_loss"])
    ckpt = resolve(tmp_path / "ft")
    assert read_checkpoint(ckpt)[1]["convention"] == "nyu"
    export = export_weights(ckpt, tmp_path / "export.safetensors")
    for src in (ckpt, export):
        assert load_for_inference(str(src), device="cpu")[1]["convention"] == "nyu"
    with pytest.raises(ValueError, match="'nyu' input convention"):
        evaluate(str(ckpt), str(tmp_path / "s"), kind="nyu", opts=InferenceOptions(convention="kitti", device="cpu"))
    assert evaluate(str(ckpt), str(tmp_path / "s"), kind="nyu",
                    opts=InferenceOptions(device="cpu"))["convention"] == "nyu"
    # a new network, or an original .pth without --convention, is a KITTI-convention one
    assert load_for_inference(str(pth), "tiny", device="cpu")[1]["convention"] == "kitti"
