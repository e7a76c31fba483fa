"""The reverse-distillation core, DMAD, AAND and AAND's pseudo-anomaly synthesiser.

Every model is built with a randomly initialised encoder (``pretrained=False``) on 32×32 images so the file stays
fast; what is checked is the contract, the stage mechanics and the pieces' invariants, not accuracy.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adcore
from adcore.data.defects import TEST_DEFECT_SOURCES
from adcore.models import aand as aand_mod
from adcore.models import dmad as dmad_mod
from adcore.models import pseudo_anomaly as pa
from adcore.models import rd

SIZE = 32
TINY = dict(pretrained=False)


def tiny_data(n: int = 4, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(3, SIZE, SIZE, generator=g)} for _ in range(n)]


def params(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith(prefix)}


# ---------------------------------------------------------------- the shared core


def test_channel_cosine_matches_torch():
    a, b = torch.randn(2, 5, 4, 3), torch.randn(2, 5, 4, 3)
    torch.testing.assert_close(rd.channel_cosine(a, b), F.cosine_similarity(a, b, dim=1), atol=1e-6, rtol=1e-5)


def test_identical_student_gives_zero_loss_and_map_and_differences_show_where_they_are():
    teacher = [torch.randn(2, c, s, s) for c, s in [(4, 8), (6, 4), (8, 2)]]
    assert rd.rd_loss(teacher, teacher).abs().item() < 1e-6
    assert rd.anomaly_map(teacher, teacher, (16, 16)).abs().max().item() < 1e-6
    student = [t.clone() for t in teacher]
    student[0][1, :, 0, 0] = -student[0][1, :, 0, 0]  # image 1, top-left corner of level 1: cosine −1
    amap = rd.anomaly_map(teacher, student, (16, 16))
    assert amap[0].abs().max() < 1e-6
    assert amap[1, 0, 0] == pytest.approx(2.0, abs=1e-5) and amap[1, -1, -1] < 1e-6


def test_core_rejects_bad_widths():
    with pytest.raises(ValueError, match="ocbe_blocks"):
        rd.ReverseDistillation(pretrained=False, ocbe_blocks=0)
    with pytest.raises(ValueError, match="decoder_ratio"):
        rd.ReverseDistillation(pretrained=False, decoder_ratio=-1)


def test_core_encoder_stays_frozen_in_train_mode():
    model = rd.ReverseDistillation(pretrained=False)
    model.train()
    assert not model.encoder.training and model.ocbe.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    out = model.predict(torch.rand(2, 3, SIZE, SIZE))
    assert out.anomaly_map.shape == (2, SIZE, SIZE)


def test_decoder_output_sign_follows_the_teacher():
    # EfficientNet-Lite0's taps are linear-bottleneck outputs (signed): the student must be able to go negative.
    model = rd.ReverseDistillation(pretrained=False)
    features = model.encode(torch.rand(2, 3, SIZE, SIZE))
    assert min(f.min() for f in features) < 0
    assert all(s.min() < 0 for s in model.student(features))
    relu_decoder = rd.Decoder(model.channels, 2 * model.channels[-1], relu_output=True)
    code = model.ocbe(features)
    assert all(s.min() >= 0 for s in relu_decoder(code, [f.shape[-2:] for f in features]))


# ---------------------------------------------------------------- both models through fit


@pytest.mark.parametrize("name, kwargs", [
    ("dmad", {}), ("dmad", dict(deform=False)), ("dmad", dict(vq=False)),
    ("aand", {}), ("aand", dict(amplify=False)),
])
def test_model_trains_and_honours_output_contract(name, kwargs):
    torch.manual_seed(0)
    model = adcore.create_model(name, **TINY, **kwargs)
    encoder_before = params(model, "encoder.")
    history = adcore.fit(model, tiny_data(), num_epochs=1, lr=1e-3, batch_size=2, progress=False)
    assert [h["stage"] for h in history] == [s for s in model.stages for _ in range(2)]
    assert all(np.isfinite(h["loss"]) for h in history)
    for k, v in params(model, "encoder.").items():  # the pretrained teacher never moves
        assert torch.equal(v, encoder_before[k]), k
    with torch.no_grad():
        out = model.predict(torch.rand(3, 3, SIZE, SIZE))
    assert isinstance(out, adcore.AnomalyOutput)
    assert out.pred_score.shape == (3,) and out.pred_score.dtype == torch.float32
    assert out.anomaly_map.shape == (3, SIZE, SIZE) and out.anomaly_map.dtype == torch.float32
    assert torch.isfinite(out.pred_score).all() and torch.isfinite(out.anomaly_map).all()
    assert (out.anomaly_map >= -1e-6).all()  # a sum of cosine distances


def test_models_evaluate_end_to_end(tmp_path):
    """Both models go through ``evaluate`` on a (tiny) real test split and write finite results."""
    train = adcore.load_dataset("textures", "brick", "train", image_size=SIZE)
    test = adcore.load_dataset("textures", "brick", "test", image_size=SIZE)
    good, bad = np.flatnonzero(test.labels == 0)[:6], np.flatnonzero(test.labels == 1)[:6]
    test = torch.utils.data.Subset(test, np.concatenate([good, bad]).tolist())
    for name in ("dmad", "aand"):
        model = adcore.create_model(name, **TINY)
        adcore.fit(model, torch.utils.data.Subset(train, range(4)), num_epochs=1, lr=1e-3, batch_size=4,
                   progress=False)
        result = adcore.evaluate(model, test, results_dir=tmp_path)
        assert all(np.isfinite(result[k]) for k in ("image_auroc", "pixel_auroc", "aupro"))
        own = "model-defined score (pred_score)" if name == "dmad" else "max of smoothed map"
        assert result["image_score"] == own
    assert len(list(tmp_path.glob("*.json"))) == 2


# ---------------------------------------------------------------- DMAD


def test_dmad_offsets_are_bounded_and_zero_offset_warp_is_identity():
    net = dmad_mod.OffsetNet(width=4, max_offset_coarse=0.05, max_offset_fine=0.02, stride=2)
    fields = net(torch.rand(2, 3, SIZE, SIZE) * 50)  # large inputs saturate the tanh
    for key, bound in [("o1", 0.1), ("o2", 0.04), ("o1_inv", 0.1), ("o2_inv", 0.04)]:
        assert fields[key].shape == (2, 2, SIZE, SIZE)
        assert fields[key].abs().max() <= bound + 1e-6, key
    x = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(dmad_mod.warp(x, torch.zeros(2, 2, SIZE, SIZE)), x, atol=1e-5, rtol=0)
    # A one-pixel shift in grid units moves content by one pixel (interior columns).
    shift = torch.zeros(2, 2, SIZE, SIZE)
    shift[:, 0] = 2 / (SIZE - 1)
    torch.testing.assert_close(dmad_mod.warp(x, shift)[..., :-1], x[..., 1:], atol=1e-5, rtol=0)


def test_dmad_vector_quantiser_snaps_to_codes_and_passes_gradients_straight_through():
    vq = dmad_mod.VectorQuantizer(num_codes=5, dim=3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    q, loss = vq(z)
    codes = vq.codebook.weight.detach()
    flat = q.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = (flat[:, None] - codes[None]).square().sum(-1).min(dim=1).values
    assert nearest.max() < 1e-10  # every output vector is a code (up to the straight-through rounding)
    q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # straight-through: d q / d z = identity
    assert loss.item() > 0


def test_dmad_smoothness_is_zero_for_constant_field_and_positive_for_noise():
    assert dmad_mod.smoothness(torch.full((1, 2, 8, 8), 0.3)).item() < 1e-7
    assert dmad_mod.smoothness(torch.randn(1, 2, 8, 8)).item() > 0.1


def test_dmad_image_score_uses_training_statistics_and_fixed_weight():
    torch.manual_seed(0)
    model = adcore.create_model("dmad", **TINY, deformation_weight=0.05)
    assert model.own_image_score
    adcore.fit(model, tiny_data(), num_epochs=1, lr=1e-3, batch_size=2, progress=False)
    assert not torch.equal(model.score_min, torch.zeros(2))  # set from the training images by on_fit_end
    assert (model.score_max >= model.score_min).all()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        amap, deformation = model.maps(x)
        raw = model._raw_scores(amap, deformation)
        expected = ((raw - model.score_min) / (model.score_max - model.score_min)) @ torch.tensor([1.0, 0.05])
        torch.testing.assert_close(model.predict(x).pred_score, expected)


def test_dmad_rejects_bad_parameters():
    with pytest.raises(ValueError, match="max_offset_coarse"):
        adcore.create_model("dmad", **TINY, max_offset_coarse=1.5)
    with pytest.raises(ValueError, match="num_codes"):
        adcore.create_model("dmad", **TINY, num_codes=0)


# ---------------------------------------------------------------- AAND


def test_aand_stage_two_uses_a_frozen_stage_one():
    torch.manual_seed(0)
    model = adcore.create_model("aand", **TINY)
    assert model.stages == ("amplify", "distill")
    initial = params(model)
    snapshot = {}
    on_stage_start = model.on_stage_start

    def spy(stage, loader):
        on_stage_start(stage, loader)
        if stage == "distill":
            snapshot.update(params(model))

    model.on_stage_start = spy
    adcore.fit(model, tiny_data(), num_epochs=1, lr=1e-2, batch_size=2, progress=False)
    final = params(model)
    amp = [k for k in final if k.startswith("amplifiers.")]
    student = [k for k in final if k.startswith(("ocbe.", "decoder."))]
    # Stage I trained the amplifiers and left the student alone; Stage II the opposite.
    assert any(not torch.equal(snapshot[k], initial[k]) for k in amp)
    assert all(torch.equal(snapshot[k], initial[k]) for k in student)
    assert all(torch.equal(final[k], snapshot[k]) for k in amp)
    assert any(not torch.equal(final[k], snapshot[k]) for k in student)
    assert not any(p.requires_grad for p in model.amplifiers.parameters())
    model.train()
    assert not model.amplifiers.training  # frozen Stage I stays in eval mode


def test_aand_without_stage_one_is_plain_distillation_from_the_teacher():
    model = adcore.create_model("aand", **TINY, amplify=False)
    assert model.stages == ("distill",)
    x = torch.rand(2, 3, SIZE, SIZE)
    teacher, gates = model.amplified_teacher(x)
    for t, e in zip(teacher, model.encode(x)):
        torch.testing.assert_close(t, e)
    assert all(g.abs().max() == 0 for g in gates)


def test_aand_gate_examples_shapes():
    model = adcore.create_model("aand", **TINY)
    arrays = model.gate_examples(torch.rand(3, 3, SIZE, SIZE), seed=1)
    assert arrays["images"].shape == (3, SIZE, SIZE, 3) and arrays["images"].dtype == np.uint8
    assert arrays["maps"].shape == (3, SIZE, SIZE) and (arrays["maps"] >= 0).all() and (arrays["maps"] <= 1).all()
    assert set(np.unique(arrays["masks"])) <= {0, 1}
    again = model.gate_examples(torch.rand(3, 3, SIZE, SIZE), seed=1)
    np.testing.assert_array_equal(arrays["masks"], again["masks"])  # seeded


def test_aand_focal_loss_is_finite_on_saturated_gates():
    # AAND's own focal loss takes log(pt) without an epsilon and returns NaN here.
    pred = torch.tensor([0.0, 1.0, 0.0, 1.0])
    target = torch.tensor([0.0, 1.0, 1.0, 0.0])
    loss = aand_mod.focal_loss(pred, target)
    assert torch.isfinite(loss) and loss > 1  # the two wrong, saturated predictions cost a lot
    right = aand_mod.focal_loss(torch.tensor([0.01, 0.99]), torch.tensor([0.0, 1.0]))
    assert right < 1e-4


def test_aand_hard_kd_loss_focuses_on_worst_positions():
    teacher = [torch.randn(2, 4, 8, 8)]
    student = [teacher[0].clone()]
    student[0][:, :, 0, 0] *= -1  # one bad position per image
    hard = aand_mod.hard_kd_loss(teacher, student, k=1)
    torch.testing.assert_close(hard - rd.rd_loss(teacher, student), torch.tensor(2.0), atol=1e-5, rtol=0)
    assert aand_mod.hard_kd_loss(teacher, student, k=64) < hard  # averaging over all positions dilutes it
    torch.testing.assert_close(aand_mod.hard_kd_loss(teacher, student, k=0), rd.rd_loss(teacher, student))


def test_aand_amplification_loss_rewards_pushing_anomalies_away():
    plain = torch.randn(1, 8, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1
    fg = torch.ones(1, 4, 4, dtype=torch.bool)
    unchanged = aand_mod.amplification_loss(plain, plain, mask, fg)
    assert unchanged.item() == pytest.approx(0.3, abs=1e-5)  # ReLU(s − s + margin)
    pushed = plain.clone()
    pushed[:, :, :2, :2] = -plain.mean(dim=(2, 3), keepdim=True).expand(1, 8, 2, 2) * 10
    assert aand_mod.amplification_loss(plain, pushed, mask, fg) < unchanged
    assert aand_mod.amplification_loss(plain, plain, torch.zeros(1, 4, 4), fg).item() == 0


def test_aand_resume_across_the_stage_boundary_matches_an_uninterrupted_run(tmp_path):
    data = tiny_data()
    kw = dict(num_epochs={"amplify": 1, "distill": 2}, lr=1e-3, batch_size=4, seed=3, progress=False)
    adcore.seed_everything(3)
    full = adcore.create_model("aand", **TINY)
    adcore.fit(full, data, **kw)

    class Interrupt(Exception):
        pass

    adcore.seed_everything(3)
    broken = adcore.create_model("aand", **TINY)
    step = broken.training_step
    calls = []

    def failing(images, stage):
        calls.append(stage)
        if calls.count("distill") == 2:  # the second distill epoch (one step per epoch)
            raise Interrupt
        return step(images, stage)

    broken.training_step = failing
    with pytest.raises(Interrupt):
        adcore.fit(broken, data, checkpoint_dir=tmp_path, **kw)
    adcore.seed_everything(3)
    resumed = adcore.create_model("aand", **TINY)
    adcore.fit(resumed, data, checkpoint_dir=tmp_path, resume=True, **kw)
    for k, v in params(full).items():
        torch.testing.assert_close(params(resumed)[k], v, msg=k)


def test_aand_rejects_bad_parameters():
    with pytest.raises(ValueError, match="foreground"):
        adcore.create_model("aand", **TINY, foreground="everything")
    with pytest.raises(ValueError, match="hard_k"):
        adcore.create_model("aand", **TINY, hard_k=-1)


# ---------------------------------------------------------------- pseudo-anomalies


def test_pseudo_anomaly_sources_are_disjoint_from_test_defects():
    assert not set(pa.FOREIGN_SOURCES) & set(TEST_DEFECT_SOURCES)


def test_perlin_noise_is_seeded_smooth_and_bounded():
    a = pa.perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    b = pa.perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (64, 64) and np.abs(a).max() <= 1.5 and a.std() > 0.05
    assert np.abs(np.diff(a, axis=0)).max() < 0.2 and np.abs(np.diff(a, axis=1)).max() < 0.2  # smooth at 16-px cells
    mask = pa.perlin_mask(64, np.random.default_rng(1))
    assert mask.dtype == bool and mask.shape == (64, 64)


def test_synthesizer_changes_only_masked_pixels_and_respects_foreground():
    torch.manual_seed(0)
    images = torch.rand(6, 3, SIZE, SIZE)
    fg = torch.zeros(6, SIZE, SIZE, dtype=torch.bool)
    fg[:, :, : SIZE // 2] = True
    out, masks = pa.PseudoAnomalySynthesizer(clean_prob=0.0)(images, fg)
    assert out.shape == images.shape and masks.shape == (6, SIZE, SIZE)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks[:, :, SIZE // 2:].sum() == 0  # never outside the foreground
    outside = masks[:, None].expand_as(images) == 0
    torch.testing.assert_close(out[outside], images[outside])
    assert masks.sum() > 0 and (out - images).abs().sum() > 0
    clean, none = pa.PseudoAnomalySynthesizer(clean_prob=1.0)(images)
    assert none.sum() == 0 and torch.equal(clean, images)


def test_synthesizer_rejects_bad_input():
    with pytest.raises(ValueError, match="clean_prob"):
        pa.PseudoAnomalySynthesizer(clean_prob=2)
    with pytest.raises(ValueError, match="images"):
        pa.PseudoAnomalySynthesizer()(torch.rand(3, SIZE, SIZE))


def test_foreground_masks():
    images = torch.zeros(1, 3, 64, 64)
    images[:, :, 16:48, 16:48] = 1.0
    bright = pa.foreground_mask(images, "bright", 128)
    assert bright[0, 32, 32] and not bright[0, 0, 0]
    assert torch.equal(pa.foreground_mask(images, "dark", 128), ~bright)
    disk = pa.foreground_mask(images, "disk")
    assert disk[0, 32, 32] and not disk[0, 0, 0]
    assert pa.foreground_mask(images, "all").all()
    with pytest.raises(ValueError, match="foreground mode"):
        pa.foreground_mask(images, "edges")
    assert pa.MVTEC_FOREGROUND["cable"] == ("all", 0)  # the repository's 'cabel' typo, fixed
