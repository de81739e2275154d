"""Numerics and behaviour of the NEPA model family, checked against the authors' released implementation's semantics."""

import math

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nepa_hf import (
    NepaConfig,
    NepaForImageClassification,
    NepaForPreTraining,
    NepaModel,
    nepa_loss,
)
from nepa_hf.models.nepa.modeling_nepa import NepaRopePositionEmbedding, patch_center_coordinates


def tiny_config(**overrides) -> NepaConfig:
    # LayerScale 1.0 so that attention/MLP branches really contribute (1e-5 hides almost every bug).
    base = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, patch_size=4,
        image_size=16, layerscale_value=1.0, qk_norm_affine=True, pos_embed_rescale=2.0,
    )
    base.update(overrides)
    return NepaConfig(**base)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (LayerNorm/QK-norm weights, LayerScale, biases too) a non-trivial random value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "q_norm.weight", "k_norm.weight")):
                param.copy_(1.0 + noise)
            else:
                param.copy_(noise)
    return model


# ---------------------------------------------------------------------------------------------------------------
# An independent float64 implementation of the forward pass (patchify, RoPE, QK-norm, blocks), with explicit loops.
# ---------------------------------------------------------------------------------------------------------------


def reference_forward(model: NepaModel, pixel_values: torch.Tensor, is_causal: bool) -> torch.Tensor:
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    x = pixel_values.double()
    batch, _, height, width = x.shape
    p, d_model, n_heads = cfg.patch_size, cfg.hidden_size, cfg.num_attention_heads
    d = d_model // n_heads
    gh, gw = height // p, width // p
    # patch embedding: conv == per-patch linear map, row-major
    w = sd["embeddings.patch_embeddings.projection.weight"]
    b = sd["embeddings.patch_embeddings.projection.bias"]
    patches = []
    for i in range(gh):
        for j in range(gw):
            crop = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]
            patches.append(torch.einsum("bchw,dchw->bd", crop, w) + b)
    tokens = torch.cat([sd["embeddings.cls_token"].expand(batch, 1, d_model), torch.stack(patches, 1)], 1)
    n = tokens.shape[1]

    # RoPE tables: theta^(-4k/d), angles y then x, repeated twice; CLS not rotated.
    inv_freq = [cfg.rope_theta ** (-4 * k / d) for k in range(d // 4)]
    cos = torch.ones(n, d, dtype=torch.float64)
    sin = torch.zeros(n, d, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            y, xc = 2 * (i + 0.5) / gh - 1, 2 * (j + 0.5) / gw - 1
            half = [2 * math.pi * y * f for f in inv_freq] + [2 * math.pi * xc * f for f in inv_freq]
            ang = torch.tensor(half + half, dtype=torch.float64)
            cos[1 + i * gw + j], sin[1 + i * gw + j] = ang.cos(), ang.sin()

    def layer_norm(t, weight=None, bias=None):
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        out = (t - mu) / torch.sqrt(var + cfg.layer_norm_eps)
        if weight is not None:
            out = out * weight
        if bias is not None:
            out = out + bias
        return out

    def rotate(t):  # t: (B, H, N, d)
        rot = torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1)
        return t * cos + rot * sin

    h = tokens
    for layer in range(cfg.num_hidden_layers):
        pre = f"encoder.layers.{layer}."
        a = layer_norm(h, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"])
        q, k, v = (
            (a @ sd[pre + f"attention.{name}.weight"].T + sd[pre + f"attention.{name}.bias"])
            .view(batch, n, n_heads, d).transpose(1, 2)
            for name in ("q_proj", "k_proj", "v_proj")
        )
        q = layer_norm(q, sd.get(pre + "attention.q_norm.weight"), sd.get(pre + "attention.q_norm.bias"))
        k = layer_norm(k, sd.get(pre + "attention.k_norm.weight"), sd.get(pre + "attention.k_norm.bias"))
        q, k = rotate(q), rotate(k)
        scores = q @ k.transpose(-1, -2) * d**-0.5
        if is_causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, d_model)
        attn = attn @ sd[pre + "attention.o_proj.weight"].T + sd[pre + "attention.o_proj.bias"]
        h = h + sd[pre + "layer_scale1.lambda1"] * attn
        m = layer_norm(h, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"])
        m = F.gelu(m @ sd[pre + "mlp.up_proj.weight"].T + sd[pre + "mlp.up_proj.bias"])
        m = m @ sd[pre + "mlp.down_proj.weight"].T + sd[pre + "mlp.down_proj.bias"]
        h = h + sd[pre + "layer_scale2.lambda1"] * m
    return layer_norm(h, sd["norm.weight"], sd["norm.bias"])


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_matches_independent_reference_forward(is_causal, size):
    model = randomize_(NepaModel(tiny_config())).eval()
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model(pixels, is_causal=is_causal).last_hidden_state.double()
    ref = reference_forward(model, pixels, is_causal)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------------


def test_rope_frequencies_head_dim_64():
    config = NepaConfig.from_preset("nepa-vit-b")
    inv_freq = NepaRopePositionEmbedding(config).inv_freq
    assert inv_freq.shape == (16,)
    torch.testing.assert_close(inv_freq[:3], torch.tensor([1.0, 0.7499, 0.5623]), atol=1e-4, rtol=0)
    assert inv_freq[-1].item() == pytest.approx(0.01334, abs=1e-5)


def test_rope_hand_checked_angle_table():
    # head dim 8 -> 2 frequencies: 1 and 100^(-1/2) = 0.1. 2x2 grid: centres at -0.5 and +0.5.
    config = NepaConfig(hidden_size=8, num_attention_heads=1, intermediate_size=16, patch_size=2, image_size=4)
    rope = NepaRopePositionEmbedding(config).eval()
    cos, sin = rope(2, 2, torch.device("cpu"), torch.float32)
    assert cos.shape == sin.shape == (5, 8)
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))  # CLS: identity
    pi = math.pi
    expected_angles = {  # token -> (y angles for freq 1, 0.1) + (x angles)
        1: [-pi, -0.1 * pi, -pi, -0.1 * pi],
        2: [-pi, -0.1 * pi, pi, 0.1 * pi],
        3: [pi, 0.1 * pi, -pi, -0.1 * pi],
        4: [pi, 0.1 * pi, pi, 0.1 * pi],
    }
    for token, half in expected_angles.items():
        angles = torch.tensor(half + half)
        torch.testing.assert_close(cos[token], angles.cos(), atol=1e-6, rtol=0)
        torch.testing.assert_close(sin[token], angles.sin(), atol=1e-6, rtol=0)


def test_rope_coordinates_follow_input_grid_and_rescale_only_in_training():
    coords = patch_center_coordinates(2, 3, torch.device("cpu"))
    torch.testing.assert_close(coords[:, 0], torch.tensor([-0.5, -0.5, -0.5, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(coords[:, 1], torch.tensor([-2 / 3, 0.0, 2 / 3] * 2))
    config = tiny_config(pos_embed_rescale=2.0)
    rope = NepaRopePositionEmbedding(config)
    rope.eval()
    eval_a = rope(4, 4, torch.device("cpu"), torch.float32)
    eval_b = rope(4, 4, torch.device("cpu"), torch.float32)
    assert torch.equal(eval_a[0], eval_b[0])
    rope.train()
    torch.manual_seed(0)
    train = rope(4, 4, torch.device("cpu"), torch.float32)
    assert not torch.allclose(train[0], eval_a[0])
    # One scalar shared by both axes: recover it from the first frequency's angle of the first patch.
    scale_y = torch.atan2(train[1][1, 0], train[0][1, 0]) / torch.atan2(eval_a[1][1, 0], eval_a[0][1, 0])
    d4 = config.head_dim // 4
    scale_x = torch.atan2(train[1][1, d4], train[0][1, d4]) / torch.atan2(eval_a[1][1, d4], eval_a[0][1, d4])
    assert 0.5 <= scale_y.item() <= 2.0 and scale_y.item() == pytest.approx(scale_x.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Attention backends, causality, any resolution
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("is_causal", [True, False])
def test_sdpa_matches_eager(is_causal):
    model = randomize_(NepaModel(tiny_config())).eval()
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(pixels, is_causal=is_causal).last_hidden_state
        model.set_attn_implementation("eager")
        eager = model(pixels, is_causal=is_causal).last_hidden_state
    assert (sdpa - eager).abs().max().item() <= 1e-5


def test_flex_attention_matches_sdpa_causal():
    pytest.importorskip("torch.nn.attention.flex_attention")
    model = randomize_(NepaModel(tiny_config(num_hidden_layers=1))).eval()
    pixels = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        sdpa = model(pixels).last_hidden_state
        model.set_attn_implementation("flex_attention")
        flex = model(pixels).last_hidden_state
    assert (sdpa - flex).abs().max().item() <= 1e-5


def test_output_attentions_with_eager_attention_returns_maps():
    model = randomize_(NepaModel(tiny_config())).eval()
    model.set_attn_implementation("eager")  # as in transformers: sdpa computes no attention maps
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, 17, 17)
    assert len(out.hidden_states) == 3
    # Causal: no weight above the diagonal; rows sum to one.
    weights = out.attentions[0][0]
    assert weights.triu(1).abs().max().item() == 0.0
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 17))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_causal_outputs_ignore_later_patches(implementation):
    model = randomize_(NepaModel(tiny_config())).eval()
    model.set_attn_implementation(implementation)
    pixels = torch.randn(1, 3, 16, 16)
    changed = pixels.clone()
    changed[:, :, 8:12, 4:8] += 1.0  # patch k = 2*4 + 1 = 9 -> token 10
    with torch.no_grad():
        a = model(pixels).last_hidden_state
        b = model(changed).last_hidden_state
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with torch.no_grad():  # bidirectional: everything changes
        a = model(pixels, is_causal=False).last_hidden_state
        b = model(changed, is_causal=False).last_hidden_state
    assert not torch.allclose(a[:, :10], b[:, :10])


@pytest.mark.parametrize("size", [(16, 16), (8, 24), (28, 12), (4, 4)])
def test_any_resolution_divisible_by_patch(size):
    model = NepaModel(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    n = (size[0] // 4) * (size[1] // 4)
    assert out.last_hidden_state.shape == (2, 1 + n, 64)
    assert out.input_embeddings.shape == (2, 1 + n, 64)
    assert out.pooler_output.shape == (2, 64)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 1:].mean(1))


def test_config_validation_errors():
    with pytest.raises(StrictDataclassClassValidationError, match="divisible by 4"):
        NepaConfig(hidden_size=60, num_attention_heads=6)
    with pytest.raises(StrictDataclassClassValidationError, match="divisible by num_attention_heads"):
        NepaConfig(hidden_size=64, num_attention_heads=5)
    with pytest.raises(StrictDataclassClassValidationError, match="pooling"):
        NepaConfig(pooling="cls")
    with pytest.raises(ValueError, match="Unknown NEPA preset"):
        NepaConfig.from_preset("nepa-vit-xxl")
    # The authors' field names would be kept as unused attributes: refused, naming the converter.
    with pytest.raises(ValueError, match="authors' `vit_nepa` field names.*nepa_hf.hub.convert"):
        NepaConfig(drop_path_prob=0.1, add_pooling_layer=False)


# ---------------------------------------------------------------------------------------------------------------
# Sizes and init
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset,cls,num_labels,expected",
    [
        ("nepa-vit-b", NepaForPreTraining, None, 85_527_552),
        ("nepa-vit-b-in1k", NepaForImageClassification, 1000, 86_299_624),
        ("nepa-vit-l", NepaForPreTraining, None, 302_967_808),
        ("nepa-vit-l-in1k", NepaForImageClassification, 1000, 303_994_856),
    ],
)
def test_reference_parameter_counts(preset, cls, num_labels, expected):
    kwargs = {"num_labels": num_labels} if num_labels else {}
    with torch.device("meta"):
        model = cls(NepaConfig.from_preset(preset, **kwargs))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_init_follows_reference():
    torch.manual_seed(0)
    config = NepaConfig.from_preset("nepa-vit-small", num_hidden_layers=2, num_labels=7)
    model = NepaForImageClassification(config)
    layer = model.nepa.encoder.layers[0]
    assert torch.all(layer.layer_scale1.lambda1 == 1e-5) and torch.all(layer.layer_scale2.lambda1 == 1e-5)
    assert layer.attention.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(layer.attention.q_proj.bias == 0)
    assert model.nepa.embeddings.cls_token.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.all(layer.norm1.weight == 1) and torch.all(layer.norm1.bias == 0)
    assert torch.all(layer.attention.q_norm.weight == 1)
    assert torch.all(model.classifier.weight == 0) and torch.all(model.classifier.bias == 0)
    assert model.nepa.rope_embeddings.inv_freq[0].item() == 1.0
    # Drop path grows linearly to the configured rate at the last block.
    config = tiny_config(num_hidden_layers=3, drop_path_rate=0.2)
    rates = [getattr(l.drop_path, "drop_prob", 0.0) for l in NepaModel(config).encoder.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2])


