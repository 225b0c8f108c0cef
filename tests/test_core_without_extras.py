"""The core needs torch alone: ``import loraopt`` and the optimizers work where no extra is installed, and whatever
needs an extra says which one.

The environment without extras is simulated in a subprocess whose import system finds no package of the extras (its
meta-path finders are wrapped to find nothing of them, so they behave as if not installed): fast and offline.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Top-level modules of every extra's packages (pyproject.toml) and of what they pull in.
EXTRA_MODULES = ("peft", "transformers", "accelerate", "lightning", "pytorch_lightning", "lightning_fabric",
                 "torchmetrics", "numpy", "tqdm", "matplotlib", "sklearn", "safetensors", "huggingface_hub",
                 "tokenizers", "scipy", "pandas")

_SCRIPT = textwrap.dedent(
    r"""
    import sys

    BLOCKED = set(sys.argv[1].split(","))


    class Hidden:
        # Wraps a meta-path finder so that it finds nothing of the blocked packages: then an import raises
        # ModuleNotFoundError and importlib.util.find_spec returns None, exactly as for a package not installed.
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, name):
            return getattr(self.finder, name)


    sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
    import warnings

    warnings.simplefilter("ignore")  # torch notes that numpy is missing
    import torch
    from torch import nn

    import loraopt


    class LoRALinear(nn.Module):
        # A hand-written LoRA layer: a frozen base and lora_A / lora_B modules, as PEFT names them.
        def __init__(self, d_in, d_out, r):
            super().__init__()
            self.base_layer = nn.Linear(d_in, d_out).requires_grad_(False)
            self.lora_A = nn.Linear(d_in, r, bias=False)
            self.lora_B = nn.Linear(r, d_out, bias=False)
            nn.init.normal_(self.lora_B.weight, std=0.1)

        def forward(self, x):
            return self.base_layer(x) + self.lora_B(self.lora_A(x))


    def model():
        torch.manual_seed(0)
        return nn.Sequential(LoRALinear(6, 8, 2), nn.Tanh(), LoRALinear(8, 3, 2))


    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for name, hp in [("adamw", dict(lr=1e-2)), ("psi-lora", dict(lr=1e-2)), ("scaled-psi-lora", dict(lr=0.1)),
                     ("svdlora", dict(lr=1e-2)), ("loko", dict(num_outputs=3))]:
        net = model()
        before = [p.detach().clone() for p in net.parameters()]
        optimizer = loraopt.create_optimizer(name, net, **hp)
        if name == "loko":
            optimizer.observe(net(x), y)
        else:
            nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        moved = any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
        assert moved and all(torch.isfinite(p).all() for p in net.parameters()), name
        print("stepped", name)

    def needs(extra, action):
        try:
            action()
        except ImportError as error:
            assert f'pip install "loraopt[{extra}]"' in str(error), str(error)
            print("needs", extra)
        else:
            raise AssertionError(f"expected an ImportError naming the {extra} extra")

    needs("peft", lambda: loraopt.create_optimizer("lora-plus", model(), lr=1e-3))
    needs("peft", lambda: loraopt.create_optimizer("riemannian-adamw", model(), lr=1e-3))
    needs("hf", lambda: __import__("loraopt.integrations.hf"))
    needs("hf", lambda: loraopt.integrations.LoKOTrainer)
    needs("lightning", lambda: __import__("loraopt.integrations.lightning"))

    from loraopt.cli import main

    for argv in (["bench", "linear", "--quick"], ["finetune", "--help"], ["demo"]):
        assert main(argv) == 2, argv
    assert main(["optimizers"]) == 0
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("done")
    """
)


def test_core_imports_and_steps_without_the_extras():
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, ",".join(EXTRA_MODULES)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("adamw", "psi-lora", "scaled-psi-lora", "svdlora", "loko"):
        assert f"stepped {name}" in out
    assert out.count("needs peft") == 2 and out.count("needs hf") == 2 and "needs lightning" in out
    assert "needs the 'bench' extra" in result.stderr and 'pip install "loraopt[bench]"' in result.stderr
    assert out.rstrip().endswith("done")


def test_the_core_distribution_depends_on_torch_alone():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]] == ["torch"]
    extras = project["optional-dependencies"]
    assert {"peft", "hf", "lightning", "bench", "test"} <= set(extras)
    # The test extra installs every other extra: the suite exercises all of them.
    assert any(req.startswith("loraopt[") and all(e in req for e in ("peft", "hf", "lightning", "bench"))
               for req in extras["test"])
