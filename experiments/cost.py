"""
experiments/cost.py -- what a forward pass of SPoT costs, counted from the model's config.

Tokens are what SPoT spends (subpixel tokens, arXiv 2507.01654): a pass costs about its token
count. A label-free placement spends compute to choose its tokens (more passes, a search, a
saliency map, a small head), and the fair yardstick is the prior that spends the same compute on
more tokens (experiments/frontier.py). Here every operation is counted in FLOPs -- one pass
(compute), SPoT-ON's search (search_compute), the spectral saliency map (saliency_compute), a
small MLP head (mlp_compute), the glimpses' two passes (glimpse_compute) -- and FLOPs become
tokens' worth (token_fit, compute_tokens). tests/test_frontier.py checks the counts against
torch.utils.flop_counter.

    from experiments import cost
    cost.compute_tokens(cost.forward_flops(model.config, 16), model.config)    # about 16
"""

import math

import numpy as np

import oracle
import utils

# -----------------------------------------------------------------------------
# FLOPs: what one forward pass costs, counted from the config
#
# The convention: a multiply-add is 2 FLOPs (so an (m x k) @ (k x n) product is 2 m k n, as
# torch.utils.flop_counter counts it); every other elementary operation -- an add, a multiply, a
# divide, and each exp, log, sqrt, sin, cos or erf -- is 1 FLOP; copies, indexing, concatenation,
# comparisons and random draws are free. Per element (or per value) that gives:
BILINEAR_VALUE = 8     # one channel's value of a bilinear read: its 4 neighbours, 4 multiply-adds
BILINEAR_POINT = 14    # one sample point: 2 coordinates to pixels (3 each), the fractions and
                       # their complements (4), the 4 corner weights (4 multiplies)
LAYERNORM = 7          # per element: mean, centre, square, variance, 1/sigma, gamma, beta
LAYERNORM_ROW = 3      # per row: the two divisions by the width and the rsqrt
SOFTMAX = 6            # per score: the 1/sqrt(d) scale, max, subtract, exp, sum, divide
GELU = 5               # per element, the exact GELU 0.5 x (1 + erf(x / sqrt 2))
ADAM = 16              # per coordinate of one Adam step (oracle.oracle_search writes it out)
FFT = 5                # a complex FFT of n points: 5 n log2(n) (the radix-2 count, FFTW's
                       # convention; a real input is counted as complex)
# torch.utils.flop_counter.FlopCounterMode counts the matrix products only (mm, addmm, bmm,
# convolutions, fused attention) at 2 FLOPs per multiply-add; it ignores bias adds, norms,
# softmax, GELU, grid_sample and every elementwise op. The operations below that it counts:
MATMULS = ("patch_embed", "qkv", "scores", "weighted_sum", "proj", "mlp", "head")


