"""Tests of spot.py: the sampler against independent references, embeddings, priors, model."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import spot
from dataclasses import asdict

from spot import (PRIORS, SPoTConfig, SPoTViT, extract_patches, extract_patches_reference,
                  grid_positions, load_checkpoint, sample_positions, sincos_pos_embed)

# The fast path (F.grid_sample) and the hand-written reference must both pass every check.
SAMPLERS = {"grid_sample": extract_patches, "reference": extract_patches_reference}
METHODS = tuple(SAMPLERS)


def reference_grid_sample(images, positions, window):
    """An independent F.grid_sample call written from the coordinate convention alone.

    Sample j of the window centred at P (pixels) is at u = P - k/2 + j + 0.5; with
    align_corners=False, grid_sample's normalized coordinate of u is 2u/size - 1.
    """
    B, C, H, W = images.shape
    N, k = positions.shape[1], window
    out = torch.zeros(B, N, C, k, k, dtype=images.dtype)
    for b in range(B):
        for n in range(N):
            py, px = positions[b, n, 0] * H, positions[b, n, 1] * W
            u_y = torch.tensor([py - k / 2 + j + 0.5 for j in range(k)], dtype=torch.float64)
            u_x = torch.tensor([px - k / 2 + j + 0.5 for j in range(k)], dtype=torch.float64)
            gy, gx = torch.meshgrid(2 * u_y / H - 1, 2 * u_x / W - 1, indexing="ij")
            grid = torch.stack([gx, gy], -1)[None].to(images.dtype)          # (1, k, k, 2) = (x, y)
            out[b, n] = F.grid_sample(images[b:b + 1], grid, align_corners=False)[0]
    return out


def reshape_patchify(images, window):
    """Non-overlapping k x k patches by reshaping, row-major: (B, G, C, k, k)."""
    B, C, H, W = images.shape
    k = window
    images = images[:, :, : H // k * k, : W // k * k]
    x = images.reshape(B, C, H // k, k, W // k, k).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // k) * (W // k), C, k, k)


# --------------------------------------------------------------------------- sampler

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size,window", [((16, 16), 4), ((12, 20), 5), ((9, 14), 3)])
def test_methods_match_each_other_and_grid_sample(channels, size, window):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, channels, *size, generator=g)
    # Random subpixel positions, plus windows hanging over every border and corner.
    border = torch.tensor([[0.0, 0.5], [1.0, 0.5], [0.5, 0.0], [0.5, 1.0], [0.0, 0.0], [1.0, 1.0],
                           [0.02, 0.97], [0.99, 0.01], [-0.1, 0.5], [0.5, 1.15]])
    positions = torch.cat([torch.rand(2, 20, 2, generator=g), border.expand(2, -1, -1)], dim=1)
    expected = reference_grid_sample(images, positions, window)
    for method in METHODS:
        got = SAMPLERS[method](images, positions, window)
        assert got.shape == (2, positions.shape[1], channels, window, window)
        assert (got - expected).abs().max() <= 1e-5, method


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_images_and_positions(method):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 2, 7, 8, dtype=torch.float64, generator=g, requires_grad=True)
    # Keep positions away from pixel-centre boundaries (fractional offset in [0.2, 0.8]),
    # where bilinear interpolation is not differentiable.
    window = 3
    cells = torch.tensor([[1.0, 2.0], [3.0, 5.0], [-1.0, 6.0], [5.0, -1.0]], dtype=torch.float64)
    frac = 0.2 + 0.6 * torch.rand(1, 4, 2, dtype=torch.float64, generator=g)
    start = cells[None] + frac                          # t_0 = P - k/2 in pixels
    positions = ((start + window / 2) / torch.tensor([7.0, 8.0], dtype=torch.float64))
    positions.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda im, pos: SAMPLERS[method](im, pos, window), (images, positions))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size,window", [(32, 4), ((24, 40), 8), (30, 7)])
def test_grid_is_a_special_case(method, size, window):
    """The grid as a special case of subpixel tokens: positions at the grid centres give exactly
    the reshape patches."""
    H, W = (size, size) if isinstance(size, int) else size
    images = torch.rand(3, 3, H, W, generator=torch.Generator().manual_seed(2))
    cells = grid_positions((H, W), window)
    positions = cells.expand(3, -1, -1)
    got = SAMPLERS[method](images, positions, window)
    # The hand-written sampler is exact. grid_sample maps pixel coordinates to [-1, 1] and back
    # in float32, which is exact only when the image side is a power of two (32 here); other
    # sides pick up ~1e-6 px of round-off.
    exact = method == "reference" or (H & (H - 1) == 0 and W & (W - 1) == 0)
    assert (got - reshape_patchify(images, window)).abs().max() <= (1e-6 if exact else 2e-5)


def test_grid_special_case_at_224_manual_exact_grid_sample_close():
    """At 224 px float32 grid_sample's normalize/unnormalize round trip costs ~1e-5 px; the
    hand-written sampler has no such round trip and is exact."""
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    positions = grid_positions(224, 16).expand(2, -1, -1)
    expected = reshape_patchify(images, 16)
    assert (extract_patches_reference(images, positions, 16) - expected).abs().max() <= 1e-6
    assert (extract_patches(images, positions, 16) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("size,window", [(224, 16), (96, 16)])
def test_grid_special_case_is_exact_in_float64(size, window):
    """In float64 (images and grid_positions(..., dtype=torch.float64)) grid_sample's round trip
    through [-1, 1] costs nothing measurable: the windows are the reshaped patches."""
    images = torch.rand(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    positions = grid_positions(size, window, dtype=torch.float64).expand(2, -1, -1)
    assert positions.dtype == torch.float64
    assert (extract_patches(images, positions, window) - reshape_patchify(images, window)).abs().max() <= 1e-12


@pytest.mark.parametrize("size,window,bound", [(224, 16, 2 ** -15), (32, 4, 0.0)])
def test_grid_special_case_float32_bound(size, window, bound):
    """The float32 bound that extract_patches' docstring states, on [0, 1] images: random ones and
    a checkerboard (neighbouring pixels differ by 1: the worst case for a coordinate error)."""
    checkerboard = (torch.arange(size)[:, None] + torch.arange(size)).remainder(2).float()
    images = torch.cat([torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(6)),
                        checkerboard.expand(1, 3, -1, -1)])
    positions = grid_positions(size, window).expand(4, -1, -1)
    assert (extract_patches(images, positions, window) - reshape_patchify(images, window)).abs().max() <= bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_images_at_224_px_read_like_float32(dtype):
    """bf16/fp16 images at the paper's 224 px: the CPU grid_sample kernel used to read values
    off by 0.5, return NaN, or crash the process; extract_patches now reads them in float32."""
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 224, 224, generator=g)
    positions = torch.rand(2, 50, 2, generator=g)
    for pos in (positions, positions.to(dtype)):       # float32 or 16-bit positions
        low = images.to(dtype)
        expected = extract_patches(low.float(), pos.float(), 16)   # the same inputs, in float32
        got = extract_patches(low, pos, 16)
        assert got.dtype == dtype and torch.isfinite(got.float()).all()
        # Only the rounding of the result to 16 bits remains (bf16: 8 significant bits).
        assert (got.float() - expected).abs().max() <= 2 ** -7


def test_grid_positions_layout():
    cells = grid_positions((8, 12), 4)
    assert cells.shape == (6, 2)
    assert torch.allclose(cells[0], torch.tensor([0.25, 1 / 6]))
    assert torch.allclose(cells[1], torch.tensor([0.25, 0.5]))   # row-major: x varies fastest


# --------------------------------------------------------------------------- embedding

def mae_2d_sincos_table(embed_dim, grid_size):
    """MAE's get_2d_sincos_pos_embed (numpy, verbatim logic): the standard fixed ViT table."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("size,window,dim", [(32, 4, 192), (224, 16, 64), (48, 8, 32)])
