"""Tests of spot.load_pretrained and spot.export: pretrained timm / DeiT / MAE ViTs as SPoTViTs.

The paper (arXiv 2507.01654) retrofits pretrained ViTs into SPoT. A loader is right only if the
loaded SPoTViT, reading the image at grid_positions, computes what the timm model computed; the
fixtures in tests/fixtures (written by experiments/make_fixtures.py, see their README) hold timm
state dicts together with timm's own logits, so these tests need neither timm nor a download.
They also hold sources as users have them: a headless encoder, timm's Hugging Face folders with
their config.json, DeiT's and MAE's training files, and files that must be refused (a shape bomb,
NaN weights); timm:NAME is tested with stand-in modules.
Run: python -m pytest -q tests/test_pretrained.py
"""
import argparse
import json
import os
import shutil
import sys
import time
import types
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch

import spot
import utils
from spot import SPoTConfig, SPoTViT, export, grid_positions, learned_pos_embed, load_pretrained

# A source that does not say its statistics, heads or pooling is a warning (tested below).
pytestmark = pytest.mark.filterwarnings("ignore:.*the source does not say")
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
    with pytest.warns(UserWarning, match=r"assumed image_mean \(0.485, 0.456, 0.406\)") as record:
        model = load_pretrained(fixture("vit_token")["state_dict"], heads=3)
    assert "--image-mean" in str(record[0].message) and "--image-std" in str(record[0].message)
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


# --------------------------------------------------------------------------- sources as users have

def training_file(name):
    """DeiT's and MAE's training files store their flags as an argparse.Namespace."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)


def no_warning(load_source):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_source()


def test_timm_shapes_are_timms_layout():
    """utils.timm_shapes (what every source is checked against before a model is built) lists
    exactly the keys and shapes of timm's own state dicts."""
    for name in GOOD:
        record = fixture(name)
        state = record["state_dict"]
        model = load(record)
        config = {k: getattr(model.config, k) for k in ("dim", "window", "in_chans", "depth",
                                                        "mlp_ratio", "pool")}
        shapes = utils.timm_shapes(config, state["pos_embed"].shape[1], record["logits"].shape[1])
        assert shapes == {key: tuple(value.shape) for key, value in state.items()}, name


def test_a_headless_encoder_gets_a_fresh_head_and_computes_timms_features():
    """vit_headless.pt: timm num_classes=0 (no head.*), as MAE's and DINO's encoders. The file
    stores mean/std and model_args beside its weights: nothing is assumed, nothing warned."""
    record = fixture("vit_headless")
    assert not any(key.startswith("head.") for key in record["state_dict"])
    model = no_warning(lambda: load_pretrained(FIXTURES / "vit_headless.pt", num_classes=7))
    config = model.config
    assert (config.image_size, config.window, config.dim, config.heads) == ((224, 224), 16, 24, 3)
    assert config.image_mean == (0.5, 0.5, 0.5) and model.head.weight.shape == (7, 24)
    _, pooled = at_grid(model, record["images_uint8"].float() / 256)
    assert (pooled - record["pooled"]).abs().max() <= 1e-5          # measured 5e-7 (values ~3)
    with pytest.raises(ValueError, match="has no head.weight: pass num_classes="):
        load_pretrained(record["state_dict"], heads=3)


