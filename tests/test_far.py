"""The FAR generator and its sampler: causality, KV cache, guidance, kernels, training signal,
sizes, class dropout, configs, FLOP counting."""

from __future__ import annotations

import pytest
import torch

from glotok.config import ConfigError
from glotok.config_ar import ARModelConfig, load_ar_config
from glotok.models.attention import KVCache, attend, flash_attn_installed
from glotok.models.far import SEMANTIC, VISUAL, FARTransformer
from glotok.sampling import filter_logits, generate
from glotok.utils.flops import count_flops, far_train_flops, mfu, peak_flops

V_VIS, V_SEM, GRID, CLASSES = 37, 23, 4, 10
L = GRID * GRID


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: OpenMP hand-offs cost more than the matmuls, and on a loaded 2-core
    # machine a step took 15x longer with 2 threads than with 1.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**kw) -> ARModelConfig:
    base = dict(visual_vocab_size=V_VIS, semantic_vocab_size=V_SEM, grid_size=GRID,
                num_classes=CLASSES, dim=64, n_layers=2, n_heads=4, head_layers=2,
                ffn_multiple_of=16, dropout=0.0, token_dropout=0.0)
    return ARModelConfig(**{**base, **kw})


@pytest.fixture
def model() -> FARTransformer:
    torch.manual_seed(0)
    m = FARTransformer(tiny_cfg())
    # LlamaGen zero-initialises the output layers: every logit would be 0 and every test below
    # would pass for a model that ignores its input. Random outputs make the logits informative.
    torch.nn.init.normal_(m.visual_output.weight, std=0.1)
    torch.nn.init.normal_(m.semantic_output.weight, std=0.1)
    return m.eval()


def token_maps(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, V_VIS, (b, GRID, GRID), generator=g),
                        torch.randint(0, V_SEM, (b, GRID, GRID), generator=g)], dim=1)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Causality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0, 5, L - 2])
def test_logits_at_t_ignore_every_token_after_t(model, t):
    idx, labels = token_maps(2), torch.tensor([1, 2])
    changed = idx.flatten(2).clone()
    changed[:, :, t + 1:] = token_maps(2, seed=1).flatten(2)[:, :, t + 1:]
    a, b = model(idx.flatten(2), labels), model(changed, labels)
    for key in ("logits_visual", "logits_semantic"):
        torch.testing.assert_close(a[key][:, :t + 1], b[key][:, :t + 1], rtol=0, atol=1e-6)
    # The change was seen where it may be: the semantic step at t + 1 sees the visual index there.
    assert not torch.allclose(a["logits_semantic"][:, t + 1:], b["logits_semantic"][:, t + 1:])


@pytest.mark.parametrize("t", [0, 7, L - 2])
def test_visual_logits_at_t_ignore_the_semantic_index_at_t(model, t):
    idx, labels = token_maps(2).flatten(2), torch.tensor([3, 4])
    changed = idx.clone()
    changed[:, SEMANTIC, t] = (changed[:, SEMANTIC, t] + 1) % V_SEM
    a, b = model(idx, labels), model(changed, labels)
    torch.testing.assert_close(a["logits_visual"][:, t], b["logits_visual"][:, t], rtol=0, atol=0)
    torch.testing.assert_close(a["logits_semantic"][:, t], b["logits_semantic"][:, t],
                               rtol=0, atol=0)
    assert not torch.allclose(a["logits_visual"][:, t + 1], b["logits_visual"][:, t + 1])


def test_semantic_logits_at_t_see_the_visual_index_at_t_but_visual_logits_do_not(model):
    idx, labels, t = token_maps(2).flatten(2), torch.tensor([3, 4]), 6
    changed = idx.clone()
    changed[:, VISUAL, t] = (changed[:, VISUAL, t] + 1) % V_VIS
    a, b = model(idx, labels), model(changed, labels)
    torch.testing.assert_close(a["logits_visual"][:, t], b["logits_visual"][:, t], rtol=0, atol=0)
    assert not torch.allclose(a["logits_semantic"][:, t], b["logits_semantic"][:, t])


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    dict(cfg_scale=None),
    dict(cfg_scale=2.0, temperature=0.9, top_k=8, top_p=0.9),
])
def test_kv_cache_sampling_equals_recomputing_the_prefix(model, settings):
    labels = torch.tensor([0, 5, 9, CLASSES])
    cached = generate(model, labels, generator=seeded(), use_cache=True, **settings)
    uncached = generate(model, labels, generator=seeded(), use_cache=False, **settings)
    assert cached.shape == (4, 2, GRID, GRID) and cached.dtype == torch.int64
    assert torch.equal(cached, uncached)


