"""The command line as a user meets it."""

from __future__ import annotations

import pytest

from conftest import assert_user_error, run_cli


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and "info" in r.stdout


def test_unknown_flag_is_one_line():
    assert_user_error(run_cli("info", "--frobnicate"), "unrecognized arguments")


def test_missing_model_dir(tmp_path):
    assert_user_error(run_cli("info", "--model", str(tmp_path / "nope")), "nope", "no such model directory")


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "info", "--model", str(tmp_path / "nope"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_openblas_can_be_switched_off():
    r = run_cli("info", env={"MIXTRAL_MLX_OPENBLAS": "0"})
    assert r.returncode == 0 and "MIXTRAL_MLX_OPENBLAS=0" in r.stdout


def test_blas_line_names_the_openblas_kernel_and_who_forced_it():
    from mixtral_mlx import blas

    if not blas.status.startswith("OpenBLAS ("):
        pytest.skip(f"no OpenBLAS loaded here: {blas.status}")
    r = run_cli("info", env={"OPENBLAS_CORETYPE": "Haswell"})
    assert r.returncode == 0 and "core Haswell, forced by OPENBLAS_CORETYPE=Haswell" in r.stdout


def test_grad_checkpoint_and_cpu_streams_are_settings_of_both_training_commands():
    from mixtral_mlx.cli import build_parser

    parser = build_parser()
    for command in ("pretrain", "finetune"):
        assert parser.parse_args([command, "--grad-checkpoint"]).grad_checkpoint is True
        assert parser.parse_args([command]).grad_checkpoint is None  # the YAML's value or the default stands
        assert parser.parse_args([command, "--cpu-streams", "1"]).cpu_streams == 1
        assert parser.parse_args([command]).cpu_streams is None
