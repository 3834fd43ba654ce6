"""
experiments/make_fixtures.py -- writes tests/fixtures/: small timm Vision Transformers, saved as
plain dicts so that the tests can check a timm -> spot.SPoTViT weight loader without timm.

Why: a loader that maps timm's keys onto SPoTViT is only right if the loaded model computes what
timm computes. These fixtures hold timm's state dicts together with timm's own outputs on a few
images, so a test can load the weights and compare outputs. Pretrained weights are not needed
(and not downloaded): random ones are, with 0.02 * randn added to every parameter after timm's
init so that no bias, norm, class token or position embedding is left at an exact 0 or 1.

Good sources (timm VisionTransformer; each a dict of timm_version, model_name, kwargs, state_dict,
mean, std, images_uint8, images, logits, logits64, pooled -- see tests/fixtures/README.md):
    vit_token.pt       32x32 images, patch 4, class token, token pooling, final norm
    vit_avg_fcnorm.pt  the same with MAE's head: global_pool="avg", fc_norm (norm is Identity)
    vit_224.pt         224x224 images, patch 16 (a 14x14 grid), token pooling; one image
    vit_w128.pt        width 128 with two 64-wide heads (no heads= needed), depth 1, token pooling
Bad sources, state dicts only (timm_version, model_name, kwargs, state_dict), for refusal tests:
    deit_distilled.pt, vit_layerscale.pt, vit_registers.pt, vit_no_class_token.pt, resnet_like.pt

Sources as users have them (seeds from 100, so the files above keep theirs):
    vit_headless.pt    224x224, patch 16, dim 24, depth 1, 3 heads, num_classes=0 (no head.*, as
                       MAE's and DINO's encoders); a good fixture's keys, and model_args (timm's
                       name for the kwargs: the heads a width of 24 cannot tell)
    hf_half/           timm's Hugging Face folder: pytorch_model.bin and the config.json timm's
                       own writer (save_config_for_hf) makes: mean/std 0.5 (timm's augreg ViTs),
                       4 heads at width 64 (a 64-wide guess gives 1); timm_outputs.pt beside
    hf_avg_nofcnorm/   global_pool="avg", fc_norm=False: the weights look like token pooling
    hf_max/            global_pool="max" (with fc_norm): the weights look like average pooling
    deit_training.pt   DeiT's main.py checkpoint: model, optimizer, lr_scheduler, epoch, scaler and
                       args, an argparse.Namespace; timm_outputs beside
    mae_pretrain.pt    MAE's pre-training checkpoint: a headless encoder plus decoder_* and
                       mask_token; args (a Namespace); timm_outputs of the encoder alone
    shape_bomb.pt      a tiny ViT whose blocks.0.mlp.fc1.weight is a zero-element (50_000_000, 0)
    vit_nan.pt         a tiny ViT with a NaN in blocks.0.attn.proj.weight and an Inf in norm.bias

Images are uint8 (stored as images_uint8: the 224x224 one as nothing else, to stay small), and
images = images_uint8 / 256 exactly, in float32 and float64 alike. Everything is seeded, so two
runs on one machine write identical tensors; timm's init (trunc_normal_: erfinv) may differ in the
last bit on another CPU or torch, so write only the fixtures you add (NAME ... below) and keep the
committed ones.

Run it from the repository root with a venv that has timm and safetensors, and, where torchvision
does not import, a stand-in torchvision module on PYTHONPATH (timm imports torchvision, but its
model code does not need it):

    PYTHONPATH=<folder with the stand-in> <venv>/bin/python -m experiments.make_fixtures [NAME ...]

The tests never run this script; they read its files with torch.load(path, weights_only=True).
"""
import argparse
import copy
import tempfile
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
HALF, IMAGENET = ([0.5] * 3, [0.5] * 3), ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
SMALL = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0,
             num_classes=10)
