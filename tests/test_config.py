"""Typed configuration: every environment loads; bad keys, types and values are named in the error."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ebbtide.cli import job_main
from ebbtide.config import ConfigError, load_config


@pytest.mark.parametrize("env", ["local", "cluster", "databricks"])
def test_every_environment_loads(env):
    cfg = load_config(env)
    assert cfg.env == env


def test_overrides_keep_types():
    cfg = load_config("local", ["sessionize.session_gap_minutes=20", "storage.user_buckets=16",
                                "spark.ui_enabled=false", "sessionize.ts_floor=1990-01-01"])
    assert cfg.sessionize.session_gap_minutes == 20.0
    assert cfg.storage.user_buckets == 16 and cfg.spark.ui_enabled is False
    assert cfg.sessionize.ts_floor.year == 1990


@pytest.mark.parametrize("override, named", [
    ("sessionize.session_gap_minute=20", "sessionize.session_gap_minute: unknown key"),
    ("storage.user_buckets=many", "storage.user_buckets"),
    ("storage.user_buckets=0", "storage.user_buckets"),
    ("storage.engine=duckdb", "storage.engine"),
    ("sessionize.max_session_minutes=10", "max_session_minutes"),
    ("sessionize.event_types={}", "sessionize.event_types"),
    ("generate.items=3", "generate.items"),
    ("nonsense.key=1", "nonsense: unknown key"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config("local", [override])
    assert named in str(err.value)


def test_unknown_environment_lists_known_ones():
    with pytest.raises(ConfigError, match="known environments: cluster, databricks, local"):
        load_config("staging")


def test_override_syntax_is_checked():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("local", ["sessionize.max_len"])


def test_cli_stops_with_exit_code_2_on_bad_config(capsys):
    assert job_main("tables", ["--set", "storage.engine=nope"]) == 2
    assert "storage.engine" in capsys.readouterr().err


def test_java_check_passes_here():
    assert subprocess.run([sys.executable, "tools/check_java.py"]).returncode == 0


def test_a_yaml_path_still_loads(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("env: site\nstorage: {root: /srv/tables}\n")
    cfg = load_config(str(path), ["nightly.top_k=7"])
    assert (cfg.env, cfg.storage.root, cfg.nightly.top_k) == ("site", "/srv/tables", 7)
    with pytest.raises(ConfigError, match="no configuration file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_environments_are_package_data():
    from ebbtide.config import packaged_environments

    assert set(packaged_environments()) >= {"local", "cluster", "databricks"}
