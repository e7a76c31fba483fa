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
    with pytest.raises(ValueError, match="ocbe_ratio"):
        rd.ReverseDistillation(pretrained=False, ocbe_ratio=0)
    for bad in [(3, 4), (3, 0, 6), 0, True]:
        with pytest.raises(ValueError, match="decoder_blocks"):
            rd.ReverseDistillation(pretrained=False, decoder_blocks=bad)
    with pytest.raises(ValueError, match="ocbe_width"):
        rd.ReverseDistillation(pretrained=False, ocbe_width=0)


def test_decoder_blocks_per_level_deepest_first():
    model = rd.ReverseDistillation(pretrained=False, decoder_blocks=(1, 2, 3))
    assert [len(stage) for stage in model.decoder.stages] == [1, 2, 3]
    assert model.decoder.stages[0][0].body[-1].num_features == model.channels[-1]  # the deepest level first
    x = torch.rand(2, 3, SIZE, SIZE)
    features = model.encode(x)
    assert [s.shape for s in model.student(features)] == [f.shape for f in features]


def _rd4ad_bottleneck(inplanes: int, planes: int, shortcut_kernel: int = 0, spatial_kernel: int = 3) -> int:
    """Parameters of one of RD4AD's (Attn/De)Bottleneck blocks with width_per_group = 128, written from its
    definition (hq-deng/RD4AD models/resnet.py, de_resnet.py), not from our modules: inner width = planes·128/64,
    output = planes·4; 1×1 → k×k → 1×1 convs without bias, a BatchNorm (weight + bias) after each; an optional
    shortcut conv (k×k, no bias) + BatchNorm. The spatial conv is 3×3, or the decoder's 2×2 transposed conv."""
    width, out = planes * 2, planes * 4
    convs = inplanes * width + spatial_kernel ** 2 * width * width + width * out
    norms = 2 * (width + width + out)
    shortcut = (shortcut_kernel ** 2 * inplanes * out + 2 * out) if shortcut_kernel else 0
    return convs + norms + shortcut


def rd4ad_wide_resnet50_2_student() -> tuple[int, int]:
    """(OCBE, decoder) parameter counts of RD4AD's BN_layer(AttnBottleneck, 3) and de_wide_resnet50_2.

    OCBE: conv1 3×3 256→512 s2 + bn1, conv2 3×3 512→1024 s2 + bn2 (level 1), conv3 3×3 512→1024 s2 + bn3 (level 2);
    bn_layer = _make_layer(AttnBottleneck, planes 512, 3 blocks, stride 2) on the 3·1024 concatenation, the first
    block with a 1×1 stride-2 shortcut 3072→2048. (BN_layer also declares conv4 1×1 4096→2048 + bn4, 8,392,704
    parameters that forward never calls; they are not part of the architecture and are not counted.)
    Decoder: inplanes 2048; _make_layer(planes 256, 3 blocks), (128, 4), (64, 6), each with stride 2, whose first
    block has a 2×2 transposed conv and a 2×2 stride-2 transposed shortcut + BatchNorm.
    """
    conv_bn = lambda cin, cout: 9 * cin * cout + 2 * cout  # noqa: E731
    ocbe = conv_bn(256, 512) + conv_bn(512, 1024) + conv_bn(512, 1024)
    ocbe += _rd4ad_bottleneck(3 * 1024, 512, shortcut_kernel=1) + 2 * _rd4ad_bottleneck(2048, 512)
    decoder, inplanes = 0, 2048
    for planes, blocks in [(256, 3), (128, 4), (64, 6)]:
        decoder += _rd4ad_bottleneck(inplanes, planes, shortcut_kernel=2, spatial_kernel=2)
        inplanes = planes * 4
        decoder += (blocks - 1) * _rd4ad_bottleneck(inplanes, planes)
    return ocbe, decoder


WRN_STUDENT = dict(backbone="wide_resnet50_2", pretrained=False, bottleneck_dim=2048, ocbe_blocks=3, ocbe_ratio=0.5,
                   decoder_blocks=(3, 4, 6), decoder_ratio=0.5)


def test_rd4ad_student_count_from_its_definition():
    # The formula alone, so that the number quoted in the docs is pinned: 58,885,120 + 24,917,504 = 83,802,624.
    assert rd4ad_wide_resnet50_2_student() == (58_885_120, 24_917_504)