def test_an_hf_folder_says_statistics_heads_and_pooling(tmp_path):
    """hf_half/: timm's config.json says mean/std 0.5 and 4 heads at width 64 (a width of 64
    alone would mean one 64-wide head); the folder, or its weights file with config.json beside
    it, loads without a warning and computes timm's logits. Arguments come first."""
    outputs = torch.load(FIXTURES / "hf_half" / "timm_outputs.pt", weights_only=True)
    images = outputs["images_uint8"].float() / 256
    for source in (FIXTURES / "hf_half", str(FIXTURES / "hf_half" / "pytorch_model.bin")):
        model = no_warning(lambda: load_pretrained(source))
        config = model.config
        assert (config.heads, config.pool, config.image_mean, config.image_std) == (
            4, "token", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        assert (at_grid(model, images)[0] - outputs["logits"]).abs().max() <= 1e-5
    given = load_pretrained(FIXTURES / "hf_half", mean=(0.1, 0.2, 0.3), heads=2).config
    assert given.image_mean == (0.1, 0.2, 0.3) and given.image_std == (0.5, 0.5, 0.5)
    assert given.heads == 2
    # The same weights without their config.json: what was assumed is one warning line.
    shutil.copy(FIXTURES / "hf_half" / "pytorch_model.bin", tmp_path / "pytorch_model.bin")
    with pytest.warns(UserWarning) as record:
        assert load_pretrained(tmp_path).config.heads == 1
    assert len(record) == 1 and "\n" not in str(record[0].message)
    for words in ("assumed", "image_mean (0.485, 0.456, 0.406)", "heads 1", "pool token",
                  "--image-mean", "--image-std", "--heads", "global_pool"):
        assert words in str(record[0].message), words


def test_an_hf_folder_prefers_model_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = torch.load(FIXTURES / "hf_half" / "pytorch_model.bin", weights_only=True)
    safetensors_torch.save_file(state, tmp_path / "model.safetensors")
    shutil.copy(FIXTURES / "hf_half" / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    model = load_pretrained(tmp_path)
    assert torch.equal(model.cls_token, load_pretrained(FIXTURES / "hf_half").cls_token)
    assert model.config.heads == 4


@pytest.mark.parametrize("folder, words", [
    ("hf_avg_nofcnorm", ["global_pool 'avg' without fc_norm", "not supported"]),
    ("hf_max", ["global_pool='max'", "not supported"]),
])
def test_pooling_the_weights_cannot_tell_is_refused_by_name(folder, words):
    """Average pooling after the final norm looks like token pooling, max pooling with fc_norm
    like average pooling: with config.json saying so, each is refused, never loaded as the
    other."""
    with pytest.raises(ValueError) as error:
        load_pretrained(FIXTURES / folder)
    assert all(word in str(error.value) for word in [folder] + words), str(error.value)


def hf_folder(tmp_path, **change):
    """hf_half's weights with its config.json changed (model_args merged)."""
    config = json.loads((FIXTURES / "hf_half" / "config.json").read_text())
    config["model_args"] |= change.pop("model_args", {})
    (tmp_path / "config.json").write_text(json.dumps(config | change))
    shutil.copy(FIXTURES / "hf_half" / "pytorch_model.bin", tmp_path / "pytorch_model.bin")
    return tmp_path


@pytest.mark.parametrize("change, words", [
    ({"global_pool": "map"}, "global_pool='map'"),
    ({"model_args": {"qk_norm": True}}, "qk_norm=True"),
    ({"model_args": {"class_token": False}}, "class_token=False"),
    ({"model_args": {"reg_tokens": 4}}, "reg_tokens=4"),
    ({"model_args": {"init_values": 1e-5}}, "init_values=1e-05"),
    ({"model_args": {"act_layer": "gelu_tanh"}}, "act_layer='gelu_tanh'"),
    ({"model_args": {"pool_include_prefix": True}}, "pool_include_prefix=True"),
    ({"model_args": {"pre_norm": True}}, "pre_norm=True"),
    ({"model_args": {"some_new_arg": 1}}, "some_new_arg=1"),
])
def test_config_keys_spotvit_cannot_compute_are_refused_by_name(tmp_path, change, words):
    with pytest.raises(ValueError, match="not supported") as error:
        load_pretrained(hf_folder(tmp_path, **change))
    assert words in str(error.value)


def test_config_keys_that_do_not_change_the_numbers_are_accepted(tmp_path):
    folder = hf_folder(tmp_path, model_args={"drop_path_rate": 0.1, "dynamic_img_size": True,
                                             "act_layer": "gelu", "fc_norm": None})
    assert load_pretrained(folder).config.heads == 4


def test_folders_without_weights_and_broken_configs_are_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="folder without model.safetensors or pytorch_model.bin"):
        load_pretrained(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    hf_folder(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="its config is not timm's"):
        load_pretrained(broken)


def test_a_deit_training_file_loads_without_running_its_code():
    """DeiT's main.py saves model, optimizer, lr_scheduler, epoch, scaler and args (an
    argparse.Namespace): read with weights_only=True, the Namespace allowed, nothing else."""
    saved = training_file("deit_training")
    assert isinstance(saved["args"], argparse.Namespace)
    with pytest.warns(UserWarning, match="image_mean"):        # DeiT's files say no statistics
        model = load_pretrained(FIXTURES / "deit_training.pt", heads=2)
    outputs = saved["timm_outputs"]
    logits, _ = at_grid(model, outputs["images_uint8"].float() / 256)
    assert (logits - outputs["logits"]).abs().max() <= 1e-5           # measured 3e-8


def test_an_mae_pretraining_checkpoint_gives_its_encoder():
    """MAE's pre-training checkpoint: encoder + decoder_* + mask_token. Its decoder is dropped
    with a warning naming the keys; the encoder computes timm's features."""
    saved = training_file("mae_pretrain")
    with pytest.warns(UserWarning) as record:
        model = load_pretrained(FIXTURES / "mae_pretrain.pt", heads=2, num_classes=5)
    message = " ".join(str(r.message) for r in record)
    for word in ("MAE", "fine-tuned", "decoder_embed.weight", "mask_token", "dropped"):
        assert word in message, word
    outputs = saved["timm_outputs"]
    _, pooled = at_grid(model, outputs["images_uint8"].float() / 256)
    assert (pooled - outputs["pooled"]).abs().max() <= 1e-5
    # The same with a head: the decoder keys of a state dict are dropped the same way.
    state = fixture("vit_token")["state_dict"]
    with pytest.warns(UserWarning, match="decoder_embed.weight, mask_token"):
        mae = load_pretrained({**state, "decoder_embed.weight": torch.zeros(1),
                               "mask_token": torch.zeros(1)}, heads=3)
    assert torch.equal(mae.cls_token, load_pretrained(state, heads=3).cls_token)


def test_refusals_quote_the_readers_reason(tmp_path):
    """Never an exception's class alone ("(EOFError)"): torch's (or safetensors') own reason."""
    empty, noise, code = tmp_path / "empty.pt", tmp_path / "noise.pt", tmp_path / "code.pt"
    empty.write_bytes(b"")
    noise.write_bytes(bytes(range(256)) * 8)
    torch.save({"model": {}, "hook": os.system}, code)
    for path, words in [(empty, "empty or cut short"), (noise, "Unsupported operand"),
                        (code, "system"), (tmp_path / "missing.pt", "No such file")]:
        with pytest.raises(ValueError) as error:
            load_pretrained(path, heads=3)
        assert path.name in str(error.value) and words in str(error.value), str(error.value)
        assert "Error)" not in str(error.value)


def test_bad_tensors_are_refused_before_a_model_is_built(tmp_path, monkeypatch):
    """Shapes are checked against what the inferred model needs, then storage and values, all
    before SPoTViT is built: no allocation sized by what a file claims."""
    monkeypatch.setattr(spot, "SPoTViT", lambda *a: pytest.fail("built a model"))
    state = fixture("vit_token")["state_dict"]
    wide = {**state, "pos_embed": state["pos_embed"][..., :40], "cls_token": torch.zeros(1, 1, 40)}
    view = torch.zeros(1).expand(50_000_000, 48)            # 4 bytes claiming 9.6 GB
    bomb = dict(state)
    for i in (0, 1):
        bomb |= {f"blocks.{i}.mlp.fc1.weight": view, f"blocks.{i}.mlp.fc1.bias": view[:, 0],
                 f"blocks.{i}.mlp.fc2.weight": view.T}
    torch.save(bomb, tmp_path / "view_bomb.pt")
    for source, words in [
        (FIXTURES / "shape_bomb.pt", ["blocks.0.mlp.fc1.weight (50000000, 0)", "(50000000, 16)"]),
        (wide, ["pos_embed (1, 65, 40) where SPoTViT needs (1, 65, 48)",
                "cls_token (1, 1, 40) where SPoTViT needs (1, 1, 48)"]),
        (FIXTURES / "vit_nan.pt", ["NaN or Inf", "blocks.0.attn.proj.weight", "norm.bias"]),
        (tmp_path / "view_bomb.pt", ["claims more numbers than its file stores"]),
        ({**state, "extra.weight": torch.zeros(2)}, ["extra.weight, which has no place"]),
        ({k: v for k, v in state.items() if k != "blocks.1.norm2.bias"},
         ["no blocks.1.norm2.bias"]),
    ]:
        start = time.perf_counter()
        with pytest.raises(ValueError) as error:
            load_pretrained(source, num_classes=4)       # (checked before heads are needed)
        assert time.perf_counter() - start < 5
        assert all(word in str(error.value) for word in words), str(error.value)


def test_export_writes_timms_folder_that_reads_back_the_same(tmp_path):
    """utils.save_pretrained(folder, export(model), model.config): pytorch_model.bin and timm's
    config.json; loading the folder gives back the statistics, pooling and heads (6 heads at
    width 48, which the weights cannot tell) and the same logits, without a warning."""
    torch.manual_seed(0)
    for pool in ("avg", "token"):
        model = SPoTViT(SPoTConfig(image_size=16, window=4, num_classes=5, dim=48, depth=2, heads=6,
                                   image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.25),
                                   norm_eps=1e-6, position_embedding="learned", pool=pool)).eval()
        folder = tmp_path / pool
        utils.save_pretrained(folder, export(model), model.config)
        config = json.loads((folder / "config.json").read_text())
        assert config["pretrained_cfg"]["mean"] == [0.4, 0.5, 0.6]
        assert config["model_args"]["global_pool"] == pool
        assert config["model_args"]["num_heads"] == 6
        back = no_warning(lambda: load_pretrained(folder))
        assert back.config == model.config
        images, positions = torch.rand(2, 3, 16, 16), torch.rand(2, 7, 2)
        with torch.no_grad():
            assert torch.equal(back(images, positions), model(images, positions))


# --------------------------------------------------------------------------- timm:NAME

class VisionTransformer:
    """What the loader reads of a timm model (so timm is not needed): vit_token's weights."""

    def __init__(self, act=None):
        record = fixture("vit_token")
        self.state, self.global_pool = record["state_dict"], "token"
        self.pretrained_cfg = {"mean": record["mean"], "std": record["std"]}
        mlp = types.SimpleNamespace(act=act or torch.nn.GELU())
        self.blocks = [types.SimpleNamespace(attn=types.SimpleNamespace(num_heads=3), mlp=mlp,
                                             norm1=torch.nn.LayerNorm(48, eps=1e-6))]

    def state_dict(self):
        return self.state


def stand_in_timm(monkeypatch, create_model, offline=False):
    """timm and huggingface_hub.constants as modules of a few lines -> the hub's constants."""
    hub = types.ModuleType("huggingface_hub.constants")
    hub.HF_HUB_OFFLINE, hub.ENDPOINT = offline, "https://huggingface.co"
    timm = types.ModuleType("timm")
    timm.is_model = lambda name: name.split(".")[0] in ("vit_token", "resnet18")
    timm.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.ModuleType("huggingface_hub"))
    monkeypatch.setitem(sys.modules, "huggingface_hub.constants", hub)
    return hub


