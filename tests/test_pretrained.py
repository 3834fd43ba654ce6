"""Tests of spot.load_pretrained and spot.export: pretrained timm / DeiT / MAE ViTs as SPoTViTs.

The paper (arXiv 2507.01654) retrofits pretrained ViTs into SPoT. A loader is right only if the
loaded SPoTViT, reading the image at grid_positions, computes what the timm model computed; the
fixtures in tests/fixtures (written by experiments/make_fixtures.py, see their README) hold timm
state dicts together with timm's own logits, so these tests need neither timm nor a download.
Run: python -m pytest -q tests/test_pretrained.py
"""
import sys
from pathlib import Path

import pytest
import torch

import spot
from spot import SPoTConfig, SPoTViT, export, grid_positions, learned_pos_embed, load_pretrained

FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD = ("vit_token", "vit_avg_fcnorm", "vit_224", "vit_w128")


def fixture(name):
    return torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)


def load(record, **overrides):
    """load_pretrained with the fixture's heads, mean and std (its widths are not standard)."""
    kwargs = dict(heads=record["kwargs"]["num_heads"], mean=record["mean"], std=record["std"])
    return load_pretrained(record["state_dict"], **{**kwargs, **overrides})


def at_grid(model, images, dtype=torch.float32):
    """Logits and pooled features with the tokens on the patch grid (a standard ViT's reading)."""
    positions = grid_positions(model.config.image_size, model.config.window, dtype=dtype)
    positions = positions.expand(len(images), -1, -1)
    with torch.no_grad():
        features = model.forward_features(images, positions)
        return model.forward_head(features), model.forward_head(features, pre_logits=True)


# --------------------------------------------------------------------------- timm's numbers

@pytest.mark.parametrize("name", GOOD)
def test_loaded_model_computes_timms_logits_in_float32(name):
    record = fixture(name)
    model = load(record)
    assert not model.training and model.config.position_embedding == "learned"
    assert model.config.pool == ("avg" if name == "vit_avg_fcnorm" else "token")
    logits, pooled = at_grid(model, record["images_uint8"].float() / 256)
    # Measured about 1e-7 (logits of size ~0.5): conv vs linear and fused vs written-out
    # attention only sum in another order.
    assert (logits - record["logits"]).abs().max() <= 1e-5
    assert (pooled - record["pooled"]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", GOOD)
def test_loaded_model_computes_timms_logits_in_float64(name):
    """float64 from float64 weights is exact to round-off (measured ~2e-16). A model loaded from
    float32 weights and then .double()'d is off by the float32 rounding of the folded class token
    (cls_token + pos_embed[:, 0], 2^-24 relative): measured up to 6e-9 with token pooling."""
    record = fixture(name)
    images = record["images_uint8"].double() / 256
    state64 = {key: value.double() for key, value in record["state_dict"].items()}
    model = load_pretrained(state64, heads=record["kwargs"]["num_heads"],
                            mean=record["mean"], std=record["std"]).double()
    assert model.cls_token.dtype == torch.float64
    logits, _ = at_grid(model, images, torch.float64)
    assert (logits - record["logits64"]).abs().max() <= 1e-10
    logits, _ = at_grid(load(record).double(), images, torch.float64)
    assert (logits - record["logits64"]).abs().max() <= 2e-8


def test_a_pos_embed_without_class_slot_leaves_the_class_token_alone():
    """timm's no_embed_class models add pos_embed to the patch tokens only: pos_embed is (1, G, D)."""
    record = fixture("vit_token")
    state = record["state_dict"]
    shifted = {**state, "pos_embed": state["pos_embed"][:, 1:],
               "cls_token": state["cls_token"] + state["pos_embed"][:, :1]}
    model = load_pretrained(shifted, heads=3, mean=record["mean"], std=record["std"])
    assert torch.equal(model.cls_token, shifted["cls_token"])
    assert torch.equal(at_grid(model, record["images"])[0], at_grid(load(record), record["images"])[0])


def test_loading_keeps_the_source_and_maps_each_key():
    """export(load_pretrained(timm's dict)) gives timm's keys and shapes back, and the same
    numbers, except the class slot of pos_embed, which now lives in cls_token."""
    for name in ("vit_token", "vit_avg_fcnorm"):
        source = fixture(name)["state_dict"]
        before = {key: value.clone() for key, value in source.items()}
        out = export(load(fixture(name)))
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in source.items()}
        assert all(torch.equal(source[key], before[key]) for key in source)   # not modified
        assert torch.equal(out["cls_token"], source["cls_token"] + source["pos_embed"][:, :1])
        assert torch.equal(out["pos_embed"][:, 1:], source["pos_embed"][:, 1:])
        assert not out["pos_embed"][:, 0].any()
        assert all(torch.equal(out[key], source[key]) for key in source
                   if key not in ("cls_token", "pos_embed"))


