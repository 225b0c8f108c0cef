"""Pure tensor functions: LoRSum and its dense references, metric statistics, the diagonal EKF, LoKO's observation
models and Jacobian rows."""

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
    LossGradient,
    OutputRows,
    apply_noise_floor,
    block_noise,
    cholesky_with_jitter,
    diag_ekf_update,
    ekf_step,
    floor_min_eigenvalue,
    floor_ones_direction,
    noise_ema_update,
    scalar_ekf_update,
)
from .reference import FullEKFResult, full_ekf_update
from .observations import LossObservation, Observation, RegressionObservation, SoftmaxObservation
