"""The 2-D U-Net for images (cgtools.models.unet2d): shapes, initialisation, time handling,
invariances, config round trips, the registry entry and a tiny overfit."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from cgtools.diffusion import MaskedConfig, UniformConfig, make_process
from cgtools.diffusion.registry import PROCESSES
from cgtools.errors import ConfigError
from cgtools.models.registry import ARCHITECTURES, DataSpec, architecture
from cgtools.models.unet2d import (UNet2D, UNet2DConfig, activation_floats, group_count, parameter_count,
                                   training_bytes)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(width=8, channel_mult=(1, 2), num_res_blocks=1, heads=2, groups=4)


def _tiny(**kw) -> UNet2DConfig:
    return UNet2DConfig(**{"channels": 1, "image_size": 8, **TINY, **kw})


def _unzeroed(net: UNet2D, seed: int = 0, std: float = 0.1) -> UNet2D:
    """The net with its zero-initialised weights (ends of residual branches, head) redrawn, so that
    every path carries signal (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return net


class _StubProcess:
    """Not a CategoricalProcess; asks for twice the channels (a learned variance)."""

    name = "stub"

    @staticmethod
    def output_channels(c: int) -> int:
        return 2 * c


@pytest.mark.parametrize("channels, size, mult, out, width", [
    (1, 8, (1,), 1, 8),
    (3, 8, (1, 2), 6, 8),
    (1, 16, (1, 2, 2), 2, 8),
    (3, 16, (1, 2), 3, 16),
    (3, 32, (1, 2, 2), 6, 8),
    (1, 32, (2,), 1, 8),
])
def test_output_shape_dtype_and_zero_at_initialisation(channels, size, mult, out, width):
    cfg = UNet2DConfig(channels=channels, image_size=size, out_channels=out, width=width, channel_mult=mult,
                       num_res_blocks=1, heads=2, groups=4)
    net = UNet2D(cfg, seed=0)
    x = torch.randn(3, channels, size, size, dtype=torch.float64)  # float64 in: cast, float32 out
    y = net(x, torch.rand(3))
    assert y.shape == (3, out, size, size) and y.dtype == torch.float32
    assert torch.equal(y, torch.zeros_like(y))  # zero-initialised head: the untrained net predicts 0
    # and with every path live the output is finite and non-zero
    y = _unzeroed(net)(x, torch.rand(3))
    assert y.shape == (3, out, size, size) and torch.isfinite(y).all() and y.abs().mean() > 1e-3


def test_non_square_images():
    cfg = _tiny(image_size=8, image_width=16, channel_mult=(1, 2, 2))
    assert cfg.attention_resolutions == (4, 2)  # heights below full resolution
    y = _unzeroed(UNet2D(cfg, seed=1))(torch.randn(2, 1, 8, 16), torch.rand(2))
    assert y.shape == (2, 1, 8, 16)
    with pytest.raises(ValueError, match=r"x_t must be \[B, 1, 8, 16\]"):
        UNet2D(cfg)(torch.randn(2, 1, 16, 8), torch.rand(2))


def test_weights_are_a_function_of_the_seed_and_leave_the_global_rng_alone():
    cfg = _tiny()
    before = torch.get_rng_state()
    a, b, c = UNet2D(cfg, seed=3).state_dict(), UNet2D(cfg, seed=3).state_dict(), UNet2D(cfg, seed=4).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    random_tensors = [k for k in a if a[k].dim() > 1 and a[k].any()]
    assert random_tensors and all(not torch.equal(a[k], c[k]) for k in random_tensors)


def test_one_time_for_the_batch_equals_the_time_repeated():
    net = _unzeroed(UNet2D(_tiny(), seed=0)).eval()
    x = torch.randn(4, 1, 8, 8)
    shared = net(x, torch.tensor([0.3]))
    # (equal up to float rounding: broadcasting one embedding may order the sums differently)
    torch.testing.assert_close(shared, net(x, torch.full((4,), 0.3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared, net(x, torch.tensor(0.3)), rtol=1e-5, atol=1e-5)
    assert (shared - net(x, torch.tensor([0.31]))).abs().max() > 1e-4  # and t is read


def test_the_output_depends_on_t_after_a_few_gradient_steps():
    net = UNet2D(_tiny(), seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    target_lo, target_hi = torch.randn(2, 4, 1, 8, 8, generator=gen)
    t_lo, t_hi = torch.full((4,), 0.1), torch.full((4,), 0.9)
    assert torch.equal(net(x, t_lo), net(x, t_hi))  # zero head: both 0
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(5):  # learn one target at t = 0.1 and another at t = 0.9
        loss = (net(x, t_lo) - target_lo).square().mean() + (net(x, t_hi) - target_hi).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (net(x, t_lo) - net(x, t_hi)).abs().mean() > 1e-2


def test_equivariant_to_permuting_the_batch_but_not_to_permuting_pixels():
    net = _unzeroed(UNet2D(_tiny(), seed=0)).eval()
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(5, 1, 8, 8, generator=gen), torch.rand(5, generator=gen)
    with torch.no_grad():
        y = net(x, t)
        perm = torch.tensor([3, 0, 4, 1, 2])
        torch.testing.assert_close(net(x[perm], t[perm]), y[perm], rtol=0, atol=1e-5)
        # each image is denoised on its own: changing one leaves the others' outputs unchanged
        x2 = x.clone()
        x2[0] = torch.randn(1, 8, 8, generator=gen)
        y2 = net(x2, t)
        torch.testing.assert_close(y2[1:], y[1:], rtol=0, atol=1e-5)
        assert (y2[0] - y[0]).abs().max() > 1e-3
        # a pixel permutation is neither ignored nor simply carried through (convs see neighbours,
        # zero padding sees the border)
        pix = torch.randperm(64, generator=gen)
        xp = x.flatten(2)[:, :, pix].view_as(x)
        yp = net(xp, t)
        assert (yp - y).abs().mean() > 1e-2
        assert (yp - y.flatten(2)[:, :, pix].view_as(y)).abs().mean() > 1e-2


def test_runs_under_vmap_as_the_sweep_stacks_it():
    nets = [_unzeroed(UNet2D(_tiny(), seed=s), seed=s) for s in (0, 1)]
    params, buffers = stack_module_state(nets)
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 1, 8, 8, generator=gen), torch.rand(2, 3, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a missing batching rule would only be slower)
        y = vmap(lambda p, b, x, t: functional_call(nets[0], (p, b), (x, t)))(params, buffers, x, t)
    torch.testing.assert_close(y, torch.stack([nets[k](x[k], t[k]) for k in range(2)]), rtol=1e-4, atol=1e-5)


def test_config_json_round_trip_keeps_tuples_and_refuses_unknown_keys():
    cfg = UNet2DConfig(channels=3, image_size=16, out_channels=6, channel_mult=[1, 2, 3], heads=2,
                       attention_resolutions=[4], dropout=0.1, time_dim=96)
    assert cfg.channel_mult == (1, 2, 3) and cfg.attention_resolutions == (4,)
    text = cfg.to_json()
    obj = json.loads(text)
    assert obj["schema"] == "unet2d/1" and obj["channel_mult"] == [1, 2, 3]
    back = UNet2DConfig.from_json(text)
    assert back == cfg and isinstance(back.channel_mult, tuple) and isinstance(back.attention_resolutions, tuple)
    assert UNet2DConfig.from_json(obj) == cfg
    assert architecture("unet2d").config_from_json(text) == cfg
    # resolved defaults are stored explicitly
    d = UNet2DConfig(channels=1, image_size=32)
    assert (d.out_channels, d.image_width, d.time_dim, d.attention_resolutions) == (1, 32, 256, (16, 8))
    assert UNet2DConfig(channels=1, image_size=8, channel_mult="1, 2").channel_mult == (1, 2)
    with pytest.raises(ConfigError, match="unknown unet2d config keys: depth"):
        UNet2DConfig.from_json({**obj, "depth": 3})
    with pytest.raises(ConfigError, match="no 'image_size'"):
        UNet2DConfig.from_json({k: v for k, v in obj.items() if k != "image_size"})
    with pytest.raises(ConfigError, match="schema"):
        UNet2DConfig.from_json({**obj, "schema": "unet/1"})


def test_registry_entry_configures_from_the_data_and_the_process():
    entry = architecture("unet2d")
    assert entry is ARCHITECTURES["unet2d"] and not entry.mup
    assert entry.settings == {"width", "channel_mult", "num_res_blocks", "attention_resolutions", "heads",
                              "dropout", "groups", "time_dim"}
    cfg = entry.configure(DataSpec(shape=(1, 8, 8)), _StubProcess(), {})
    assert (cfg.channels, cfg.out_channels, cfg.image_size, cfg.image_width) == (1, 2, 8, 8)
    assert cfg == UNet2DConfig(channels=1, image_size=8, out_channels=2)  # the defaults
    cfg = entry.configure(DataSpec(shape=(3, 16, 8)), object(), {"width": 16, "channel_mult": [1, 2]})
    assert (cfg.out_channels, cfg.image_size, cfg.image_width, cfg.channel_mult) == (3, 16, 8, (1, 2))
    net = entry.build(cfg, object(), 5)
    assert isinstance(net, UNet2D) and net(torch.zeros(2, 3, 16, 8), torch.rand(1)).shape == (2, 3, 16, 8)
    assert entry.memory_bytes(cfg, 8) == training_bytes(cfg, 8) > 0


@pytest.mark.skipif("gaussian" not in PROCESSES, reason="the Gaussian process is not registered yet")
def test_registry_entry_with_the_gaussian_process():
    from cgtools.diffusion import make_config

    process = make_process(make_config("gaussian"), 2)
    cfg = architecture("unet2d").configure(DataSpec(shape=(1, 8, 8)), process, dict(TINY))
    expected = process.output_channels(1) if hasattr(process, "output_channels") else 1
    assert cfg.channels == 1 and cfg.out_channels == expected
    net = architecture("unet2d").build(cfg, process, 0)
    # one training step through the Process interface: the prediction is what the loss expects
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=gen) * 2 - 1
    t = process.sample_t(4, gen)
    x_t = process.q_sample(x0, t, gen)
    prediction = net(x_t, process.network_time(t))
    assert prediction.shape == (4, expected, 8, 8)
    loss = process.loss(prediction, x0, x_t, t).loss.mean()
    loss.backward()
    assert torch.isfinite(loss) and net.conv_out.weight.grad.abs().sum() > 0


def test_impossible_configs_and_mismatched_data_are_config_errors():
    entry = architecture("unet2d")
    with pytest.raises(ConfigError, match="cannot be halved 2 times"):
        UNet2DConfig(channels=1, image_size=6)  # 3 levels: 6 -> 3 -> 1.5
    with pytest.raises(ConfigError, match="cannot be halved 2 times"):
        entry.configure(DataSpec(shape=(1, 8, 10)), _StubProcess(), {})
    UNet2DConfig(channels=1, image_size=6, channel_mult=(1, 2))  # one halving is fine
    with pytest.raises(ConfigError, match="attention resolution"):
        UNet2DConfig(channels=1, image_size=8, attention_resolutions=(16,))
    with pytest.raises(ConfigError, match="attention heads"):
        UNet2DConfig(channels=1, image_size=8, width=6, channel_mult=(1,), heads=4)  # the middle: 6 channels
    with pytest.raises(ConfigError, match="width must be even"):
        UNet2DConfig(channels=1, image_size=8, width=7, heads=1)
    with pytest.raises(ConfigError, match="dropout"):
        UNet2DConfig(channels=1, image_size=8, dropout=1.0)
    with pytest.raises(ConfigError, match="channel_mult"):
        UNet2DConfig(channels=1, image_size=8, channel_mult=())
    with pytest.raises(ConfigError, match="num_res_blocks"):
        UNet2DConfig(channels=1, image_size=8, num_res_blocks=0)
    with pytest.raises(ConfigError, match="token data needs --arch unet or transformer"):
        entry.configure(DataSpec(vocab=8, length=8), _StubProcess(), {})
    masked = make_process(MaskedConfig(), 4)
    with pytest.raises(ConfigError, match="denoises images; masked noise corrupts tokens"):
        entry.configure(DataSpec(shape=(1, 8, 8)), masked, {})
    with pytest.raises(ConfigError, match=r"shape \(C, H, W\)"):
        entry.configure(DataSpec(shape=(8, 8)), _StubProcess(), {})
    # and the token architectures refuse images
    for arch, process in (("unet", make_process(UniformConfig(), 2)), ("transformer", masked)):
        with pytest.raises(ConfigError, match=f"the {arch} architecture denoises token sequences; "
                                              "image data needs --arch unet2d"):
            architecture(arch).configure(DataSpec(shape=(1, 8, 8)), process, {})


def test_group_count_is_the_largest_divisor_not_above_groups():
    assert [group_count(c, 32) for c in (1, 3, 8, 48, 64, 96, 128)] == [1, 3, 8, 24, 32, 32, 32]
    net = UNet2D(UNet2DConfig(channels=1, image_size=8, width=12, channel_mult=(1, 2), heads=3, groups=8))
    assert net.conv_in.weight.shape[0] == 12 and net.norm_out.num_groups == 6


def test_parameter_count_and_memory_estimate_match_the_module():
    for cfg in (_tiny(), UNet2DConfig(channels=3, image_size=16, out_channels=6, width=16),
                _tiny(channel_mult=(1,), num_res_blocks=2), _tiny(image_width=16, channel_mult=(1, 1, 2))):
        net = UNet2D(cfg)
        assert parameter_count(cfg) == sum(p.numel() for p in net.parameters())
    # the activation estimate against the tensors autograd actually keeps (within ±30 %)
    cfg = UNet2DConfig(channels=3, image_size=16, width=16)
    net = UNet2D(cfg)
    kept: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(torch.randn(4, 3, 16, 16), torch.rand(4))
    estimate = 4 * activation_floats(cfg, 4)
    assert 0.7 < estimate / sum(kept.values()) < 1.3
    assert training_bytes(cfg, 8) > training_bytes(cfg, 4) > 16 * parameter_count(cfg)


def test_dropout_only_in_training_mode():
    net = _unzeroed(UNet2D(_tiny(dropout=0.5), seed=0))
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    net.train()
    assert not torch.equal(net(x, t), net(x, t))
    net.eval()
    assert torch.equal(net(x, t), net(x, t))


def test_a_tiny_net_overfits_four_images():
    """4 fixed 8×8 images, fixed times and a fixed noise target: Adam drives the MSE from ~1 (the
    zero prediction) down by more than 100× within 100 steps (measured: ~10⁵× for seeds 0-2)."""
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.rand(4, generator=gen)
    eps = torch.randn(4, 1, 8, 8, generator=gen)
    net = UNet2D(UNet2DConfig(channels=1, image_size=8, width=16, channel_mult=(1, 2), num_res_blocks=1,
                              heads=2, groups=8), seed=0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = (net(x_t, t) - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.5 and min(losses[-10:]) < losses[0] / 100, (losses[0], losses[-10:])