# --------------------------------------------------------------------------- the learned table

@pytest.mark.parametrize("size,window", [(32, 4), ((24, 40), 8), (30, 7), (224, 16), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_learned_table_reads_rows_midpoints_and_borders(size, window, dtype):
    (H, W), generator = spot.utils.to_hw(size), torch.Generator().manual_seed(0)
    gh, gw = H // window, W // window
    table = torch.randn(1, gh * gw, 8, generator=generator, dtype=dtype)
    read = lambda positions: learned_pos_embed(table, positions[None], size, window)[0]
    cells = grid_positions(size, window, dtype=dtype)
    assert torch.equal(read(cells), table[0])                       # a grid position: its row
    grid = table[0].view(gh, gw, -1)
    if gw > 1:       # halfway between cells (0, 0) and (0, 1): their mean
        middle = torch.tensor([[0.5 * window / H, window / W]], dtype=dtype)
        assert torch.allclose(read(middle)[0], (grid[0, 0] + grid[0, 1]) / 2, atol=1e-6)
    # Beyond the outer centres (the border half-cells, outside the image) the border rows hold.
    corners = torch.tensor([[0.0, 0.0], [-0.3, 0.1 * window / W], [1.0, 1.0], [1.2, -1.0]],
                           dtype=dtype)
    expected = torch.stack([grid[0, 0], grid[0, 0], grid[-1, -1], grid[-1, 0]])
    assert torch.equal(read(corners), expected)


def test_learned_table_passes_gradients_to_positions_and_table():
    table = torch.randn(1, 16, 8, requires_grad=True)
    positions = torch.tensor([[[0.3, 0.6], [0.375, 0.625]]], requires_grad=True)  # 2nd: a centre
    learned_pos_embed(table, positions, 32, 8).square().sum().backward()
    assert positions.grad.abs().min() > 0 and table.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda p: learned_pos_embed(table.double(), p, 32, 8),
                                    (torch.tensor([[[0.31, 0.55]]], dtype=torch.float64,
                                                  requires_grad=True),))


def test_learned_model_is_order_free_and_reads_any_positions():
    torch.manual_seed(0)
    model = SPoTViT(SPoTConfig(image_size=16, window=4, num_classes=5, dim=32, depth=1, heads=2,
                               position_embedding="learned", pool="avg")).eval()
    assert model.pos_table.shape == (1, 16, 32) and isinstance(model.norm, torch.nn.Identity)
    images, positions = torch.rand(2, 3, 16, 16), torch.rand(2, 9, 2)
    with torch.no_grad():
        logits = model(images, positions)
        assert torch.allclose(logits, model(images, positions[:, torch.randperm(9)]), atol=1e-6)


# --------------------------------------------------------------------------- export

def test_export_round_trip_learned_avg_and_sincos_models():
    torch.manual_seed(0)
    images, positions = torch.rand(2, 3, 16, 16), torch.rand(2, 7, 2)
    grid = grid_positions(16, 4).expand(2, -1, -1)
    small = dict(image_size=16, window=4, num_classes=5, dim=32, depth=2, heads=2,
                 image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.25))
    learned = SPoTViT(SPoTConfig(**small, position_embedding="learned", pool="avg", norm_eps=1e-6)).eval()
    sincos = SPoTViT(SPoTConfig(**small, norm_eps=1e-6)).eval()
    default = SPoTViT(SPoTConfig(**small)).eval()                 # norm_eps 1e-5
    for model in (learned, sincos, default):
        back = load_pretrained(export(model), heads=2, mean=model.config.image_mean,
                               std=model.config.image_std)
        assert back.config.pool == model.config.pool and back.config.norm_eps == 1e-6
        if model is default:    # timm's LayerNorms use eps 1e-6: with 1e-5 put back, identical
            for module in back.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.eps = 1e-5
        with torch.no_grad():
            assert torch.equal(back(images, grid), model(images, grid))
            if model is learned:  # the same table: the same model at any positions
                assert torch.equal(back(images, positions), model(images, positions))