def test_timm_name_reads_timms_cache_first(monkeypatch):
    calls = []

    def create_model(name, pretrained):
        calls.append((name, pretrained, hub.HF_HUB_OFFLINE))
        return VisionTransformer()
    hub = stand_in_timm(monkeypatch, create_model)
    monkeypatch.setattr(utils.urllib.request, "urlopen", lambda *a, **k: pytest.fail("network"))
    model = no_warning(lambda: load_pretrained("timm:vit_token"))     # timm says everything
    assert calls == [("vit_token", True, True)] and hub.HF_HUB_OFFLINE is False
    assert (model.config.heads, model.config.image_mean) == (3, (0.5, 0.5, 0.5))
    record = fixture("vit_token")
    assert (at_grid(model, record["images"])[0] - record["logits"]).abs().max() <= 1e-5


@pytest.mark.parametrize("offline", [False, True])
def test_timm_name_offline_fails_fast_in_one_line(monkeypatch, offline):
    calls = []

    def create_model(name, pretrained):
        calls.append(hub.HF_HUB_OFFLINE)
        raise FileNotFoundError("Cannot find the requested files in the disk cache\nand more")

    def urlopen(*args, **kwargs):
        calls.append("urlopen")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    hub = stand_in_timm(monkeypatch, create_model, offline)
    monkeypatch.setattr(utils.urllib.request, "urlopen", urlopen)
    with pytest.raises(ValueError) as error:
        load_pretrained("timm:vit_token")
    message = str(error.value)
    assert "\n" not in message and "timm:vit_token" in message and "pass a file" in message
    assert ("name resolution" if not offline else "disk cache") in message
    assert calls == ([True] if offline else [True, "urlopen"])   # timm never retried online
    assert hub.HF_HUB_OFFLINE is offline