def test_guidance_scale_one_equals_plain_conditional_sampling(model):
    labels = torch.tensor([1, 2, 3])
    guided = generate(model, labels, cfg_scale=1.0, generator=seeded(3))
    plain = generate(model, labels, cfg_scale=None, generator=seeded(3))
    assert torch.equal(guided, plain)
    assert not torch.equal(generate(model, labels, cfg_scale=4.0, generator=seeded(3)), plain)


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(model):
    labels = torch.tensor([1, 2])
    a, b = (generate(model, labels, generator=seeded(7)) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, generate(model, labels, generator=seeded(8)))
    assert a[:, VISUAL].max() < V_VIS and a[:, SEMANTIC].max() < V_SEM and a.min() >= 0


def test_top_k_and_top_p_keep_the_most_likely_indices():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    p = logits.softmax(-1)[0]  # 0.64, 0.24, 0.09, ...: the top two hold 0.88
    assert kept(filter_logits(logits, top_p=float(p[0] + p[1]) - 1e-3)) == [True, True, False,
                                                                             False, False]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]


def test_sampling_in_training_mode_is_refused(model):
    with pytest.raises(RuntimeError, match="eval"):
        generate(model.train(), torch.tensor([1]))


# --------------------------------------------------------------------------------------------
# Attention kernels. A GPU cannot exist on the CI machine (CPU-only torch, 2 cores), so these
# run only where someone runs the suite on a CUDA box with flash_attn installed.
# --------------------------------------------------------------------------------------------

needs_flash = pytest.mark.skipif(not torch.cuda.is_available() or not flash_attn_installed(),
                                 reason="needs a CUDA GPU and the flash_attn package")


@pytest.mark.gpu
@needs_flash
def test_flash_forward_equals_sdpa_forward_within_bf16_tolerance():
    torch.manual_seed(0)
    m = FARTransformer(tiny_cfg(dim=128, n_heads=2)).cuda().to(torch.bfloat16).eval()
    torch.nn.init.normal_(m.visual_output.weight, std=0.1)
    idx, labels = token_maps(4).cuda(), torch.tensor([0, 1, 2, 3], device="cuda")
    m.set_attention_backend("flash")
    assert m.attention_backend() == "flash"
    flash = m(idx, labels)["logits_visual"]
    m.set_attention_backend("sdpa")
    sdpa = m(idx, labels)["logits_visual"]
    torch.testing.assert_close(flash, sdpa, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_flash
def test_flash_kv_cache_decoding_equals_sdpa_within_bf16_tolerance():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 9, 4, 32, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    outs = []
    for backend in ("flash", "sdpa"):
        cache = KVCache(2, 16, 4, 32, dtype=torch.bfloat16, device="cuda")
        prefill = attend(q[:, :5], k[:, :5], v[:, :5], cache=cache, backend=backend)
        steps = [attend(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], cache=cache, backend=backend)
                 for i in range(5, 9)]
        outs.append(torch.cat([prefill, *steps], dim=1))
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-2, atol=2e-2)


def test_cached_attention_equals_full_causal_attention():
    g = seeded(0)
    q, k, v = (torch.randn(2, 7, 2, 8, generator=g) for _ in range(3))
    cache = KVCache(2, 8, 2, 8, dtype=torch.float32, device="cpu")
    # A multi-token append after a prefix exercises the bottom-right-aligned causal mask.
    parts = [attend(q[:, :3], k[:, :3], v[:, :3], cache=cache, backend="sdpa"),
             attend(q[:, 3:6], k[:, 3:6], v[:, 3:6], cache=cache, backend="sdpa"),
             attend(q[:, 6:], k[:, 6:], v[:, 6:], cache=cache, backend="sdpa")]
    torch.testing.assert_close(torch.cat(parts, dim=1), attend(q, k, v, backend="sdpa"))
    assert cache.length == 7


def test_flash_backend_where_it_cannot_run_is_a_clear_error(model):
    if torch.cuda.is_available() and flash_attn_installed():
        pytest.skip("flash can run here")
    model.set_attention_backend("flash")
    with pytest.raises(RuntimeError, match="backend 'flash' was requested"):
        model(token_maps(1), torch.tensor([0]))
    model.set_attention_backend("auto")
    assert model.attention_backend() == "sdpa"


# --------------------------------------------------------------------------------------------
# Training signal, sizes, class dropout, configs
# --------------------------------------------------------------------------------------------