def test_non_affine_qk_norm_has_no_parameters():
    model = NepaModel(NepaConfig.from_preset("nepa-vit-b", num_hidden_layers=1))
    assert not any("q_norm" in name for name, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# Pretraining objective
# ---------------------------------------------------------------------------------------------------------------


def test_loss_is_shifted_negative_cosine_and_bounded():
    model = randomize_(NepaForPreTraining(tiny_config()))
    model.eval()
    pixels = torch.randn(2, 3, 16, 16)
    out = model(pixels)
    pred, target = out.last_hidden_state, out.input_embeddings
    expected = -F.cosine_similarity(pred[:, :-1], target[:, 1:], dim=-1).mean()
    torch.testing.assert_close(out.loss, expected)
    assert -1.0 <= out.loss.item() <= 1.0
    # Perfect predictions give -1, opposite ones +1.
    z = torch.randn(2, 5, 8)
    assert nepa_loss(torch.cat([z[:, 1:], z[:, :1]], 1), z).item() == pytest.approx(-1.0, abs=1e-6)
    assert nepa_loss(-torch.cat([z[:, 1:], z[:, :1]], 1), z).item() == pytest.approx(1.0, abs=1e-6)


def test_stop_gradient_blocks_the_target_path_only():
    model = randomize_(NepaForPreTraining(tiny_config()))
    out = model(torch.randn(2, 3, 16, 16))
    out.loss.backward()  # nepa_loss detaches the targets (the one place stop-gradient is applied)
    # Gradient still reaches the patch embedding through the input path.
    assert model.nepa.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    grad_with_stop = model.nepa.embeddings.cls_token.grad.clone()

    ablation = NepaForPreTraining(tiny_config(pretraining_stop_gradient=False))
    ablation.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 16, 16)
    model.zero_grad()
    torch.manual_seed(2)
    out_stop = model(pixels)
    out_stop.loss.backward()
    torch.manual_seed(2)
    out_free = ablation(pixels)
    out_free.loss.backward()
    torch.testing.assert_close(out_stop.loss, out_free.loss)
    # The CLS embedding is a target of nothing (never a target), but patch embeddings are: gradients differ.
    w_stop = model.nepa.embeddings.patch_embeddings.projection.weight.grad
    w_free = ablation.nepa.embeddings.patch_embeddings.projection.weight.grad
    assert not torch.allclose(w_stop, w_free)
    assert grad_with_stop.shape == (1, 1, 64)


