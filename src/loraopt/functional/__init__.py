"""Pure tensor functions: LoRSum and its dense references, metric statistics, the diagonal EKF."""

from .lorsum import (
    LoRSumResult,
    lorsum,
    lorsum_from_projections,
    lowrank_sq_norm,
    project_left,
    project_right,
    scaled_svd_project,
    spd_solve,
    svd_factors,
    svd_project,
)
from .ekf import (
    EKFConfig,
    EKFInfo,
    EKFResult,
    FullEKFResult,
    apply_noise_floor,
    block_noise,
    cholesky_with_jitter,
    diag_ekf_update,
    floor_min_eigenvalue,
    floor_ones_direction,
    full_ekf_update,
    noise_ema_update,
    scalar_ekf_update,
)
