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