def test_loss_falls_on_a_small_fixed_token_set():
    torch.manual_seed(0)
    m = FARTransformer(tiny_cfg(class_dropout=0.1)).train()
    idx, labels = token_maps(4, seed=5), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.05)
    first = m(idx, labels)
    for _ in range(200):
        out = m(idx, labels)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    # Zero-initialised outputs: the first loss is exactly log(vocab) per codebook.
    assert first["loss_visual"].item() == pytest.approx(torch.log(torch.tensor(V_VIS)).item())
    assert out["loss_visual"].item() < 0.2 * first["loss_visual"].item()
    assert out["loss_semantic"].item() < 0.2 * first["loss_semantic"].item()
    assert out["loss"].item() == pytest.approx(
        (out["loss_visual"].item() + out["loss_semantic"].item()) / 2)


@pytest.mark.parametrize("overrides,paper", [
    ({}, 415e6),
    (dict(n_layers=36, dim=1280, n_heads=20, head_layers=4), 898e6),
])
def test_far_b_and_far_l_parameter_counts_are_within_10_percent_of_the_paper(overrides, paper):
    with torch.device("meta"):
        m = FARTransformer(ARModelConfig(**overrides))
    assert abs(m.num_params() - paper) / paper < 0.10
    assert len({id(layer) for layer in [*m.layers, *m.head_layers]}) == len(m.layers) + len(
        m.head_layers)


def test_class_dropout_replaces_labels_by_the_null_class():
    torch.manual_seed(0)
    m = FARTransformer(tiny_cfg(class_dropout=0.1))
    labels = torch.randint(0, CLASSES, (20000,))
    dropped = m.drop_labels(labels)
    is_null = dropped == CLASSES
    assert 0.09 < is_null.float().mean().item() < 0.11
    assert torch.equal(dropped[~is_null], labels[~is_null])


def test_training_with_full_class_dropout_equals_the_null_class_in_eval():
    torch.manual_seed(0)
    m = FARTransformer(tiny_cfg(class_dropout=1.0))
    torch.nn.init.normal_(m.visual_output.weight, std=0.1)
    idx, labels = token_maps(3), torch.tensor([1, 2, 3])
    train_loss = m.train()(idx, labels)["loss"]
    null_loss = m.eval()(idx, torch.full((3,), CLASSES))["loss"]
    cond_loss = m(idx, labels)["loss"]
    assert train_loss.item() == pytest.approx(null_loss.item(), abs=1e-6)
    assert cond_loss.item() != pytest.approx(null_loss.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["far-b", "far-l", "sample"])
def test_ar_configs_load_and_build_on_the_meta_device(repo, name):
    cfg = load_ar_config(repo / "configs/ar" / f"{name}.yaml")
    with torch.device("meta"):
        m = FARTransformer(cfg.model)
    assert m.seq_len == cfg.model.grid_size ** 2


@pytest.mark.parametrize("override,key", [
    ("model.n_heads=64", "model.n_heads"),  # head dim 2: no room for 2-D RoPE
    ("data.variant=centre", "data.variant"),
    ("sample.top_p=0", "sample.top_p"),
])
def test_a_bad_ar_setting_names_its_key(repo, override, key):
    with pytest.raises(ConfigError, match=key):
        load_ar_config(repo / "configs/ar/sample.yaml", [override])


def test_rope_table_stays_exact_fp32_through_dtype_casts_and_to_empty():
    m = FARTransformer(tiny_cfg())
    table = m.rope.clone()
    assert torch.equal(m.to(torch.bfloat16).rope, table)
    with torch.device("meta"):
        meta = FARTransformer(tiny_cfg())
    meta.to_empty(device="cpu")
    assert torch.equal(meta.rope, table)


def test_counted_training_flops_equal_the_analytic_formula():
    cfg = tiny_cfg()
    with torch.device("meta"):
        m = FARTransformer(cfg).train()
        idx, labels = torch.zeros(3, 2, GRID, GRID, dtype=torch.long), torch.zeros(3).long()
    counted = count_flops(lambda: m(idx, labels)["loss"].backward())
    assert counted == far_train_flops(cfg, batch=3)


def test_mfu_is_null_with_a_reason_where_the_peak_is_unknown():
    peak, reason = peak_flops("cpu", torch.bfloat16)
    assert peak is None and "CPU" in reason
    assert mfu(1e12, 1.0, peak) is None
    assert mfu(989e12 / 2, 1.0, 989e12) == pytest.approx(0.5)