def test_export_is_timms_layout_for_a_sincos_model():
    torch.manual_seed(0)
    model = SPoTViT(SPoTConfig(image_size=32, window=4, num_classes=10, dim=48, depth=2, heads=3,
                               mlp_ratio=2.0))
    out = export(model)
    timm_keys = {k: v.shape for k, v in fixture("vit_token")["state_dict"].items()}
    assert {k: v.shape for k, v in out.items()} == timm_keys
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in out.values())
    expected = spot.sincos_pos_embed(grid_positions(32, 4)[None], 48, 32, 4)
    assert torch.equal(out["pos_embed"][:, 1:], expected)
    images = torch.rand(1, 3, 32, 32)
    conv = torch.nn.functional.conv2d(images, out["patch_embed.proj.weight"],      # timm's conv
                                      out["patch_embed.proj.bias"], stride=4)   # (1, 48, 8, 8)
    windows = spot.extract_patches(images, grid_positions(32, 4)[None], 4)
    linear = model.patch_embed(windows.flatten(2))                            # (1, 64, 48)
    assert torch.allclose(conv.flatten(2).transpose(1, 2), linear, atol=1e-5)


# --------------------------------------------------------------------------- sources

def test_pth_file_with_a_wrapper_and_module_prefixes(tmp_path):
    record = fixture("vit_token")
    path = tmp_path / "deit_style.pth"
    torch.save({"model": {f"module.{k}": v for k, v in record["state_dict"].items()}, "epoch": 3},
               path)
    for source in (path, str(path)):
        model = load_pretrained(source, heads=3, mean=record["mean"], std=record["std"])
        logits, _ = at_grid(model, record["images"])
        assert torch.equal(logits, at_grid(load(record), record["images"])[0])


def test_safetensors_file(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    record = fixture("vit_avg_fcnorm")
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in record["state_dict"].items()}, path)
    model = load_pretrained(path, heads=3, mean=record["mean"], std=record["std"])
    assert (at_grid(model, record["images"])[0] - record["logits"]).abs().max() <= 1e-5


def test_safetensors_and_timm_missing_say_which_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ValueError, match="needs the safetensors package: pip install safetensors"):
        load_pretrained(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="needs the timm package"):
        load_pretrained("timm:vit_base_patch16_224")


def test_mean_and_std_default_to_imagenet():
    model = load_pretrained(fixture("vit_token")["state_dict"], heads=3)
    assert model.config.image_mean == (0.485, 0.456, 0.406)
    assert model.config.image_std == (0.229, 0.224, 0.225)
    assert load(fixture("vit_token"), std=(0.3, 0.3, 0.3)).config.image_std == (0.3, 0.3, 0.3)