def compute(config, n_tokens):
    """FLOPs of every operation of one SPoTViT(config) forward pass on one image at n_tokens
    positions -> {operation: FLOPs}, each summed over the blocks (see the convention above; a
    batch of B images costs B times as much). T = N + 1 tokens go through the blocks (the class
    token joins the N position tokens), so attention's scores grow with T^2."""
    n, d, depth, classes = n_tokens, config.dim, config.depth, config.num_classes
    hidden, k, c = int(config.dim * config.mlp_ratio), config.window, config.in_chans
    t = n + 1
    if config.position_embedding == "learned":
        position = n * (6 + 3 * 3 * d)         # p and its fractions; 3 lerps of 3 FLOPs per channel
    else:
        position = n * (4 + d // 2 + d)        # p; the angles p * omega; their sin and cos
    avg = config.pool == "avg"
    return {
        "normalize": 2 * c * math.prod(config.image_size),       # (image - mean) / std, all pixels
        "patch_extraction": n * (k * k * (BILINEAR_POINT + c * BILINEAR_VALUE) + 6 * k),
        "patch_embed": 2 * n * (c * k * k) * d,
        "pos_embed": position + n * d,                          # ... and adding it to the tokens
        "qkv": depth * 2 * t * d * 3 * d,
        "scores": depth * 2 * t * t * d,                         # q k^T, all heads: h T^2 (d/h)
        "softmax": depth * SOFTMAX * config.heads * t * t,
        "weighted_sum": depth * 2 * t * t * d,                   # softmax(.) v
        "proj": depth * 2 * t * d * d,
        "mlp": depth * 2 * 2 * t * d * hidden,                   # fc1 and fc2
        "gelu": depth * GELU * t * hidden,
        "norms": (2 * depth * t + (1 if avg else t)) * (LAYERNORM * d + LAYERNORM_ROW),
        "residual": depth * 2 * t * d,
        "biases": n * d + depth * t * (3 * d + d + hidden + d) + classes,
        "pool": n * d + d if avg else 0,                          # the mean of the N tokens
        "head": 2 * d * classes,
    }


def forward_flops(config, n_tokens):
    """FLOPs of one forward pass on one image at n_tokens (the sum of compute())."""
    return sum(compute(config, n_tokens).values())


def backward_compute(config, n_tokens):
    """FLOPs of the backward pass SPoT-ON takes: the gradient of the loss w.r.t. the POSITIONS
    only, the weights frozen -> {operation: FLOPs}. A matrix product needs its input's gradient
    only (as many FLOPs as its forward: autograd skips the weights' gradients), except attention,
    whose two products have both factors depending on the positions (twice the forward); every
    other operation is counted at twice its forward (it reads what it saved and the upstream
    gradient), but the image normalisation, which needs no gradient."""
    forward = compute(config, n_tokens)
    doubled = ("scores", "weighted_sum")
    return {op: (2 * f if op in doubled else f) if op in MATMULS else 2 * f * (op != "normalize")
            for op, f in forward.items()}


def search_compute(config, n_tokens, steps=oracle.DEFAULT_STEPS):
    """FLOPs of SPoT-ON (oracle.oracle_search) on one image: `steps` forward and backward passes,
    one Adam step per coordinate each, and the final forward pass that classifies the image at
    the found positions -> {"forward", "backward", "objective_and_adam": FLOPs}."""
    classes = config.num_classes
    return {"forward": (steps + 1) * forward_flops(config, n_tokens),
            "backward": steps * sum(backward_compute(config, n_tokens).values()),
            "objective_and_adam": (steps + 1) * 4 * classes + steps * ADAM * 2 * n_tokens}


def saliency_compute(image_size, in_chans=3, size=64):
    """FLOPs of spot.saliency_map on one image (spectral residual at size x size, mirror-padded by
    size // 4 on each side: P = size + 2 (size // 4)) -> {operation: FLOPs}."""
    height, width = utils.to_hw(image_size)
    p = size + 2 * (size // 4)
    radius = int(3 * max(size * 0.025, 0.5))
    resize = BILINEAR_POINT + BILINEAR_VALUE                  # one channel per output pixel
    return {
        "gray": in_chans * height * width,                    # the channel mean
        "resize": resize * size * size + resize * height * width,      # down to s, back up
        "fft": 2 * FFT * p * p * math.log2(p * p),            # fft2 and ifft2
        # per frequency: |F| (4), log(. + eps) (2), exp(-local mean) (2), F times it (2), |.|^2 (5)
        "spectrum": 15 * p * p,
        "local_mean": 10 * p * p,                             # 3 x 3 box: 9 adds, 1 divide
        "blur": 2 * (2 * radius + 1) ** 2 * p * p,            # the Gaussian conv, p x p outputs
        "normalise": 3 * height * width,                      # clamp, sum, divide
    }


def mlp_compute(widths, rows=1, activation=GELU):
    """FLOPs of a small MLP head (Linear, activation, ..., Linear) of layer widths
    [in, hidden, ..., out] on `rows` inputs -> {"matmul", "biases", "activation": FLOPs}."""
    pairs = list(zip(widths[:-1], widths[1:]))
    return {"matmul": rows * sum(2 * a * b for a, b in pairs),
            "biases": rows * sum(b for _, b in pairs),
            "activation": rows * activation * sum(widths[1:-1])}


def sketch_compute(size, channels, image_size):
    """FLOPs of placement.sketch_net on one image's sketch and of its feature map's mean ->
    {operation: FLOPs}: the area downsampling to size x size (one add per input pixel and
    channel, one scale per output), the convolutions (2 FLOPs per multiply-add, bias and GELU
    per output), the mean."""
    c, (h, w) = channels, utils.to_hw(image_size)
    convs, side = 0, size
    for c_in, c_out, stride in ((3, c // 2, 1), (c // 2, c, 2), (c, c, 2)):
        side = math.ceil(side / stride)
        convs += side * side * c_out * (2 * c_in * 9 + 1 + GELU)
    return {"downsample": 3 * (h * w + size * size), "convolutions": convs,
            "mean": c * side * side}


def glimpse_compute(config, placer_config, n_tokens):
    """FLOPs of experiments.glimpses.glimpse on one image at N = G + K tokens -> {operation:
    FLOPs}: pass 1 (the class token and G glance tokens; its head, which glimpse skips, is
    counted too), pass 2 (a class token and the K placed tokens), pass 2's attention to pass 1's
    cached keys and values, and the placer head (experiments.placement.GlancePlacer)."""
    g = max(1, min(n_tokens - 1, round(placer_config.glance_fraction * n_tokens)))
    k, d, w = n_tokens - g, config.dim, placer_config.width
    memory = g + 1                                         # pass 1's cached keys
    norm = LAYERNORM * d + LAYERNORM_ROW
    placer = {"queries": k * (4 + w // 2 + w) + 2 * k * w * w + k * w,   # sin-cos, Linear
              "keys_values": memory * (norm + 2 * d * 2 * w + 2 * w),
              "attention": 2 * 2 * k * memory * w + SOFTMAX * placer_config.heads * k * memory,
              "proj": 2 * k * w * w + k * w + k * w,             # ... and the residual add
              "mlp": k * (LAYERNORM * w + LAYERNORM_ROW)
              + sum(mlp_compute([w, 2 * w, 2], rows=k).values()),
              "shift": k * 2 * 3}                        # tanh, the scale, the add to the base
    return {"glance": forward_flops(config, g), "second": forward_flops(config, k),
            "cross_attention": cross_attention(config, k + 1, memory),
            "placer": sum(placer.values())}


def cross_attention(config, queries, cached):
    """FLOPs of a second pass's attention to a first pass's cached keys and values (as
    experiments.glimpses.run_blocks reads them), beyond its attention to its own: per block,
    `queries` rows against `cached` keys -- scores q k^T and the weighted sum of v (2 FLOPs per
    multiply-add each, all heads: queries x cached x dim) and the softmax of every score."""
    return config.depth * (2 * 2 * queries * cached * config.dim
                           + SOFTMAX * config.heads * queries * cached)


# -----------------------------------------------------------------------------
# Tokens' worth: FLOPs in the currency of the frontier
#
# The definition: a model's marginal cost of a token, a, is the slope of the least-squares line
# forward_flops(config, N) ~ a N + b over N = 4, 5, ..., G (every integer; G = the model's full
# patch grid, the top of its budgets, at least 16): the price of one more token at the budgets
# the model is used at. A cost of F FLOPs is then worth F / a tokens. It is additive (two passes
# are worth twice one), and a pass at N tokens is worth about N: N + b / a on the line, where the
# offset b / a is what a pass costs besides its tokens (the class token, the head, the image
# normalisation) less what the line's fit to a slightly convex curve (attention is quadratic in
# N) takes off. For the CPU presets' model (6 blocks of width 192, an 8 x 8 grid) a = 3.93 M
# FLOPs (CIFAR-10, 32 px) and 4.21 M (Imagenette, 128 px), the offset -0.10 and -0.07 tokens, and
# a pass at 4 / 16 / 64 tokens is worth 4.61 / 15.92 / 64.61 (4.59 / 15.94 / 64.59): within 0.65
# of N everywhere in 4..64 (tests/test_frontier.py checks it). frontier.json's
# settings["tokens_worth"] holds a, b and the offset of the model at hand.

def token_fit(config):
    """-> (a: FLOPs per token, b: FLOPs of a pass besides its tokens), the least-squares line of
    forward_flops(config, N) over N = 4..G (G = the patch grid's size, at least 16)."""
    grid = math.prod(side // config.window for side in config.image_size)
    n = np.arange(4, max(grid, 16) + 1, dtype=np.float64)
    flops = np.array([forward_flops(config, int(x)) for x in n], dtype=np.float64)
    a, b = np.polyfit(n, flops, 1)
    return float(a), float(b)


def compute_tokens(flops, config):
    """FLOPs -> tokens' worth: flops / a, a = the marginal FLOPs per token of token_fit."""
    return flops / token_fit(config)[0]
