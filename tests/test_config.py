"""ModelArgs: reading transformers configs, validation, presets."""

from __future__ import annotations

import json

import pytest

from mixtral_mlx.config import ModelArgs, load_preset, preset_names
from mixtral_mlx.errors import UserError
from conftest import assert_user_error, run_cli, write_hf_model


def test_presets_load_and_validate():
    assert {"tiny", "small", "minimixtral-175m", "mixtral-8x7b"} <= set(preset_names())
    for name in preset_names():
        load_preset(name)
    mini = load_preset("minimixtral-175m")
    assert (mini.hidden_size, mini.num_hidden_layers, mini.num_attention_heads, mini.num_key_value_heads,
            mini.head_dim, mini.num_local_experts, mini.num_experts_per_tok, mini.intermediate_size,
            mini.vocab_size) == (512, 8, 8, 2, 64, 8, 2, 2048, 32000)


def test_round_trip_through_hf_dict():
    args = load_preset("small")
    again = ModelArgs.from_hf(json.loads(json.dumps(args.to_hf())))
    assert again == args


def test_reads_transformers_config(tmp_path):
    write_hf_model(tmp_path, num_key_value_heads=1, sliding_window=9, rope_theta=1e6)
    args = ModelArgs.from_file(tmp_path / "config.json")
    assert (args.num_key_value_heads, args.sliding_window, args.rope_theta, args.head_dim) == (1, 9, 1e6, 16)


BAD_CONFIGS = [
    ("missing field", lambda c: c.pop("hidden_size"), "hidden_size"),
    ("experts_per_tok > experts", lambda c: c.update(num_experts_per_tok=9), "num_experts_per_tok"),
    ("hidden not divisible by heads", lambda c: c.update(hidden_size=66, head_dim=None), "hidden_size"),
    ("unknown rope type", lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
     "rope_parameters.rope_type"),
    ("negative layers", lambda c: c.update(num_hidden_layers=-1), "num_hidden_layers"),
    ("kv heads do not divide heads", lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
    ("bad window", lambda c: c.update(sliding_window=0), "sliding_window"),
    ("not mixtral", lambda c: c.update(model_type="llama"), "model_type"),
]


@pytest.mark.parametrize("name,corrupt,field", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_config_names_file_and_field(tmp_path, name, corrupt, field):
    write_hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    corrupt(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        ModelArgs.from_file(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(e.value) and field in str(e.value)


def test_bad_config_through_cli_is_one_line_exit_2(tmp_path):
    write_hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_experts_per_tok"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_user_error(run_cli("info", "--model", str(tmp_path)), "config.json", "num_experts_per_tok")


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 10,\n  oops}')
    with pytest.raises(UserError, match=r"config.json:2: not valid JSON"):
        ModelArgs.from_file(tmp_path / "config.json")