def test_pos_embed_equals_standard_table_on_grid(size, window, dim):
    positions = grid_positions(size, window)[None]
    got = sincos_pos_embed(positions, dim, size, window)[0]
    expected = torch.from_numpy(mae_2d_sincos_table(dim, size // window)).float()
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5


def test_pos_embed_resolves_quarter_window_shift():
    size, window, dim = 224, 16, 192
    base = torch.tensor([[[0.5, 0.5]]])
    for axis in (0, 1):
        shifted = base.clone()
        shifted[..., axis] += 0.25 * window / size
        diff = sincos_pos_embed(shifted, dim, size, window) - sincos_pos_embed(base, dim, size, window)
        assert diff.abs().max() >= 0.2


# --------------------------------------------------------------------------- priors

@pytest.mark.parametrize("prior", PRIORS)
def test_priors_shape_range_and_reproducibility(prior):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    draw = lambda seed: sample_positions(prior, 4, 16, 32, 4, generator=torch.Generator().manual_seed(seed),
                                         images=images)
    a, b = draw(0), draw(0)
    assert a.shape == (4, 16, 2)
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    if prior in ("isotropic", "center"):
        assert torch.equal(a, draw(1)) and torch.equal(a[0], a[3])
    else:   # random priors: different seeds and different images of one batch differ
        assert not torch.equal(a, draw(1))
        assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("n", [1, 2, 7, 8, 10, 16, 25, 30, 64])
def test_isotropic_has_exactly_n_spread_points(n):
    positions = sample_positions("isotropic", 1, n, 64, 8)[0]
    assert positions.shape == (n, 2)
    assert len(torch.unique(positions, dim=0)) == n
    m = math.isqrt(n)
    if m * m == n:
        lattice = (torch.arange(m) + 0.5) / m
        expected = torch.stack(torch.meshgrid(lattice, lattice, indexing="ij"), -1).reshape(-1, 2)
        assert torch.allclose(positions, expected)


def test_center_prior_is_more_central_than_isotropic():
    iso = sample_positions("isotropic", 1, 25, 32, 4)
    center = sample_positions("center", 1, 25, 32, 4)
    assert (center - 0.5).abs().mean() < 0.85 * (iso - 0.5).abs().mean()


def test_grid_prior_picks_distinct_grid_cells():
    positions = sample_positions("grid", 8, 10, 32, 4, generator=torch.Generator().manual_seed(0))
    cells = grid_positions(32, 4)
    for image in positions:
        assert len(torch.unique(image, dim=0)) == 10
        assert all((cells == p).all(1).any() for p in image)
    full = sample_positions("grid", 2, 64, 32, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full[0][full[0][:, 1].argsort(stable=True)][full[0][full[0][:, 1].argsort(stable=True)][:, 0].argsort(stable=True)],
                       cells)


def test_salient_prior_follows_saliency():
    """A bright square on a faintly textured image: salient positions concentrate around it."""
    images = 0.4 + 0.1 * torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    images[:, :, 8:20, 40:52] = 1.0
    positions = sample_positions("salient", 2, 200, 64, 8, generator=torch.Generator().manual_seed(0),
                                 images=images)
    near = ((positions[..., 0] - 14 / 64).abs() < 0.2) & ((positions[..., 1] - 46 / 64).abs() < 0.2)
    # The box around the square is 16% of the image; it receives far more of the tokens.
    assert near.float().mean() > 0.4
    saliency = spot.saliency_map(images)
    assert saliency[:, 8:20, 40:52].mean() > 3 * saliency.mean()
    assert torch.allclose(saliency.flatten(1).sum(1), torch.ones(2))


# --------------------------------------------------------------------------- model

def tiny_model(**overrides):
    config = dict(image_size=16, window=4, num_classes=5, dim=32, depth=2, heads=2)
    config.update(overrides)
    torch.manual_seed(0)
    return SPoTViT(SPoTConfig(**config)).eval()


def test_model_shapes_any_token_count_and_features():
    model = tiny_model()
    images = torch.rand(3, 3, 16, 16)
    for n in (1, 5, 16, 40):
        positions = torch.rand(3, n, 2)
        assert model(images, positions).shape == (3, 5)
        feats = model.forward_head(model.forward_features(images, positions), pre_logits=True)
        assert feats.shape == (3, 32)


def test_logits_do_not_depend_on_token_order():
    model = tiny_model()
    images = torch.rand(2, 3, 16, 16)
    positions = torch.rand(2, 12, 2)
    shuffled = positions[:, torch.randperm(12)]
    assert torch.allclose(model(images, positions), model(images, shuffled), atol=1e-5)


def test_attention_matches_explicit_softmax_attention():
    model = tiny_model()
    attn = model.blocks[0].attn
    x = torch.randn(2, 7, 32)
    B, T, D = x.shape
    q, k, v = attn.qkv(x).view(B, T, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // 2), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(B, T, D))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_cpu_attention_equals_torch_fused_attention_values_and_gradients():
    """spot.attention writes the formula out on the CPU (faster to train through); it must equal
    torch's F.scaled_dot_product_attention, forward and backward, in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 65, 16, requires_grad=True) for _ in range(3))
    ours = spot.attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(ours, ref, atol=1e-5)
    grad_out = torch.randn_like(ref)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for a, b in zip(ours_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [t.bfloat16() for t in (q, k, v)]
        ours, ref = spot.attention(*low), F.scaled_dot_product_attention(*low)
    assert ours.dtype == ref.dtype == torch.bfloat16
    assert (ours.float() - ref.float()).abs().max() < 0.05      # bf16 has ~3 significant digits


def test_grid_placed_spot_equals_standard_vit_forward():
    """A grid-placed SPoTViT is a standard ViT: reshape patchify + linear + fixed sin-cos table."""
    model = tiny_model()
    images = torch.rand(2, 3, 16, 16)
    positions = grid_positions(16, 4).expand(2, -1, -1)
    x = (images - model.image_mean) / model.image_std
    tokens = model.patch_embed(reshape_patchify(x, 4).flatten(2))
    tokens = tokens + torch.from_numpy(mae_2d_sincos_table(32, 4)).float()
    x = torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1)
    for block in model.blocks:
        x = block(x)
    expected = model.head(model.norm(x)[:, 0])
    assert torch.allclose(model(images, positions), expected, atol=1e-5)


def test_configs_without_the_optional_keys_build_this_projects_vit():
    """A config that leaves norm_eps / position_embedding / pool out gets this project's own ViT:
    LayerNorm eps 1e-5, sin-cos positions, class-token pooling, the same state dict."""
    model = tiny_model(image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.25))
    old = {k: v for k, v in asdict(model.config).items() if k not in ("norm_eps", "position_embedding", "pool")}
    rebuilt = SPoTViT(SPoTConfig(**old)).eval()
    rebuilt.load_state_dict(model.state_dict())                   # strict: the same keys
    assert sorted(model.state_dict()) == sorted(
        ["patch_embed.weight", "patch_embed.bias", "cls_token", "norm.weight", "norm.bias", "head.weight",
         "head.bias"] + [f"blocks.{i}.{name}" for i in range(2) for name in (
             "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
             "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
             "mlp.fc2.weight", "mlp.fc2.bias")])
    assert all(m.eps == 1e-5 for m in rebuilt.modules() if isinstance(m, torch.nn.LayerNorm))
    images, positions = torch.rand(2, 3, 16, 16), torch.rand(2, 9, 2)
    x = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(
        extract_patches((images - model.image_mean) / model.image_std, positions, 4).flatten(2))
        + sincos_pos_embed(positions, 32, 16, 4)], 1)
    for block in model.blocks:
        x = block(x)
    expected = model.head(F.layer_norm(x, (32,), model.norm.weight, model.norm.bias, 1e-5)[:, 0])
    with torch.no_grad():
        assert torch.equal(rebuilt(images, positions), model(images, positions))
        assert torch.allclose(rebuilt(images, positions), expected, atol=1e-6)


def test_float64_model_computes_in_float64():
    """.double() with float64 positions: embedding, softmax and normalization all in float64
    (the config's mean/std, not their float32 buffers), matching the float32 model closely."""
    model = tiny_model(image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225))
    images, positions = torch.rand(2, 3, 16, 16), torch.rand(2, 9, 2)
    assert sincos_pos_embed(positions.double(), 32, 16, 4).dtype == torch.float64
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    expected = torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ q
    assert (spot.attention(q, q, q) - expected).abs().max() <= 1e-14
    with torch.no_grad():
        low, high = model(images, positions), model.double()(images.double(), positions.double())
    assert high.dtype == torch.float64 and torch.allclose(low.double(), high, atol=1e-5)


def test_gradients_reach_positions():
    model = tiny_model()
    positions = torch.rand(2, 6, 2, requires_grad=True)
    model(torch.rand(2, 3, 16, 16), positions).sum().backward()
    assert positions.grad is not None and positions.grad.abs().sum() > 0


def test_load_checkpoint_round_trip(tmp_path):
    model = tiny_model(image_size=(16, 20), image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.25))
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_config": asdict(model.config), "model": model.state_dict()}, path)
    loaded = load_checkpoint(path)
    images, positions = torch.rand(2, 3, 16, 20), torch.rand(2, 9, 2)
    assert torch.equal(loaded(images, positions), model(images, positions))
    assert not loaded.training
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an SPoT checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


class _RunsCode:
    """A pickle payload: unpickling it would call open(marker, "w"), creating the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_checkpoint_never_runs_code_from_the_file(tmp_path):
    model = tiny_model()
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_config": asdict(model.config), "model": model.state_dict(),
                "args": {"payload": _RunsCode(str(marker))}}, path)
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_checkpoint_errors_name_the_file(tmp_path):
    model = tiny_model()
    good = tmp_path / "good.pt"
    torch.save({"model_config": asdict(model.config), "model": model.state_dict()}, good)
    truncated, empty, noise = tmp_path / "truncated.pt", tmp_path / "empty.pt", tmp_path / "noise.pt"
    truncated.write_bytes(good.read_bytes()[:500])
    empty.write_bytes(b"")
    noise.write_bytes(bytes(range(256)) * 8)
    other = tmp_path / "other.pt"
    torch.save({"model_config": {**asdict(model.config), "dim": 64}, "model": model.state_dict()},
               other)
    for path, words in [(truncated, "could not be read"), (empty, "could not be read"),
                        (noise, "could not be read"), (tmp_path, "is a directory"),
                        (tmp_path / "missing.pt", "does not exist"), (other, "does not load")]:
        with pytest.raises(ValueError, match=words) as error:
            load_checkpoint(path)
        assert str(path) in str(error.value)


# --------------------------------------------------------------------------- bad input

def test_bad_input_errors_name_the_argument():
    images, positions = torch.rand(2, 3, 16, 16), torch.rand(2, 4, 2)
    cases = [
        (lambda: extract_patches(torch.rand(3, 16, 16), positions, 4), "images"),
        (lambda: extract_patches(images, torch.rand(2, 4, 3), 4), "positions"),
        (lambda: extract_patches(images, torch.rand(3, 4, 2), 4), "batch size"),
        (lambda: extract_patches(images, torch.full((2, 4, 2), float("nan")), 4), "NaN"),
        (lambda: extract_patches(images, torch.full((2, 4, 2), float("inf")), 4), "inf"),
        (lambda: extract_patches(images, positions, 0), "window"),
        (lambda: extract_patches(images, positions, 17), "window"),
        (lambda: SPoTConfig(dim=30, heads=4), "dim"),
        (lambda: SPoTConfig(image_size=16, window=20), "window"),
        (lambda: SPoTViT({"dim": 32}), "SPoTConfig"),
        (lambda: SPoTConfig(position_embedding="rope"), "position_embedding"),
        (lambda: SPoTConfig(pool="max"), "pool"),
        (lambda: SPoTConfig(norm_eps=0.0), "norm_eps"),
        (lambda: sample_positions("uniform", 2, 0, 16, 4), "n_tokens"),
        (lambda: sample_positions("random", 2, 4, 16, 4), "uniform"),
        (lambda: sample_positions("salient", 2, 4, 16, 4), "images"),
        (lambda: sample_positions("grid", 2, 17, 16, 4), "n_tokens"),
        (lambda: tiny_model()(torch.rand(2, 3, 8, 8), positions), "images"),
    ]
    for call, word in cases:
        with pytest.raises(ValueError, match=word):
            call()


def test_saliency_ignores_image_borders():
    """The FFT's wrap-around must not make the top/bottom borders look salient: an image whose
    top half is brighter has its salient edge in the middle, not at the borders."""
    images = 0.4 + 0.1 * torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    images[:, :, :32] += 0.3
    saliency = spot.saliency_map(images)[0]
    assert saliency[30:34].mean() > 3 * saliency.mean()
    assert saliency[:3].mean() < saliency.mean() and saliency[-3:].mean() < saliency.mean()


def test_saliency_map_has_no_jpeg_block_grid_and_still_finds_objects():
    """The spectral residual lifts even the weakest frequencies; in a 32 px JPEG those are mostly
    its 8 x 8 block edges, which once filled every map with one fixed grid. With the amplitude
    floored at its mean, JPEG'd smooth noise averages to a map without that grid, and the map
    still puts more of its mass on the shapes' objects than their share of the image."""
    from experiments import saliency_pattern as study
    noise = study.jpeg(study.smooth_noise(200, 32, 1.5), quality=75)
    average = spot.saliency_map(noise).mean(0)                                  # (32, 32)
    assert study.grid(average)[0] < 0.5             # the map before the fix: 1.7
    assert study.grid(study.saliency(noise).mean(0))[0] > 1.0    # that map, for comparison
    images, _, info = data.make_shapes(200, 32, return_info=True)
    assert study.lift(spot.saliency_map(images.float() / 255), info["mask"]) > 7   # before: 5.5
