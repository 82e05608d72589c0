"""Every command that README.md and docs/*.md give parses with its script's own tyro parser."""

import importlib
import re
import shlex

import pytest
import tyro

from conftest import REPO

import train_sft

SCRIPTS = {"train_sft.py": "train_sft", "train_grpo.py": "train_grpo", "eval.py": "eval"}
COMMAND = re.compile(r"(?:python|accelerate launch|torchrun)\b[^`#]*?\b(train_sft|train_grpo|eval)\.py\b")



def _shell_variables(lines: list[str]) -> dict:
    """`NAME=value` assignments and `for NAME in first ...` loops of a code block: what its commands expand."""
    values = {}
    for line in lines:
        if m := re.match(r"\s*(?:export\s+)?([A-Za-z_]\w*)=(.*)$", line):
            values[m.group(1)] = " ".join(shlex.split(m.group(2)))
        if m := re.search(r"\bfor\s+([A-Za-z_]\w*)\s+in\s+(\S+)", line):
            values[m.group(1)] = m.group(2)
    return values


def _commands(text: str, variables: dict) -> list[str]:
    """The argument lists of every trainer / eval.py command in `text`, as the shell would split them."""
    found = []
    for m in COMMAND.finditer(text):
        rest = text[m.end():]
        rest = re.sub(r"<[^<>\n]*>", "x", rest.split("\n")[0])  # placeholders such as <sft run>
        rest = re.split(r"\s(?:&&|\||;|2>&1|>)\s|;\s*done|`", rest + " ")[0]
        # "$VAR" stays one word; a bare $VAR splits into words, as in the shell.
        rest = re.sub(r'"\$\{?([A-Za-z_]\w*)\}?"', lambda v: shlex.quote(variables.get(v.group(1), "1")), rest)
        rest = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda v: variables.get(v.group(1), "1"), rest)
        expanded = []
        for word in shlex.split(rest, comments=True):
            word = re.sub(r"\{([^{},]*),[^{}]*\}", r"\1", word) if not word.startswith("{\"") else word  # {1,2,3}
            if word != "...":
                expanded.append(word)
        found.append((m.group(1) + ".py", expanded))
    return found


def documented_commands():
    """(file, script, arguments) for every command in README.md and docs/*.md; a continuation line that no
    command owns (a comment swallowed the backslash before it) is reported as a command of its own."""
    commands = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
        for block in blocks:
            joined = []
            for line in block.splitlines():
                code = line.split(" #")[0].rstrip()
                if joined and joined[-1].endswith("\\"):
                    joined[-1] = joined[-1][:-1] + " " + code.strip()
                else:
                    joined.append(code)
            variables = _shell_variables(joined)
            for line in joined:
                if line.strip().startswith("--"):
                    commands.append((path.name, "orphan", line.strip()))
                for script, words in _commands(line, variables):
                    commands.append((path.name, script, words))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            for script, words in _commands(span, {}):
                commands.append((path.name, script, words))
    return commands


def test_every_documented_command_parses():
    commands = documented_commands()
    assert sum(script == "train_sft.py" for _, script, _ in commands) >= 5
    assert sum(script == "eval.py" for _, script, _ in commands) >= 10
    failures = []
    for source, script, words in commands:
        if script == "orphan":
            failures.append(f"{source}: a continuation line outside any command: {words}")
            continue
        module = importlib.import_module(SCRIPTS[script])
        try:
            tyro.cli(module.Args, args=words)
        except SystemExit:
            failures.append(f"{source}: {script} {' '.join(words)}")
    assert not failures, "\n".join(failures)


def test_the_command_extractor_sees_what_the_shell_sees():
    line = 'python eval.py --env-kwargs "$KW" --model runs/<run>/checkpoint --seed {1,2}  # x'
    ((script, words),) = _commands(line, _shell_variables(["KW='{\"top_k\": 3}'"]))
    assert script == "eval.py" and words == ["--env-kwargs", '{"top_k": 3}', "--model", "runs/x/checkpoint",
                                             "--seed", "1"]
    with pytest.raises(SystemExit):  # a bare --bf16 (bool | None) is what broke docs/train_sft.md
        tyro.cli(train_sft.Args, args=["--bf16"])