GOOD = {   # name: (kwargs, (mean, std), images)
    "vit_token": (SMALL, HALF, 3),
    "vit_avg_fcnorm": ({**SMALL, "global_pool": "avg", "fc_norm": True, "class_token": True},
                       IMAGENET, 3),
    "vit_224": (dict(img_size=224, patch_size=16, embed_dim=24, depth=1, num_heads=3,
                     mlp_ratio=2.0, num_classes=5), HALF, 1),
    # timm's 64-wide heads (128 = 2 x 64): the head count follows from the width, so
    # `python train.py --init-from tests/fixtures/vit_w128.pt --dataset shapes` needs no --heads.
    "vit_w128": (dict(img_size=32, patch_size=4, embed_dim=128, depth=1, num_heads=2, mlp_ratio=1.0,
                      num_classes=10), HALF, 3),
}
TINY = {**SMALL, "depth": 1}
BAD = {    # name: (class name, kwargs)
    "deit_distilled": ("VisionTransformerDistilled", {**TINY, "mlp_ratio": 4.0}),
    "vit_layerscale": ("VisionTransformer", {**TINY, "init_values": 1e-5}),
    "vit_registers": ("VisionTransformer", {**TINY, "reg_tokens": 2}),
    "vit_no_class_token": ("VisionTransformer", {**TINY, "class_token": False,
                                                 "global_pool": "avg"}),
}


# Sources as users have them. HF folders: timm.create_model("vit_base_patch16_224", **kwargs), so
# that timm records model_args and pretrained_cfg (mean/std 0.5) as it does for the hub.
TINIEST = dict(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0,
               num_classes=4)
HEADLESS = dict(img_size=224, patch_size=16, embed_dim=24, depth=1, num_heads=3, mlp_ratio=2.0,
                num_classes=0, global_pool="token")
HF = {   # folder: (kwargs, images for timm_outputs.pt)
    "hf_half": (dict(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=4,
                     mlp_ratio=1.0, num_classes=10), 3),
    "hf_avg_nofcnorm": ({**TINIEST, "global_pool": "avg", "fc_norm": False}, 0),
    "hf_max": ({**TINIEST, "global_pool": "max"}, 0),
}
TRAINED = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0)


def perturbed(model):
    """timm's init, then + 0.02 * randn on every parameter: nothing left at exactly 0 or 1."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def good_fixture(timm, seed, kwargs, norm, count):
    """A VisionTransformer's weights and its outputs on `count` seeded images."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    model = perturbed(VisionTransformer(**kwargs))
    record = dict(timm_version=timm.__version__, model_name=describe(kwargs), kwargs=dict(kwargs),
                  state_dict=dict(model.state_dict()), mean=norm[0], std=norm[1])
    return record | timm_outputs(model, norm, kwargs["img_size"], count)


def timm_outputs(model, norm, size, count):
    """timm's outputs on `count` seeded uint8 images: images_uint8, logits, logits64, pooled
    (and images when small)."""
    images_uint8 = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    images = images_uint8.float() / 256                       # exact: a power of two
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in norm)
    with torch.no_grad():                  # float64 from the Python floats, not from float32
        x = (images - mean.float()) / std.float()
        logits = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        x64 = (images.double() - mean) / std
        logits64 = copy.deepcopy(model).double()(x64)
    record = dict(images_uint8=images_uint8, logits=logits, logits64=logits64, pooled=pooled)
    if count > 1:                  # the 224x224 image would be 600 KB as floats
        record["images"] = images
    return record


def describe(kwargs):
    pool = kwargs.get("global_pool", "token")
    head = "avg pooling + fc_norm" if pool == "avg" else "class-token pooling + final norm"
    return (f"timm VisionTransformer {kwargs['img_size']}px/{kwargs['patch_size']}, "
            f"dim {kwargs['embed_dim']}, depth {kwargs['depth']}, {head}; random init + noise")


def bad_fixtures(timm):
    """State dicts that a ViT loader must refuse, with the key names timm gives them."""
    from timm.models import deit, vision_transformer
    for seed, (name, (cls, kwargs)) in enumerate(BAD.items(), start=len(GOOD)):
        torch.manual_seed(seed)
        module = deit if cls == "VisionTransformerDistilled" else vision_transformer
        model = perturbed(getattr(module, cls)(**kwargs))
        yield name, dict(timm_version=timm.__version__, model_name=f"timm {cls}: {name}",
                         kwargs=dict(kwargs), state_dict=dict(model.state_dict()))
    torch.manual_seed(len(GOOD) + len(BAD))
    state = perturbed(timm.create_model("resnet18", num_classes=10)).state_dict()
    keys = list(state)[:10] + ["fc.weight", "fc.bias"]       # a taste of a CNN, kept small
    yield "resnet_like", dict(timm_version=timm.__version__,
                              model_name="timm resnet18: its first 10 keys and fc",
                              kwargs={"model": "resnet18", "num_classes": 10},
                              state_dict={k: state[k] for k in keys})


