# Import rsa_mlx before anything imports mlx, so the fast BLAS is loaded first.
import rsa_mlx  # noqa: F401
