"""What the model converters accept: parameter dtypes and quantisation modes
(mlx-lm's)."""

Q_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
DTYPES = ("float16", "bfloat16", "float32")
