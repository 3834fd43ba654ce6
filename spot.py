"""
spot.py -- Subpixel Placement of Tokens (SPoT) in a small Vision Transformer.

The paper: "Subpixel Placement of Tokens in Vision Transformers", arXiv 2507.01654. Everything
its method needs is in this one file:

    extract_patches      subpixel tokens: read a k x k window at any subpixel position
                         (bilinear); extract_patches_reference is the same written out by hand
    sincos_pos_embed     subpixel tokens: the continuous 2D sin-cos position embedding
    sample_positions     spatial priors: where tokens go before any search
    SPoTViT              a pre-norm ViT that reads an image through a set of positions (one model
                         for every prior and budget: retrofitting), built from an SPoTConfig
                         (nanoGPT's GPT(GPTConfig) pattern)
    load_checkpoint      rebuild a model from a checkpoint written by train.py
    load_pretrained      a pretrained timm / DeiT / MAE ViT (a state dict, a file, or timm:NAME) as
                         an SPoTViT that computes on the grid what it computed (the paper's
                         retrofitting starts there); export writes an SPoTViT back as timm's keys

Try it:  python spot.py      (a tiny demo: samples every prior and runs a forward pass)

Coordinates (used everywhere in this project)
---------------------------------------------
A token position is a pair (y, x) normalized to the image: 0 is the top/left image *edge*,
1 the bottom/right *edge*, and the pair is the *centre* of the token's k x k window. A set of
positions for a batch is a tensor of shape (B, N, 2).

In pixel units pixel i spans [i, i+1) and its centre is i + 0.5 (PyTorch's
`align_corners=False` convention). A window centred at P = y*H covers [P - k/2, P + k/2] and
its k samples sit at P - k/2 + j + 0.5, j = 0..k-1. Samples that fall outside the image read
zero (after the model's normalization, i.e. the dataset's mean colour).

    x = 0        x = 0.5 (centre)          x = 1
    +----+----+----+----+----+----+----+----+      one row of a W = 8 image, k = 2
    | 0  | 1  | 2  | 3  | 4  | 5  | 6  | 7  |      pixel i covers [i, i+1)
    +----+----+----+----+----+----+----+----+
                  [====|====]                      window at x = 0.375 (P = 3.0):
                     ^    ^                        samples at 2.5, 3.5 = centres of px 2, 3
                     [====|====]                   window at x = 0.4375 (P = 3.5):
                        ^    ^                     samples at 3.0, 4.0 = halfway between
                                                   pixel centres -> 50/50 blends

The patch grid is the special case P = (i + 0.5) k: every sample lands on a pixel centre and
the window is exactly the i-th non-overlapping k x k patch, so the grid is one placement among
all the subpixel ones ("Ω_grid ⊆ Ω_subpix").
"""

import importlib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Subpixel tokens: reading a k x k window at a subpixel position

