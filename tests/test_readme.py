"""The README works as written, offline.

- Every ```python block runs, in README order, each in a fresh namespace (a newcomer copies one section at a time),
  in one temporary working folder where `data/` is the bundled data and files written by earlier snippets stay.
- Snippets that load the authors' converted checkpoints (`nepa-vit-b`, `nepa-vit-b-in1k`) get offline stand-ins: tiny
  synthetic checkpoints in the authors' `vit_nepa` layout saved as local folders under the Hub ids the README
  converts from (`SixAILab/...`; a local folder wins over the Hub), turned into `nepa-vit-b` & co. by the README's
  own `python -m nepa_hf.hub.convert` commands. The README's code then runs unchanged.
- Every command in a ```bash block names a script or module that exists, and every `--flag` it passes is one that
  program lists in its `--help` (launcher flags before the script are checked against `accelerate launch` /
  `torchrun`). The commands that take seconds offline (conversion, publishing with `--dry-run`) run for real, in
  README order between the snippets. Flags named in a section's text belong to a program that section runs.
- A snippet that loads through the Auto classes or a pipeline imports nepa_hf first, so it also works copied alone.
"""

import contextlib
import importlib
import importlib.util
import io
import re
import runpy
import shlex
import sys
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from unittest import mock

import pytest

from nepa_hf.hub.model_card import PUBLISHED_CHECKPOINTS
from reference_checkpoints import reference_config, reference_state_dict, write_reference_folder

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# Stand-ins for the Hub checkpoints the README converts: like the releases, the pretrained one is causal with a
# non-affine QK-norm, the fine-tuned classifier bidirectional with an affine QK-norm (hidden 32, 2 blocks).
REFERENCE_STAND_INS = {
    "SixAILab/nepa-base-patch14-224": dict(architecture="ViTNepaForPreTraining", is_causal=True, qk_norm_affine=False),
    "SixAILab/nepa-base-patch14-224-sft": dict(
        architecture="ViTNepaForImageClassification", is_causal=False, qk_norm_affine=True
    ),
}
PLACEHOLDERS = {"<org>": "readme-test"}
LAUNCHERS = ("accelerate", "torchrun")
# Shell scripts of the README that pass their arguments on to a Python script.
SHELL_WRAPPERS = {"scripts/run_demo.sh": "examples/demo.py"}


# ---------------------------------------------------------------------------------------------------------------
# Reading the README
# ---------------------------------------------------------------------------------------------------------------


def code_blocks(text: str | None = None) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the README (or of `text`), in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text() if text is None else text, flags=re.S | re.M)


def readme_sections() -> list[tuple[str, str]]:
    """(heading, text) of each `## ` section; the text before the first one is the intro."""
    return [(part.splitlines()[0], part) for part in re.split(r"^## ", README.read_text(), flags=re.M)]


def python_snippets() -> list[str]:
    return [code for language, code in code_blocks() if language == "python"]


@dataclass
class Command:
    line: str  # as written (continuations joined)
    launcher: str | None  # "accelerate", "torchrun" or None
    launcher_args: list[str]
    program: str  # a path relative to the repo, or "-m package.module"
    args: list[str]


def readme_commands(text: str | None = None) -> list[Command]:
    """The commands of all the README's (or `text`'s) bash blocks."""
    return [c for language, code in code_blocks(text) if language == "bash" for c in parse_commands(code)]