@pytest.mark.parametrize("name", ["aand", "dmad-px"])
def test_paper_config_student_is_rd4ads_full_width_student(name):
    """The paper recipes' student (AAND's, and DMAD's pixel model) has exactly RD4AD's parameter count."""
    model_name, _, mode = name.partition("-")
    recipe = adcore.get_recipe(model_name, "paper")
    params = {**recipe.model_params, "pretrained": False, **({"mode": mode} if mode else {})}
    model = adcore.create_model(model_name, **params)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(model.ocbe), count(model.decoder)) == rd4ad_wide_resnet50_2_student()
    assert [len(stage) for stage in model.decoder.stages] == [3, 4, 6]
    assert [stage[0].body[0].out_channels for stage in model.decoder.stages] == [512, 256, 128]  # ratio 0.5
    assert model.ocbe.blocks[0].body[0].out_channels == 1024  # the OCBE bottleneck is 1024 wide


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
        if name == "dmad":  # the repository's test-set protocol, measured beside (not instead of) ours
            _, arrays = adcore.evaluate(model, test, results_dir=None, return_arrays=True)
            assert arrays["score_terms"].shape == (12, 2)
            assert result["code_protocol"] == dmad_mod.DMAD.code_protocol(arrays["labels"], arrays["score_terms"],
                                                                          result["category"])
        else:
            assert "code_protocol" not in result
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


def test_dmad_smoothness_is_the_codes_padded_two_channel_filter():
    # Smooth_Loss: zero padding 1, one 3×3 kernel over both channels (summed before |·|). A constant c in both channels
    # is 0 inside; an edge pixel misses 3 neighbours, 2c(1 − 5/8); a corner misses 5, 2c(1 − 3/8). On 8×8: 24 edge
    # pixels and 4 corners, so the mean is 2c(24·3/8 + 4·5/8)/64 = 0.1078125 for c = 0.3.
    assert dmad_mod.smoothness(torch.full((1, 2, 8, 8), 0.3)).item() == pytest.approx(0.1078125, rel=1e-6)
    # opposite channels cancel before |·| (a per-channel loss would see 2 × 0.1078125 / 2 ≠ 0)
    assert dmad_mod.smoothness(torch.tensor([0.3, -0.3]).view(1, 2, 1, 1).expand(1, 2, 8, 8)).item() < 1e-7
    assert dmad_mod.smoothness(torch.randn(1, 2, 8, 8)).item() > 0.1