def test_no_shift_ablation_uses_same_position_targets():
    model = randomize_(NepaForPreTraining(tiny_config(pretraining_shift=False))).eval()
    out = model(torch.randn(2, 3, 16, 16))
    expected = -F.cosine_similarity(out.last_hidden_state[:, 1:], out.input_embeddings[:, 1:], dim=-1).mean()
    torch.testing.assert_close(out.loss, expected)


def test_mask_token_replaces_inputs_but_targets_stay_clean():
    model = randomize_(NepaForPreTraining(tiny_config(use_mask_token=True))).eval()
    pixels = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 3] = True
    clean = model(pixels)
    masked = model(pixels, bool_masked_pos=mask)
    assert torch.equal(clean.input_embeddings, masked.input_embeddings)
    assert not torch.allclose(clean.last_hidden_state[:, 4:], masked.last_hidden_state[:, 4:])
    with pytest.raises(ValueError, match="use_mask_token=True"):
        NepaForPreTraining(tiny_config())(pixels, bool_masked_pos=mask)


def test_gradient_checkpointing_gives_same_gradients():
    config = tiny_config(drop_path_rate=0.1)
    model = randomize_(NepaForPreTraining(config)).train()
    pixels = torch.randn(2, 3, 16, 16)

    def grads():
        model.zero_grad()
        torch.manual_seed(3)
        model(pixels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = grads()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], msg=name)