def parse_commands(block: str) -> list[Command]:
    """The `python`, `accelerate launch`, `torchrun` and `bash` commands of a bash block."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # ACCELERATE_USE_CPU=1 ...
            words.pop(0)
        if not words:
            continue
        line = " ".join(line.split())
        if words[0] in ("python", "bash"):
            if words[1] == "-m":
                commands.append(Command(line, None, [], f"-m {words[2]}", words[3:]))
            else:
                commands.append(Command(line, None, [], words[1], words[2:]))
        elif words[0] in LAUNCHERS:
            start = 2 if words[0] == "accelerate" else 1
            assert words[0] != "accelerate" or words[1] == "launch", f"unexpected accelerate command: {line}"
            script = next((i for i, word in enumerate(words) if word.endswith(".py")), None)
            assert script is not None, f"no script in the launcher command: {line}"
            commands.append(Command(line, words[0], words[start:script], words[script], words[script + 1 :]))
        else:
            raise AssertionError(f"The README runs a command this test does not know how to check: {line}")
    return commands


def flags(args: list[str]) -> list[str]:
    return [word.split("=", 1)[0] for word in args if word.startswith("--")]


def mentioned_flags(text: str) -> set[str]:
    """`--flags` that a piece of the README mentions outside its commands: in prose and in bash comments."""
    prose, language = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            language = line[3:] if language is None else None
        elif language is None:
            prose.append(line)
        elif language == "bash" and re.search(r"(^|\s)#", line):
            prose.append(re.split(r"(?:^|\s)#", line, maxsplit=1)[1])
    return set(re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", "\n".join(prose)))


# ---------------------------------------------------------------------------------------------------------------
# What the programs accept
# ---------------------------------------------------------------------------------------------------------------


@cache
def help_text(program: str) -> str:
    """What `python <program> --help` prints. Run in this process: a fresh interpreter per script costs ~9 s of
    imports, and the parsers are the same."""
    stdout, code = io.StringIO(), "did not exit"
    try:
        with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # runpy: "found in sys.modules" for an already imported module
            if program.startswith("-m "):
                with mock.patch.object(sys, "argv", [program[3:], "--help"]):
                    runpy.run_module(program[3:], run_name="__main__", alter_sys=True)
            else:
                with mock.patch.object(sys, "argv", [str(REPO / program), "--help"]):
                    runpy.run_path(str(REPO / program), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    assert code in (0, None), f"`python {program} --help` exited with {code!r}:\n{stdout.getvalue()}"
    return stdout.getvalue()


@cache
def launcher_help(launcher: str) -> str:
    """What `accelerate launch --help` / `torchrun --help` print (accelerate hides options unless argv says
    `launch --help` alone)."""
    if launcher == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        with mock.patch.object(sys, "argv", ["accelerate", "launch", "--help"]):
            return launch_command_parser().format_help()
    from torch.distributed.run import get_args_parser

    return get_args_parser().format_help()


def accepted_flags(help_output: str) -> set[str]:
    """The option strings of an argparse help: lines `  --name VALUE, --alias VALUE   help text`.

    Only the invocation column counts, not flags mentioned in descriptions or help texts."""
    accepted = set()
    for line in help_output.splitlines():
        if re.match(r"  -", line):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            accepted.update(re.findall(r"--[\w-]+", invocation))
    return accepted


def python_program(command: Command) -> str | None:
    """The Python script or module that receives the command's arguments (None for other shell scripts)."""
    program = SHELL_WRAPPERS.get(command.program, command.program)
    return None if program.endswith(".sh") else program


def unknown_flags(command: Command) -> list[str]:
    program = python_program(command)
    problems = [] if program is None else [
        f"{flag} (not in `python {program} --help`)" for flag in flags(command.args)
        if flag not in accepted_flags(help_text(program))
    ]  # fmt: skip
    if command.launcher:
        problems += [f"{flag} (not a `{command.launcher}` option)" for flag in flags(command.launcher_args)
                     if flag not in accepted_flags(launcher_help(command.launcher))]  # fmt: skip
    return problems


