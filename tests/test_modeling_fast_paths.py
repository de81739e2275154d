"""The eager fast paths of the NEPA block (pair-layout RoPE, fused LayerScale, GELU recompute) compute exactly what
the plain paths compute, step aside when they must, and keep the step free of host synchronisations."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nepa_hf.models.nepa.modeling_nepa as modeling
from nepa_hf import NepaForImageClassification, NepaForPreTraining, NepaModel
from test_modeling import randomize_, reference_forward, tiny_config


@pytest.fixture
def plain_paths(monkeypatch):
    """Force the rotate-half attention path and the autograd-saved GELU (the reference implementations)."""

    def force():
        monkeypatch.setattr(modeling.NepaAttention, "_use_pair_layout", lambda self, hidden_states: False)
        monkeypatch.setattr(modeling.NepaMLP, "_recompute_activation", lambda self, pre_activation: False)

    return force


def _loss_and_grads(model, pixels):
    model.zero_grad(set_to_none=True)
    loss = model(pixels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(qk_norm_affine=True),
        dict(qk_norm_affine=False),
        dict(qk_norm_affine=True, qk_norm_bias=True),
        dict(hidden_act="gelu_pytorch_tanh", is_causal=False),
    ],
)
def test_fast_paths_match_plain_paths_forward_and_gradients(overrides, plain_paths):
    torch.manual_seed(0)
    model = randomize_(NepaForPreTraining(tiny_config(pos_embed_rescale=None, **overrides))).train()
    pixels = torch.randn(2, 3, 12, 20)
    fast_loss, fast_grads = _loss_and_grads(model, pixels)
    with torch.no_grad():
        fast_eval = model.eval().nepa(pixels).last_hidden_state
    plain_paths()
    plain_loss, plain_grads = _loss_and_grads(model.train(), pixels)
    with torch.no_grad():
        plain_eval = model.eval().nepa(pixels).last_hidden_state
    assert fast_grads.keys() == plain_grads.keys()
    torch.testing.assert_close(fast_eval, plain_eval, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-6, rtol=1e-6)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_float64_fast_path_matches_independent_reference():
    model = randomize_(NepaModel(tiny_config())).double().eval()
    pixels = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    with torch.no_grad():
        ours = model(pixels).last_hidden_state
    # complex128 rotation; the RoPE angles themselves are float32 by design (reference §3), hence 1e-6.
    torch.testing.assert_close(ours, reference_forward(model, pixels, is_causal=True), atol=1e-6, rtol=1e-5)


def _saved_bytes(model, pixels) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(pixels).loss
    return sum(storages.values())


def test_gelu_recompute_drops_exactly_the_activation_output(monkeypatch):
    config = tiny_config(pos_embed_rescale=None)
    model = NepaForPreTraining(config).train()
    pixels = torch.randn(4, 3, 16, 16)
    monkeypatch.setattr(modeling.NepaAttention, "_use_pair_layout", lambda self, hidden_states: False)
    recomputed = _saved_bytes(model, pixels)
    monkeypatch.setattr(modeling.NepaMLP, "_recompute_activation", lambda self, pre_activation: False)
    plain = _saved_bytes(model, pixels)
    tokens = 1 + (16 // config.patch_size) ** 2
    gelu_outputs = config.num_hidden_layers * 4 * tokens * config.intermediate_size * 4  # fp32 bytes
    assert plain - recomputed == gelu_outputs


class _ShiftedLinear(nn.Linear):
    """Stands for a LoRA/quantised Linear: a subclass whose own forward must run."""

    def forward(self, x):
        return super().forward(x) + 0.5


def test_wrapped_or_hooked_projections_run_their_own_forward(plain_paths):
    model = randomize_(NepaModel(tiny_config())).train()
    pixels = torch.randn(2, 3, 16, 16)
    attention, mlp = model.encoder.layers[0].attention, model.encoder.layers[0].mlp
    shifted = _ShiftedLinear(attention.q_proj.in_features, attention.q_proj.out_features)
    shifted.load_state_dict(attention.q_proj.state_dict())
    attention.q_proj = shifted
    calls = []
    mlp.down_proj.register_forward_hook(lambda module, args, output: calls.append("down_proj"))
    attention.k_proj.register_forward_pre_hook(lambda module, args: calls.append("k_proj"))
    torch.manual_seed(0)
    ours = model(pixels).last_hidden_state
    assert calls == ["k_proj", "down_proj"]
    plain_paths()
    torch.manual_seed(0)
    torch.testing.assert_close(ours, model(pixels).last_hidden_state)


def test_bf16_autocast_takes_the_plain_paths():
    model = randomize_(NepaForPreTraining(tiny_config())).train()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(pixels).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class _HostReads(TorchDispatchMode):
    """Records ops that copy a tensor value to the host (`.item()`, `bool(tensor)`, `nonzero`): device syncs on a GPU."""

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