def test_dmad_offset_net_matches_the_codes_residual_block_and_sees_normalised_images():
    net = dmad_mod.OffsetNet(width=4, stride=1)
    block, bn = net.res
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(block, dmad_mod.ResBlock)
    kinds = [type(m).__name__ for m in block.body]
    assert kinds == ["ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert block.body[1].kernel_size == (3, 3) and block.body[4].kernel_size == (1, 1)
    with torch.no_grad():  # the shortcut is the identity: a zeroed last conv leaves x
        block.body[4].weight.zero_(), block.body[4].bias.zero_()
        x = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(block(x), x)
    torch.manual_seed(0)
    model = adcore.create_model("dmad", **TINY).eval()
    seen = []
    model.offsets.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        model._forward(x)
    mean = torch.tensor(adcore.backbones.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(adcore.backbones.IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (x - mean) / std)


def test_dmad_predict_returns_its_raw_terms():
    torch.manual_seed(0)
    model = adcore.create_model("dmad", **TINY).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out = model.predict(x)
        torch.testing.assert_close(out.score_terms, model._raw_scores(*model.maps(x)))
    assert adcore.create_model("aand", **TINY).eval().predict(x).score_terms is None


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


def test_dmad_cycle_loss_is_measured_on_imagenet_normalised_images():
    x = torch.rand(2, 3, 8, 8)
    back = x.clone()
    back[:, 0] += 0.1  # the red channel off by 0.1 everywhere, the others exact
    # By hand: ((0.1 / 0.229)² + 0 + 0) / 3 = 0.190690 / 3 = 0.0635635; on [0, 1] images it would be 0.01 / 3.
    assert dmad_mod.cycle_loss(back, x).item() == pytest.approx(0.0635635, rel=1e-5)
    assert F.mse_loss(back, x).item() == pytest.approx(0.0033333, rel=1e-4)


def test_dmad_training_step_logs_the_normalised_cycle_loss():
    torch.manual_seed(0)
    model = adcore.create_model("dmad", **TINY, cycle_weight=2.0).eval()  # eval: a deterministic forward twice
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        logs = model.training_step(x, "main")
        out = model._forward(x)
        back = dmad_mod.warp(dmad_mod.warp(out["x_def"], out["o2_inv"]), out["o1_inv"])
    torch.testing.assert_close(logs["cycle"], 2.0 * dmad_mod.cycle_loss(back, x))
    assert logs["cycle"] > 2.0 * 15 * F.mse_loss(back, x)  # 1/std² is 17-20 per channel


def test_dmad_image_and_pixel_models_have_the_repositorys_ocbe_inputs():
    # DMAD-PPDM resnet.py BN_layer: vq=True concatenates 3 × 64 squeezed levels + the 1024-channel VQ level 3 (1216);
    # vq=False is RD4AD's OCBE over 3 × 1024.
    sp = adcore.create_model("dmad", mode="sp", backbone="wide_resnet50_2", pretrained=False, offset_width=4)
    px = adcore.create_model("dmad", mode="px", backbone="wide_resnet50_2", pretrained=False, offset_width=4)
    assert sp.ocbe.blocks[0].body[0].in_channels == 1216 and sp.quantizer is not None
    assert px.ocbe.blocks[0].body[0].in_channels == 3072 and px.quantizer is None
    assert isinstance(px.ocbe.level3, torch.nn.Identity)
    assert [m.in_channels for m in sp.ocbe.modules() if isinstance(m, torch.nn.Conv2d)][:3] == [256, 64, 64]
    assert sp.quantizer.codebook.weight.shape == (200, 1024)
    with pytest.raises(ValueError, match="no VQ"):
        adcore.create_model("dmad", **TINY, mode="px", vq=True)
    with pytest.raises(ValueError, match="mode"):
        adcore.create_model("dmad", **TINY, mode="both")
    # the sp ablation without VQ drops the 64-channel squeeze with it (BN_layer(vq=False)): the px model's OCBE
    no_vq = adcore.create_model("dmad", mode="sp", vq=False, backbone="wide_resnet50_2", pretrained=False,
                                offset_width=4)
    assert no_vq.quantizer is None and no_vq.ocbe.blocks[0].body[0].in_channels == 3072
    assert isinstance(no_vq.ocbe.level3, torch.nn.Identity)


@pytest.mark.parametrize("mode", ["sp", "px"])
def test_dmad_deformation_in_the_pixel_map(mode):
    torch.manual_seed(0)
    model = adcore.create_model("dmad", **TINY, mode=mode, deformation_in_map=True, deformation_weight=0.5)
    adcore.fit(model, tiny_data(), num_epochs=1, lr=1e-3, batch_size=2, progress=False)
    assert (model.pixel_max > model.pixel_min).all()  # per-pixel statistics of the training images
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        amap, deformation = model.maps(x)
        lo, hi = model.pixel_min, model.pixel_max
        expected = (amap - lo[0]) / (hi[0] - lo[0]) + 0.5 * (deformation - lo[1]) / (hi[1] - lo[1])
        torch.testing.assert_close(model.predict(x).anomaly_map, expected)
        model.deformation_in_map = False
        torch.testing.assert_close(model.predict(x).anomaly_map, amap)


@pytest.mark.parametrize("name, kwargs", [("dmad", {}), ("dmad", dict(mode="px")), ("aand", {})])
def test_a_fresh_model_loads_the_trained_state_dict(name, kwargs):
    """Everything learnt from the training data (weights and statistics) travels in the state dict."""
    torch.manual_seed(0)
    model = adcore.create_model(name, **TINY, **kwargs)
    data = tiny_data()
    adcore.fit(model, data, num_epochs=1, lr=1e-3, batch_size=2, progress=False)
    fresh = adcore.create_model(name, **TINY, **kwargs)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = model.predict(x), fresh.predict(x)
    torch.testing.assert_close(a.pred_score, b.pred_score)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    if name == "aand":
        assert fresh.foreground_rule == model.foreground_rule


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


def test_aand_stage_two_teacher_cache_is_the_slow_twin_computed_once():
    data = tiny_data(6)
    runs = {}
    for cache in (False, True):
        torch.manual_seed(0)
        model = adcore.create_model("aand", **TINY, cache_teacher=cache)
        seen = []
        amplified_teacher = model.amplified_teacher

        def counting(images, _inner=amplified_teacher, _seen=seen):
            _seen.append(len(images))
            return _inner(images)

        model.amplified_teacher = counting
        adcore.fit(model, data, num_epochs={"amplify": 1, "distill": 3}, lr=1e-2, batch_size=4, progress=False)
        runs[cache] = (params(model), sum(seen))
        assert model._teacher_cache is None  # freed when training ends
    # the slow twin runs the teacher on every image of every Stage-II epoch; the cache on each image once
    assert runs[False][1] == 3 * len(data) and runs[True][1] == len(data)
    for k, v in runs[False][0].items():
        torch.testing.assert_close(runs[True][0][k], v, rtol=1e-5, atol=1e-6)


def test_the_first_pretrained_backbone_of_a_process_draws_no_random_numbers():
    from adcore import backbones

    backbones._mapped_efficientnet_lite0_state.cache_clear()  # as in a fresh process
    torch.manual_seed(0)
    backbones.create_backbone("efficientnet_lite0")
    after_first = torch.rand(4)
    torch.manual_seed(0)
    backbones.create_backbone("efficientnet_lite0")
    torch.testing.assert_close(torch.rand(4), after_first, rtol=0, atol=0)


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
    # every feature near one direction v (cos ≈ 1 between any two), from a fixed generator: the test must not depend
    # on what earlier tests drew from the global RNG
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 8, 1, 1, generator=g)
    plain = v + 0.1 * torch.randn(1, 8, 4, 4, generator=g)
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1
    fg = torch.ones(1, 4, 4, dtype=torch.bool)
    unchanged = aand_mod.amplification_loss(plain, plain, mask, fg)
    assert unchanged.item() == pytest.approx(0.3, abs=1e-5)  # ReLU(s − s + margin)
    pushed = plain.clone()
    pushed[:, :, :2, :2] = -10 * v  # anomalies turned against the normal direction: cos ≈ −1 < cos before − margin
    assert aand_mod.amplification_loss(plain, pushed, mask, fg) < 0.01 < unchanged
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


def test_aand_level_foreground_is_average_pooled_above_0_3(monkeypatch):
    torch.manual_seed(0)
    model = adcore.create_model("aand", **TINY, foreground="disk")
    seen = []
    original = aand_mod.amplification_loss

    def spy(plain, amplified, mask, foreground, **kw):
        seen.append(foreground)
        return original(plain, amplified, mask, foreground, **kw)

    monkeypatch.setattr(aand_mod, "amplification_loss", spy)
    x = torch.rand(2, 3, SIZE, SIZE)
    model.training_step(x, "amplify")
    disk = pa.foreground_mask(x, "disk").float()
    for got in seen:  # one per level: 8×8, 4×4, 2×2 at 32 px
        pooled = F.adaptive_avg_pool2d(disk[:, None], got.shape[-2:])[:, 0]
        assert torch.equal(got, pooled > 0.3)
    assert seen[0].shape[-2:] == (8, 8) and 0 < seen[0].float().mean() < 1
    # Pooling, not nearest sampling: a cell one quarter covered is background, one half covered is foreground.
    fg = torch.zeros(1, 4, 4)
    fg[0, 0, 0] = 1  # a quarter of cell (0, 0)
    fg[0, 0:2, 2] = 1  # half of cell (0, 1)
    assert aand_mod._level_masks(fg, [(2, 2)])[0].tolist() == [[[0.0, 1.0], [0.0, 0.0]]]


class _Named(list):
    """A list of training samples with the attributes AAND reads from a training set."""

    def __init__(self, items, category, native):
        super().__init__(items)
        self.category, self._native = category, [(native, native)] * len(items)


def test_aand_foreground_rule_from_the_training_set():
    model = adcore.create_model("aand", **TINY)
    loader = torch.utils.data.DataLoader(_Named(tiny_data(2), "cable", 1024), batch_size=2)
    model.on_fit_start(loader)
    assert model.foreground_rule == ("disk", 0, 1024)
    model.on_fit_start(torch.utils.data.DataLoader(_Named(tiny_data(2), "screw", 1024), batch_size=2))
    assert model.foreground_rule == ("dark", 150, 1024)
    subset = torch.utils.data.Subset(_Named(tiny_data(3), "bottle", 900), [0, 2])  # a Subset is looked through
    model.on_fit_start(torch.utils.data.DataLoader(subset, batch_size=2))
    assert model.foreground_rule == ("disk", 0, 900)
    model.on_fit_start(torch.utils.data.DataLoader(tiny_data(2), batch_size=2))  # no category, no native size
    assert model.foreground_rule == ("all", 0, None)


def test_foreground_blur_is_sigma_8_at_the_native_resolution():
    from scipy.ndimage import gaussian_filter

    torch.manual_seed(0)
    images = torch.rand(1, 3, 64, 64)
    grey = (0.299 * images[0, 0] + 0.587 * images[0, 1] + 0.114 * images[0, 2]).numpy() * 255
    for native, sigma in [(256, 2.0), (None, 8.0), (64, 8.0)]:  # σ = 8 · 64 / native
        expected = torch.from_numpy(gaussian_filter(grey, sigma) > 127)
        assert torch.equal(pa.foreground_mask(images, "bright", 127, native_size=native)[0], expected), native


def test_aand_synthesizer_has_the_codes_ten_operations_and_solarize_at_half():
    rng = np.random.default_rng(0)
    assert len(pa._operations(rng, "aand")) == 10  # datasets/database.py's augmenters list
    assert len(pa._operations(rng, "validation")) == 11  # what the stored validation curves were drawn with
    assert adcore.create_model("aand", **TINY).synthesizer.operations == "aand"
    with pytest.raises(ValueError, match="operations"):
        pa.PseudoAnomalySynthesizer(operations="draem")
    white = torch.full((3, 4, 4), 255, dtype=torch.uint8)
    solarize = pa._operations(rng, "aand")[4]  # iaa.Solarize(0.5, threshold=(32, 128)): half the images
    changed = sum(not torch.equal(solarize(white), white) for _ in range(400))
    assert 160 < changed < 240
    # brightness × and + are one operation: the output is the product, then the sum, of one draw each
    grey = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    one = pa._operations(np.random.default_rng(1), "aand")[1](grey)
    draws = np.random.default_rng(1)
    mul, add = draws.uniform(0.8, 1.2), int(draws.integers(-30, 31))
    import torchvision.transforms.v2.functional as TF
    assert torch.equal(one.int(), TF.adjust_brightness(grey, float(mul)).int() + add) and add != 0


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
    # AAND's list puts cable with bottle on the centred disk; its 'cabel' typo had cable skipped.
    assert pa.MVTEC_FOREGROUND["cable"] == pa.MVTEC_FOREGROUND["bottle"] == ("disk", 0)


@pytest.mark.parametrize("name", ["dmad", "aand"])
def test_the_constructor_defaults_are_the_default_recipe(name):
    """``adcore.fit(adcore.create_model(name), data)`` trains the default recipe's model, not some other width."""
    recipe = adcore.get_recipe(name, "default")
    with pytest.warns(UserWarning, match="RANDOMLY"):
        plain = adcore.create_model(name, pretrained=False)
        listed = adcore.create_model(name, pretrained=False, **recipe.model_params)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(plain) == shapes(listed)
    assert plain.stages == listed.stages


def test_validation_curve_over_aands_last_stage():
    """adcore.validation's test-free epoch choice extends to AAND: Stage I fixed, the curve over Stage II."""
    from adcore.validation import epoch_curve

    common = dict(model_params=TINY, image_size=SIZE, categories=["brick"], holdout=8, batch_size=16, lr=1e-3,
                  progress=False)
    with pytest.warns(UserWarning, match="RANDOMLY"):
        curve = epoch_curve("aand", epochs=[2, 1], fixed_epochs={"amplify": 1}, **common)
    assert curve["epochs"] == [1, 2] and set(curve["curves"]["brick"]) == {1, 2}  # distill epochs, not amplify's
    assert curve["params"]["fixed_epochs"] == {"amplify": 1} and curve["chosen_epochs"] in (1, 2)
    for bad in [None, {"distill": 1}]:  # Stage I's count must be fixed, and only it
        with pytest.raises(ValueError, match="fixed_epochs"):
            epoch_curve("aand", epochs=[1], fixed_epochs=bad, **common)
    with pytest.raises(ValueError, match="scheduler in 'distill'"):  # a schedule breaks one-run-for-many
        epoch_curve("aand", epochs=[1], fixed_epochs={"amplify": 1}, **{
            **common, "model_params": {**TINY, "milestones_distill": (1,)}})