def user_fixtures(timm):
    """Sources as users have them -> (name, {file: a dict to torch.save, or text to write})."""
    from timm.models._hub import save_config_for_hf
    from timm.models.vision_transformer import Block, VisionTransformer
    record = good_fixture(timm, 100, HEADLESS, HALF, 1)
    yield "vit_headless", {"vit_headless.pt": record | {"model_args": dict(HEADLESS)}}
    for seed, (name, (kwargs, count)) in enumerate(HF.items(), start=101):
        torch.manual_seed(seed)
        model = perturbed(timm.create_model("vit_base_patch16_224", **kwargs))
        with tempfile.TemporaryDirectory() as folder:
            save_config_for_hf(model, Path(folder) / "config.json")    # timm's own writer
            config = (Path(folder) / "config.json").read_text()
        files = {"pytorch_model.bin": dict(model.state_dict()), "config.json": config}
        if count:
            files["timm_outputs.pt"] = timm_outputs(model, HALF, kwargs["img_size"], count)
        yield name, {f"{name}/{file}": content for file, content in files.items()}
    torch.manual_seed(104)
    model = perturbed(VisionTransformer(**TRAINED, num_classes=10))
    args = argparse.Namespace(model="deit_tiny_patch16_224", input_size=224, batch_size=256,
                              epochs=300, lr=5e-4, smoothing=0.1, data_path="/datasets/imagenet",
                              output_dir="deit_tiny", distillation_type="none")
    deit = dict(model=dict(model.state_dict()), epoch=299, args=args,
                optimizer={"state": {}, "param_groups": [{"lr": 5e-6, "params": [0, 1]}]},
                lr_scheduler={"last_epoch": 299}, scaler={"scale": 65536.0},
                timm_outputs=timm_outputs(model, IMAGENET, 16, 2))
    yield "deit_training", {"deit_training.pt": deit}
    torch.manual_seed(105)
    encoder = perturbed(VisionTransformer(**TRAINED, num_classes=0))
    decoder = {"decoder_embed.weight": torch.randn(16, 32), "decoder_embed.bias": torch.randn(16),
               "mask_token": torch.randn(1, 1, 16), "decoder_pos_embed": torch.randn(1, 17, 16),
               "decoder_norm.weight": torch.randn(16), "decoder_norm.bias": torch.randn(16),
               "decoder_pred.weight": torch.randn(48, 16), "decoder_pred.bias": torch.randn(48)}
    block = perturbed(Block(16, 2)).state_dict()
    decoder |= {f"decoder_blocks.0.{key}": value for key, value in block.items()}
    args = argparse.Namespace(model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75,
                              norm_pix_loss=True, epochs=800, blr=1.5e-4, output_dir="mae_base")
    mae = dict(model={**encoder.state_dict(), **decoder}, epoch=799, args=args,
               optimizer={"state": {}, "param_groups": [{"lr": 1e-6, "params": [0]}]},
               scaler={"scale": 32768.0}, timm_outputs=timm_outputs(encoder, IMAGENET, 16, 2))
    yield "mae_pretrain", {"mae_pretrain.pt": mae}
    for seed, name in enumerate(("shape_bomb", "vit_nan"), start=106):
        torch.manual_seed(seed)
        state = dict(perturbed(VisionTransformer(**TINIEST)).state_dict())
        if name == "shape_bomb":     # 0 bytes that claim 50 million rows
            state["blocks.0.mlp.fc1.weight"] = torch.zeros(50_000_000, 0)
        else:
            state["blocks.0.attn.proj.weight"][0, 0] = float("nan")
            state["norm.bias"][1] = float("inf")
        yield name, {f"{name}.pt": dict(timm_version=timm.__version__, kwargs=dict(TINIEST),
                                        model_name=f"timm VisionTransformer: {name}",
                                        state_dict=state)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="write only these fixtures (default: all)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write (tests/fixtures)")
    args = parser.parse_args(argv)
    import timm                    # only here: the project itself never needs timm
    args.out.mkdir(parents=True, exist_ok=True)
    fixtures = [(name, {f"{name}.pt": good_fixture(timm, seed, *spec)})
                for seed, (name, spec) in enumerate(GOOD.items())]
    fixtures += [(name, {f"{name}.pt": record}) for name, record in bad_fixtures(timm)]
    for name, files in fixtures + list(user_fixtures(timm)):
        if args.names and name not in args.names:
            continue
        for file, content in files.items():
            path = args.out / file
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content)
            else:
                torch.save(content, path)
            print(f"{path}  {path.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
