"""Ablation of the Neural ePDO's own hyper-parameters around the CPU default.

  python -m neural_epdo_jax.study --study=configs/studies/ablation_g_s.py \
      --workdir=runs/studies/ablation_g_s

The default network of configs/default.py (C8 regular fields 8, 8, 12, 12, 16, 16; order 4,
g = 4, s = 4, reduction 1, fd stencils; 20,466 parameters) and one change at a time: fewer
fields per partition (g = 2, with s = 2), fewer distinct generators (s = 2, s = 1), a
narrower generator (reduction 2), lower derivative order (order 2), Gaussian stencils. The
values the layer cannot build at these widths are left out (g = 8 does not divide 12
fields; reduction 4 leaves 2 hidden fields, not divisible by s = 4). The protocol is the
default's, pinned here: all 4,000 bundled rotated digits, 8 epochs, Adam 1e-2 dropped x0.1
for epoch 8, test accuracy every epoch; 3 seeds per variant.

Expected: every variant within a few points of the default (0.93-0.95 on one seed); the
study measures which knob matters at this size; the measured tables are in
docs/results.md. Cost on 2 CPU cores: 7 variants x 3 seeds at about 3-4 min each (the
default's 8 epochs; the variants' throughput differs by less than 2x), about 1.5 hours.
"""

import ml_collections

# The default config's protocol and model, pinned so that the study keeps measuring the
# same thing when configs/default.py changes.
PROTOCOL = dict(
    dataset="rotated_digits",
    num_train_examples=-1,
    num_test_examples=-1,
    augmentation="none",
    batch_size=32,
    num_epochs=8,
    learning_rate=1e-2,
    weight_decay=1e-4,
    lr_boundaries_epochs=(8,),
    lr_scales=(0.1,),
    eval_from_epoch=1,
    eval_every_epochs=1,
    progress_bar=False,
)
DEFAULT_MODEL = dict(
    n=8,
    field_type="regular",
    channels=(8, 8, 12, 12, 16, 16),
    order=4,
    g=4,
    s=4,
    reduction=1,
    discretisation="fd",
)
VARIANTS = {
    "default": dict(),
    "g2_s2": dict(g=2, s=2),
    "s2": dict(s=2),
    "s1": dict(s=1),
    "reduction2": dict(reduction=2),
    "order2": dict(order=2),
    "gauss": dict(discretisation="gauss"),
}


def get_config() -> ml_collections.ConfigDict:
    """Returns the study: one run per variant, 3 seeds each."""
    study = ml_collections.ConfigDict()
    study.seeds = (0, 1, 2)
    study.runs = [
        dict(
            name=name,
            config="configs/default.py",
            overrides=dict(PROTOCOL, model=dict(DEFAULT_MODEL, **change)),
        )
        for name, change in VARIANTS.items()
    ]
    return study