def section_accepted_flags(section: str) -> set[str]:
    """Every flag the programs (and launchers) run in a section's bash blocks accept."""
    accepted = set()
    for command in readme_commands(section):
        if python_program(command) is not None:
            accepted |= accepted_flags(help_text(python_program(command)))
        if command.launcher:
            accepted |= accepted_flags(launcher_help(command.launcher))
    return accepted


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_readme_code_fences_are_balanced():
    fences = [line for line in README.read_text().splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0, "unbalanced ``` fences in README.md"
    assert all(line in ("```", "```python", "```bash", "```text") for line in fences), sorted(set(fences))


def test_readme_has_snippets_and_commands_for_every_tool():
    assert len(python_snippets()) >= 10
    commands = readme_commands()
    assert {c.program for c in commands} >= {
        "scripts/run_demo.sh", "scripts/run_tests.sh", "examples/demo.py", "examples/pretrain_nepa.py",
        "examples/finetune_classification.py", "examples/finetune_segmentation.py", "examples/evaluate_nepa.py",
        "examples/visualize.py", "-m nepa_hf.hub.convert", "-m nepa_hf.models.nepa.convert_nepa",
        "-m nepa_hf.hub.publish",
    }  # fmt: skip
    assert {c.launcher for c in commands} >= set(LAUNCHERS)
    ci_lines = {line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()}
    assert any(shlex.join(["bash", c.program, *c.args]) in ci_lines for c in commands), "no README command in .ci/run"


def test_flag_readers():
    help_output = "usage: x [--a A]\n\nUse --b.\n  -h, --help   show\n  --a A, --a-alias A  the a\n  --c    see --d\n"
    assert accepted_flags(help_output) == {"--help", "--a", "--a-alias", "--c"}
    text = "Use `--x`.\n|---|---|\n```bash\npython a.py --y 1  # or --z\n```\n```python\nf('--w')\n```\n"
    assert mentioned_flags(text) == {"--x", "--z"}


def test_readme_commands_use_existing_programs_and_accepted_flags():
    problems = []
    for command in readme_commands():
        if command.program.startswith("-m "):
            exists = importlib.util.find_spec(command.program[3:]) is not None
        else:
            exists = (REPO / command.program).is_file()
        if not exists:
            problems.append(f"{command.line}\n    no {command.program} in the repository")
        elif bad := unknown_flags(command):
            problems.append(f"{command.line}\n    " + ", ".join(bad))
    assert not problems, "README commands that would fail:\n" + "\n".join(problems)


def test_shell_wrappers_pass_their_arguments_on():
    for script, program in SHELL_WRAPPERS.items():
        assert f'{program} "$@"' in (REPO / script).read_text(), f"{script} no longer runs {program} with its args"


def test_readme_flags_in_text_are_accepted_by_the_sections_programs():
    """A flag the text names (`--ema`, `--preset`, ... or in a comment) belongs to a program the section runs."""
    problems = []
    for heading, section in readme_sections():
        unknown = mentioned_flags(section) - section_accepted_flags(section)
        if unknown:
            programs = sorted({c.program for c in readme_commands(section)}) or "no commands"
            problems.append(f"## {heading}: {sorted(unknown)} (section runs {programs})")
    assert not problems, "README text names flags its commands do not take:\n" + "\n".join(problems)


def test_each_python_snippet_imports_nepa_hf_before_the_auto_classes():
    """Copied alone into a fresh interpreter, a snippet that loads through an Auto class or a pipeline must import
    nepa_hf first (or say trust_remote_code=True). Running the snippets here cannot show it: nepa_hf is imported."""
    problems = []
    for index, snippet in enumerate(python_snippets()):
        use = re.search(r"\bAuto\w+\.from_pretrained\(|\bpipeline\(", snippet)
        registration = re.search(r"^(import nepa_hf|from nepa_hf[\w.]* import)", snippet, flags=re.M)
        if use and "trust_remote_code=True" not in snippet and (not registration or registration.start() > use.start()):
            problems.append(f"python snippet {index}:\n{snippet}")
    assert not problems, "snippets using Auto classes without importing nepa_hf first:\n" + "\n".join(problems)


def offline_args(command: Command) -> list[str] | None:
    """The arguments to run a README command with here, or None where it is only checked (too slow offline, or an
    upload). Placeholders get values; publishing the stand-in of one of our published checkpoints gets a card name
    of its own (the tool rightly refuses to put the ViT-B card on a 2-block stand-in)."""
    if command.program in ("-m nepa_hf.hub.convert", "-m nepa_hf.models.nepa.convert_nepa"):
        args = list(command.args)
    elif command.program == "-m nepa_hf.hub.publish" and "--dry-run" in command.args:
        args = list(command.args)
        model = args[args.index("--model") + 1]
        if model in PUBLISHED_CHECKPOINTS:
            args += ["--name", f"{model}-stand-in"]
    else:
        return None
    for placeholder, value in PLACEHOLDERS.items():
        args = [arg.replace(placeholder, value) for arg in args]
    assert not any("<" in arg for arg in args), f"unfilled placeholder in: {command.line}"
    return args


def prepare_workdir(folder: Path) -> None:
    """What a newcomer has: the bundled data, and (as tiny stand-ins) the Hub checkpoints the README converts."""
    (folder / "data").symlink_to(REPO / "data")
    for seed, (repo_id, variant) in enumerate(REFERENCE_STAND_INS.items()):
        config = reference_config(**variant)
        write_reference_folder(folder / repo_id, config, reference_state_dict(config, seed=seed))


@pytest.mark.slow
def test_readme_runs_in_order(tmp_path, monkeypatch):
    """The python snippets and the cheap commands, in README order, as a newcomer would run them."""
    prepare_workdir(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # dry runs need no token
    ran = set()
    for index, (language, code) in enumerate(code_blocks()):
        if language == "python":
            try:
                exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__main__"})
            except Exception as error:  # pragma: no cover - failure path
                pytest.fail(f"README python block {index} failed: {error!r}\n{code}")
            continue
        if language != "bash":  # e.g. the ```text layout tree
            continue
        for command in parse_commands(code):
            args = offline_args(command)
            if args is None:
                continue
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):  # as `python -m <module> <args>` would run it
                exit_code = importlib.import_module(command.program[3:]).main(args)
            assert exit_code == 0, f"{command.line} failed:\n{stdout.getvalue()}"
            if command.program == "-m nepa_hf.hub.publish":
                assert "ok: load-back with trust_remote_code and without nepa_hf" in stdout.getvalue()
            ran.add(command.program)
    assert ran == {"-m nepa_hf.hub.convert", "-m nepa_hf.models.nepa.convert_nepa", "-m nepa_hf.hub.publish"}


def test_readme_backbone_loaders_work_on_a_local_folder(tmp_path):
    """The README's ways to load a saved backbone folder work, whatever AutoBackbone does with it."""
    import torch
    from transformers import AutoBackbone

    from nepa_hf import NepaBackbone, NepaConfig

    text = " ".join(README.read_text().split())
    assert "`NepaBackbone.from_pretrained(local_dir)` and `AutoBackbone.from_config(config)` work on local folders" in text
    config = NepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    saved = NepaBackbone(config).eval()
    saved.save_pretrained(tmp_path / "backbone")
    pixels = torch.randn(1, 3, 28, 28)
    loaded = NepaBackbone.from_pretrained(tmp_path / "backbone").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).feature_maps, saved(pixels).feature_maps, rtol=0, atol=0)
    assert type(AutoBackbone.from_config(loaded.config)) is NepaBackbone


