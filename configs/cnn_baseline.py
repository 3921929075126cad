"""Plain CNN baseline: R-gauss's layout and protocol with ordinary 5x5 convolutions.

  python train.py --config=configs/cnn_baseline.py

Workdir runs/cnn_baseline (rerun the command to resume). `neural_epdo_jax.cnn.CNN`: six
5x5 conv blocks with BatchNorm and ReLU, 2x2 max pools after blocks 2 and 4, channel dropout
after blocks 3-6, global max pool and the same head as the paper's networks. Widths (20,
28, 36, 36, 56, 76), R-fd's field counts scaled by about 1.17, give 235,110 trainable
parameters: 0.4% more than R-gauss's 234,186. The same data and protocol as R-fd
(`mnist_rot_regular_fd.py`: MNIST-rot, 'reference' rotation augmentation, 199 epochs).
Nothing in it is rotation equivariant: it learns every orientation from the data.
Expected: below the equivariant networks on MNIST-rot; not measured yet (see
configs/studies/paper_variants.py; results in docs/results.md once run).
Cost: training about 1 hour on 2 CPU cores (680 images/s in a trial run), plus the 140
evaluations of the 50,000 test images; not measured on a GPU.
"""

import ml_collections

from configs import mnist_rot_regular_fd


def get_config() -> ml_collections.ConfigDict:
    """Returns the CNN baseline configuration."""
    config = mnist_rot_regular_fd.get_config()

    # Model: `config.model` holds exactly CNN's constructor arguments (but dtype).
    config.model_name = "CNN"
    config.model = ml_collections.ConfigDict()
    config.model.channels = (20, 28, 36, 36, 56, 76)
    config.model.kernel_size = 5
    config.model.dropout = 0.1
    config.model.num_classes = 10
    return config
