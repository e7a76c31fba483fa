"""VT-ADL, ADViT, AnoViT and the conv AE: output contract, training, minimax gradient signs, SSIM, MDN, resume."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adcore
from adcore.models.vit import MDNHead, ViTEncoder, prior_sigma, ssim, ssim_map
from adcore.training import NonFiniteLossError

S = 32  # image side for every test here: a 4×4 grid of 8-px patches
TINY = {
    "vt_adl": dict(image_size=S, patch_size=8, embed_dim=32, depth=1, num_heads=2, latent_dim=64, num_components=3,
                   decoder_width=16),
    "advit": dict(image_size=S, patch_size=8, embed_dim=32, depth=2, num_heads=2, latent_dim=64, num_components=3,
                  decoder_width=16),
    "anovit": dict(image_size=S, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_width=16),
    "conv_ae": dict(image_size=S, patch_size=8, embed_dim=32, base_width=8, decoder_width=16),
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, S, S, generator=g)


def _dataset(n=6, seed=0):
    return [{"image": im} for im in _images(n, seed)]


def _model(name, **overrides):
    adcore.seed_everything(0)
    return adcore.create_model(name, **{**TINY[name], **overrides})


# --------------------------------------------------------------------------------------------------------------------
# Registry and output contract
# --------------------------------------------------------------------------------------------------------------------
def test_registered():
    assert {"vt_adl", "advit", "anovit", "conv_ae"} <= set(adcore.list_models())


@pytest.mark.parametrize("name", sorted(TINY))
def test_fit_few_steps_and_output_contract(name):
    model = _model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = adcore.fit(model, _dataset(), num_epochs=2, lr=1e-3, batch_size=3, progress=False)
    assert len(history) == 4
    assert all(math.isfinite(h["loss"]) for h in history)
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed, "training did not change any weight"
    out = model.predict(_images(4, seed=1))
    assert isinstance(out, adcore.AnomalyOutput)
    assert out.pred_score.shape == (4,)
    assert out.anomaly_map.ndim == 3 and out.anomaly_map.shape[0] == 4
    assert torch.isfinite(out.pred_score).all() and torch.isfinite(out.anomaly_map).all()
    if name in ("vt_adl", "advit"):
        assert out.anomaly_map.shape[1:] == (S // 8, S // 8)  # one MDN likelihood per patch
    else:
        assert out.anomaly_map.shape[1:] == (S, S)  # per-pixel reconstruction error
        assert torch.allclose(out.pred_score, out.anomaly_map.flatten(1).amax(1))


@pytest.mark.parametrize("name", sorted(TINY))
def test_predict_rejects_wrong_image_size(name):
    model = _model(name).eval()
    with pytest.raises(ValueError, match=f"\\(B, 3, {S}, {S}\\)"):
        model.predict(torch.rand(2, 3, S + 8, S + 8))


@pytest.mark.parametrize("name,params,match", [
    ("vt_adl", dict(mdn_mode="gmm"), "mdn_mode"),
    ("vt_adl", dict(image_score="sum"), "image_score"),
    ("vt_adl", dict(image_size=36), "multiple of patch_size"),
    ("vt_adl", dict(latent_dim=50), "latent_dim"),
    ("vt_adl", dict(noise_std=-0.1), "noise_std"),
    ("vt_adl", dict(num_components=0), "num_components"),
    ("advit", dict(minimax_weight=-1.0), "minimax_weight"),
    ("anovit", dict(num_heads=3), "divisible by num_heads"),
    ("conv_ae", dict(patch_size=6), "power of two"),
    ("anovit", dict(colour=True), "unknown parameter"),
])
def test_bad_parameters_raise(name, params, match):
    with pytest.raises(ValueError, match=match):
        _model(name, **params)


def test_anomaly_attention_refuses_class_token():
    with pytest.raises(ValueError, match="class token"):
        ViTEncoder(S, 8, 32, 1, 2, attention="anomaly", class_token=True)


# --------------------------------------------------------------------------------------------------------------------
# VT-ADL parts
# --------------------------------------------------------------------------------------------------------------------
def test_noise_only_in_training():
    model = _model("vt_adl", noise_std=0.2)
    tokens = torch.zeros(64, 16, 32)
    model.train()
    noisy = model.add_noise(tokens)
    assert abs(noisy.std().item() - 0.2) < 0.01
    model.eval()
    assert torch.equal(model.add_noise(tokens), tokens)
    assert torch.equal(_model("vt_adl", noise_std=0.0).train().add_noise(tokens), tokens)


def test_paper_image_score_uses_one_minus_ssim():
    model = _model("vt_adl", image_score="paper").eval()
    assert model.own_image_score
    images = _images(3)
    out = model.predict(images)
    tokens, _ = model.encoder(images)
    recon = model.decode(tokens)
    nll_max = model.mdn.nll(tokens).amax(1)
    mse = (recon - images).pow(2).flatten(1).mean(1)
    expected = mse + (1 - ssim(images, recon, reduction="none")) + nll_max
    assert torch.allclose(out.pred_score, expected, atol=1e-5)
    assert not _model("vt_adl").own_image_score


def test_mdn_head_modes():
    head = MDNHead(5, num_components=1)
    x = torch.randn(7, 5)
    logits, mu, log_var = head(x)
    assert logits.shape == (7, 1) and mu.shape == (7, 1, 5) and log_var.shape == (7, 1, 5)
    assert (log_var >= 0).all()  # softplus read as log-variance: every variance ≥ 1, as in VT-ADL
    vtadl = head.nll(x, mode="vtadl", backend="torch")
    lse = head.nll(x, mode="logsumexp", backend="torch")
    # With one component the two differ only in how often log 2π is counted: once (VT-ADL) or once per dimension.
    assert torch.allclose(lse - vtadl, torch.full((7,), 0.5 * 4 * math.log(2 * math.pi)), atol=1e-4)
    by_hand = 0.5 * (math.log(2 * math.pi) + (log_var + (x[:, None] - mu) ** 2 / log_var.exp()).sum(-1))[:, 0]
    assert torch.allclose(vtadl, by_hand, atol=1e-4)


def test_unconditional_mixture_is_a_shared_density():
    torch.manual_seed(0)
    head = MDNHead(4, num_components=3, conditional=False)
    x = torch.randn(6, 4)
    logits, mu, log_var = head(x)
    assert logits.shape == (3,) and mu.shape == (3, 4) and log_var.shape == (3, 4)
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(mu, (0.5 * log_var).exp()), 1))
    torch.testing.assert_close(head.nll(x, mode="logsumexp", backend="torch"), -mix.log_prob(x), rtol=1e-4, atol=1e-4)
    model = _model("vt_adl", mdn_conditional=False)
    adcore.fit(model, _dataset(), num_epochs=1, lr=1e-3, batch_size=3, progress=False)
    out = model.predict(_images(2))
    assert out.anomaly_map.shape == (2, S // 8, S // 8) and torch.isfinite(out.anomaly_map).all()


def test_ssim_identity_and_reference():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 40, generator=g)
    y = (x + 0.2 * torch.randn(1, 3, 40, 40, generator=g)).clamp(0, 1)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(x, y).item() < 0.9
    assert ssim(x, y).item() == pytest.approx(ssim(y, x).item(), abs=1e-6)
    ours = ssim_map(x, y)[0].permute(1, 2, 0).double().numpy()
    _, ref = skimage_metrics.structural_similarity(
        x[0].permute(1, 2, 0).double().numpy(), y[0].permute(1, 2, 0).double().numpy(), win_size=11,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1, full=True)
    inner = (slice(5, -5), slice(5, -5))  # away from the border, where zero padding and reflection differ
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-4)
    x.requires_grad_(True)
    (1 - ssim(x, y)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_prior_sigma_range():
    raw = torch.tensor([-10.0, 0.0, 10.0])
    sigma = prior_sigma(raw)
    assert sigma[0] < 1e-3 and sigma[2] == pytest.approx(2.0, abs=1e-3) and (sigma > 0).all()
    assert torch.allclose(prior_sigma(raw, 2.0), 2 * sigma)


# --------------------------------------------------------------------------------------------------------------------
# ADViT minimax
# --------------------------------------------------------------------------------------------------------------------
def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_minimax_gradient_signs():
    """−k·dis_series reaches only q, k (ascent on the discrepancy); +k·dis_prior reaches only σ (descent)."""
    k = 3.0
    model = _model("advit", minimax_weight=k, noise_std=0.0).train()
    images = _images(4)
    g_full = _grads(model, model.training_step(images, "main")["loss"])
    g_base = _grads(model, model.base_losses(images, model.encoder(images)[0])["loss"])
    g_series = _grads(model, model.discrepancy(model.encoder(images)[1])[0].mean())
    g_prior = _grads(model, model.discrepancy(model.encoder(images)[1])[1].mean())

    # The one backward of the combined loss is the sum of the two phases' gradients, with their signs.
    for n in g_full:
        torch.testing.assert_close(g_full[n] - g_base[n], -k * g_series[n] + k * g_prior[n], rtol=1e-3, atol=1e-6)
    sigma_names = [n for n in g_full if "sigma_proj" in n]
    last_qkv = f"encoder.blocks.{len(model.encoder.blocks) - 1}.attn.qkv.weight"
    qkv_names = [n for n in g_full if n.endswith("attn.qkv.weight")]
    assert len(sigma_names) == 4 and len(qkv_names) == 2
    for n in sigma_names:  # σ is moved by the prior term alone, towards the series association
        assert g_prior[n].abs().sum() > 0 and g_series[n].abs().sum() == 0 and g_base[n].abs().sum() == 0
        torch.testing.assert_close(g_full[n], k * g_prior[n], rtol=1e-4, atol=1e-7)
    # The last block's q, k are moved by the series term alone (earlier blocks also feed later blocks' σ).
    assert g_series[last_qkv].abs().sum() > 0 and g_prior[last_qkv].abs().sum() == 0
    torch.testing.assert_close(g_full[last_qkv] - g_base[last_qkv], -k * g_series[last_qkv], rtol=1e-3, atol=1e-6)

    # One small descent step on the minimax terms alone moves the discrepancy the expected way.
    def discrepancy_after(names, step):
        m = _model("advit", minimax_weight=k, noise_std=0.0).train()
        s, p = m.discrepancy(m.encoder(images)[1])
        before = s.mean().item()
        g = _grads(m, -k * s.mean() + k * p.mean())
        with torch.no_grad():
            for n, prm in m.named_parameters():
                if n in names:
                    prm -= step * g[n]
        return before, m.discrepancy(m.encoder(images)[1])[0].mean().item()

    before, after = discrepancy_after({last_qkv}, 0.5)
    assert after > before  # series association pushed away from the prior
    before, after = discrepancy_after(set(sigma_names), 0.05)
    assert after < before  # prior pulled towards the series association


def test_minimax_off_gives_sigma_no_gradient():
    images = _images(4)
    for k, trained in ((0.0, False), (3.0, True)):
        model = _model("advit", minimax_weight=k).train()
        g = _grads(model, model.training_step(images, "main")["loss"])
        sigma_grad = sum(g[n].abs().sum().item() for n in g if "sigma_proj" in n)
        assert (sigma_grad > 0) == trained


def test_advit_score_uses_training_statistics():
    model = _model("advit")
    adcore.fit(model, _dataset(), num_epochs=1, lr=1e-3, batch_size=3, progress=False)
    # on_fit_end measured the discrepancy of the training patches at every grid position; no test data is involved.
    series, _ = model.discrepancy(model.encoder(_images())[1])  # (6 training images, N)
    assert model.assoc_mean.shape == model.assoc_std.shape == model.grid_hw
    torch.testing.assert_close(model.assoc_mean.flatten(), series.mean(0))
    torch.testing.assert_close(model.assoc_std.flatten(), series.std(0, unbiased=False))
    # The global statistics follow from the per-position ones exactly: pooled over all training patches.
    model.assoc_norm = "global"
    mean, std = model.assoc_stats()
    torch.testing.assert_close(mean, series.mean().expand(series.shape[1]))
    torch.testing.assert_close(std, series.std(unbiased=False).expand(series.shape[1]), rtol=1e-4, atol=1e-6)
    model.assoc_norm = "position"
    images = _images(3, seed=2)
    assert model.assoc_weight == 0.0  # the default map is the MDN likelihood alone, the one the description names
    nll_only = model.predict(images).anomaly_map
    tokens, _ = model.encoder(images)
    torch.testing.assert_close(nll_only.flatten(1), model.mdn.nll(tokens))
    model.assoc_weight = 1.0  # the discrepancy-weighted ablation
    with_assoc = model.predict(images).anomaly_map
    assert not torch.allclose(with_assoc, nll_only)
    s_test, _ = model.discrepancy(model.encoder(images)[1])
    z = (s_test - model.assoc_mean.flatten()) / model.assoc_std.flatten()
    torch.testing.assert_close(with_assoc.flatten(1), nll_only.flatten(1) * torch.exp(-z.clamp(-20, 20)))


def test_advit_position_norm_removes_the_grid_template():
    """The discrepancy depends on grid position (border priors are truncated); per-position statistics remove that."""
    model = _model("advit")
    train = _dataset(6)
    adcore.fit(model, train, num_epochs=1, lr=1e-3, batch_size=3, progress=False)
    mean = model.assoc_mean
    # Before any standardisation R carries the grid: corner and centre differ by far more than R varies per position.
    assert (mean[0, 0] - mean[1, 1]).abs() > 3 * model.assoc_std.max()
    images = torch.stack([d["image"] for d in train])
    series, _ = model.discrepancy(model.encoder(images)[1])
    for norm, template in (("position", False), ("global", True)):
        model.assoc_norm = norm
        m, s = model.assoc_stats()
        z = ((series - m) / s).mean(0)  # mean standardised R of the training images, per position
        assert (z.abs().max() > 1) == template, (norm, z)
    with pytest.raises(ValueError, match="assoc_norm"):
        _model("advit", assoc_norm="none")


def test_advit_statistics_travel_with_the_state_dict():
    model = _model("advit", assoc_weight=1.0)  # a weighted map, which reads the statistics
    adcore.fit(model, _dataset(), num_epochs=1, lr=1e-3, batch_size=3, progress=False)
    fresh = adcore.create_model("advit", **TINY["advit"], assoc_weight=1.0)
    fresh.load_state_dict(model.state_dict())
    images = _images(2, seed=4)
    torch.testing.assert_close(fresh.eval().predict(images).anomaly_map, model.predict(images).anomaly_map)


@pytest.mark.parametrize("name", sorted(TINY))
def test_create_model_without_arguments_is_the_default_recipe(name):
    """``fit(create_model(name), data)`` trains the notebook's default: constructor defaults = the default recipe."""
    import inspect

    recipe = adcore.get_recipe(name, "default")
    cls = type(_model(name))
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    if name == "advit":  # ADViT's own parameters, then VT-ADL's through **vt_adl_params
        defaults |= {k: p.default for k, p in inspect.signature(cls.__mro__[1].__init__).parameters.items()
                     if p.default is not inspect.Parameter.empty}
    flat = recipe.flat()
    assert {k: defaults[k] for k in flat if k in defaults} == {k: flat[k] for k in flat if k in defaults}
    assert set(recipe.model_params) <= set(defaults) and "image_size" in defaults
    paper = adcore.get_recipe(name, "paper")
    assert set(paper.model_params) <= set(defaults)


