"""The paper's MNIST-rot networks as `models.NeuralEPDONet` arguments (the README's variants
table; the reference's `pdo_net` flags). Plain data with no imports, so that scripts
can list the variants before importing JAX; `models.PAPER_VARIANTS` is the same dict."""

PAPER_VARIANTS: dict[str, dict] = {
    "R-fd": dict(),
    "R-gauss": dict(discretisation="gauss"),
    "Q-gauss": dict(
        field_type="regular+quo_4",
        channels=(12, 16, 24, 24, 32, 64),
        s=1,
        reduction=2,
        discretisation="gauss",
    ),
    "D-gauss": dict(
        flip=True, channels=(12, 16, 24, 24, 32, 64), s=1, reduction=1, discretisation="gauss"
    ),
    "PDO-eConv": dict(g=-1),
}
