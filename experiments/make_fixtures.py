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

Images are uint8 (stored as images_uint8: the 224x224 one as nothing else, to stay small), and
images = images_uint8 / 256 exactly, in float32 and float64 alike. Everything is seeded, so two
runs write identical tensors.

Run it from the repository root with a venv that has timm and safetensors, and, where torchvision
does not import, a stand-in torchvision module on PYTHONPATH (timm imports torchvision, but its
model code does not need it):

    PYTHONPATH=<folder with the stand-in> <venv>/bin/python -m experiments.make_fixtures

The tests never run this script; they read its files with torch.load(path, weights_only=True).
"""
import argparse
import copy
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
    size = kwargs["img_size"]
    images_uint8 = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8)
    images = images_uint8.float() / 256                       # exact: a power of two
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in norm)
    with torch.no_grad():                  # float64 from the Python floats, not from float32
        x = (images - mean.float()) / std.float()
        logits = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        x64 = (images.double() - mean) / std
        logits64 = copy.deepcopy(model).double()(x64)
    record = dict(timm_version=timm.__version__, model_name=describe(kwargs), kwargs=dict(kwargs),
                  state_dict=dict(model.state_dict()), mean=norm[0], std=norm[1],
                  images_uint8=images_uint8, logits=logits, logits64=logits64, pooled=pooled)
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write (tests/fixtures)")
    args = parser.parse_args(argv)
    import timm                    # only here: the project itself never needs timm
    args.out.mkdir(parents=True, exist_ok=True)
    fixtures = [(name, good_fixture(timm, seed, *spec))
                for seed, (name, spec) in enumerate(GOOD.items())]
    for name, record in fixtures + list(bad_fixtures(timm)):
        path = args.out / f"{name}.pt"
        torch.save(record, path)
        print(f"{path}  {path.stat().st_size // 1024} KB  {list(record['state_dict'])}")


if __name__ == "__main__":
    main()