def grid_positions(image_size, window, dtype=torch.float32):
    """Centres of the non-overlapping patch grid, row-major: (G, 2), G = (H//k) * (W//k).

    Cell (i, j) has centre ((i + 0.5) k / H, (j + 0.5) k / W), computed in `dtype` (float64 for
    comparisons at float64 precision). When k does not divide the image, the grid covers the
    top-left (H//k)k x (W//k)k pixels, like a strided convolution.
    """
    height, width = to_hw(image_size)
    check_window(window, (height, width))
    rows = (torch.arange(height // window, dtype=dtype) + 0.5) * window / height
    cols = (torch.arange(width // window, dtype=dtype) + 0.5) * window / width
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def extract_patches(images, positions, window):
    """I_q(s; k) of subpixel tokens: the k x k window centred at each subpixel position, read by
    bilinear interpolation (the fast path, F.grid_sample; extract_patches_reference below is the
    same reading written out by hand, and tests/test_spot.py proves the two equal).

    images:    (B, C, H, W) float
    positions: (B, N, 2) (y, x) window centres, normalized to [0, 1] (see the module docstring;
               values outside [0, 1] are allowed and read zeros where they leave the image)
    window:    k, the side of the square window in pixels
    returns    (B, N, C, k, k)

    At grid_positions the windows are the reshaped k x k patches: exactly when H and W are powers
    of two (32/4: measured error 0), else up to H * 2^-23 px off after grid_sample's round trip
    through [-1, 1] in float32: on [0, 1] images at 224/16 within 2^-15 (about 3.1e-5; measured
    2^-15 on a checkerboard, the worst case). In float64 (grid_positions(..., dtype=
    torch.float64)) the error is below 1e-12; extract_patches_reference is exact in both.
    """
    positions = _check_sampler_inputs(images, positions, window)
    (B, C, H, W), N, k = images.shape, positions.shape[1], window
    # Sample j of a window centred at P (pixels) sits at u_j = P - k/2 + j + 0.5, on each axis.
    offsets = torch.arange(k, device=images.device, dtype=positions.dtype) + 0.5 - k / 2   # (k,)
    centre = positions * positions.new_tensor((H, W))                         # (B, N, 2) = P
    # grid_sample wants (x, y) in [-1, 1] with align_corners=False: g = 2 u / size - 1.
    ys = (centre[..., 0, None] + offsets) * (2 / H) - 1                      # (B, N, k)
    xs = (centre[..., 1, None] + offsets) * (2 / W) - 1                      # (B, N, k)
    grid = torch.stack(torch.broadcast_tensors(xs[:, :, None, :], ys[:, :, :, None]), dim=-1)
    grid = grid.reshape(B, N * k, k, 2)                                      # (B, N*k, k, 2)
    # One (N*k) x k output "image" per batch element. Half-precision images are read in float32:
    # the CPU kernel is wrong for them (values off, NaN, even a crash at 224 px).
    sample_dtype = torch.promote_types(images.dtype, torch.float32)
    out = F.grid_sample(images.to(sample_dtype), grid.to(sample_dtype), mode="bilinear",
                        padding_mode="zeros", align_corners=False).to(images.dtype)
    return out.view(B, C, N, k, k).permute(0, 2, 1, 3, 4)                   # (B, N, C, k, k)


def extract_patches_reference(images, positions, window):
    """extract_patches written out by hand: the math of subpixel tokens, for the reader (and tests).

    Sample j of a window sits at u_j = P - k/2 + j + 0.5 (pixels). Bilinear interpolation between
    pixel centres works on t = u - 0.5, so t_j = (P - k/2) + j: ALL k samples along one axis share
    the same fractional part. The whole window is therefore a blend of ONE (k+1) x (k+1) block:

        block  = I[r0 : r0+k+1, c0 : c0+k+1]              r0 = floor(t_y), c0 = floor(t_x)
        rows   = (1 - fy) * block[:-1, :] + fy * block[1:, :]     fy = t_y - r0   -> (k, k+1)
        window = (1 - fx) * rows[:, :-1] + fx * rows[:, 1:]       fx = t_x - c0   -> (k, k)

    Gradients reach the positions through fy and fx (floor() has zero gradient), which is why
    bilinear sampling is differentiable almost everywhere (not on pixel-centre boundaries).
    Same arguments and result as extract_patches.
    """
    positions = _check_sampler_inputs(images, positions, window)
    (B, C, H, W), N, k = images.shape, positions.shape[1], window
    start = positions * positions.new_tensor((H, W)) - k / 2    # (B, N, 2) = t_0 (see above)
    corner = start.detach().floor()                      # (B, N, 2) top-left pixel of the block
    frac = start - corner                                # (B, N, 2) shared fractional offset
    corner = corner.long()

    offsets = torch.arange(k + 1, device=images.device)
    rows = corner[..., 0, None] + offsets                # (B, N, k+1) pixel rows of the block
    cols = corner[..., 1, None] + offsets                # (B, N, k+1) pixel columns
    # Pixels outside the image read zero: gather a clamped (valid) index, then mask it out.
    row_ok = (rows >= 0) & (rows < H)
    col_ok = (cols >= 0) & (cols < W)
    inside = (row_ok[..., :, None] & col_ok[..., None, :]).unsqueeze(-1)   # (B, N, k+1, k+1, 1)

    # Gather from a channels-last copy so that one index fetches all C channels of a pixel.
    pixels = images.permute(0, 2, 3, 1).reshape(B * H * W, C)             # (B*H*W, C)
    batch = torch.arange(B, device=images.device).view(B, 1, 1, 1) * (H * W)
    index = batch + rows.clamp(0, H - 1)[..., :, None] * W + cols.clamp(0, W - 1)[..., None, :]
    block = pixels[index] * inside                       # (B, N, k+1, k+1, C)

    fy = frac[..., 0].view(B, N, 1, 1, 1).to(images.dtype)
    fx = frac[..., 1].view(B, N, 1, 1, 1).to(images.dtype)
    block = torch.lerp(block[:, :, :-1], block[:, :, 1:], fy)         # (B, N, k, k+1, C)
    block = torch.lerp(block[:, :, :, :-1], block[:, :, :, 1:], fx)   # (B, N, k, k, C)
    return block.permute(0, 1, 4, 2, 3)                  # (B, N, C, k, k)


# -----------------------------------------------------------------------------
# Subpixel tokens: the continuous position embedding

def sincos_pos_embed(positions, dim, image_size, window, temperature=10000.0):
    """Continuous 2D sin-cos embedding of (B, N, 2) positions -> (B, N, dim).

    Positions are first expressed in units of windows, shifted so that grid cell (i, j) sits at
    exactly (i, j):   p_y = y H / k - 0.5,   p_x = x W / k - 0.5.
    Each axis gets dim/2 channels, [sin(p w_0..), cos(p w_0..)] with w_m = temperature^(-m / (dim/4)).
    The highest frequency is 1 radian per window, so a quarter-window shift moves the fastest
    channels by about 0.25: subpixel moves are visible to the model, unlike an embedding in
    [0, 1] image units, where a quarter window of a 224 px image is only 0.018.

    Channel order is [x half, y half], exactly MAE's `get_2d_sincos_pos_embed`, so on the grid
    centres this IS the fixed sin-cos table of a standard ViT (tests/test_spot.py checks it), and
    a grid-placed SPoTViT is a standard ViT with fixed sin-cos embeddings. Computed in float32,
    or in float64 for float64 positions.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be divisible by 4 for a 2D sin-cos embedding, got {dim}")
    height, width = to_hw(image_size)
    quarter = dim // 4
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    omega = 1.0 / temperature ** (torch.arange(quarter, device=positions.device,
                                               dtype=dtype) / quarter)              # (dim/4,)
    p_y = positions[..., 0].to(dtype) * (height / window) - 0.5                     # (B, N)
    p_x = positions[..., 1].to(dtype) * (width / window) - 0.5
    angle_y = p_y[..., None] * omega                                                 # (B, N, dim/4)
    angle_x = p_x[..., None] * omega
    return torch.cat([angle_x.sin(), angle_x.cos(), angle_y.sin(), angle_y.cos()], dim=-1)


def learned_pos_embed(table, positions, image_size, window):
    """A learned table (1, gh*gw, dim), one row per grid cell (row-major, a timm ViT's pos_embed
    without its class slot), read at (B, N, 2) continuous positions -> (B, N, dim).

    The cell-centre coordinates of sincos_pos_embed, p_y = y H / k - 0.5, p_x = x W / k - 0.5,
    put cell (i, j) at exactly (i, j); between centres the table is read bilinearly:

        row(p_y, p_x) = lerp(lerp(T[i0, j0], T[i0, j1], f_x), lerp(T[i1, j0], T[i1, j1], f_x), f_y)
        i0 = floor(p_y), i1 = i0 + 1, f_y = p_y - i0   (and the same for x)

    so a grid position reads its cell's row exactly (lerp is exact at weights 0 and 1), halfway
    between two cells reads their mean, and p is first clamped to [0, gh - 1] x [0, gw - 1]:
    beyond the outer centres (the image's border half-cells, or outside) the border value holds.
    Gradients reach the positions through f_y and f_x, as in extract_patches_reference.
    """
    (height, width), k = to_hw(image_size), window
    last = positions.new_tensor((height // k - 1, width // k - 1))          # (2,) outer centres
    p = positions * positions.new_tensor((height / k, width / k)) - 0.5      # (B, N, 2)
    # y = (i + 0.5) k / H is rounded, so a grid centre's p lands a few ulps off i: snap p within
    # 1024 ulps of an integer (1.2e-4 cells in float32) to it in value (the gradient passes
    # straight through), so that the grid reads exact rows.
    near = p.detach().round()
    snap = (p.detach() - near).abs() <= 1024 * torch.finfo(p.dtype).eps
    p = torch.where(snap, near + (p - p.detach()), p).clamp(torch.zeros_like(last), last)
    low = torch.minimum(p.detach().floor(), (last - 1).clamp_min(0)).long()   # (B, N, 2) i0, j0
    high = torch.minimum(low + 1, last.long())                                 # (B, N, 2) i1, j1
    frac = (p - low).to(table.dtype)                                           # (B, N, 2) f_y, f_x
    grid = table.reshape(height // k, width // k, -1)                          # (gh, gw, dim)
    top = torch.lerp(grid[low[..., 0], low[..., 1]], grid[low[..., 0], high[..., 1]], frac[..., 1:])
    bottom = torch.lerp(grid[high[..., 0], low[..., 1]], grid[high[..., 0], high[..., 1]], frac[..., 1:])
    return torch.lerp(top, bottom, frac[..., :1])                              # (B, N, dim)


# -----------------------------------------------------------------------------
# Spatial priors: where tokens go before any search

PRIORS = ("uniform", "gaussian", "sobol", "isotropic", "center", "salient", "grid")


def isotropic_positions(n_tokens):
    """Exactly n evenly spread points: r = round(sqrt(n)) rows of cell centres.

    The n points are split over the r rows as evenly as possible (row sizes differ by at most
    one), and each row places its points at the centres of equal cells. For n = m^2 this is the
    m x m lattice ((i + 0.5)/m, (j + 0.5)/m), e.g. the paper's 5 x 5 for 25 tokens.  -> (n, 2)
    """
    rows = max(1, round(math.sqrt(n_tokens)))
    counts = [n_tokens // rows + (1 if r < n_tokens % rows else 0) for r in range(rows)]
    points = [((r + 0.5) / rows, (c + 0.5) / count)
              for r, count in enumerate(counts) for c in range(count)]
    return torch.tensor(points, dtype=torch.float32)


def center_warp(positions, scale=0.25):
    """The centre prior's warp (official code): c -> 0.5 + d (1 - exp(-(d/s)^2)), d = c - 0.5.

    Points near the centre move almost onto it, points near the border barely move, so an even
    lattice becomes dense in the middle of the image.
    """
    offset = positions - 0.5
    return 0.5 + offset * (1 - torch.exp(-(offset / scale) ** 2))


def saliency_map(images, size=64):
    """Spectral-residual saliency (Hou & Zhang, CVPR 2007) of (B, C, H, W) images -> (B, H, W).

    The paper's salient prior uses a *pretrained* saliency network; this project has no
    pretrained weights, so this classic training-free detector stands in: the log amplitude
    spectrum minus its local average (the "spectral residual") is transformed back with the
    original phase; what survives marks the unexpected, i.e. salient, parts of the image.
    The map is non-negative and sums to 1 over each image.
    """
    _check_images(images)
    B, _, H, W = images.shape
    gray = images.float().mean(dim=1, keepdim=True)                               # (B, 1, H, W)
    small = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False)
    # The FFT treats the image as periodic, so the jump between opposite borders would look
    # "salient"; mirror-padding first makes the periodic image continuous. Cropped off below.
    pad = size // 4
    small = F.pad(small, (pad, pad, pad, pad), mode="reflect")[:, 0]            # (B, s+2p, s+2p)
    spectrum = torch.fft.fft2(small)
    log_amplitude = torch.log(spectrum.abs() + 1e-8)
    local_mean = F.avg_pool2d(log_amplitude[:, None], 3, stride=1, padding=1,
                              count_include_pad=False)[:, 0]
    # The residual spectrum is exp(log_amplitude - local_mean) * exp(i * phase); since
    # amplitude * exp(i * phase) is the spectrum itself, that is spectrum * exp(-local_mean):
    # the same numbers without the complex exp and angle (half the time of this function).
    saliency = torch.fft.ifft2(spectrum * torch.exp(-local_mean)).abs() ** 2      # (B, s, s)
    # Smooth with a Gaussian (sigma = 2.5% of the side, as in the original recipe's blur).
    sigma = max(size * 0.025, 0.5)
    radius = int(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2).to(saliency.device)
    kernel = taps[:, None] * taps / taps.sum() ** 2                      # (2r+1, 2r+1), sums to 1
    saliency = F.conv2d(saliency[:, None], kernel[None, None], padding=radius)
    saliency = saliency[:, :, pad:pad + size, pad:pad + size]
    saliency = F.interpolate(saliency, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    saliency = saliency.clamp_min(0)
    return saliency / saliency.flatten(1).sum(1).clamp_min(1e-12).view(B, 1, 1)


def sample_positions(prior, batch_size, n_tokens, image_size, window, generator=None, images=None):
    """Draw token positions from a spatial prior -> (batch_size, n_tokens, 2) in [0, 1].

    prior:      one of PRIORS
                "uniform"   i.i.d. uniform over the image
                "gaussian"  i.i.d. N(0.5, (1/pi)^2) per axis, clamped to the image (official code)
                "sobol"     scrambled Sobol points (even coverage, little overlap), a fresh
                            scramble per image
                "isotropic" deterministic, exactly n evenly spread points (isotropic_positions)
                "center"    the isotropic lattice warped toward the centre (center_warp)
                "salient"   drawn in proportion to each image's saliency_map (needs images=;
                            a (B, H, W) map passed as images= is drawn from as it is)
                "grid"      n distinct patch-grid centres chosen at random per image: patch
                            dropout, what a standard ViT can do with n tokens (the baseline)
    image_size: int or (H, W); window: the token window k (used by "grid")
    generator:  a torch.Generator; random priors draw every image independently from it, so a
                seeded generator reproduces the positions. Deterministic priors ignore it and
                return the same positions for every image.
    images:     (B, C, H, W) in [0, 1] or a (B, H, W) saliency map, required by "salient" only
    """
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    B, N = _positive_int(batch_size, "batch_size"), _positive_int(n_tokens, "n_tokens")
    height, width = to_hw(image_size)
    check_window(window, (height, width))
    device = generator.device if generator is not None else torch.device("cpu")

    if prior == "uniform":
        return torch.rand(B, N, 2, generator=generator, device=device)
    if prior == "gaussian":
        return (0.5 + torch.randn(B, N, 2, generator=generator, device=device) / math.pi).clamp(0, 1)
    if prior == "sobol":
        # One scrambled engine per image, seeded from the generator: independent across images,
        # reproducible from the seed, and each image's N points are a low-discrepancy set.
        seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator, device=device).tolist()
        return torch.stack([torch.quasirandom.SobolEngine(2, scramble=True, seed=s).draw(N)
                            for s in seeds]).to(device)
    if prior in ("isotropic", "center"):
        points = isotropic_positions(N).to(device)
        return (center_warp(points) if prior == "center" else points).expand(B, N, 2).clone()
    if prior == "grid":
        cells = grid_positions((height, width), window).to(device)             # (G, 2)
        if N > len(cells):
            raise ValueError(f"n_tokens={N} exceeds the {len(cells)} cells of the "
                             f"{height // window}x{width // window} patch grid (prior 'grid')")
        # A random permutation per image (argsort of uniform noise), keep the first N cells.
        chosen = torch.rand(B, len(cells), generator=generator, device=device).argsort(dim=1)[:, :N]
        return cells[chosen]
    # prior == "salient"
    if not torch.is_tensor(images) or (images.shape[0], *images.shape[-2:]) != (B, height, width):
        raise ValueError(f"prior 'salient' needs images=({B}, C, {height}, {width}) to compute "
                         f"saliency from, or a ({B}, {height}, {width}) map, got {getattr(images, 'shape', images)}")
    saliency = (images if images.dim() == 3 else saliency_map(images)).to(device).flatten(1)   # (B, H*W)
    pixel = torch.multinomial(saliency, N, replacement=True, generator=generator)  # (B, N)
    jitter = torch.rand(B, N, 2, generator=generator, device=device)          # subpixel offset
    row, col = pixel // width, pixel % width
    return torch.stack([(row + jitter[..., 0]) / height, (col + jitter[..., 1]) / width], dim=-1)


# -----------------------------------------------------------------------------
# The model: subpixel tokens into a ViT, one model for every prior and budget (retrofitting)

@dataclass
class SPoTConfig:
    """Everything that defines an SPoTViT; the model is SPoTViT(SPoTConfig(...)), as in nanoGPT."""
    image_size: tuple = (32, 32)  # (H, W); an int means a square image
    window: int = 4               # k: each token reads a k x k window
    num_classes: int = 10
    dim: int = 192                # token width (divisible by 4 and by heads)
    depth: int = 6                # transformer blocks
    heads: int = 3
    mlp_ratio: float = 4.0
    in_chans: int = 3
    image_mean: tuple = (0.5, 0.5, 0.5)   # the model normalizes its [0, 1] input itself, so
    image_std: tuple = (0.5, 0.5, 0.5)    # callers (oracle, plots) always pass raw images
    # The defaults below are how every model of this project was built before pretrained ViTs
    # (load_pretrained sets norm_eps=1e-6, timm's, and pos_embed="learned"), so old checkpoints,
    # whose configs lack these keys, load unchanged.
    norm_eps: float = 1e-5        # every LayerNorm's epsilon
    pos_embed: str = "sincos"     # "sincos": sincos_pos_embed; "learned": a table, learned_pos_embed
    pool: str = "token"           # "token": the class token, final norm; "avg": mean of the
                                  # position tokens, then fc_norm (MAE's fine-tuning head)

    def __post_init__(self):
        self.image_size = to_hw(self.image_size)
        for name, choices in (("pos_embed", ("sincos", "learned")), ("pool", ("token", "avg"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not (isinstance(self.norm_eps, float) and 0 < self.norm_eps < 1):
            raise ValueError(f"norm_eps must be a float in (0, 1), got {self.norm_eps!r}")
        check_window(self.window, self.image_size)
        for name in ("num_classes", "dim", "depth", "heads", "in_chans"):
            _positive_int(getattr(self, name), name)
        if self.dim % 4 or self.dim % self.heads:
            raise ValueError(f"dim must be divisible by 4 and by heads={self.heads}, "
                             f"got dim={self.dim}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if len(self.image_mean) != self.in_chans or len(self.image_std) != self.in_chans:
            raise ValueError(f"image_mean and image_std need in_chans={self.in_chans} values each")


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for (B, heads, T, d) tensors: scaled dot-product attention.

    On CUDA this is torch's fused kernel. On the CPU it is the same formula written out, because
    torch's fused CPU kernel has a slow backward in bf16 (experiments/bench.py's attention section
    measures both; experiments/NOTES.md gives the numbers). The softmax runs in float32 even under bf16
    autocast, as the fused kernels do internally, and in float64 for float64 inputs.
    """
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5                 # (B, h, T, T)
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)               # float32 or float64
    return scores.softmax(dim=-1, dtype=softmax_dtype).to(v.dtype) @ v       # (B, h, T, d)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):                                                    # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = attention(q, k, v)                                               # (B, h, T, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, heads, mlp_ratio, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SPoTViT(nn.Module):
    """A ViT that reads an image through a *set* of subpixel token positions (subpixel tokens).

        model = SPoTViT(SPoTConfig(dim=128, depth=4))
        model(images, positions) -> logits (B, num_classes)

    images are (B, C, H, W) in [0, 1] (normalized inside with image_mean/std); positions are
    (B, N, 2) (y, x) window centres in [0, 1], any N per call. Token i is
        patch_embed(flatten(window at positions[i])) + sincos_pos_embed(positions[i]),
    a class token is prepended, and the sequence goes through pre-norm blocks. There is no
    token order anywhere, so the logits do not depend on the order of the positions.
    With positions = grid_positions(...) this is exactly a standard ViT with fixed sin-cos
    position embeddings. With config.pos_embed="learned" the embedding is a learned table of one
    row per grid cell (`pos_table`, read by learned_pos_embed) and with config.pool="avg" the
    head reads the mean of the position tokens through fc_norm: together, a timm / MAE ViT
    (load_pretrained).
    """

    def __init__(self, config=None):
        super().__init__()
        config = config if config is not None else SPoTConfig()
        if not isinstance(config, SPoTConfig):
            raise ValueError(f"config must be an SPoTConfig, got {type(config).__name__}")
        self.config = config
        for name in ("image_mean", "image_std"):    # (1, C, 1, 1); not saved: the config has them
            value = torch.tensor(getattr(config, name)).view(1, -1, 1, 1)
            self.register_buffer(name, value, persistent=False)
        k, dim, heads, ratio, eps = config.window, config.dim, config.heads, config.mlp_ratio, config.norm_eps
        self.patch_embed = nn.Linear(config.in_chans * k * k, dim)          # (C*k*k) -> dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, ratio, eps) for _ in range(config.depth))
        avg = config.pool == "avg"     # (nn.Identity has no weights: "token" keeps the old keys)
        self.norm = nn.Identity() if avg else nn.LayerNorm(dim, eps=eps)
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if avg else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes)
        self.apply(self._init_weights)
        # timm/MAE init: the patch embedding like a conv (xavier on the flattened weight).
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.normal_(self.cls_token, std=0.02)
        if config.pos_embed == "learned":     # (1, gh*gw, dim), timm's init
            table = torch.zeros(1, (config.image_size[0] // k) * (config.image_size[1] // k), dim)
            self.pos_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):    # (LayerNorms start as 1 and 0 already)
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def pos_embed(self, positions):
        """(B, N, 2) -> (B, N, dim): the fixed continuous sin-cos embedding (no parameters), or
        the learned table read bilinearly (config.pos_embed="learned")."""
        config = self.config
        if config.pos_embed == "learned":
            return learned_pos_embed(self.pos_table, positions, config.image_size, config.window)
        return sincos_pos_embed(positions, config.dim, config.image_size, config.window)

    def forward_features(self, images, positions):
        """images (B, C, H, W) in [0, 1], positions (B, N, 2) -> tokens (B, 1 + N, dim) after the
        final norm (pool="avg" has none: its fc_norm comes after the pooling, in forward_head)."""
        _check_images(images)
        config = self.config
        shape = ("B", config.in_chans, *config.image_size)
        if images.shape[1:] != shape[1:]:
            raise ValueError(f"images must be {shape} for this model, got {tuple(images.shape)}")
        mean, std = self.image_mean, self.image_std
        if images.dtype == torch.float64:   # the buffers round the config's values to float32
            mean, std = (images.new_tensor(v).view(1, -1, 1, 1) for v in (config.image_mean, config.image_std))
        images = (images - mean) / std
        windows = extract_patches(images, positions, config.window)          # (B, N, C, k, k)
        tokens = self.patch_embed(windows.flatten(2))                        # (B, N, dim)
        tokens = tokens + self.pos_embed(positions).to(tokens.dtype)
        cls = self.cls_token.expand(len(tokens), -1, -1)                     # (B, 1, dim)
        x = torch.cat([cls, tokens], dim=1)                                  # (B, 1 + N, dim)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, features, pre_logits=False):
        """The pooled feature (B, dim) if pre_logits (used for kNN), else logits (B, classes):
        the class token, or with pool="avg" fc_norm(the mean of the N position tokens)."""
        pooled = self.fc_norm(features[:, 1:].mean(dim=1) if self.config.pool == "avg" else features[:, 0])
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images, positions):
        return self.forward_head(self.forward_features(images, positions))


def load_checkpoint(path, map_location="cpu", return_checkpoint=False):
    """Rebuild an SPoTViT (eval mode) from a checkpoint written by train.py.

    The checkpoint is a dict with "model_config" (the SPoTConfig as a dict) and "model" (the
    state dict); train.py adds its args, classes, optimizer and random states. It is read with
    weights_only=True: a checkpoint is a file people download and share, and a full pickle could
    run any code. With return_checkpoint=True -> (model, the whole checkpoint dict).
    Raises ValueError naming the file when it is missing, unreadable or not an SPoT checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} {'is a directory' if path.is_dir() else 'does not exist'}; pass "
                         f"a checkpoint file (train.py writes <out>/checkpoint.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:   # truncated, empty, random bytes, or holding code (refused)
        reason = str(error).strip().split("\n")[0].split(". ")[0] or type(error).__name__
        raise ValueError(f"{path} could not be read as a checkpoint ({reason}): it is truncated, "
                         f"not a checkpoint, or holds objects other than tensors and plain data, "
                         f"which could run code") from None
    if not isinstance(checkpoint, dict) or not {"model_config", "model"} <= checkpoint.keys():
        raise ValueError(f"{path} is not an SPoT checkpoint (a dict with 'model_config' and "
                         f"'model', as train.py writes)")
    try:
        model = SPoTViT(SPoTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: its model does not load ({str(error).splitlines()[0]})") from None
    model = model.to(map_location).eval()
    return (model, checkpoint) if return_checkpoint else model


# -----------------------------------------------------------------------------
# Pretrained ViTs (timm, DeiT, MAE) as SPoTViTs: the paper retrofits such models into SPoT
#
# A timm VisionTransformer's state dict uses SPoTViT's names for blocks.*, norm.*, fc_norm.* and
# head.*, and differs in two (D = width, C = channels, k = patch side, G = gh * gw grid cells):
#   patch_embed.proj.weight (D, C, k, k), a stride-k conv  <->  patch_embed.weight (D, C*k*k):
#       the same numbers flattened. extract_patches' windows are (C, k, k) and flatten in that
#       order, so the linear map of a grid window is the conv on its patch.
#   pos_embed (1, 1 + G, D): slot 0 for the class token, then the grid row-major. timm adds it
#       after prepending the class token, so cls_token + pos_embed[:, 0] is what the class token
#       carries: it is folded into cls_token, and pos_embed[:, 1:] becomes pos_table, read by
#       learned_pos_embed in cell-centre coordinates (cell (i, j) at p = (i, j): its own row).
# timm's LayerNorms use eps 1e-6 (norm_eps), its GELU is exact (as here); MAE's fine-tuning head
# has no norm.* but fc_norm.* (pool="avg"). Weights with no place in SPoTViT are refused by name.

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}   # ViT-Ti, S, B, L, H
UNSUPPORTED = {   # key pattern -> what those weights are
    r"^dist_token$|^head_dist\.": "a distilled DeiT's distillation token and head",
    r"^reg_token$": "register tokens",
    r"\.ls[12]\.gamma$|\.gamma_[12]$": "layer scale",
    r"^norm_pre\.": "a norm before the blocks (norm_pre)",
    r"\.q_bias$|\.v_bias$": "separate q/v biases",
    r"^decoder|^mask_token$": "an MAE pre-training checkpoint's decoder (use a fine-tuned one)",
}


def load_pretrained(source, *, image_size=None, num_classes=None, heads=None, mean=None, std=None):
    """A pretrained ViT -> an SPoTViT (eval mode) that, with its tokens at grid_positions,
    computes the logits the source computes (timm's numbers, up to float round-off).

    source: a timm-style state dict; a .pth/.pt/.bin file (read with weights_only=True; a
    {"model": ...} or {"state_dict": ...} wrapper and DDP's "module." prefixes are removed); a
    .safetensors file (needs the safetensors package); or "timm:NAME" (needs timm; downloads
    NAME's pretrained weights). The shape comes from the weights: dim, in_chans and window from
    patch_embed.proj.weight, depth from the blocks, mlp_ratio from mlp.fc1, pool="avg" when
    there is an fc_norm, the native grid from pos_embed (square, after one class slot or none).
    heads= is needed unless dim is a standard width (192, 384, 768, 1024, 1280: ViT-Ti to H)
    or a multiple of 64 (timm's ViTs use 64-wide heads).
    image_size (default: the native one) other than the native one resamples the table as timm's
    resample_abs_pos_embed does; num_classes other than the head's gives a fresh head.
    mean/std: these arguments, else timm's pretrained config for timm:NAME, else ImageNet's,
    (0.485, 0.456, 0.406) and (0.229, 0.224, 0.225). Anything it cannot read or represent
    raises a ValueError naming it (and the keys, e.g. dist_token of a distilled DeiT).
    The model keeps the source's precision, at least float32 (float64 weights: float64 model).
    """
    name = repr(str(source)) if isinstance(source, (str, Path)) else "the state dict"
    state, stats = _read_state_dict(source, name)
    config, slots, side = _pretrained_config(state, name, image_size, num_classes, heads)
    stats = stats or IMAGENET_STATS
    config = replace(config, image_mean=stats[0] if mean is None else mean,
                     image_std=stats[1] if std is None else std)
    # The source's precision, at least float32 (float64 weights fold the class slot exactly).
    dtype = torch.promote_types(state["pos_embed"].dtype, torch.float32)
    model, table = SPoTViT(config).to(dtype), state.pop("pos_embed").to(dtype)
    state["cls_token"] = state["cls_token"] + table[:, :slots].sum(1, keepdim=True)   # folded (or + 0)
    state["pos_table"] = _resample_grid(table[:, slots:], side, config)
    state["patch_embed.weight"] = state.pop("patch_embed.proj.weight").flatten(1)   # (D, C*k*k)
    state["patch_embed.bias"] = state.pop("patch_embed.proj.bias")
    head = state.get("head.weight")
    if head is None or head.shape[0] != config.num_classes:          # new classes: a fresh head
        state.update((key, value) for key, value in model.state_dict().items() if key.startswith("head."))
    try:
        model.load_state_dict(state)
    except RuntimeError as error:     # keys with no place in SPoTViT, or shapes that differ
        raise ValueError(f"{name} does not fit an SPoTViT: {' '.join(str(error).split())}") from None
    return model.eval()


def _read_state_dict(source, name):
    """load_pretrained's source -> (a flat state dict, timm's (mean, std) or None)."""
    stats = None
    if isinstance(source, str) and source.startswith("timm:"):
        model = _optional("timm", name).create_model(source[len("timm:"):], pretrained=True)
        stats, source = (model.pretrained_cfg["mean"], model.pretrained_cfg["std"]), model.state_dict()
        if getattr(model, "global_pool", "token") == "avg" and "fc_norm.weight" not in source:
            raise ValueError(f"{name} averages its tokens without an fc_norm: not supported")
    elif isinstance(source, (str, Path)):
        read = lambda path: torch.load(path, map_location="cpu", weights_only=True)
        if str(source).endswith(".safetensors"):
            read = _optional("safetensors.torch", "reading .safetensors").load_file
        try:
            source = read(source)
        except Exception as error:   # missing, truncated, random bytes, or holding code (refused)
            raise ValueError(f"{name} could not be read as a state dict ({type(error).__name__})") from None
    for key in ("model", "state_dict"):       # training scripts' wrappers: {"model": state dict}
        if isinstance(source, dict) and isinstance(source.get(key), dict):
            source = source[key]
    if not isinstance(source, dict) or not all(torch.is_tensor(value) for value in source.values()):
        raise ValueError(f"{name} is not a state dict (a dict of tensors)")
    return {key.removeprefix("module."): value for key, value in source.items()}, stats


def _optional(module, purpose):
    """Import timm or safetensors only on the path that reads their format."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise ValueError(f"{purpose} needs the {package} package: pip install {package}") from None


def _pretrained_config(state, name, image_size, num_classes, heads):
    """Refuse what SPoTViT cannot represent; read the shape -> (SPoTConfig, class slots, side)."""
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"{name} is not a ViT state dict: it has no (D, C, k, k) "
                         f"patch_embed.proj.weight (its keys begin {list(state)[:4]})")
    for pattern, what in UNSUPPORTED.items():
        if keys := [key for key in state if re.search(pattern, key)]:
            raise ValueError(f"{name} holds {what}: {', '.join(keys[:4])}; SPoTViT has no place for them")
    if "cls_token" not in state or "pos_embed" not in state:
        raise ValueError(f"{name} has no {'pos_embed' if 'cls_token' in state else 'cls_token'}: models "
                         f"without a class token or a learned pos_embed are not supported")
    (dim, in_chans, k, _), cells = weight.shape, state["pos_embed"].shape[1]
    slots = next((n for n in (1, 0) if math.isqrt(cells - n) ** 2 == cells - n), None)
    if slots is None:
        raise ValueError(f"{name}: pos_embed {tuple(state['pos_embed'].shape)} is not a square grid")
    heads = heads or STANDARD_HEADS.get(dim) or (dim // 64 if dim % 64 == 0 else None)   # timm: 64-wide heads
    if heads is None:
        raise ValueError(f"{name}: a ViT of width {dim} has no standard number of heads; pass heads=")
    head = state.get("head.weight")
    if num_classes is None and head is None:
        raise ValueError(f"{name} has no head.weight: pass num_classes= for a fresh head")
    # Block builds int(dim * mlp_ratio) hidden units: the ratio that gives fc1's back exactly.
    hidden = state.get("blocks.0.mlp.fc1.weight", weight).shape[0]     # (no blocks: depth 0, refused)
    ratio = next(r for r in (hidden / dim, math.nextafter(hidden / dim, math.inf)) if int(dim * r) == hidden)
    side = math.isqrt(cells - slots)
    config = SPoTConfig(image_size=image_size or side * k, window=k, in_chans=in_chans, dim=dim,
                        depth=len({key.split(".")[1] for key in state if key.startswith("blocks.")}),
                        heads=heads, mlp_ratio=ratio,
                        num_classes=num_classes or head.shape[0], norm_eps=1e-6,
                        pos_embed="learned", pool="avg" if "fc_norm.weight" in state else "token")
    return config, slots, side


def _resample_grid(table, side, config):
    """timm's resample_abs_pos_embed: the (1, side*side, D) table as a D-channel side x side image,
    resized bicubically (antialiased, align_corners=False) to the model's grid -> (1, gh*gw, D).
    At the same size every output pixel sits on its input pixel: the table comes back unchanged."""
    size = tuple(s // config.window for s in config.image_size)
    image = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)              # (1, D, side, side)
    image = F.interpolate(image, size=size, mode="bicubic", antialias=True, align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1)


def export(model):
    """An SPoTViT -> a timm VisionTransformer state dict (a plain dict of tensors, keys above).

    timm's VisionTransformer(img_size=image_size, patch_size=window, embed_dim=dim, depth=depth,
    num_heads=heads, mlp_ratio=mlp_ratio, num_classes=num_classes, global_pool=pool, fc_norm=
    pool == "avg") loads it with strict=True. pos_embed's class slot is zeros (cls_token carries
    it) and a sin-cos model exports its embedding of the grid as the table. A state dict holds no
    LayerNorm eps: timm's ViTs, and load_pretrained, use 1e-6, so a model trained here with the
    default norm_eps=1e-5 computes slightly differently after the trip (set the eps back, e.g.
    timm's norm_layer=partial(nn.LayerNorm, eps=1e-5)). With norm_eps=1e-6 (every model that
    load_pretrained made), load_pretrained(export(model)) gives back the same logits.
    """
    config, k = model.config, model.config.window
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    weight, _ = state.pop("patch_embed.weight"), state.pop("pos_table", None)
    # The embedding the model adds at grid_positions (a learned table's rows, exactly), computed
    # in the model's precision (float32, or float64 for a float64 model).
    grid = grid_positions(config.image_size, k, dtype=torch.promote_types(weight.dtype, torch.float32))
    table = model.pos_embed(grid[None].to(weight.device)).detach().to(weight.dtype)    # (1, G, D)
    return {"cls_token": state.pop("cls_token"),
            "pos_embed": torch.cat([torch.zeros_like(table[:, :1]), table], dim=1),   # (1, 1+G, D)
            "patch_embed.proj.weight": weight.view(config.dim, config.in_chans, k, k),
            "patch_embed.proj.bias": state.pop("patch_embed.bias"), **state}


# -----------------------------------------------------------------------------
# Input checks of the public functions (every error names the argument); inner code trusts them

def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def to_hw(size, name="image_size"):
    """An int or (H, W) pair -> (H, W) of positive ints."""
    pair = (size, size) if isinstance(size, int) else size
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name} must be a positive int or a (height, width) pair, got {size!r}")
    return tuple(_positive_int(side, name) for side in pair)


def check_window(window, image_hw, name="window"):
    if _positive_int(window, name) > min(image_hw):
        raise ValueError(f"{name}={window} is larger than the image {image_hw[0]}x{image_hw[1]}; "
                         f"use a {name} <= {min(image_hw)}")


def _check_images(images):
    if not torch.is_tensor(images) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating-point (B, C, H, W) tensor (e.g. uint8 / 255), "
                         f"got {getattr(images, 'shape', type(images).__name__)} "
                         f"{getattr(images, 'dtype', '')}")


def _check_sampler_inputs(images, positions, window):
    """Check the samplers' three inputs -> positions in at least float32 (in bf16 a coordinate
    near 1 is off by up to 2^-9 of the image, i.e. 0.4 px at 224 px)."""
    _check_images(images)
    check_window(window, images.shape[-2:])
    if not torch.is_tensor(positions) or positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must be a (B, N, 2) tensor of (y, x) in [0, 1], got "
                         f"{getattr(positions, 'shape', type(positions).__name__)}")
    if positions.shape[0] != images.shape[0] or positions.shape[1] < 1:
        raise ValueError(f"positions {tuple(positions.shape)} must hold N >= 1 positions for each "
                         f"of the {images.shape[0]} images (the batch size)")
    # Reading values of a GPU tensor makes the CPU wait for the GPU on every forward pass, so
    # NaN/inf is caught for CPU tensors only (on CUDA it shows up as NaN logits instead).
    if positions.device.type == "cpu" and not torch.isfinite(positions).all():
        raise ValueError("positions contain NaN or inf; positions are (y, x) in [0, 1]")
    return positions.to(torch.promote_types(positions.dtype, torch.float32))


if __name__ == "__main__":
    torch.manual_seed(0)
    model = SPoTViT(SPoTConfig(image_size=32, window=4, num_classes=10, dim=64, depth=2, heads=2))
    images = torch.rand(2, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    for prior in PRIORS:
        positions = sample_positions(prior, 2, 16, 32, 4, generator=generator, images=images)
        print(f"{prior:>9}: positions {tuple(positions.shape)} in [{positions.min():.3f}, "
              f"{positions.max():.3f}] -> logits {tuple(model(images, positions).shape)}")
