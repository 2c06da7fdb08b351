"""Typed configs: unknown keys and impossible values fail loudly, overrides parse as YAML."""

import pydantic
import pytest

from metarec_dist.config import load_config, parse_override
from metarec_dist.data.synthetic import SyntheticConfig
from metarec_dist.errors import ConfigError


def test_overrides_are_parsed_as_yaml_values():
    assert parse_override("seed=3") == (["seed"], 3)
    assert parse_override("a.b=0.5") == (["a", "b"], 0.5)
    assert parse_override("source_users=[1, 2]") == (["source_users"], [1, 2])
    assert parse_override("name_prefix=abc") == (["name_prefix"], "abc")


def test_file_values_and_overrides_combine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 5\nrelated_sources: 7\n")
    config = load_config(SyntheticConfig, path, ["related_sources=2"])
    assert (config.seed, config.related_sources, config.noise_sources) == (5, 2, 2)


@pytest.mark.parametrize(
    "text,message",
    [
        ("seed: [1\n", "not valid YAML"),
        ("- 1\n- 2\n", "expected a mapping"),
        ("related_noise: 1.5\n", "field 'related_noise'"),
        ("typo_key: 1\n", "unknown key 'typo_key'"),
        ("seed: abc\n", "field 'seed'"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(SyntheticConfig, path)


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(SyntheticConfig, tmp_path / "nope.yaml")


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("seed")


def test_configs_are_immutable():
    config = SyntheticConfig()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.seed = 3
