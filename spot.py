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

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Subpixel tokens: reading a k x k window at a subpixel position

def grid_positions(image_size, window):
    """Centres of the non-overlapping patch grid, row-major: (G, 2), G = (H//k) * (W//k).

    Cell (i, j) has centre ((i + 0.5) k / H, (j + 0.5) k / W). When k does not divide the
    image, the grid covers the top-left (H//k)k x (W//k)k pixels, like a strided convolution.
    """
    height, width = to_hw(image_size)
    check_window(window, (height, width))
    rows = (torch.arange(height // window) + 0.5) * window / height
    cols = (torch.arange(width // window) + 0.5) * window / width
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
    a grid-placed SPoTViT is a standard ViT with fixed sin-cos embeddings.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be divisible by 4 for a 2D sin-cos embedding, got {dim}")
    height, width = to_hw(image_size)
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=positions.device,
                                               dtype=torch.float32) / quarter)      # (dim/4,)
    p_y = positions[..., 0].float() * (height / window) - 0.5                        # (B, N)
    p_x = positions[..., 1].float() * (width / window) - 0.5
    angle_y = p_y[..., None] * omega                                                 # (B, N, dim/4)
    angle_x = p_x[..., None] * omega
    return torch.cat([angle_x.sin(), angle_x.cos(), angle_y.sin(), angle_y.cos()], dim=-1)


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
                "salient"   drawn in proportion to each image's saliency_map (needs images=)
                "grid"      n distinct patch-grid centres chosen at random per image: patch
                            dropout, what a standard ViT can do with n tokens (the baseline)
    image_size: int or (H, W); window: the token window k (used by "grid")
    generator:  a torch.Generator; random priors draw every image independently from it, so a
                seeded generator reproduces the positions. Deterministic priors ignore it and
                return the same positions for every image.
    images:     (B, C, H, W) in [0, 1], required by "salient" only
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
    if not torch.is_tensor(images) or images.shape[:1] + images.shape[2:] != (B, height, width):
        raise ValueError(f"prior 'salient' needs images=({B}, C, {height}, {width}) to compute "
                         f"saliency from, got {getattr(images, 'shape', images)}")
    saliency = saliency_map(images.to(device)).flatten(1)                     # (B, H*W)
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

    def __post_init__(self):
        self.image_size = to_hw(self.image_size)
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
    autocast, as the fused kernels do internally.
    """
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5                 # (B, h, T, T)
    return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v       # (B, h, T, d)


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

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
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
    position embeddings.
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
        k, dim, heads, ratio = config.window, config.dim, config.heads, config.mlp_ratio
        self.patch_embed = nn.Linear(config.in_chans * k * k, dim)          # (C*k*k) -> dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, config.num_classes)
        self.apply(self._init_weights)
        # timm/MAE init: the patch embedding like a conv (xavier on the flattened weight).
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):    # (LayerNorms start as 1 and 0 already)
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def pos_embed(self, positions):
        """(B, N, 2) -> (B, N, dim): fixed continuous sin-cos embedding (no parameters)."""
        return sincos_pos_embed(positions, self.config.dim, self.config.image_size, self.config.window)

    def forward_features(self, images, positions):
        """images (B, C, H, W) in [0, 1], positions (B, N, 2) -> normed tokens (B, 1 + N, dim)."""
        _check_images(images)
        shape = ("B", self.config.in_chans, *self.config.image_size)
        if images.shape[1:] != shape[1:]:
            raise ValueError(f"images must be {shape} for this model, got {tuple(images.shape)}")
        images = (images - self.image_mean) / self.image_std
        windows = extract_patches(images, positions, self.config.window)     # (B, N, C, k, k)
        tokens = self.patch_embed(windows.flatten(2))                        # (B, N, dim)
        tokens = tokens + self.pos_embed(positions).to(tokens.dtype)
        cls = self.cls_token.expand(len(tokens), -1, -1)                     # (B, 1, dim)
        x = torch.cat([cls, tokens], dim=1)                                  # (B, 1 + N, dim)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, features, pre_logits=False):
        """Class-token feature (B, dim) if pre_logits (used for kNN), else logits (B, classes)."""
        return features[:, 0] if pre_logits else self.head(features[:, 0])

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
