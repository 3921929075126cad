"""The paper's four MNIST-rot networks, PDO-eConv and the CNN baseline, full protocol.

  python -m neural_epdo_jax.tools.study --study=configs/studies/paper_variants.py \
      --workdir=runs/studies/paper_variants

R-fd, R-gauss, Q-gauss, D-gauss (configs/mnist_rot_*.py), the linear PDO-eConv baseline
(configs/mnist_rot_pdo_econv.py) and the plain CNN with R-gauss's parameter count
(configs/cnn_baseline.py), each with the paper's protocol: MNIST-rot (needs
`mnist_rotation_new.zip`, see neural_epdo_jax/data/sources.py), 199 epochs, 3 seeds. Each
finished run is also evaluated on a fixed subset of 10,000 test images rotated by every 15
degrees.

This is the GPU study: on a CPU the runner refuses to train it (one run takes about a day);
`--dry_run` prints the 18 train.py commands for a scheduler (one GPU each), and
`--collect_only` tabulates whatever they finished.

Expected: the paper's MNIST-rot table, about 99.1-99.2% for the regular models, below that
for PDO-eConv and the CNN; not measured yet (results go to docs/results.md once they are).
Cost: projected from the GPU benchmark (docs/performance.md, one H200): R-gauss 12 min,
Q-gauss 13 min, D-gauss 20 min per run, R-fd as R-gauss (the same computation); PDO-eConv
and the CNN not measured on a GPU (the CNN trains at 680 images/s on 2 CPU cores). With
those two at most 30 min each, 3 seeds take at most about 6 GPU hours.
"""

import ml_collections

CONFIGS = {
    "R-fd": "configs/mnist_rot_regular_fd.py",
    "R-gauss": "configs/mnist_rot_regular_gauss.py",
    "Q-gauss": "configs/mnist_rot_quotient_gauss.py",
    "D-gauss": "configs/mnist_rot_dihedral_gauss.py",
    "PDO-eConv": "configs/mnist_rot_pdo_econv.py",
    "CNN": "configs/cnn_baseline.py",
}


def get_config() -> ml_collections.ConfigDict:
    """Returns the study: the paper's configs unchanged, 3 seeds each."""
    study = ml_collections.ConfigDict()
    study.seeds = (0, 1, 2)
    study.runs = [
        dict(name=name, config=path, overrides=dict(progress_bar=False))
        for name, path in CONFIGS.items()
    ]
    study.rotation_sweep_degrees = 15.0
    study.rotation_sweep_examples = 10_000
    study.needs_accelerator = True
    return study
