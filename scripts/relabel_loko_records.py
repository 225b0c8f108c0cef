"""Relabel `loraopt bench online` records of ``--methods loko`` that ran under LoKO's former softmax floor.

Until 2026-12-02 LoKO's softmax default floored only the all-ones direction of R at 1e-4; the default is now every
eigenvalue clamped at 1e-2 (``loraopt.optim.loko_config.DEFAULT_NOISE_FLOOR``, benchmarks/notes/loko.md). A record
keeps the settings it ran with (``optimizer_defaults``), so the runs of ``loko`` made under the former default are
the method ``loko-ones`` (``noise_floor="ones", r_min=1e-4``, the same filter): this moves each such record to that
name, with a ``relabelled`` note, so that ``--merge`` does not mix the two defaults under one name. Records already
at the current default are left alone.

With ``--adopt``, each run of ``loko-floor`` at r_min 1e-2 (the current default's settings exactly) is also written as
a run of ``loko`` (with an ``adopted_from`` note) where that stream and seed has no ``loko`` run yet, so the summary's
"LoKO (library defaults)" row shows the current default.

    python scripts/relabel_loko_records.py [--adopt] benchmarks/results/online/gpu_size/records
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def former_default(record: dict) -> bool:
    settings = record["record"].get("optimizer_defaults", {})
    return (record["task"]["method"] == "loko" and settings.get("observation", "softmax") == "softmax"
            and settings.get("noise_floor") in (None, "ones") and settings.get("r_min") == 1e-4)


def relabel(folder: Path) -> list:
    moved = []
    for path in sorted(folder.rglob("loko-g0-*.json")):
        record = json.loads(path.read_text())
        if not former_default(record):
            continue
        record["task"]["method"] = "loko-ones"
        record["relabelled"] = ("ran as `--methods loko` under LoKO's former softmax default (noise_floor None = the "
                                "all-ones direction, r_min 1e-4), the settings of `loko-ones`")
        target = path.with_name("loko-ones-" + path.name[len("loko-"):])
        target.write_text(json.dumps(record))
        path.unlink()
        moved.append((path.name, target.name))
    return moved


def adopt(folder: Path) -> list:
    from loraopt.optim.loko_config import DEFAULT_NOISE_FLOOR, DEFAULT_R_MIN

    copied = []
    for path in sorted(folder.rglob("loko-floor-g*.json")):
        record = json.loads(path.read_text())
        settings = record["record"].get("optimizer_defaults", {})
        if (settings.get("noise_floor"), settings.get("r_min")) != (DEFAULT_NOISE_FLOOR["softmax"],
                                                                     DEFAULT_R_MIN["softmax"]):
            continue
        target = path.with_name("loko-g0-" + path.name.split("-", 3)[3])  # loko-floor-g1-s0-n... -> loko-g0-s0-n...
        if target.exists():
            continue
        record["task"].update(method="loko", grid_index=0)
        record["adopted_from"] = (f"{path.name}: `loko-floor` at r_min 1e-2, the settings of LoKO's current softmax "
                                  "default (noise_floor clamp, r_min 1e-2)")
        target.write_text(json.dumps(record))
        copied.append((path.name, target.name))
    return copied


if __name__ == "__main__":
    args = sys.argv[1:]
    adopting = "--adopt" in args
    for folder in [a for a in args if a != "--adopt"]:
        for old, new in relabel(Path(folder)):
            print(f"{folder}: {old} -> {new}")
        for old, new in (adopt(Path(folder)) if adopting else []):
            print(f"{folder}: {old} copied as {new}")