# --------------------------------------------------------------------------------------------------------------------
# Training that a user can trust
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vt_adl", "advit"])
def test_killed_run_resumes_to_the_same_model(name, tmp_path):
    data = _dataset(6)
    reference = _model(name)
    adcore.fit(reference, data, num_epochs=3, lr=1e-3, batch_size=3, seed=5, checkpoint_dir=tmp_path / "a",
               progress=False)

    killed = _model(name)
    calls = {"n": 0}
    step = killed.training_step

    def dies_in_epoch_three(images, stage):
        calls["n"] += 1
        if calls["n"] == 6:  # the second step of the third epoch
            raise KeyboardInterrupt
        return step(images, stage)

    killed.training_step = dies_in_epoch_three
    with pytest.raises(KeyboardInterrupt):
        adcore.fit(killed, data, num_epochs=3, lr=1e-3, batch_size=3, seed=5, checkpoint_dir=tmp_path / "b",
                   progress=False)
    resumed = _model(name)
    history = adcore.fit(resumed, data, num_epochs=3, lr=1e-3, batch_size=3, seed=5, checkpoint_dir=tmp_path / "b",
                         resume=True, progress=False)
    assert len(history) == 6
    images = _images(3, seed=3)
    a, b = reference.predict(images), resumed.predict(images)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.pred_score, b.pred_score)


