"""The RHM U-Net (cgtools.models.unet) and its μP parameterisation (cgtools.models.mup).

The channel-last matmul network is checked against an independent channel-first implementation
built from torch.nn.functional.conv1d / conv_transpose1d / layer_norm; μP is checked with a
coordinate check over widths and a standard-parameterisation negative control.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from cgtools.errors import ConfigError
from cgtools.models import UNet, UNetConfig, flops_forward, flops_per_step, param_groups
from cgtools.models.mup import raw_learning_rates
from cgtools.models.unet import reference_leaf_standardisation


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(cfg: UNetConfig, batch: int, seed: int):
    """Random clean x0 [B, d], a uniformly-noised x_t [B, d], t [B] and keep_prob = 1 - t."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, cfg.vocab, (batch, cfg.length), generator=g)
    t = torch.rand(batch, generator=g)
    keep = torch.rand(batch, cfg.length, generator=g) < (1 - t)[:, None]
    x_t = torch.where(keep, x0, torch.randint(0, cfg.vocab, (batch, cfg.length), generator=g))
    if cfg.masked:
        x_t = torch.where(keep, x0, torch.full_like(x0, cfg.vocab))
    return x0, x_t, t, 1 - t


# ---- an independent channel-first reference --------------------------------------------------
def _sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = np.array([10000.0 ** (-m / (half - 1)) for m in range(half)])
    arg = 1000.0 * t.double().numpy()[:, None] * freqs[None, :]
    return torch.from_numpy(np.concatenate([np.sin(arg), np.cos(arg)], axis=1)).float()


def _reference_forward(model: UNet, x_t, t, keep_prob):
    """Channel-first U-Net with torch convs, weights converted from the GEMM layouts."""
    c = model.config
    n, s, L, K = c.width, c.branching, c.depth, c.vocab

    def bias(p):  # [C] -> [1, C, 1]
        return 0.0 if p is None else p[None, :, None]

    def tail(a, blk, k):  # a: [B, n, len]
        if tb is not None:
            a = a + tb[:, k, :, None]
        if blk.norm_weight is not None:
            a = F.layer_norm(a.transpose(1, 2), (n,), blk.norm_weight, blk.norm_bias,
                             1e-5).transpose(1, 2)
        pre.append(a.transpose(1, 2))
        return F.gelu(a)

    if c.input_mode == "onehot":
        inp = F.one_hot(x_t, c.input_vocab).float().transpose(1, 2)  # [B, V, d]
    else:
        mean = 1 / K if c.leaf_mean is None else c.leaf_mean
        std = math.sqrt(K - 1) / K if c.leaf_std is None else c.leaf_std
        if c.masked:
            msg = torch.stack([F.one_hot(torch.tensor(x), K).float() if x < K
                               else torch.full((K,), 1 / K) for x in x_t.reshape(-1).tolist()])
            msg = msg.view(*x_t.shape, K)
        else:
            a = keep_prob[:, None, None]
            msg = a * F.one_hot(x_t, K).float() + (1 - a) / K
        inp = ((msg - mean) / std).transpose(1, 2)  # [B, K, d]
    V = inp.shape[1]
    h = F.conv1d(inp, model.embed_weight.T[:, :, None]) / math.sqrt(V) + bias(model.embed_bias)
    if c.embed_gelu:
        h = F.gelu(h)
    tb = None
    if c.time_embedding:
        tb = _sinusoid(t, c.time_dim) @ model.time_weight / math.sqrt(c.time_dim)
        tb = tb.view(-1, 2 * L, n)
    pre, skips = [], [h]
    for i, blk in enumerate(model.enc):
        w = blk.weight.view(s, n, n).permute(2, 1, 0)  # [out, in, k]
        h = tail(F.conv1d(h, w, stride=s) / math.sqrt(s * n) + bias(blk.bias), blk, i)
        skips.append(h)
    z = skips[L]
    cin = c.skip_factor * n
    for j, blk in enumerate(model.dec):
        skip = skips[L - j]
        if c.skip == "concat":
            inp = torch.cat([z, skip], dim=1)
        else:
            inp = z if j == 0 else z + skip
        w = blk.weight.view(cin, s, n).permute(0, 2, 1)  # [in, out, k]
        fan = cin * (s if c.deconv_fan_in == "cin_k" else 1)
        z = tail(F.conv_transpose1d(inp, w, stride=s) / math.sqrt(fan) + bias(blk.bias), blk, L + j)
    inp = torch.cat([z, skips[0]], dim=1) if c.skip == "concat" else z + skips[0]
    mult = 1 / cin if c.readout == "mup" else 1 / math.sqrt(cin)
    logits = F.conv1d(inp, model.readout_weight.T[:, :, None]) * mult + bias(model.readout_bias)
    return logits.transpose(1, 2), pre


