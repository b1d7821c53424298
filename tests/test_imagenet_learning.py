"""The vision networks learn: a small hierarchical Flowformer and a small DeiT-style ViT (timm's VisionTransformer
with our flow attention as its `attn_layer`) train on scikit-learn's digits, written as an ImageFolder, through the
ImageNet task's datamodule and module, and beat chance (10%) clearly. Seeded, CPU, a few seconds each.

The augmentation is toned down for 16-pixel digits (no RandAugment, flips or mixing, crops of at least 80%), and
the schedule has no warm-up: three epochs are all there is.
"""

from __future__ import annotations

import lightning as L
import pytest
from hydra.utils import instantiate

from flowformer.models.qkv_attention import bind_attention
from tasks.imagenet.digits import write_digits
from tests.helpers import compose_config

DIGITS = [
    "data.dataset=digits", "data.image_size=16", "data.num_workers=0", "data.pin_memory=false",
    "data.check_images=false", "data.mixup=0", "data.cutmix=0", "data.train_transform.auto_augment=null",
    "+data.train_transform.hflip=0.0", "+data.train_transform.scale=[0.8,1.0]", "module.warmup_epochs=0",
]
EPOCHS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_digits(root / "digits", size=16, seed=0)
    return root


def val_accuracy_after_training(data_dir, build_model, batch_size: int, lr: float) -> float:
    """Top-1 on the digits' val split after `EPOCHS` epochs of the ImageNet pipeline with the given network."""
    cfg = compose_config(["experiment=imagenet/hierarchical", f"paths.data_dir={data_dir}", *DIGITS,
                          f"data.batch_size={batch_size}", f"module.lr={lr}", f"trainer.max_epochs={EPOCHS}"])
    L.seed_everything(0, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = instantiate(cfg.module, model=build_model(cfg, datamodule), **datamodule.module_dims())
    trainer = L.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=EPOCHS, gradient_clip_val=cfg.trainer.gradient_clip_val,
    )
    trainer.fit(module, datamodule=datamodule)
    return float(trainer.callback_metrics["val/acc"])


def hierarchical(cfg, datamodule):
    """Three stages of widths 32/64/64 (64, 16 and 4 tokens), one block each: 0.14 M parameters."""
    overrides = {"patch_size": 2, "dims": [32, 64, 64], "depths": [1, 1, 1], "heads": [2, 4, 4]}
    return instantiate(cfg.model, **overrides, **datamodule.model_dims(), _convert_="all")


def deit_style(cfg, datamodule):
    """timm's VisionTransformer (16 patches of 4×4, width 96, 2 blocks) with flow attention, as deit_small builds
    DeiT-S; it pools the tokens' mean, as the class token needs more steps than this test can afford."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=datamodule.image_size, patch_size=4, embed_dim=96, depth=2, num_heads=4,
        num_classes=datamodule.num_classes, class_token=False, global_pool="avg",
        attn_layer=bind_attention(cfg.model.attention.name),
    )


# The thresholds sit well below what seeds 0-2 reach (about 80% and 40-60%), and far above chance (10%: 360 val
# images put one standard error near 2 points).
@pytest.mark.parametrize(
    "build_model,batch_size,lr,threshold", [(hierarchical, 64, 3e-2, 0.5), (deit_style, 32, 3e-2, 0.3)]
)
def test_vision_networks_learn_the_digits(data_dir, build_model, batch_size, lr, threshold):
    assert val_accuracy_after_training(data_dir, build_model, batch_size, lr) > threshold