def test_non_finite_loss_names_epoch_and_step(tmp_path):
    model = _model("vt_adl")
    with torch.no_grad():
        model.mdn.mu.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="epoch 1/2, step 1"):
        adcore.fit(model, _dataset(), num_epochs=2, lr=1e-3, batch_size=3, checkpoint_dir=tmp_path, progress=False)


def test_code_image_score_keeps_the_ssim_sign_bug():
    images = _images(3)
    paper = _model("vt_adl", image_score="paper").eval()
    code = _model("vt_adl", image_score="code").eval()
    code.load_state_dict(paper.state_dict())
    assert code.own_image_score
    tokens, _ = paper.encoder(images)
    s = ssim(images, paper.decode(tokens), reduction="none")
    # the two scores differ by exactly (SSIM) − (1 − SSIM) = 2·SSIM − 1 per image
    diff = code.predict(images).pred_score - paper.predict(images).pred_score
    assert torch.allclose(diff, 2 * s - 1, atol=1e-5)
    advit = _model("advit", image_score="code").eval()
    assert advit.own_image_score and advit.predict(images).pred_score.shape == (3,)


# --------------------------------------------------------------------------------------------------------------------
# Mixed precision and the fused attention's settings
# --------------------------------------------------------------------------------------------------------------------
def test_sigma_is_float32_and_positive_under_bf16_autocast():
    """Under autocast σ = 3^(sigmoid(5 raw) + 1e-5) - 1 computed in bfloat16 rounds to 0 for raw below about -1.1
    (a NaN prior, or the op's ValueError on CPU); the model computes it in float32 and the op takes it beside bf16 q."""
    from adcore.models.vit import AnomalyAttention
    torch.manual_seed(0)
    attn = AnomalyAttention(32, 2, (4, 4), backend="torch")
    with torch.no_grad():
        attn.sigma_proj.bias.fill_(-3.0)  # raw ≈ -3: σ ≈ 3e-7·ln 3 in float32, exactly 0 in bfloat16
    seen = {}
    attn.register_forward_hook(lambda m, i, o: seen.update(dis=o[1][0]))
    from adcore import ops
    real = ops.anomaly_attention

    def spy(q, k, v, sigma, *args, **kwargs):
        seen.update(q=q.dtype, sigma=sigma)
        return real(q, k, v, sigma, *args, **kwargs)

    x = torch.randn(2, 16, 32)
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=torch.bfloat16):
        mp.setattr(ops, "anomaly_attention", spy)
        out, _ = attn(x)
    assert seen["q"] == torch.bfloat16 and seen["sigma"].dtype == torch.float32
    assert (seen["sigma"] > 0).all() and torch.isfinite(seen["sigma"]).all()
    assert torch.isfinite(seen["dis"]).all() and torch.isfinite(out).all()


def test_advit_trains_a_step_under_bf16_autocast():
    model = _model("advit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.training_step(_images(2), model.stages[0])["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fp32_precision_reaches_every_anomaly_attention():
    model = _model("advit", fp32_precision="ieee")
    layers = [b.attn for b in model.encoder.blocks]
    assert layers and all(a.fp32_precision == "ieee" for a in layers)
    assert all(b.attn.fp32_precision == "tf32" for b in _model("advit").encoder.blocks)
    with pytest.raises(ValueError, match="fp32_precision"):
        _model("advit", fp32_precision="fp16")


def test_set_deterministic_sets_what_the_fused_backward_follows():
    from adcore.utils import set_deterministic
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[1], prev[2]
