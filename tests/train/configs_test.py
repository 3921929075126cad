"""Every config file loads, validates and builds its model; the paper variants follow the
reference's experiments (docs/design.md)."""

import glob
import importlib
import os

import ml_collections
from absl.testing import absltest, parameterized

from neural_epdo_jax.train import checkpointing
from neural_epdo_jax.train.state import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_NAMES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
    if not p.endswith("__init__.py")
)
NAMED_CONFIGS = [(name, name) for name in CONFIG_NAMES]
PAPER = ("regular_fd", "regular_gauss", "quotient_gauss", "dihedral_gauss", "pdo_econv")

# The four experiments (and the linear baseline with R-fd's channels).
PAPER_MODELS = {
    "regular_fd": dict(
        flip=False, field_type="regular", channels=(16, 24, 32, 32, 48, 64), g=4, s=4,
        reduction=1, discretisation="fd",
    ),
    "regular_gauss": dict(
        flip=False, field_type="regular", channels=(16, 24, 32, 32, 48, 64), g=4, s=4,
        reduction=1, discretisation="gauss",
    ),
    "quotient_gauss": dict(
        flip=False, field_type="regular+quo_4", channels=(12, 16, 24, 24, 32, 64), g=4, s=1,
        reduction=2, discretisation="gauss",
    ),
    "dihedral_gauss": dict(
        flip=True, field_type="regular", channels=(12, 16, 24, 24, 32, 64), g=4, s=1,
        reduction=1, discretisation="gauss",
    ),
    "pdo_econv": dict(
        flip=False, field_type="regular", channels=(16, 24, 32, 32, 48, 64), g=-1,
        discretisation="fd",
    ),
}  # fmt: skip

# The training protocol shared by all of them.
PAPER_PROTOCOL = dict(
    dataset="mnist_rot",
    train_split="train",
    test_split="test",
    num_train_examples=-1,
    num_test_examples=-1,
    augmentation="reference",
    seed=0,
    batch_size=64,
    num_epochs=199,
    learning_rate=2e-3,
    adam_b1=0.9,
    adam_b2=0.999,
    adam_eps=1e-8,
    weight_decay=1e-4,
    lr_boundaries_epochs=(60, 120, 150, 180),
    lr_scales=(0.1, 0.5, 0.5, 0.5),
    reset_adam_every_epoch=False,
    eval_from_epoch=60,
    eval_every_epochs=1,
    dtype="float32",
)


def load(name: str) -> ml_collections.ConfigDict:
    return importlib.import_module(f"configs.{name}").get_config()


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


class ConfigsTest(parameterized.TestCase):
    def test_all_configs_are_found(self):
        for name in ("default", "test", *(f"mnist_rot_{p}" for p in PAPER)):
            self.assertIn(name, CONFIG_NAMES)

    @parameterized.named_parameters(*NAMED_CONFIGS)
    def test_loads_validates_and_builds_model(self, name):
        config = load(name)
        model = validate_config(config)  # Constructs the model: its own checks run.
        self.assertEqual(type(model).__name__, config.model_name)
        self.assertEqual(model.dtype, config.dtype)
        for key, value in config.model.items():
            self.assertEqual(getattr(model, key), value, key)

    @parameterized.named_parameters(*NAMED_CONFIGS)
    def test_same_keys_as_default(self, name):
        # Variants only override: a typo would silently add a key the code never reads.
        config, default = load(name), load("default")
        keys, default_keys = flat_keys(config), flat_keys(default)
        if config.model_name != default.model_name:  # `model`: another class's arguments
            keys = {k for k in keys if not k.startswith("model.")}
            default_keys = {k for k in default_keys if not k.startswith("model.")}
        self.assertEqual(keys, default_keys)

    @parameterized.named_parameters(*NAMED_CONFIGS)
    def test_docstring_gives_command_and_expectation(self, name):
        doc = importlib.import_module(f"configs.{name}").__doc__
        command = "bash run.sh train" if name == "default" else f"--config=configs/{name}.py"
        self.assertIn(command, doc)
        self.assertIn("Expected", doc)

    @parameterized.named_parameters(*[(p, p) for p in PAPER])
    def test_paper_variant_hyper_parameters(self, variant):
        config = load(f"mnist_rot_{variant}")
        expected_model = dict(n=16, order=4, dropout=0.1, kernel_size=5, num_classes=10)
        expected_model.update(PAPER_MODELS[variant])
        for key, value in expected_model.items():
            self.assertEqual(config.model[key], value, f"model.{key}")
        for key, value in PAPER_PROTOCOL.items():
            self.assertEqual(config[key], value, key)

    def test_default_and_test_configs_are_small(self):
        default, test = load("default"), load("test")
        self.assertEqual(default.dataset, "rotated_digits")
        self.assertLess(default.model.n, 16)
        self.assertLessEqual(test.num_train_examples, 100)
        self.assertLessEqual(test.num_test_examples, 100)
        self.assertLessEqual(test.num_epochs, 2)
        # The last training batch is padded, to exercise the mask.
        self.assertNotEqual(test.num_train_examples % test.batch_size, 0)

    def test_execution_keys_reach_the_model_and_do_not_block_resuming(self):
        config = load("default")
        self.assertIsNone(config.model.chunk)  # unset: the model picks per backend
        config.model.chunk, config.model.eval_chunk, config.model.impl = 2, 0, "dense"
        model = validate_config(config)
        self.assertEqual((model.chunk, model.eval_chunk, model.impl), (2, 0, "dense"))
        with self.assertRaises(TypeError):  # typed: --config.model.chunk=abc is refused
            config.model.chunk = "abc"
        # A run may resume with other values, also from a config.json written before these
        # keys existed; a key that changes the math is still reported.
        saved = checkpointing.config_to_dict(load("default"))
        for key in ("impl", "chunk", "eval_chunk"):
            del saved["model"][key]
        requested = checkpointing.config_to_dict(config)
        self.assertEqual(checkpointing.config_differences(saved, requested), [])
        config.model.n = 4
        self.assertEqual(
            checkpointing.config_differences(saved, checkpointing.config_to_dict(config)),
            ["model.n: 8 in the workdir, 4 requested"],
        )


if __name__ == "__main__":
    absltest.main()
