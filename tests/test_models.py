"""The tokenizer's parts: shapes, the quantiser's search and gradient, the residual module."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from glotok.config import TokenizerModelConfig
from glotok.models.quantizer import L2NormQuantizer, code_statistics
from glotok.models.residual import ResidualRefiner
from glotok.models.tokenizer import SEMANTIC, VISUAL, GloTokTokenizer


def small_cfg(**kw):
    cfg = OmegaConf.structured(TokenizerModelConfig(
        image_size=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=32,
        semantic_codebook_size=64, visual_codebook_size=96, adapter_layers=1, adapter_width=32,
        adapter_heads=4))
    cfg.residual.width, cfg.residual.heads = 32, 4
    for k, v in kw.items():
        OmegaConf.update(cfg, k, v)
    return cfg


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GloTokTokenizer(small_cfg())


def images(b=2, size=32):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_gives_two_int64_index_maps_in_range(model):
    idx = model.encode(images())
    assert idx.shape == (2, 2, 8, 8) and idx.dtype == torch.int64
    assert idx[:, VISUAL].max() < 96 and idx[:, SEMANTIC].max() < 64 and idx.min() >= 0


def test_decode_gives_float_images_of_input_size(model):
    out = model.decode(model.encode(images()))
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32


def test_decode_of_encode_equals_the_eval_forward(model):
    # The refined latent is a function of the indices only: no extra information is hidden.
    model.eval()
    x = images()
    assert torch.allclose(model.decode(model.encode(x)), model(x)["recon"], atol=1e-5)


def test_forward_returns_recon_indices_and_scalar_losses(model):
    out = model(images())
    assert out["recon"].shape == (2, 3, 32, 32) and out["indices"].shape == (2, 2, 8, 8)
    for k in ("codebook_loss", "commit_loss", "residual_loss"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])


def test_wrong_image_size_is_rejected_with_the_factor(model):
    with pytest.raises(ValueError, match="multiple of the tokenizer's downsampling factor 4"):
        model.encode(torch.zeros(1, 3, 30, 30))


def test_out_of_range_indices_are_rejected(model):
    idx = model.encode(images())
    idx[0, VISUAL, 0, 0] = 96
    with pytest.raises(ValueError, match="out of range"):
        model.decode(idx)


def test_nearest_code_equals_brute_force_search():
    torch.manual_seed(0)
    q = L2NormQuantizer(300, 8)
    torch.nn.init.normal_(q.embedding.weight)
    z = torch.randn(4, 8, 5, 5)
    out = q(z)
    flat = torch.nn.functional.normalize(z, dim=1).permute(0, 2, 3, 1).reshape(-1, 8)
    brute = torch.cdist(flat, q.codebook()).argmin(dim=1).reshape(4, 5, 5)
    assert torch.equal(out.indices, brute)
    assert torch.equal(q.nearest(z), brute)
    assert torch.allclose(out.z_q, q.lookup(brute), atol=1e-6)


def test_straight_through_gradient_is_identity():
    q = L2NormQuantizer(50, 8)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    g = torch.randn_like(out.z_q)
    (grad,) = torch.autograd.grad(out.z_q, out.z, g)
    assert torch.equal(grad, g)


def test_codebook_and_commit_losses_send_gradients_to_their_sides():
    q = L2NormQuantizer(50, 8)
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    out.codebook_loss.backward(retain_graph=True)
    assert z.grad is None and q.embedding.weight.grad.abs().sum() > 0
    q.embedding.weight.grad = None
    out.commit_loss.backward()
    assert z.grad.abs().sum() > 0 and q.embedding.weight.grad is None


def test_usage_counts_every_position_in_training_only():
    q = L2NormQuantizer(50, 8)
    q(torch.randn(2, 8, 3, 3))
    assert int(q.usage.sum()) == 18
    q.eval()
    q(torch.randn(2, 8, 3, 3))
    assert int(q.usage.sum()) == 18
    stats = code_statistics(q.usage)
    assert 0 < stats["usage"] <= 18 / 50 and 1 <= stats["perplexity"] <= 18


def test_usage_counter_survives_a_bf16_cast():
    q = L2NormQuantizer(50, 8).bfloat16()
    assert q.usage.dtype == torch.int64


def test_residual_module_is_identity_at_init():
    r = ResidualRefiner(8, grid=4, width=32, heads=4)
    assert torch.count_nonzero(r(torch.randn(2, 8, 4, 4))) == 0


def test_residual_module_learns_to_predict_the_quantisation_error(model):
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = images()
    first = None
    for _ in range(30):
        loss = model(x)["residual_loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_without_residual_module_the_decoder_sees_the_codes():
    torch.manual_seed(0)
    m = GloTokTokenizer(small_cfg(**{"residual.enabled": False}))
    out = m(images())
    assert out["residual_loss"] == 0


def test_paper_scale_model_tokenizes_256_to_16x16():
    torch.manual_seed(0)
    m = GloTokTokenizer(OmegaConf.structured(TokenizerModelConfig()))
    n = sum(p.numel() for p in m.parameters())
    assert 100e6 < n < 130e6  # VQ-16 (~72M) + two 6-layer adapters + refiners
    idx = m.encode(torch.zeros(1, 3, 256, 256))
    assert idx.shape == (1, 2, 16, 16)
    assert m.visual.quantizer.num_codes == 12288 and m.semantic.quantizer.num_codes == 4096
