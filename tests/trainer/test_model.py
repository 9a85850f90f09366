"""BP-Net re-implementation: exact checkpoint layout, loading, forward on edge cases, component maths."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.model import (
    CSPN,
    MODEL_PRESETS,
    MULTISCALE_WEIGHTS,
    BilateralPropagation,
    BPNet,
    KernelHead,
    ModelConfig,
    WeightedPool,
    backproject,
    build_model,
    config_from_dict,
    fold_batchnorm,
    for_inference,
    load_original_checkpoint,
    model_config_dict,
    normalize_rgb,
)
from trainer.ops import knn4, local_conv

# Every tensor name and shape of the original BP-Net (from the project's shared notes), kept in the
# repository so that this test runs on any clone.
TSV = Path(__file__).resolve().parent / "data" / "bpnet_state_dict.tsv"


def read_tsv():
    rows = [line.rstrip("\n").split("\t") for line in TSV.read_text().splitlines()[1:] if line.strip()]
    return {name: (() if shape == "scalar" else tuple(int(s) for s in shape.split("x")), kind)
            for name, shape, kind in rows}


def shape_of(t):
    return tuple(t.shape)


def inputs(B=1, H=64, W=96, n_points=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = normalize_rgb(torch.randint(0, 256, (B, 3, H, W), generator=g, dtype=torch.uint8))
    sparse = torch.zeros(B, 1, H, W)
    flat = torch.randperm(H * W, generator=g)[:n_points]
    sparse.view(B, -1)[:, flat] = 2 + 60 * torch.rand(B, n_points, generator=g)
    K = torch.tensor([[60.0, 0, W / 2 - 0.5], [0, 60.0, H / 2 - 0.5], [0, 0, 1]]).expand(B, 3, 3).clone()
    return rgb, sparse, K


@pytest.fixture(scope="module")
def bpnet():
    return build_model("bpnet")


def test_bpnet_layout_equals_original(bpnet):
    ref = read_tsv()
    sd = bpnet.state_dict()
    assert list(sd) == list(ref)  # same names, same order
    assert {k: shape_of(v) for k, v in sd.items()} == {k: s for k, (s, _) in ref.items()}
    params = dict(bpnet.named_parameters())
    assert {k for k, (_, kind) in ref.items() if kind == "param"} == set(params)
    assert sum(p.numel() for p in bpnet.parameters()) == 89_873_730
    assert sum(int(np.prod(s)) for s, kind in ref.values() if kind == "param") == 89_873_730


def test_original_checkpoint_form_loads_strict(bpnet, tmp_path):
    read_tsv()
    probes = ("conv_img.0.conv.conv.weight", "pred5.wpool.permute.conv.2.bias", "pred0.cspn.convct.1.conv.conv.bias",
              "layer3_img.1.bn2.running_var", "pred2.fuse.decoder.2.upf.bn.num_batches_tracked")
    g = torch.Generator().manual_seed(0)
    saved = {}
    with torch.no_grad():
        for name in probes:
            t = bpnet.state_dict()[name]
            t.copy_(torch.randint(1, 100, t.shape, generator=g))
            saved[name] = t.clone()
    # the original trainer's result_ema.pth, with DDP's prefix for good measure
    sd = {"module." + k: v for k, v in bpnet.state_dict().items()}
    path = tmp_path / "result_ema.pth"
    torch.save({"net": sd, "epoch": 3, "best_metric_ema": 0.7}, path)
    with torch.no_grad():
        for name in probes:
            bpnet.state_dict()[name].zero_()
    load_original_checkpoint(bpnet, path)
    for name in probes:
        assert torch.equal(bpnet.state_dict()[name], saved[name])
    del sd["module.pred0.conv.bias"]
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match="pred0.conv.bias"):
        load_original_checkpoint(bpnet, path)


def test_tiny_forward_shapes_finite_and_backward():
    torch.manual_seed(0)
    model = build_model("tiny")
    rgb, sparse, K = inputs()
    out = model(rgb, sparse, K)
    assert len(out) == 6 and all(o.shape == (1, 1, 64, 96) for o in out)
    assert all(torch.isfinite(o).all() for o in out)
    loss = sum(w * (o - 10).abs().mean() for w, o in zip(MULTISCALE_WEIGHTS, out, strict=True))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("n_points", [0, 1])
def test_forward_survives_few_points(n_points):
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    with torch.no_grad():
        out = model(*inputs(B=2, n_points=n_points))
    assert all(o.shape == (2, 1, 64, 96) and torch.isfinite(o).all() for o in out)


def test_batch_items_are_independent_in_eval():
    # float64: an untrained net amplifies float32 rounding (which differs with the batch size) too much
    torch.manual_seed(0)
    model = build_model("tiny").double().eval()
    rgb, sparse, K = (t.double() for t in inputs(B=2, n_points=80, seed=1))
    K[1, 0, 0] = 75.0
    with torch.no_grad():
        both = model(rgb, sparse, K)
        one = model(rgb[1:], sparse[1:], K[1:])
    for a, b in zip(both, one, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a[1:], b, rtol=1e-9, atol=1e-9)


def test_rejects_sizes_not_multiple_of_32():
    with pytest.raises(ValueError):
        build_model("tiny")(*inputs(H=48, W=96))


def test_weighted_pool_is_a_convex_combination_per_cell():
    torch.manual_seed(0)
    pool = WeightedPool(4, level=2, drift=1e6).eval()
    sparse = torch.zeros(1, 1, 8, 8)
    sparse[0, 0, 1, 2] = 5.0  # cell (0, 0): one point -> its depth
    sparse[0, 0, 4, 4], sparse[0, 0, 7, 6] = 10.0, 20.0  # cell (1, 1): two points -> between them
    with torch.no_grad():
        out = pool(sparse, torch.randn(1, 4, 2, 2))
    assert out.shape == (1, 1, 2, 2)
    # only the original's 1e-6 in the denominator keeps it from being exact
    assert out[0, 0, 0, 0].item() == pytest.approx(5.0, rel=1e-4)
    assert 10.0 < out[0, 0, 1, 1].item() < 20.0
    assert out[0, 0, 0, 1].item() == 0.0 and out[0, 0, 1, 0].item() == 0.0


def test_weighted_pool_is_float32_under_bf16_autocast():
    """bf16 autocast (the GPU default for training) must not touch the geometry: the pool's 1e6 drift
    rounds to a 4096 grid in bf16 and its exp() overflowed into NaN in every cell with a point."""
    torch.manual_seed(0)
    pool = WeightedPool(4, level=2, drift=1e6).eval()
    sparse = torch.zeros(1, 1, 8, 8)
    sparse[0, 0, 1, 2], sparse[0, 0, 4, 4], sparse[0, 0, 7, 6] = 5.0, 10.0, 20.0
    feat = torch.randn(1, 4, 2, 2) * 100  # large weights: what a trained pool can predict
    with torch.no_grad():
        ref = pool(sparse, feat)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pool(sparse, feat)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_whole_network_under_bf16_autocast_is_finite_and_close_to_float32():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    rgb, sparse, K = inputs(n_points=120)
    with torch.no_grad():
        ref = model(rgb, sparse, K)[-1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(rgb, sparse, K)[-1].float()
    assert torch.isfinite(out).all()
    # bf16 features (3 significant digits) perturb the result of this untrained, chaotic network by a
    # few percent, never its scale (before the fix every pixel was NaN)
    assert (out - ref).abs().median().item() < 0.1 * ref.abs().median().item()


def test_backproject_inverts_projection_at_integer_pixels():
    K = torch.tensor([[[100.0, 0, 31.5], [0, 90.0, 20.25], [0, 0, 1]]])
    depth = torch.rand(1, 1, 6, 8) * 10 + 1
    xx, yy = torch.meshgrid(torch.arange(8), torch.arange(6), indexing="xy")
    pts = backproject(depth, K, xx, yy).view(3, 6, 8)
    u = K[0, 0, 0] * pts[0] / pts[2] + K[0, 0, 2]
    v = K[0, 1, 1] * pts[1] / pts[2] + K[0, 1, 2]
    torch.testing.assert_close(u, xx.float())
    torch.testing.assert_close(v, yy.float())
    torch.testing.assert_close(pts[2], depth[0, 0])


@pytest.mark.parametrize("k", [3, 5, 7])
def test_kernel_head_weights_sum_to_one_with_centre_in_the_middle(k):
    head = KernelHead(4, k).eval()
    torch.nn.init.ones_(head.conv[1].conv.bn.weight)
    with torch.no_grad():
        w = head(torch.randn(2, 4, 5, 5))
        raw = head.conv(torch.randn(1, 4, 5, 5))
    assert w.shape == (2, k * k, 5, 5)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 5, 5))
    # the k*k-1 off-centre weights have absolute sum < 1 (normalised), so the centre stays positive
    off = torch.cat([w[:, : k * k // 2], w[:, k * k // 2 + 1:]], 1)
    assert torch.all(off.abs().sum(1) <= 1 + 1e-6) and raw.shape[1] == k * k - 1


def test_presets_config_round_trip():
    assert MULTISCALE_WEIGHTS == tuple(4.0 ** -(5 - i) for i in range(6))
    for cfg in MODEL_PRESETS.values():
        assert config_from_dict(json.loads(json.dumps(model_config_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict({**model_config_dict(MODEL_PRESETS["tiny"]), "attention_heads": 4})
    model = build_model("tiny")
    rebuilt = build_model(json.loads(json.dumps(model_config_dict(model))))
    assert rebuilt.config == model.config == MODEL_PRESETS["tiny"]
    assert {k: shape_of(v) for k, v in rebuilt.state_dict().items()} == {
        k: shape_of(v) for k, v in model.state_dict().items()}
    m = build_model(ModelConfig(**{**model_config_dict(MODEL_PRESETS["tiny"]), "cspn_iters": (4,) * 6}))
    assert isinstance(m, BPNet) and m.pred0.cspn.iters == 4
    with pytest.raises(ValueError, match="architecture"):
        build_model({**model_config_dict(MODEL_PRESETS["tiny"]), "arch": "other"})


def test_tiny_checkpoint_round_trip_gives_same_outputs(tmp_path):
    torch.manual_seed(0)
    a = build_model("tiny").eval()
    for p in a.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    torch.save({"net": a.state_dict()}, tmp_path / "ckpt.pth")
    b = load_original_checkpoint(build_model("tiny"), tmp_path / "ckpt.pth").eval()
    x = inputs(n_points=40)
    with torch.no_grad():
        for oa, ob in zip(a(*x), b(*x), strict=True):
            assert torch.equal(oa, ob)


def test_normalize_rgb_matches_the_original_formula():
    rgb = torch.tensor([[[[0]], [[128]], [[255]]]], dtype=torch.uint8)
    out = normalize_rgb(rgb)
    expected = [(0 - 90.9950) / 79.2382, (128 - 96.2278) / 80.5267, (255 - 94.3213) / 82.1483]
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.flatten().numpy(), np.float32(expected), rtol=0, atol=0)


def with_random_norms(module, seed=0):
    """Untrained BN layers are the identity up to their batch statistics; random affine parameters make
    a comparison see every weight."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module