def bad_sources(tmp_path):
    """(source, words its error must contain)."""
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(256)) * 8)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    state = fixture("vit_token")["state_dict"]
    return [
        (noise, ["noise.pth", "could not be read"]),
        (tmp_path / "missing.pt", ["missing.pt", "could not be read"]),
        (listed, ["list.pt", "not a state dict"]),
        (fixture("resnet_like")["state_dict"], ["not a ViT state dict", "patch_embed.proj.weight"]),
        (fixture("deit_distilled")["state_dict"], ["distilled", "dist_token", "head_dist"]),
        (fixture("vit_layerscale")["state_dict"], ["layer scale", "blocks.0.ls1.gamma"]),
        (fixture("vit_registers")["state_dict"], ["register tokens", "reg_token"]),
        (fixture("vit_no_class_token")["state_dict"], ["cls_token", "class token"]),
        ({**state, "decoder_embed.weight": torch.zeros(1), "mask_token": torch.zeros(1)},
         ["MAE", "fine-tuned", "decoder_embed.weight", "mask_token"]),
        ({**state, "blocks.0.attn.q_bias": torch.zeros(48)}, ["q/v biases", "q_bias"]),
        ({**state, "norm_pre.weight": torch.zeros(48)}, ["norm_pre.weight"]),
        ({**state, "blocks.0.attn.q_norm.weight": torch.zeros(16)}, ["q_norm.weight"]),
        ({k: v for k, v in state.items() if not k.startswith("head.")}, ["num_classes="]),
        ({**state, "pos_embed": state["pos_embed"][:, :40]}, ["pos_embed", "square"]),
    ]


def test_bad_sources_are_refused_by_name(tmp_path):
    for source, words in bad_sources(tmp_path):
        with pytest.raises(ValueError) as error:
            load_pretrained(source, heads=3)
        for word in words:
            assert word in str(error.value), (word, str(error.value))
    with pytest.raises(ValueError, match="width 48 .* heads="):
        load_pretrained(fixture("vit_token")["state_dict"])


# --------------------------------------------------------------------------- resizing, new heads

def test_image_size_resamples_the_table_and_native_size_keeps_it():
    record = fixture("vit_token")
    table = record["state_dict"]["pos_embed"][:, 1:]                       # (1, 64, 48)
    assert torch.equal(load(record).pos_table, table)
    assert torch.equal(load(record, image_size=32).pos_table, table)
    bigger = load(record, image_size=48)                                   # 12 x 12 cells
    assert bigger.config.image_size == (48, 48) and bigger.pos_table.shape == (1, 144, 48)
    wide = load(record, image_size=(32, 64))
    assert wide.pos_table.shape == (1, 128, 48)
    # A constant table stays constant when resampled (the antialiased bicubic weights sum to 1).
    flat = {**record["state_dict"], "pos_embed": torch.full((1, 65, 48), 0.25)}
    resized = load_pretrained(flat, heads=3, image_size=20).pos_table
    assert resized.shape == (1, 25, 48) and torch.allclose(resized, torch.full_like(resized, 0.25))
    with torch.no_grad():
        assert bigger(torch.rand(2, 3, 48, 48), torch.rand(2, 5, 2)).shape == (2, 10)


def test_num_classes_gives_a_fresh_head_and_keeps_the_rest():
    record = fixture("vit_avg_fcnorm")
    same, other = load(record), load(record, num_classes=7)
    assert other.head.weight.shape == (7, 48) and other.head.bias.shape == (7,)
    assert torch.equal(load(record, num_classes=10).head.weight, same.head.weight)
    kept, new = same.state_dict(), other.state_dict()
    assert kept.keys() == new.keys()
    assert all(torch.equal(kept[key], new[key]) for key in kept if not key.startswith("head."))


def test_heads_follow_from_a_width_of_64_wide_heads():
    """No heads= for a width that is a multiple of 64 (timm's ViTs use 64-wide heads)."""
    record = fixture("vit_w128")
    model = load_pretrained(record["state_dict"], mean=record["mean"], std=record["std"])
    assert model.config.heads == 2 == record["kwargs"]["num_heads"]
    assert (at_grid(model, record["images_uint8"].float() / 256)[0] - record["logits"]).abs().max() <= 1e-5