def test_timm_name_unknown_not_a_vit_or_another_activation(monkeypatch):
    stand_in_timm(monkeypatch, lambda name, pretrained: type("ResNet", (), {})())
    with pytest.raises(ValueError, match="timm has no model 'vit_nope'"):
        load_pretrained("timm:vit_nope")
    with pytest.raises(ValueError, match="is timm's ResNet, not a VisionTransformer"):
        load_pretrained("timm:resnet18")
    stand_in_timm(monkeypatch, lambda name, pretrained: VisionTransformer(
        act=torch.nn.GELU(approximate="tanh")))
    with pytest.raises(ValueError, match="act_layer=\"GELU\\(approximate='tanh'\\)\""):
        load_pretrained("timm:vit_token")


def test_a_timm_that_fails_to_import_reports_why(tmp_path, monkeypatch):
    """timm installed but broken (a torchvision that does not match): its ImportError, not
    "pip install timm" (which is for a timm that is not installed)."""
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text(
        "raise ImportError(\"cannot import name 'InterpolationMode' from 'torchvision'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    with pytest.raises(ValueError) as error:
        load_pretrained("timm:vit_base_patch16_224")
    message = str(error.value)
    assert "needs the timm package" in message and "fails to import" in message
    assert "InterpolationMode" in message and "pip install" not in message