# ---------------------------------------------------------------------------------------------------------------
# Classification head
# ---------------------------------------------------------------------------------------------------------------


def test_classification_pooling_and_losses():
    torch.manual_seed(0)
    model = randomize_(NepaForImageClassification(tiny_config(num_labels=3, is_causal=False))).eval()
    pixels = torch.randn(4, 3, 16, 16)
    out = model(pixels, output_hidden_states=True)
    hidden = model.nepa(pixels).last_hidden_state
    expected = model.classifier(model.fc_norm(hidden[:, 1:].mean(1)))
    torch.testing.assert_close(out.logits, expected)

    labels = torch.tensor([0, 2, 1, 2])
    torch.testing.assert_close(model(pixels, labels=labels).loss, F.cross_entropy(out.logits, labels))
    soft = F.one_hot(labels, 3).float() * 0.9 + 0.1 / 3
    soft_loss = model(pixels, labels=soft).loss
    torch.testing.assert_close(soft_loss, torch.sum(-soft * out.logits.log_softmax(-1), -1).mean())
    assert model.config.problem_type in (None, "single_label_classification")

    multi = NepaForImageClassification(tiny_config(num_labels=3, problem_type="multi_label_classification"))
    target = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    multi_out = multi(pixels, labels=target)
    torch.testing.assert_close(multi_out.loss, F.binary_cross_entropy_with_logits(multi_out.logits, target))

    regression = NepaForImageClassification(tiny_config(num_labels=1))
    reg_out = regression(pixels, labels=torch.randn(4))
    assert reg_out.loss.ndim == 0