CONFIGS = [
    dict(vocab=4, depth=2, branching=2, width=8),
    dict(vocab=5, depth=2, branching=3, width=6, skip="concat"),
    dict(vocab=3, depth=3, branching=2, width=8, norm="layernorm", bias=False),
    dict(vocab=4, depth=1, branching=4, width=8, time_embedding=False, embed_gelu=True),
    dict(vocab=4, depth=2, branching=2, width=8, input_mode="leaf_message", readout="standard"),
    dict(vocab=4, input_vocab=5, depth=2, branching=2, width=8, input_mode="leaf_message"),
    dict(vocab=4, input_vocab=5, depth=2, branching=2, width=8, deconv_fan_in="cin_k"),
    # the authors' public code ("reference-code" preset)
    dict(vocab=6, depth=3, branching=2, width=8, skip="concat", norm="layernorm", bias=False,
         time_embedding=False, input_mode="leaf_message", embed_gelu=True, deconv_fan_in="cin_k",
         leaf_mean=0.3, leaf_std=0.4),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_matches_channel_first_conv_reference(kw):
    cfg = UNetConfig(**kw)
    model = UNet(cfg, seed=3)
    with torch.no_grad():  # non-zero biases and gains so that their placement is tested
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    _, x_t, t, keep = _batch(cfg, 5, seed=1)
    logits, pre = model(x_t, t, keep, return_preactivations=True)
    ref_logits, ref_pre = _reference_forward(model, x_t, t, keep)
    assert logits.shape == (5, cfg.length, cfg.vocab) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert list(pre) == model.block_names
    for a, b in zip(pre.values(), ref_pre, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("s", [2, 3])
def test_block_gemms_equal_conv1d_and_conv_transpose1d(s):
    """The GEMM layouts documented in unet.py are conv1d / conv_transpose1d (filter s, stride s)."""
    g = torch.Generator().manual_seed(s)
    B, length, cin, cout = 3, s * s, 5, 7
    x = torch.randn(B, cin, length, generator=g)  # channel-first
    w_conv = torch.randn(cout, cin, s, generator=g)
    w_gemm = w_conv.permute(2, 1, 0).reshape(s * cin, cout)  # [k·n_in + c, o] = w[o, c, k]
    out = x.transpose(1, 2).reshape(B * length // s, s * cin) @ w_gemm
    torch.testing.assert_close(out.view(B, length // s, cout).transpose(1, 2),
                               F.conv1d(x, w_conv, stride=s), rtol=1e-5, atol=1e-5)
    w_tconv = torch.randn(cin, cout, s, generator=g)
    w_gemm = w_tconv.permute(0, 2, 1).reshape(cin, s * cout)  # [c, k·n_out + o] = w[c, o, k]
    out = x.transpose(1, 2).reshape(B * length, cin) @ w_gemm
    torch.testing.assert_close(out.view(B, length * s, cout).transpose(1, 2),
                               F.conv_transpose1d(x, w_tconv, stride=s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth,branching,vocab", [(1, 2, 2), (2, 3, 5), (3, 2, 16), (2, 4, 8)])
@pytest.mark.parametrize("skip", ["add", "concat"])
def test_shapes_and_preactivation_hook(depth, branching, vocab, skip):
    cfg = UNetConfig(vocab=vocab, depth=depth, branching=branching, width=12, skip=skip)
    model = UNet(cfg)
    _, x_t, t, _ = _batch(cfg, 4, seed=0)
    logits, pre = model(x_t, t, return_preactivations=True)
    assert logits.shape == (4, branching**depth, vocab) and torch.isfinite(logits).all()
    names = [f"enc{i}" for i in range(1, depth + 1)] + [f"dec{j}" for j in range(1, depth + 1)]
    assert list(pre) == names
    lengths = [branching ** (depth - i) for i in range(1, depth + 1)]
    lengths += [branching ** (depth - j) for j in range(depth - 1, -1, -1)]
    assert [a.shape for a in pre.values()] == [(4, n, 12) for n in lengths]
    torch.testing.assert_close(model(x_t, t), logits)  # the hook changes nothing


def test_time_conditioning_flag():
    on = UNet(UNetConfig(vocab=4, depth=2, width=8), seed=0)
    off = UNet(UNetConfig(vocab=4, depth=2, width=8, time_embedding=False), seed=0)
    assert "time_weight" in dict(on.named_parameters())
    assert "time_weight" not in dict(off.named_parameters())
    x = torch.randint(0, 4, (3, 4), generator=torch.Generator().manual_seed(0))
    t1, t2 = torch.full((3,), 0.1), torch.full((3,), 0.7)
    assert not torch.allclose(on(x, t1), on(x, t2))
    torch.testing.assert_close(off(x, t1), off(x, t2), rtol=0, atol=0)
    torch.testing.assert_close(on(x, torch.tensor(0.1)), on(x, t1))  # a scalar t broadcasts
    torch.testing.assert_close(off(x, None), off(x, t1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs t"):
        on(x, None)


def test_leaf_message_input():
    cfg = UNetConfig(vocab=5, depth=1, branching=2, width=8, input_mode="leaf_message")
    model = UNet(cfg)
    x = torch.tensor([[0, 3], [4, 4]])
    with pytest.raises(ValueError, match="keep_prob"):
        model(x, torch.zeros(2))
    # Default standardisation: a clean one-hot has mean 0 and (population) std 1 over symbols.
    msg = model._leaf_message(x, torch.ones(2))
    torch.testing.assert_close(msg.mean(-1), torch.zeros(2, 2))
    torch.testing.assert_close(msg.std(-1, unbiased=False), torch.ones(2, 2))
    # Pure noise (ᾱ = 0) carries no information: every input is the same.
    torch.testing.assert_close(model(x, torch.zeros(2), torch.zeros(2))[0],
                               model(x, torch.zeros(2), torch.zeros(2))[1])
    masked = UNet(UNetConfig(vocab=5, input_vocab=6, depth=1, branching=2, width=8,
                             input_mode="leaf_message"))
    assert torch.isfinite(masked(torch.tensor([[5, 2]]), torch.zeros(1))).all()


def test_reference_leaf_standardisation():
    a = torch.linspace(0, 1, 11, dtype=torch.float64)
    mean, std = reference_leaf_standardisation(a, 4)
    assert mean == pytest.approx(float((a + (1 - a) / 4).mean()))
    assert std == pytest.approx(math.sqrt(float((a + (1 - a) / 16).mean()) - mean**2))


def test_seeded_initialisation():
    cfg = UNetConfig(vocab=4, depth=2, width=64)
    a, b, c = UNet(cfg, seed=0), UNet(cfg, seed=0), UNet(cfg, seed=1)
    params = zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True)
    for (name, pa), pb, pc in params:
        assert torch.equal(pa, pb)
        if name.endswith("weight") and "norm" not in name:
            assert not torch.equal(pa, pc)
            assert abs(pa.mean().item()) < 0.1 and abs(pa.std().item() - 1) < 0.1  # N(0, 1)
        else:
            assert torch.equal(pa, pc)  # biases 0, LayerNorm gains 1: not random


def test_config_json_round_trip_and_validation():
    cfg = UNetConfig(vocab=4, input_vocab=5, depth=2, width=16, skip="concat", leaf_std=0.5)
    assert cfg.input_vocab == 5 and UNetConfig(vocab=4).input_vocab == 4
    assert UNetConfig.from_json(cfg.to_json()) == cfg
    assert UNetConfig(vocab=7).width == 8192  # the paper's width
    with pytest.raises(ConfigError, match="unknown"):
        UNetConfig.from_json('{"vocab": 4, "colour": 1}')
    with pytest.raises(ConfigError, match="schema"):
        UNetConfig.from_json('{"schema": "unet/99", "vocab": 4}')
    for bad in [dict(vocab=1), dict(vocab=4, input_vocab=6), dict(vocab=4, branching=1),
                dict(vocab=4, skip="mul"), dict(vocab=4, norm="batch"), dict(vocab=4, time_dim=7),
                dict(vocab=4, input_mode="bits"), dict(vocab=4, width=0), dict(vocab=4, bias=1)]:
        with pytest.raises(ConfigError):
            UNetConfig(**bad)


def test_safetensors_checkpoint_round_trip(tmp_path):
    cfg = UNetConfig(vocab=4, depth=2, width=8, norm="layernorm")
    model = UNet(cfg, seed=5)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path), metadata={"unet": cfg.to_json()})
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        restored_cfg = UNetConfig.from_json(f.metadata()["unet"])
    restored = UNet(restored_cfg, seed=0)
    restored.load_state_dict(load_file(str(path)))
    _, x_t, t, _ = _batch(cfg, 3, seed=2)
    torch.testing.assert_close(restored(x_t, t), model(x_t, t), rtol=0, atol=0)


# ---- μP optimiser groups -----------------------------------------------------------------------
def test_param_groups_learning_rates():
    cfg = UNetConfig(vocab=4, depth=2, branching=2, width=32, norm="layernorm")
    model = UNet(cfg)
    groups = param_groups(model, 0.5, "sgd")
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    sgd = raw_learning_rates(model, 0.5, "sgd")
    assert sgd.pop("readout_bias") == 0.5
    assert set(sgd.values()) == {0.5 * 32}
    adam = raw_learning_rates(model, 0.5, "adam")
    assert adam["embed_weight"] == pytest.approx(0.5 / math.sqrt(4))
    assert adam["time_weight"] == pytest.approx(0.5 / math.sqrt(128))
    assert adam["enc.0.weight"] == pytest.approx(0.5 / math.sqrt(2 * 32))
    assert adam["dec.0.weight"] == pytest.approx(0.5 / math.sqrt(32))
    assert adam["readout_weight"] == pytest.approx(0.5)
    assert adam["enc.1.norm_weight"] == adam["dec.0.bias"] == adam["readout_bias"] == 0.5
    assert set(raw_learning_rates(model, 0.5, "adam", scheme="global").values()) == {0.5}
    sp = raw_learning_rates(model, 0.5, "sgd", scheme="standard")
    assert sp["enc.0.weight"] == pytest.approx(0.5 * 64) and sp["dec.0.bias"] == 0.5
    for bad in [dict(optimizer="rmsprop"), dict(optimizer="rmsprop", scheme="global"),
                dict(scheme="ntk")]:
        with pytest.raises(ConfigError):
            param_groups(model, 0.5, **bad)
    with pytest.raises(ConfigError):
        param_groups(model, -1.0)
    torch.optim.SGD(groups, lr=0.0, momentum=0.9)  # torch accepts the extra keys


# ---- FLOP count --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(skip="concat"), dict(input_mode="leaf_message"),
                                dict(time_embedding=False, branching=3)])
def test_flops_match_torch_flop_counter(kw):
    cfg = UNetConfig(**{"vocab": 5, "depth": 2, "branching": 2, "width": 16, **kw})
    model = UNet(cfg)
    _, x_t, t, keep = _batch(cfg, 6, seed=0)
    with FlopCounterMode(display=False) as fwd:
        logits = model(x_t, t, keep)
    assert fwd.get_total_flops() == flops_forward(cfg, 6)
    with FlopCounterMode(display=False) as both:
        model(x_t, t, keep).sum().backward()
    assert both.get_total_flops() == flops_per_step(cfg, 6)
    assert logits.shape[0] == 6


def test_flops_formula_of_the_paper():
    """Encoder + decoder ≈ 2·n²·s·(d-1)/(s-1) MACs per sequence (reference/diffusion.md §1.10)."""
    cfg = UNetConfig(vocab=16, depth=3, branching=2, width=1024, time_embedding=False)
    macs = 2 * 1024**2 * 2 * (8 - 1) / (2 - 1)
    readout = 8 * 1024 * 16
    assert flops_forward(cfg, 1) == 2 * (macs + readout)


# ---- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.05)])
def test_tiny_model_overfits_one_batch(optimizer, lr):
    """Predict x0 from a noised x_t (cross-entropy) on one fixed batch until it is memorised."""
    cfg = UNetConfig(vocab=4, depth=2, branching=2, width=64)
    model = UNet(cfg, seed=0)
    x0, x_t, t, _ = _batch(cfg, 16, seed=0)
    groups = param_groups(model, lr, optimizer)
    opt = (torch.optim.SGD(groups, lr=0.0, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(groups, lr=0.0))
    for _ in range(120):
        loss = F.cross_entropy(model(x_t, t).reshape(-1, 4), x0.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01
    assert torch.equal(model(x_t, t).argmax(-1), x0)


COORD_WIDTHS = [32, 64, 128, 256]
COORD_STEPS = 4
# A quantity ∝ n^±1/2 has log-log slope ±0.5; μP curves measured here stay within ±0.17.
COORD_SLOPE_TOL = 0.25


def _coord_check(scheme: str, lr: float, seeds=(0, 1)) -> dict[str, np.ndarray]:
    """Mean |pre-activation| per block (and |logits|) after each of the first SGD steps.

    Returns {layer: slopes [steps]} of log(mean |a|) against log(width), averaged over seeds.
    """
    table: dict[str, np.ndarray] = {}
    for width in COORD_WIDTHS:
        runs = []
        for seed in seeds:
            cfg = UNetConfig(vocab=8, depth=3, branching=2, width=width,
                             readout="mup" if scheme == "mup" else "standard")
            model = UNet(cfg, seed=seed)
            opt = torch.optim.SGD(param_groups(model, lr, "sgd", scheme=scheme), lr=0.0,
                                  momentum=0.9)
            _, probe_x, probe_t, _ = _batch(cfg, 64, seed=99)
            rows = []
            for step in range(COORD_STEPS):
                x0, x_t, t, _ = _batch(cfg, 64, seed=1000 + 100 * seed + step)
                loss = F.cross_entropy(model(x_t, t).reshape(-1, 8), x0.reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    logits, pre = model(probe_x, probe_t, return_preactivations=True)
                rows.append([a.abs().mean().item() for a in pre.values()]
                            + [logits.abs().mean().item()])
            runs.append(rows)
        table[width] = np.mean(runs, axis=0)  # [steps, layers]
    names = [*UNet(UNetConfig(vocab=8, width=8)).block_names, "logits"]
    log_w = np.log(COORD_WIDTHS)
    values = np.log(np.stack([table[w] for w in COORD_WIDTHS]))  # [widths, steps, layers]
    return {name: np.array([np.polyfit(log_w, values[:, k, j], 1)[0] for k in range(COORD_STEPS)])
            for j, name in enumerate(names)}


def test_mup_coordinate_check():
    """μP: mean |activation| of every block and of the logits is flat in width over the first
    SGD steps (lr 2 in μP units, momentum 0.9, deliberately large)."""
    slopes = _coord_check("mup", 2.0)
    worst = max(abs(v).max() for v in slopes.values())
    assert worst < COORD_SLOPE_TOL, {k: np.round(v, 2) for k, v in slopes.items()}


def test_standard_parameterisation_fails_coordinate_check():
    """Negative control: the same net in SP (readout 1/sqrt(n), one lr for the PyTorch-style
    weights) at a fixed lr — logits grow with width (slope ≈ 0.8 here), so the check must fail."""
    slopes = _coord_check("standard", 1.0)
    table = {k: np.round(v, 2) for k, v in slopes.items()}
    assert slopes["logits"].min() > 2 * COORD_SLOPE_TOL, table


@pytest.mark.parametrize("kw", [{}, {"bias": False}, {"norm": "layernorm"}, {"skip": "concat"},
                                {"time_embedding": False}, {"input_mode": "leaf_message"}])
def test_the_inference_fast_path_computes_the_same_logits(kw):
    """Under inference with one time for the batch (a sampler step), the time bias and the μP
    multiplier are folded into each GEMM; the logits equal the explicit training-form forward
    up to float32 rounding, and differ per row when times differ (no false sharing)."""
    cfg = UNetConfig(vocab=6, depth=3, branching=2, width=32, **kw)
    net = UNet(cfg, seed=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (5, 8), generator=gen)
    t = torch.full((5,), 0.37)
    keep = torch.full((5,), 0.6) if cfg.input_mode == "leaf_message" else None
    explicit = net(x, t, keep_prob=keep)  # grad enabled: the explicit form
    with torch.inference_mode():
        folded = net(x, t[:1], keep_prob=keep)  # one time for the batch, as shared_time passes it
        assert net(x, t, keep_prob=keep).shape == folded.shape
        mixed = net(x, torch.tensor([0.37, 0.9, 0.37, 0.1, 0.37]), keep_prob=keep)
    torch.testing.assert_close(folded, explicit.detach(), rtol=1e-5, atol=1e-5)
    if cfg.time_embedding:
        torch.testing.assert_close(mixed[0], folded[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[1], folded[1], atol=1e-4)
