"""Every code snippet of README.md runs as written.

Python blocks run on a tiny randomly initialised BERT classifier saved as a Hugging Face folder: the test only
replaces the model path (``path = "path/to/model"``). Its word-level vocabulary holds every word of the README
snippets, so the sentences the snippets train on are real inputs. Command lines in the bash blocks are parsed by the
command's own parser (their jobs take minutes and real models, so they are not run here).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from loraopt.cli import BENCHMARKS, main

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
RUN_SH = README.parent / "run.sh"
MODEL_LINE = re.compile(r'^path = "path/to/model".*$', re.MULTILINE)


def _blocks(language: str) -> list[tuple[int, str]]:
    """(first line number, code) of each fenced block of ``language``."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    inside, start, body = False, 0, []
    for number, line in enumerate(lines, start=1):
        if not inside and line.strip() == f"```{language}":
            inside, start, body = True, number + 1, []
        elif inside and line.strip() == "```":
            inside = False
            blocks.append((start, "\n".join(body) + "\n"))
        elif inside:
            body.append(line)
    assert not inside, f"README.md: unclosed ```{language} block at line {start - 1}"
    return blocks


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = _blocks("bash")


def _block(marker: str) -> tuple[int, str]:
    found = [(line, code) for line, code in PYTHON_BLOCKS if marker in code]
    assert len(found) == 1, f"expected one README python block with {marker!r}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = sorted({w for _, code in PYTHON_BLOCKS for s in re.findall(r'"([^"]*)"', code)
                    for w in re.findall(r"[a-z]+|[^\sa-z]", s.lower())})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})
    torch.manual_seed(0)
    # initializer_range 0.2 (BERT's default is 0.02): with the default, a random 2-layer encoder maps every sentence
    # to nearly the same [CLS] feature, which no optimizer can separate; a pretrained encoder's features differ.
    config = BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, initializer_range=0.2)
    folder = tmp_path_factory.mktemp("readme-model")
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _run_block(marker: str, folder: Path) -> dict:
    import contextlib
    import io

    line, code = _block(marker)
    assert len(MODEL_LINE.findall(code)) == 1, "the snippet should load its model from one `path = ...` line"
    code = MODEL_LINE.sub(f"path = {str(folder)!r}", code)
    namespace: dict = {"__name__": "__readme__"}
    torch.manual_seed(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)  # line numbers match README.md
    namespace["__printed__"] = printed.getvalue()
    return namespace


def _loss_and_accuracy(model, namespace) -> tuple[float, float]:
    encoded, labels = namespace["encoded"], namespace["labels"]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    return loss, float((logits.argmax(-1) == labels).float().mean())


def _base_loss(folder: Path, namespace) -> float:
    """The loss before training: LoRA starts at B = 0, so the untrained adapter model is the base model."""
    from transformers import AutoModelForSequenceClassification

    return _loss_and_accuracy(AutoModelForSequenceClassification.from_pretrained(folder), namespace)[0]


def _lora_moved(model) -> bool:
    return any(float(p.detach().abs().max()) > 0 for name, p in model.named_parameters() if "lora_B" in name)


@pytest.fixture(scope="module")
def peft_run(tiny_model_folder):
    return _run_block('create_optimizer("proj-psi-lora"', tiny_model_folder)


def test_readme_has_the_snippets_this_file_runs():
    assert len(PYTHON_BLOCKS) == 2 and len(BASH_BLOCKS) == 2


def test_peft_snippet_is_complete_and_trains(peft_run):
    model = peft_run["model"]
    assert _lora_moved(model)  # the optimizer stepped the LoRA factors
    assert peft_run["scheduler"].get_last_lr()[0] == pytest.approx(0.0)  # total_iters matches the loop
    assert len(re.findall(r"epoch \d+: loss", peft_run["__printed__"])) == peft_run["epochs"]


def test_peft_snippet_learns(peft_run, tiny_model_folder):
    """30 steps of the snippet at the factories' defaults learn the toy task. For scale, on this model: the factored
    default 0.728 -> 0.571 (5 of 6 sentence kinds right), AdamW at 3e-3 in its place 0.728 -> 0.451 (5 of 6), the
    plain step (lr 0.03, clipped) 0.728 -> 0.188 (6 of 6); chance is 3 of 6."""
    before = _base_loss(tiny_model_folder, peft_run)
    after, accuracy = _loss_and_accuracy(peft_run["model"], peft_run)
    assert after < 0.85 * before, (before, after)
    assert accuracy >= 0.8, accuracy


def test_loko_snippet_is_complete_and_learns(tiny_model_folder):
    namespace = _run_block('create_optimizer("loko"', tiny_model_folder)
    model = namespace["model"]
    assert _lora_moved(model)
    assert namespace["optimizer"].skipped_steps == 0
    before = _base_loss(tiny_model_folder, namespace)
    after, _ = _loss_and_accuracy(model, namespace)
    assert after < before, (before, after)


# ---------------------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------------------

def _command_lines() -> list[str]:
    lines = []
    for _, code in BASH_BLOCKS:
        for line in code.splitlines():
            command = line.split("#", 1)[0].strip()
            if command:
                lines.append(command)
    return lines


def _loraopt_invocations() -> list[list[str]]:
    """Each `loraopt ...` line as argv lists; `bench a | b | c` stands for three commands."""
    calls = []
    for line in _command_lines():
        if not line.startswith("loraopt "):
            continue
        if line.startswith("loraopt bench ") and "|" in line:
            calls += [["bench", name.strip()] for name in line[len("loraopt bench "):].split("|")]
        else:
            calls.append(shlex.split(line)[1:])
    return calls


def test_run_sh_lines_name_existing_jobs():
    jobs = set(re.findall(r"^\s+([a-z-]+)\)", RUN_SH.read_text(), flags=re.MULTILINE))
    used = [shlex.split(line)[2] for line in _command_lines() if line.startswith("bash run.sh ")]
    assert used and all(job in jobs for job in used), (used, jobs)


@pytest.mark.parametrize("argv", _loraopt_invocations(), ids=" ".join)
def test_command_line_parses(argv, capsys):
    from loraopt_bench import finetune

    command, args = argv[0], argv[1:]
    if command == "finetune":
        config = finetune.config_from_args(finetune.finetune_parser().parse_args(args))
        config.validate()  # optimizer name, ranges
        assert finetune.resolve_task(config.task)[0] == finetune.MODEL_KINDS[config.model]
    elif command == "evaluate":
        finetune.evaluate_parser().parse_args(args)
    elif command == "demo":
        finetune.demo_parser().parse_args(args)
    elif command == "bench":
        assert args[0] in BENCHMARKS
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", *args, "--help"])
        assert exit_info.value.code == 0
    elif command == "--version":
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("loraopt ")
    elif command == "optimizers":
        assert main(argv) == 0
        assert "scaled-psi-lora" in capsys.readouterr().out
    else:
        pytest.fail(f"README command `loraopt {' '.join(argv)}` is not a loraopt command")