def test_last_token_pooling_has_no_fc_norm():
    model = randomize_(NepaForImageClassification(tiny_config(num_labels=2, pooling="last"))).eval()
    pixels = torch.randn(2, 3, 16, 16)
    hidden = model.nepa(pixels).last_hidden_state
    torch.testing.assert_close(model(pixels).logits, model.classifier(hidden[:, -1]))
    assert isinstance(model.fc_norm, torch.nn.Identity)


def test_bf16_autocast_forward_backward_close_to_fp32():
    model = randomize_(NepaForPreTraining(tiny_config())).eval()
    pixels = torch.randn(2, 3, 16, 16)
    reference = model(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(pixels)
    torch.testing.assert_close(low.last_hidden_state.float(), reference.last_hidden_state, atol=0.1, rtol=0.05)
    assert abs(low.loss.item() - reference.loss.item()) < 0.02
    low.loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_rope_tables_are_cached_in_eval_and_fresh_in_training():
    model = NepaModel(tiny_config()).eval()
    rope = model.rope_embeddings
    first = rope(4, 4, torch.device("cpu"), torch.float32)
    assert rope(4, 4, torch.device("cpu"), torch.float32)[0] is first[0]  # same cached tensor object
    model.train()
    assert rope(4, 4, torch.device("cpu"), torch.float32)[0] is not first[0]


def test_float64_model_matches_independent_reference():
    model = randomize_(NepaModel(tiny_config())).double().eval()
    pixels = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    with torch.no_grad():
        ours = model(pixels).last_hidden_state
    # The RoPE angles themselves are float32 by design (then cast), hence 1e-6 rather than 1e-12.
    torch.testing.assert_close(ours, reference_forward(model, pixels, is_causal=True), atol=1e-6, rtol=1e-5)


def test_bf16_autocast_training_step_is_finite():
    model = randomize_(NepaForPreTraining(tiny_config(drop_path_rate=0.1))).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 16, 16)).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class _ShiftedLinear(torch.nn.Linear):
    """Stands for a LoRA/quantised Linear: a subclass whose own forward must run."""

    def forward(self, x):
        return super().forward(x) + 0.5