def reference_bilateral(prop, feat, points, offset, idx):
    """BilateralPropagation as the original writes it: the MLP on the concatenated [own feature, gathered
    neighbour feature, neighbour point, offset] of every pixel's 4 neighbours."""
    B, C, H, W = feat.shape
    num, N = idx.shape[1], H * W
    feat = feat.reshape(B, C, N)
    gather_idx = idx.reshape(B, 1, num * N)
    own = feat.view(B, C, 1, N).expand(B, C, num, N)
    nbr = torch.gather(feat, 2, gather_idx.expand(B, C, num * N)).view(B, C, num, N)
    nbr_pts = torch.gather(points, 2, gather_idx.expand(B, 3, num * N)).view(B, 3, num, N)
    x = prop.convXF(torch.cat([own, nbr, nbr_pts, offset], dim=1))
    x = prop.act(x + prop.convXL(x))
    alpha, beta, omega = torch.split(prop.coef.conv(x), 1, dim=1)
    omega = torch.softmax(omega, dim=2)
    return torch.sum(((alpha + 1) * nbr_pts[:, -1:] + beta) * omega, dim=2, keepdim=True).view(B, 1, H, W)


def test_bilateral_propagation_equals_the_concatenated_mlp():
    # the module applies the first 1x1 conv to the pixels before gathering: the same sums, reordered
    torch.manual_seed(0)
    prop = with_random_norms(BilateralPropagation(6)).double().train()
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 6, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    sparse = torch.where(torch.rand(2, 1, 5, 8, generator=g) < 0.2, 3.0, 0.0).double()
    idx, offset = knn4(sparse)
    points = (torch.randn(2, 3, 40, generator=g, dtype=torch.float64) * 20).requires_grad_()
    got = prop(feat, points, offset, idx)
    ref = reference_bilateral(prop, feat, points, offset, idx)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    params = [feat, points, *prop.parameters()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(ref.square().sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def reference_cspn(cspn, feat, h, h0):
    """CSPN as the original writes it: normalised kernels from the heads, then every step of the three
    chains with local_conv, the confidences blending the midway and final states."""
    kernels = [cspn.weight3x3(feat), cspn.weight5x5(feat), cspn.weight7x7(feat)]
    masks = torch.split(cspn.convmask(feat) * (h0 > 1e-3).float(), 1, dim=1)
    confs = torch.split(cspn.convck(feat), 1, dim=1)
    hs, states = [h, h, h], [h]
    for i in range(cspn.iters):
        hs = [(1.0 - m) * local_conv(hk, w) + m * h0 for hk, w, m in zip(hs, kernels, masks, strict=True)]
        if i == cspn.iters // 2 - 1:
            states.append(confs[0] * hs[0] + confs[1] * hs[1] + confs[2] * hs[2])
    states.append(confs[0] * hs[0] + confs[1] * hs[1] + confs[2] * hs[2])
    states = torch.cat(states, dim=1)
    blend = cspn.convct(torch.cat([feat, states], dim=1))
    return torch.sum(blend * states, dim=1, keepdim=True)


@pytest.mark.parametrize("iters", [2, 5])
def test_cspn_equals_the_step_by_step_reference(iters):
    torch.manual_seed(iters)
    cspn = with_random_norms(CSPN(4, iters), seed=iters).double().train()
    g = torch.Generator().manual_seed(2)
    feat = torch.randn(2, 4, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    h = (torch.rand(2, 1, 6, 9, generator=g, dtype=torch.float64) * 30 + 2).requires_grad_()
    h0 = torch.where(torch.rand(2, 1, 6, 9, generator=g) < 0.3, h.detach(), 0.0)
    got, ref = cspn(feat, h, h0), reference_cspn(cspn, feat, h, h0)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    params = [feat, h, *cspn.parameters()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(ref.square().sum(), params),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["tiny", "bpnet-s"])
def test_inference_network_equals_the_eval_network(name):
    """for_inference (norms folded into the convs, channels-last on a CPU) computes what eval mode does."""
    import copy

    torch.manual_seed(0)
    model = with_random_norms(build_model(name)).double()
    rgb, sparse, K = (t.double() for t in inputs(B=2, n_points=150, seed=3))
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.momentum = 0.5
        model.train()(rgb, sparse, K)  # running statistics that are not 0 and 1
        ref = model.eval()(rgb, sparse, K)
        folded = fold_batchnorm(copy.deepcopy(model))
        fast = for_inference(copy.deepcopy(model))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) and fast.channels_last
        for net in (folded, fast):
            for a, b in zip(net(rgb, sparse, K), ref, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the geometry stays float32 in the fast network too
            assert torch.isfinite(fast.float()(rgb.float(), sparse.float(), K.float())[-1]).all()
