"""
spot.py -- Subpixel Placement of Tokens (SPoT) in a small Vision Transformer.

The paper: "Subpixel Placement of Tokens in Vision Transformers", arXiv 2507.01654. Its method,
top to bottom:

    extract_patches_reference   subpixel tokens: the k x k window at any subpixel position, read
                                by bilinear interpolation, written out by hand; extract_patches
                                is the same reading, fast (F.grid_sample), proven equal
    sincos_pos_embed     subpixel tokens: the continuous 2D sin-cos position embedding
    sample_positions     spatial priors: where tokens go before any search
    SPoTViT              a pre-norm ViT that reads an image through a set of positions (one model
                         for every prior and budget: retrofitting), built from an SPoTConfig
                         (nanoGPT's GPT(GPTConfig) pattern)
    load_checkpoint      rebuild a model from a checkpoint written by train.py
    load_pretrained      a pretrained timm / DeiT / MAE ViT as an SPoTViT that computes on the
                         grid what it computed (the paper's retrofitting starts there); export
                         writes an SPoTViT back as timm's keys. Reading those files is plumbing:
                         utils.py does it, and checks every argument of this file's functions
                         (every error names the argument).

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

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

# -----------------------------------------------------------------------------
# Subpixel tokens: reading a k x k window at a subpixel position

def extract_patches_reference(images, positions, window):
    """I_q(s; k) of subpixel tokens: the k x k window centred at each subpixel position, read by
    bilinear interpolation, written out by hand (extract_patches below is the same, fast).

    images:    (B, C, H, W) float
    positions: (B, N, 2) (y, x) window centres, normalized to [0, 1] (see the module docstring;
               values outside [0, 1] are allowed and read zeros where they leave the image)
    window:    k, the side of the square window in pixels
    returns    (B, N, C, k, k)

    Sample j of a window sits at u_j = P - k/2 + j + 0.5 (pixels). Bilinear interpolation between
    pixel centres works on t = u - 0.5, so t_j = (P - k/2) + j: ALL k samples along one axis share
    the same fractional part. The whole window is therefore a blend of ONE (k+1) x (k+1) block:

        block  = I[r0 : r0+k+1, c0 : c0+k+1]              r0 = floor(t_y), c0 = floor(t_x)
        rows   = (1 - fy) * block[:-1, :] + fy * block[1:, :]     fy = t_y - r0   -> (k, k+1)
        window = (1 - fx) * rows[:, :-1] + fx * rows[:, 1:]       fx = t_x - c0   -> (k, k)

    Gradients reach the positions through fy and fx (floor() has zero gradient), which is why
    bilinear sampling is differentiable almost everywhere (not on pixel-centre boundaries).
    """
    positions = utils.check_sampler_inputs(images, positions, window)
    H, W = images.shape[-2:]
    k = window
    start = positions * positions.new_tensor((H, W)) - k / 2     # (B, N, 2) = (t_y, t_x) of j = 0
    corner = start.detach().floor()                              # (B, N, 2) = (r0, c0)
    frac = (start - corner).to(images.dtype)                     # (B, N, 2) = (fy, fx)
    # The block's pixel rows and columns, shifted by one into the image padded with a border of
    # zeros: every index outside the image is clamped onto that border, so it reads zero.
    block_range = torch.arange(k + 1, device=images.device)               # 0..k from the corner
    index = corner.long()[..., None] + block_range                        # (B, N, 2, k+1)
    rows = index[..., 0, :, None].clamp(-1, H) + 1                        # (B, N, k+1, 1)
    cols = index[..., 1, None, :].clamp(-1, W) + 1                        # (B, N, 1, k+1)
    batch = torch.arange(len(images), device=images.device)[:, None, None, None]
    padded = F.pad(images, (1,) * 4)                                      # (B, C, H+2, W+2)
    block = padded[batch, :, rows, cols]                                  # (B, N, k+1, k+1, C)
    fy, fx = frac[..., None, None, None].unbind(2)                        # (B, N, 1, 1, 1) each
    block = torch.lerp(block[:, :, :-1], block[:, :, 1:], fy)             # (B, N, k, k+1, C)
    block = torch.lerp(block[..., :-1, :], block[..., 1:, :], fx)         # (B, N, k, k, C)
    return block.permute(0, 1, 4, 2, 3)                                   # (B, N, C, k, k)


def extract_patches(images, positions, window):
    """extract_patches_reference, fast: the same reading in one F.grid_sample call (same
    arguments, same result; tests/test_spot.py proves the two equal).

    Its price is float32 round-off. At grid_positions the windows are the reshaped k x k patches
    exactly when H and W are powers of two (32/4: measured error 0), else up to H * 2^-23 px off
    after grid_sample's round trip through [-1, 1] in float32: on [0, 1] images at 224/16 within
    2^-15 (about 3.1e-5; measured 2^-15 on a checkerboard, the worst case). In float64
    (grid_positions(..., dtype=torch.float64)) the error is below 1e-12; extract_patches_reference
    is exact in both.
    """
    positions = utils.check_sampler_inputs(images, positions, window)
    H, W = images.shape[-2:]
    k = window
    # Sample j of a window centred at P (pixels) sits at u_j = P - k/2 + j + 0.5, on each axis.
    j = torch.arange(k, device=images.device, dtype=positions.dtype)
    offsets = j + 0.5 - k / 2                                                # (k,) = u_j - P
    centre = positions * positions.new_tensor((H, W))                         # (B, N, 2) = P
    # grid_sample wants (x, y) in [-1, 1] with align_corners=False: g = 2 u / size - 1.
    ys = (centre[..., 0, None] + offsets) * (2 / H) - 1                      # (B, N, k)
    xs = (centre[..., 1, None] + offsets) * (2 / W) - 1                      # (B, N, k)
    # Sample (i, j) of a window reads (x_j, y_i).
    pairs = torch.broadcast_tensors(xs[..., None, :], ys[..., None])        # (B, N, k, k) each
    grid = torch.stack(pairs, dim=-1)                                        # (B, N, k, k, 2)
    grid = grid.flatten(1, 2)                            # (B, N, k, k, 2) -> (B, N*k, k, 2)
    # One (N*k) x k output "image" per batch element, bilinear, zeros outside the image.
    # Half-precision images are read in float32: the CPU kernel is wrong for them (values off,
    # NaN, even a crash at 224 px).
    dtype = torch.promote_types(images.dtype, torch.float32)
    out = F.grid_sample(images.to(dtype), grid.to(dtype), align_corners=False)   # (B, C, N*k, k)
    out = out.to(images.dtype).unflatten(2, (-1, k))                              # (B, C, N, k, k)
    return out.transpose(1, 2)                                                    # (B, N, C, k, k)


def grid_positions(image_size, window, dtype=torch.float32):
    """Centres of the non-overlapping patch grid, row-major: (G, 2), G = (H//k) * (W//k).

    Cell (i, j) has centre ((i + 0.5) k / H, (j + 0.5) k / W), computed in `dtype` (float64 for
    comparisons at float64 precision). When k does not divide the image, the grid covers the
    top-left (H//k)k x (W//k)k pixels, like a strided convolution.
    """
    sides = utils.to_hw(image_size)                                       # (H, W)
    utils.check_window(window, sides)
    # (i + 0.5) k / H for every row i, (j + 0.5) k / W for every column j
    axes = [(torch.arange(side // window, dtype=dtype) + 0.5) * window / side
            for side in sides]
    return torch.cartesian_prod(*axes)                                   # (G, 2), row-major


# -----------------------------------------------------------------------------
# Subpixel tokens: the continuous position embedding

def sincos_pos_embed(positions, dim, image_size, window, temperature=10000.0):
    """Continuous 2D sin-cos embedding of (B, N, 2) positions -> (B, N, dim).

    Positions are first expressed in units of windows, shifted so that grid cell (i, j) sits at
    exactly (i, j):   p_y = y H / k - 0.5,   p_x = x W / k - 0.5.
    Each axis gets dim/2 channels, [sin(p w_0..), cos(p w_0..)], w_m = temperature^(-m / (dim/4)).
    The highest frequency is 1 radian per window, so a quarter-window shift moves the fastest
    channels by about 0.25: subpixel moves are visible to the model, unlike an embedding in
    [0, 1] image units, where a quarter window of a 224 px image is only 0.018.

    Channel order is [x half, y half], exactly MAE's `get_2d_sincos_pos_embed`, so on the grid
    centres this IS the fixed sin-cos table of a standard ViT (tests/test_spot.py checks it), and
    a grid-placed SPoTViT is a standard ViT with fixed sin-cos embeddings. Computed in float32,
    or in float64 for float64 positions.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4 for a 2D sin-cos embedding, got {dim}")
    height, width = utils.to_hw(image_size)
    quarter = dim // 4
    dtype = torch.promote_types(positions.dtype, torch.float32)            # float32 or float64
    m = torch.arange(quarter, device=positions.device, dtype=dtype)
    omega = 1.0 / temperature ** (m / quarter)                                      # (dim/4,)
    scale = positions.new_tensor((height / window, width / window), dtype=dtype)
    p = positions.to(dtype) * scale - 0.5                                # (B, N, 2) = (p_y, p_x)
    angle = p.flip(-1)[..., None] * omega                                # (B, N, 2, dim/4), x first
    embedding = torch.cat([angle.sin(), angle.cos()], dim=-1)            # (B, N, 2, dim/2)
    return embedding.flatten(-2)                                         # (B, N, dim)


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
    height, width = utils.to_hw(image_size)
    k = window
    last = positions.new_tensor((height // k - 1, width // k - 1))          # (2,) outer centres
    p = positions * positions.new_tensor((height / k, width / k)) - 0.5      # (B, N, 2)
    # y = (i + 0.5) k / H is rounded, so a grid centre's p lands a few ulps off i: snap p within
    # 1024 ulps of an integer (1.2e-4 cells in float32) to it in value (the gradient passes
    # straight through), so that the grid reads exact rows.
    p_value = p.detach()
    near = p_value.round()
    snap = (p_value - near).abs() <= 1024 * torch.finfo(p.dtype).eps         # (B, N, 2)
    p = torch.where(snap, near + (p - p_value), p)
    p = p.clamp(torch.zeros_like(last), last)
    second_last = (last - 1).clamp_min(0)           # i0 stops there, so that i1 = i0 + 1 exists
    low = torch.minimum(p.detach().floor(), second_last).long()                # (B, N, 2) i0, j0
    high = torch.minimum(low + 1, last.long())                                 # (B, N, 2) i1, j1
    frac = (p - low).to(table.dtype)                                           # (B, N, 2)
    f_y, f_x = frac.split(1, dim=-1)                                           # (B, N, 1) each
    i0, j0 = low.unbind(-1)                                                    # (B, N) each
    i1, j1 = high.unbind(-1)
    grid = table.reshape(height // k, width // k, -1)                          # (gh, gw, dim)
    top = torch.lerp(grid[i0, j0], grid[i0, j1], f_x)                          # (B, N, dim)
    bottom = torch.lerp(grid[i1, j0], grid[i1, j1], f_x)
    return torch.lerp(top, bottom, f_y)                                        # (B, N, dim)


# -----------------------------------------------------------------------------
# Spatial priors: where tokens go before any search

# The priors of sample_positions:
#   "uniform"   i.i.d. uniform over the image
#   "gaussian"  i.i.d. N(0.5, (1/pi)^2) per axis, clamped to the image (as dsb-ifi/SPoT's
#               spot/oracle.py draws it)
#   "sobol"     scrambled Sobol points (even coverage, little overlap), a fresh scramble per image
#   "isotropic" deterministic, exactly n evenly spread points (isotropic_positions)
#   "center"    the isotropic lattice warped toward the centre (center_warp)
#   "salient"   drawn in proportion to each image's saliency_map
#   "grid"      n distinct patch-grid centres chosen at random per image: patch dropout, what a
#               standard ViT can do with n tokens (the baseline)
PRIORS = ("uniform", "gaussian", "sobol", "isotropic", "center", "salient", "grid")


def isotropic_positions(n_tokens):
    """Exactly n evenly spread points: r = round(sqrt(n)) rows of cell centres.

    The n points are split over the r rows as evenly as possible (row sizes differ by at most
    one), and each row places its points at the centres of equal cells. For n = m^2 this is the
    m x m lattice ((i + 0.5)/m, (j + 0.5)/m), e.g. the paper's 5 x 5 for 25 tokens.  -> (n, 2)
    """
    rows = round(math.sqrt(n_tokens))
    counts = [n_tokens // rows + (r < n_tokens % rows) for r in range(rows)]   # (r < ...) is 0/1
    points = [((r + 0.5) / rows, (c + 0.5) / count)
              for r, count in enumerate(counts) for c in range(count)]
    return torch.tensor(points, dtype=torch.float32)


def center_warp(positions, scale=0.25):
    """The centre prior's warp (dsb-ifi/SPoT's spot/utils.py, _sample_centroids_gauss, there with
    s = 0.2): c -> 0.5 + d (1 - exp(-(d/s)^2)), d = c - 0.5.

    Points near the centre move almost onto it, points near the border barely move, so an even
    lattice becomes dense in the middle of the image.
    """
    offset = positions - 0.5
    pull = 1 - torch.exp(-(offset / scale) ** 2)              # ~0 near the centre, ~1 far away
    return 0.5 + offset * pull


def saliency_map(images, size=64):
    """Spectral-residual saliency (Hou & Zhang, CVPR 2007) of (B, C, H, W) images -> (B, H, W).

    The paper's salient prior uses a *pretrained* saliency network; this project has no
    pretrained weights, so this classic training-free detector stands in: the log amplitude
    spectrum minus its local average (the "spectral residual") is transformed back with the
    original phase; what survives marks the unexpected, i.e. salient, parts of the image.
    One change to Hou & Zhang's recipe: the amplitude is floored at its mean before the log
    (below), so the 8 x 8 block edges of small JPEGs do not paint one fixed grid on every map.
    The map is non-negative and sums to 1 over each image.
    """
    utils.check_images(images)
    gray = images.float().mean(dim=1, keepdim=True)                               # (B, 1, H, W)
    small = F.interpolate(gray, size=size, mode="bilinear", align_corners=False)   # (B, 1, s, s)
    # The FFT treats the image as periodic, so the jump between opposite borders would look
    # "salient"; mirror-padding first makes the periodic image continuous. Cropped off below.
    pad = size // 4
    small = F.pad(small, (pad,) * 4, mode="reflect")                         # (B, 1, s+2p, s+2p)
    spectrum = torch.fft.fft2(small)
    amplitude = spectrum.abs()                                           # (B, 1, s+2p, s+2p)
    # The residual lifts every frequency to its neighbours' height, the weakest too: in a small
    # JPEG those are mostly its 8 x 8 blocks' edges, which would fill every map with one fixed
    # grid. A floor at the mean amplitude leaves the frequencies weaker than average weak.
    floor = amplitude.mean((2, 3), keepdim=True)                         # (B, 1, 1, 1)
    log_amplitude = torch.log(amplitude + floor + 1e-8)
    local_mean = F.avg_pool2d(log_amplitude, 3, stride=1, padding=1,
                              count_include_pad=False)
    # The residual spectrum is exp(log_amplitude - local_mean) * exp(i * phase); since
    # amplitude * exp(i * phase) is the spectrum itself, that is spectrum * exp(-local_mean):
    # the same numbers without the complex exp and angle (half the time of this function).
    residual = spectrum * torch.exp(-local_mean)                         # (B, 1, s+2p, s+2p)
    saliency = torch.fft.ifft2(residual).abs() ** 2                      # (B, 1, s+2p, s+2p)
    # Smooth with a Gaussian (sigma = 2.5% of the side, as in the original recipe's blur).
    sigma = max(size * 0.025, 0.5)
    radius = int(3 * sigma)
    distance = torch.arange(-radius, radius + 1) / sigma                   # (2r+1,) in sigmas
    taps = torch.exp(-0.5 * distance ** 2).to(saliency.device)
    kernel = taps[:, None] * taps / taps.sum() ** 2                      # (2r+1, 2r+1), sums to 1
    saliency = F.conv2d(saliency, kernel[None, None], padding=radius)
    saliency = saliency[..., pad:pad + size, pad:pad + size]             # (B, 1, s, s)
    saliency = F.interpolate(saliency, size=images.shape[-2:], mode="bilinear",
                             align_corners=False)                                # (B, 1, H, W)
    saliency = saliency[:, 0].clamp_min(0)                                        # (B, H, W)
    total = saliency.flatten(1).sum(1).clamp_min(1e-12)                          # (B,)
    return saliency / total[:, None, None]


def sample_positions(prior, batch_size, n_tokens, image_size, window,
                     generator=None, images=None):
    """Draw token positions from a spatial prior -> (batch_size, n_tokens, 2) in [0, 1].

    prior: one of PRIORS (above); image_size: int or (H, W); window: k (used by "grid").
    generator: a torch.Generator; random priors draw every image independently from it (seeded,
    it reproduces the positions); deterministic priors ignore it (every image gets the same).
    images: (B, C, H, W) in [0, 1] for "salient" only, or a (B, H, W) saliency map to draw from.
    """
    B, N, (height, width) = utils.check_prior_inputs(
        prior, PRIORS, batch_size, n_tokens, image_size, window, images)
    device = getattr(generator, "device", "cpu")
    draw = dict(generator=generator, device=device)
    if prior == "uniform":
        return torch.rand(B, N, 2, **draw)
    if prior == "gaussian":
        points = 0.5 + torch.randn(B, N, 2, **draw) / math.pi                # N(0.5, (1/pi)^2)
        return points.clamp(0, 1)
    if prior == "sobol":
        # One scrambled engine per image, seeded from the generator: N low-discrepancy points.
        seeds = torch.randint(0, 2**31 - 1, (B,), **draw).tolist()
        points = [torch.quasirandom.SobolEngine(2, scramble=True, seed=s).draw(N)
                  for s in seeds]                                               # B x (N, 2)
        return torch.stack(points).to(device)
    if prior in ("isotropic", "center"):
        points = isotropic_positions(N).to(device)                            # (N, 2)
        if prior == "center":
            points = center_warp(points)
        return points.repeat(B, 1, 1)                                         # (B, N, 2)
    if prior == "grid":
        cells = grid_positions((height, width), window).to(device)             # (G, 2)
        # A random permutation per image (argsort of uniform noise), keep the first N cells.
        order = torch.rand(B, len(cells), **draw).argsort(dim=1)                # (B, G)
        return cells[order[:, :N]]
    saliency = images if images.dim() == 3 else saliency_map(images)         # (B, H, W)
    # A pixel drawn in proportion to its saliency, then a uniform point inside it.
    weights = saliency.to(device).flatten(1)                                  # (B, H*W)
    pixel = torch.multinomial(weights, N, True, generator=generator)          # (B, N) indices
    row_col = torch.stack([pixel // width, pixel % width], dim=-1)            # (B, N, 2)
    jitter = torch.rand(B, N, 2, **draw)                                      # in [0, 1) px
    return (row_col + jitter) / jitter.new_tensor((height, width))


# -----------------------------------------------------------------------------
# The model: subpixel tokens into a ViT, one model for every prior and budget (retrofitting)

@dataclass
class SPoTConfig:
    """Everything that defines an SPoTViT; the model is SPoTViT(SPoTConfig(...)), as in nanoGPT.
    The last three fields default to this project's own ViT; load_pretrained sets a timm ViT's
    (norm_eps=1e-6, position_embedding="learned", and pool="avg" for MAE's fine-tuning head)."""
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
    norm_eps: float = 1e-5        # every LayerNorm's epsilon
    position_embedding: str = "sincos"   # "sincos": sincos_pos_embed; "learned": learned_pos_embed
    pool: str = "token"           # "token": the class token, final norm; "avg": mean of the
                                  # position tokens, then fc_norm

    def __post_init__(self):
        """utils.check_config makes image_size an (H, W) pair and image_mean and image_std
        tuples, and refuses a config no model can be built from (every error names the field)."""
        utils.check_config(self)


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for (B, heads, T, d) tensors: scaled dot-product attention.

    On CUDA this is torch's fused kernel. On the CPU it is the same formula written out, because
    torch's fused CPU kernel has a slow backward in bf16 (experiments/bench.py's attention section
    measures both; experiments/NOTES.md gives the numbers). The softmax runs in float32 even under
    bf16 autocast, as the fused kernels do internally, and in float64 for float64 inputs.
    """
    if q.device.type == "cuda":
        return F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5                                              # 1 / sqrt(d)
    scores = (q @ k.transpose(-2, -1)) * scale                               # (B, h, T, T)
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)               # float32 or float64
    weights = scores.softmax(dim=-1, dtype=softmax_dtype).to(v.dtype)        # rows sum to 1
    return weights @ v                                                       # (B, h, T, d)


class Attention(nn.Module):
    """Multi-head self-attention: one linear map makes q, k and v for every head, each head
    attends over all T tokens, and a linear map mixes the heads' outputs."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """(B, T, D) -> (B, T, D). No mask and no token order: every token attends to all."""
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))                 # (B, T, 3, h, D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                                 # (B, h, T, D/h) each
        x = attention(q, k, v)                                               # (B, h, T, D/h)
        return self.proj(x.transpose(1, 2).flatten(2))                       # (B, T, D)


class Mlp(nn.Module):
    """The block's per-token feed-forward layer: fc2(GELU(fc1(x))), the exact GELU, as timm's."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

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
    position embeddings. With config.position_embedding="learned" the embedding is a learned
    table of one row per grid cell (`pos_table`, read by learned_pos_embed) and with
    config.pool="avg" the
    head reads the mean of the position tokens through fc_norm: together, a timm / MAE ViT
    (load_pretrained).
    """

    def __init__(self, config):
        """A timm ViT's layers, but patch_embed is a Linear on a flattened k x k window (timm's
        stride-k conv on the grid, flattened) and the position embedding is read at positions."""
        super().__init__()
        if not isinstance(config, SPoTConfig):
            raise ValueError(f"config must be an SPoTConfig, got {type(config).__name__}")
        self.config = config
        for name in ("image_mean", "image_std"):    # (C, 1, 1); not saved: the config has them
            value = torch.tensor(getattr(config, name))[:, None, None]
            self.register_buffer(name, value, persistent=False)
        k = config.window
        dim = config.dim
        eps = config.norm_eps
        self.patch_embed = nn.Linear(config.in_chans * k * k, dim)          # (C*k*k) -> dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        blocks = (Block(dim, config.heads, config.mlp_ratio, eps)
                  for _ in range(config.depth))
        self.blocks = nn.ModuleList(blocks)
        # One norm before the head: the final norm of the class token ("token"), or fc_norm of
        # the mean token ("avg"); the unused one is an nn.Identity, which has no weights.
        avg = config.pool == "avg"
        self.norm = nn.Identity() if avg else nn.LayerNorm(dim, eps=eps)
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if avg else nn.Identity()
        self.head = nn.Linear(dim, config.num_classes)
        self.apply(self._init_weights)
        # timm/MAE init: the patch embedding like a conv (xavier on the flattened weight).
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.normal_(self.cls_token, std=0.02)
        if config.position_embedding == "learned":     # (1, gh*gw, dim), timm's init
            cells = math.prod(side // k for side in config.image_size)      # gh * gw
            table = torch.zeros(1, cells, dim)
            self.pos_table = nn.Parameter(nn.init.trunc_normal_(table, std=0.02))

    @staticmethod
    def _init_weights(module):
        """timm's ViT init of every linear layer: truncated normal weights, zero biases."""
        if isinstance(module, nn.Linear):    # (LayerNorms start as 1 and 0 already)
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def pos_embed(self, positions):
        """(B, N, 2) -> (B, N, dim): the fixed continuous sin-cos embedding (no parameters), or
        the learned table read bilinearly (config.position_embedding="learned")."""
        config = self.config
        if config.position_embedding == "learned":
            return learned_pos_embed(self.pos_table, positions, config.image_size, config.window)
        return sincos_pos_embed(positions, config.dim, config.image_size, config.window)

    def forward_features(self, images, positions):
        """images (B, C, H, W) in [0, 1], positions (B, N, 2) -> tokens (B, 1 + N, dim) after the
        final norm (pool="avg" has none: its fc_norm comes after the pooling, in forward_head)."""
        config = self.config
        utils.check_images(images, (config.in_chans, *config.image_size))
        mean, std = self.image_mean, self.image_std
        if images.dtype == torch.float64:   # the buffers round the config's values to float32
            mean = images.new_tensor(config.image_mean)[:, None, None]
            std = images.new_tensor(config.image_std)[:, None, None]
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
        if self.config.pool == "avg":
            pooled = features[:, 1:].mean(dim=1)                              # (B, dim)
        else:
            pooled = features[:, 0]                                           # the class token
        pooled = self.fc_norm(pooled)                # (an nn.Identity for the class token)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images, positions):
        """images (B, C, H, W) in [0, 1], positions (B, N, 2) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(images, positions))


# -----------------------------------------------------------------------------
# Models from files: train.py's checkpoints, and pretrained ViTs (retrofitting starts from one).
# Reading the files, and timm's layout, is plumbing: utils.py.

def load_checkpoint(path, map_location="cpu", return_checkpoint=False):
    """Rebuild an SPoTViT (eval mode) from a checkpoint written by train.py: a dict with
    "model_config" (the SPoTConfig as a dict) and "model" (the state dict), read safely by
    utils.read_checkpoint. With return_checkpoint=True -> (model, the whole checkpoint dict).
    Raises ValueError naming the file when it is missing, unreadable or not an SPoT checkpoint.
    """
    checkpoint = utils.read_checkpoint(path)
    try:
        model = SPoTViT(SPoTConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: its model does not load "
                         f"({str(error).splitlines()[0]})") from None
    model = model.to(map_location).eval()
    return (model, checkpoint) if return_checkpoint else model


def load_pretrained(source, *, image_size=None, num_classes=None, heads=None,
                    mean=None, std=None):
    """A pretrained timm / DeiT / MAE ViT (a state dict, a file, timm's HF folder or "timm:NAME")
    -> an SPoTViT (eval mode) that, with its tokens at grid_positions, computes the logits the
    source computes (timm's numbers, up to float round-off). utils.read_pretrained reads the
    source, takes what the weights cannot tell from the arguments or the source's config (a
    warning says what it assumed), checks every tensor and refuses what an SPoTViT cannot
    represent (a ValueError naming it), all before a model is built. The model keeps the
    source's precision, at least float32; other classes, or a headless source, get a fresh head.
    """
    kwargs, state = utils.read_pretrained(
        source, image_size, num_classes, heads, mean, std)
    config = SPoTConfig(**kwargs)
    model = SPoTViT(config)
    model = model.to(state["pos_table"].dtype)      # the source's precision, at least float32
    state["pos_table"] = utils.resample_table(state["pos_table"], config)   # (1, gh*gw, dim)
    if "head.weight" not in state:                 # new classes: the model's own fresh head
        state["head.weight"] = model.head.weight
        state["head.bias"] = model.head.bias
    model.load_state_dict(state)
    return model.eval()


def export(model):
    """An SPoTViT -> a timm VisionTransformer state dict (utils.to_timm says which keys, and how
    timm loads it). Its position table is the embedding the model adds at grid_positions,
    computed in the model's precision (float32, or float64 for a float64 model).
    utils.save_pretrained(folder, export(model), model.config) writes it as timm's Hugging Face
    folder, with the config.json that keeps its input statistics, pooling and heads."""
    config = model.config
    weight = model.patch_embed.weight
    dtype = torch.promote_types(weight.dtype, torch.float32)
    grid = grid_positions(config.image_size, config.window, dtype=dtype)        # (G, 2)
    table = model.pos_embed(grid[None].to(weight.device))                       # (1, G, D)
    table = table.detach().to(weight.dtype)
    return utils.to_timm(model.state_dict(), table, config)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = SPoTViT(SPoTConfig(dim=64, depth=2, heads=2))      # 32 x 32 images, 4 x 4 windows
    images = torch.rand(2, 3, 32, 32)
    for prior in PRIORS:
        positions = sample_positions(prior, 2, 16, 32, 4, images=images)     # (2, 16, 2)
        logits = model(images, positions)                                  # (2, 10)
        print(f"{prior:>9}: positions in [{positions.min():.3f}, {positions.max():.3f}], "
              f"logits {tuple(logits.shape)}")