def test_wrapped_or_hooked_projections_run_their_own_forward():
    model = randomize_(NepaModel(tiny_config())).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(pixels).last_hidden_state
    attention, mlp = model.encoder.layers[0].attention, model.encoder.layers[0].mlp
    shifted = _ShiftedLinear(attention.q_proj.in_features, attention.q_proj.out_features)
    shifted.load_state_dict(attention.q_proj.state_dict())
    attention.q_proj = shifted
    calls = []
    mlp.down_proj.register_forward_hook(lambda module, args, output: calls.append("down_proj"))
    attention.k_proj.register_forward_pre_hook(lambda module, args: calls.append("k_proj"))
    with torch.no_grad():
        after = model(pixels).last_hidden_state
    assert calls == ["k_proj", "down_proj"]
    assert not torch.allclose(before, after)


class _HostReads(TorchDispatchMode):
    """Records ops that copy a tensor value to the host (`.item()`, `bool(tensor)`, `nonzero`): GPU device syncs."""

    HOST_READS = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.nonzero.default,
    }

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.HOST_READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_training_forward_backward_has_no_host_syncs():
    pretraining = NepaForPreTraining(tiny_config(drop_path_rate=0.1)).train()  # RoPE rescale and drop path active
    classifier = NepaForImageClassification(tiny_config(num_labels=3, drop_path_rate=0.1)).train()
    pixels = torch.randn(2, 3, 16, 16)
    with _HostReads() as mode:
        pretraining(pixels).loss.backward()
        classifier(pixels, labels=torch.tensor([0, 2])).loss.backward()
        classifier(pixels, labels=torch.rand(2, 3).softmax(-1)).loss.backward()
    assert mode.reads == []


# ---------------------------------------------------------------------------------------------------------------
# Loading: missing QK-norm weights
# ---------------------------------------------------------------------------------------------------------------


def _qk_norm_weights(model) -> dict:
    return {name: p for name, p in model.named_parameters() if name.endswith(("q_norm.weight", "k_norm.weight"))}


@pytest.mark.parametrize("source_class", [NepaModel, NepaForPreTraining])
def test_non_affine_checkpoint_loads_into_affine_config_computing_the_same(tmp_path, source_class):
    """The authors' base checkpoint is non-affine and their fine-tuning affine: the QK-norm weights are new (reported
    as MISSING, as transformers reports every new weight) and start at 1.0, which computes the same function."""
    source = randomize_(source_class(tiny_config(qk_norm_affine=False))).eval()
    source.save_pretrained(tmp_path)
    model, info = NepaForPreTraining.from_pretrained(tmp_path, qk_norm_affine=True, output_loading_info=True)
    weights = _qk_norm_weights(model)
    assert info["missing_keys"] == set(weights) and not info["unexpected_keys"]
    assert len(weights) == 4 and all(torch.equal(w, torch.ones_like(w)) for w in weights.values())
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = source(pixels).last_hidden_state
        torch.testing.assert_close(model.nepa(pixels).last_hidden_state, expected, atol=0, rtol=0)


@pytest.mark.parametrize("deleted", [("q_norm",), ("q_norm", "k_norm")])
def test_affine_checkpoint_missing_qk_norm_weights_is_reported(tmp_path, caplog, deleted):
    from safetensors.torch import load_file, save_file

    NepaForPreTraining(tiny_config(qk_norm_affine=True)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not any(f".{norm}." in k for norm in deleted)}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("INFO"):
        _, info = NepaForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set(weights) - set(kept)
    assert "non-affine QK-norm" not in caplog.text
    for cls in (NepaForImageClassification, NepaModel):  # whatever head loads it
        _, info = cls.from_pretrained(tmp_path, output_loading_info=True)
        backbone_missing = {key for key in info["missing_keys"] if "encoder." in key}  # not the new head's
        assert {key.split("encoder.", 1)[1] for key in backbone_missing} == {
            key.split("encoder.", 1)[1] for key in set(weights) - set(kept)
        }
