"""Default: a small C_8 Neural ePDO network on the bundled rotated digits, CPU-sized.

  bash run.sh train        # = python train.py --config=configs/default.py --workdir=runs/default

Trains 14 epochs on the 4,000 bundled rotated digits (no download), the last four at a
tenth of the learning rate, and prints the accuracy on their 1,000 test digits; rerunning
resumes from runs/default.
Expected: last-epoch test accuracy 0.963 on a 2-core CPU (seed 0). Runs are deterministic on
one machine; summing in another order (another device count, the XLA formulation instead of
the C++ kernel) moves it by a few tenths of a point. 20,466 parameters.
Cost: about 3-4 minutes on 2 idle CPU cores (3 min 13 s with the compilation cache warm).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default (quick, CPU) configuration."""
    config = ml_collections.ConfigDict()

    # Data. `data_dir`, `manual_dir`, `idx_dir`: '' means the dataset's default location.
    config.dataset = "rotated_digits"
    config.train_split = "train"
    config.test_split = "test"
    config.data_dir = ""
    config.manual_dir = ""
    config.idx_dir = ""
    config.idx_rotate = False  # 'idx' only: rotate each image by a seeded uniform angle.
    config.num_train_examples = -1  # -1: the whole split; else a fixed subset of N examples.
    config.num_test_examples = -1
    # 'reference' | 'bilinear' | 'none' (README, "Data"). The bundled digits are already rotated at
    # random and the network is C8-equivariant: without augmentation it learns fastest.
    config.augmentation = "none"

    # Model: `config.model` holds exactly NeuralEPDONet's constructor arguments (but dtype).
    config.model_name = "NeuralEPDONet"
    config.model = ml_collections.ConfigDict()
    config.model.n = 8
    config.model.flip = False
    config.model.field_type = "regular"
    config.model.channels = (8, 8, 12, 12, 16, 16)
    config.model.order = 4
    config.model.g = 4
    config.model.s = 4
    config.model.reduction = 1
    config.model.discretisation = "fd"
    config.model.kernel_size = 5
    config.model.dropout = 0.1
    config.model.dropout_per_field = False  # the reference drops single channels.
    config.model.num_classes = 10
    # How it runs, not what it computes (the same math; a run may resume with other values):
    # the Neural ePDO layers' formulation ('fourier', or 'dense': the straightforward one),
    # images per layer chunk, and per step of the inference loop (unset: per backend; see
    # NeuralEPDONet). E.g. --config.model.eval_chunk=0 evaluates the whole batch at once.
    config.model.impl = "fourier"
    config.model.chunk = ml_collections.config_dict.placeholder(int)
    config.model.eval_chunk = ml_collections.config_dict.placeholder(int)
    config.dtype = "float32"  # activations; 'bfloat16' keeps float32 parameters.

    # Optimisation: Adam with coupled L2 (PyTorch `weight_decay`), piecewise constant LR.
    config.seed = 0
    config.batch_size = 32
    config.num_epochs = 14
    config.learning_rate = 1e-2  # 5x the paper's: few epochs; 2e-3 barely moves in 10.
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_eps = 1e-8
    config.weight_decay = 1e-4
    # Epoch b (counted from 1) is the first epoch at the scaled rate; scales are cumulative.
    config.lr_boundaries_epochs = (11,)
    config.lr_scales = (0.1,)
    # The reference re-creates Adam every epoch (moments and bias correction reset).
    config.reset_adam_every_epoch = False

    # Evaluation, logging, checkpoints.
    config.eval_batch_size = 250
    config.eval_every_epochs = 1
    config.eval_from_epoch = 1  # the reference evaluates from epoch 60 on.
    config.log_every_steps = 20
    config.checkpoint_every_epochs = 1
    config.progress_bar = True

    # Multi-host: call jax.distributed.initialize() first (cluster auto-detection).
    config.distributed = False
    return config