def test_readme_autobackbone_note_holds_for_the_installed_transformers(tmp_path):
    """The README says how `AutoBackbone.from_pretrained(local_dir)` fails; while it does, it must fail that way."""
    import transformers
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoBackbone

    from nepa_hf import NepaBackbone, NepaConfig

    text = " ".join(README.read_text().split())
    assert "AutoBackbone.from_pretrained(local_dir)` fails in the locked transformers before reaching NEPA" in text
    assert "HFValidationError: Repo id must be in the form 'repo_name' or 'namespace/repo_name'" in text
    config = NepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    NepaBackbone(config).save_pretrained(tmp_path / "backbone")
    try:
        AutoBackbone.from_pretrained(str((tmp_path / "backbone").resolve()))
    except HFValidationError as error:
        assert "Repo id must be in the form 'repo_name' or 'namespace/repo_name'" in str(error)
    else:
        pytest.skip(
            f"AutoBackbone.from_pretrained(local_dir) works in transformers {transformers.__version__}: once the lock "
            "holds such a release, drop the README's note about it (and this test)"
        )


# ---------------------------------------------------------------------------------------------------------------
# docs/distributed.md and the Accelerate configs it documents
# ---------------------------------------------------------------------------------------------------------------

DISTRIBUTED_DOC = REPO / "docs" / "distributed.md"
ACCELERATE_CONFIGS = REPO / "examples" / "accelerate_configs"


def test_distributed_doc_commands_use_existing_programs_flags_and_configs():
    """Like the README's commands; and each `--config_file` is a committed config, every one of which is shown."""
    commands = readme_commands(DISTRIBUTED_DOC.read_text())
    assert {c.program for c in commands} >= {"examples/pretrain_nepa.py", "examples/finetune_classification.py"}
    problems, configs = [], set()
    for command in commands:
        if not (REPO / command.program).is_file():
            problems.append(f"{command.line}\n    no {command.program} in the repository")
        elif bad := unknown_flags(command):
            problems.append(f"{command.line}\n    " + ", ".join(bad))
        if "--config_file" in command.launcher_args:
            configs.add(command.launcher_args[command.launcher_args.index("--config_file") + 1])
    assert not problems, "docs/distributed.md commands that would fail:\n" + "\n".join(problems)
    assert all((REPO / config).is_file() for config in configs), configs
    text = DISTRIBUTED_DOC.read_text()
    assert all(f"`{path.name}`" in text for path in ACCELERATE_CONFIGS.glob("*.yaml"))  # each one documented


def launch_environment(config_name: str) -> tuple[str, dict]:
    """(distributed type, environment) that `accelerate launch --config_file <config>` gives the training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    config = ACCELERATE_CONFIGS / f"{config_name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "examples/pretrain_nepa.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:  # as `accelerate launch` does before its DeepSpeed launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return defaults.distributed_type.value, prepare_deepspeed_cmd_env(args)[1]
    return defaults.distributed_type.value, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("config_name, distributed_type, expected", [
    ("ddp", "MULTI_GPU", {"ACCELERATE_MIXED_PRECISION": "bf16"}),
    ("fsdp2", "FSDP", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                       "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "NepaLayer"}),
    ("deepspeed_zero2", "DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                                      "ACCELERATE_GRADIENT_CLIPPING": "1.0"}),
    ("deepspeed_zero3", "DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                                      "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}),
])
def test_accelerate_configs_give_the_documented_launch_settings(config_name, distributed_type, expected):
    """Accelerate's own launcher reads each committed config (no GPU or DeepSpeed needed to parse) into the settings
    docs/distributed.md relies on: FSDP2 with full state dicts, ZeRO-3 gathering the weights to save them."""
    kind, env = launch_environment(config_name)
    assert kind == distributed_type
    assert {key: env.get(key) for key in expected} == expected
