"""Every bad input (tests/bad_inputs.py: each CLI flag and sweep-file key with a wrong type, range or
name) gets one line on stderr and exit code 2, before anything runs; and the list covers every flag
and key there is."""

from __future__ import annotations

import argparse

import pytest

from harness.cli import build_parser
from harness.sweep import SweepSpec
from tests.bad_inputs import CASES, run_case


@pytest.mark.parametrize("what,argv,text,needle", CASES, ids=[case[0] for case in CASES])
def test_a_bad_input_is_one_line_and_exit_2(tmp_path, data_dir, what, argv, text, needle):
    code, err = run_case(argv, text, tmp_path)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert needle in err, err
    assert not (tmp_path / "out" / "results.jsonl").exists()  # nothing ran


def _flags() -> dict[str, set[str]]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {name: {flag for action in sub._actions for flag in action.option_strings} - {"-h", "--help"}
            for name, sub in commands.items()}


def test_every_flag_of_every_command_and_every_sweep_key_has_a_bad_input_case():
    tried = {flag for _, argv, _, _ in CASES for flag in argv if flag.startswith("--")}
    for command, flags in _flags().items():
        untried = {flag for flag in flags if flag not in tried}
        # a flag with aliases is tried under one of its names
        untried -= {f for f in untried if any(alias in tried for alias in _aliases(command, f))}
        assert not untried, f"{command}: no bad-input case for {sorted(untried)}"
    texts = "\n".join(text for _, _, text, _ in CASES if text)
    keys = set(SweepSpec.model_fields) | {"latency"}
    assert all(f"{key}:" in texts for key in keys), sorted(k for k in keys if f"{k}:" not in texts)


def _aliases(command: str, flag: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return next((a.option_strings for a in sub._actions if flag in a.option_strings), [])
