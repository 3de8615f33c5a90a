"""The Databricks Asset Bundle and notebooks, checked without a workspace: structure, schedules, clusters, and that
every entry point and option a job names exists in the package."""

from __future__ import annotations

import ast
import glob
import os
import re

import pytest
import yaml
from ebbtide.cli import build_parser, job_argv

ROOT = os.path.join(os.path.dirname(__file__), "..")
SAMPLE = {"{{job.start_time.iso_date}}": "2026-11-08", "{{job.parameters.run_date}}": "2026-11-08",
          "{{job.parameters.from_date}}": "2026-10-01", "{{job.parameters.to_date}}": "2026-10-31",
          "{{job.parameters.as_of}}": "2026-11-08", "${var.conf}": "databricks"}


def _load(path):
    with open(os.path.join(ROOT, path)) as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def bundle():
    root = _load("databricks.yml")
    jobs = {}
    for pattern in root["include"]:
        files = sorted(glob.glob(os.path.join(ROOT, pattern)))
        assert files, f"include {pattern} matches nothing"
        for f in files:
            jobs.update(yaml.safe_load(open(f))["resources"]["jobs"])
    return root, jobs


def _scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml (tomllib is 3.11+; the project supports 3.10)."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    block = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', block, re.M))


def _tasks(jobs):
    return [(name, task) for name, job in jobs.items() for task in job["tasks"]]


def test_bundle_declares_the_wheel_and_every_job(bundle):
    root, jobs = bundle
    assert root["bundle"]["name"] == "ebbtide"
    wheel = root["artifacts"]["ebbtide_wheel"]
    assert wheel["type"] == "whl" and wheel["build"] == "make package"
    assert set(jobs) == {"ebbtide_nightly", "ebbtide_train_weekly", "ebbtide_backfill", "ebbtide_maintain_weekly"}
    assert {"dev", "prod"} <= set(root["targets"])
    for name in root["targets"]["prod"]["resources"]["jobs"]:
        assert name in jobs, f"prod overrides unknown job {name}"


def test_every_entry_point_and_option_exists(bundle):
    _, jobs = bundle
    scripts = _scripts()
    parser = build_parser()
    for job, task in _tasks(jobs):
        wt = task["python_wheel_task"]
        assert wt["package_name"] == "ebbtide"
        target = scripts.get(wt["entry_point"])
        assert target, f"{job}.{task['task_key']}: no entry point {wt['entry_point']} in [project.scripts]"
        module, func = target.split(":")
        import importlib

        assert callable(getattr(importlib.import_module(module), func))
        stage = wt["entry_point"].removeprefix("ebbtide-")
        params = [SAMPLE.get(p, p) for p in wt["parameters"]]
        assert not [p for p in params if "{{" in p or "${" in p], f"unresolved parameter in {job}: {params}"
        args = parser.parse_args(job_argv(stage, params))      # what the entry point hands to the CLI
        assert args.command == stage
        assert any(lib.get("whl", "").endswith(".whl") for lib in task["libraries"])


def test_nightly_job_schedule_dates_and_retries(bundle):
    _, jobs = bundle
    job = jobs["ebbtide_nightly"]
    assert len(job["schedule"]["quartz_cron_expression"].split()) in (6, 7)
    assert job["schedule"]["timezone_id"] == "UTC"
    assert {p["name"]: p["default"] for p in job["parameters"]}["run_date"] == "{{job.start_time.iso_date}}"
    tasks = {t["task_key"]: t for t in job["tasks"]}
    assert [d["task_key"] for d in tasks["nightly"]["depends_on"]] == ["sessionize"]
    assert [tasks[k]["python_wheel_task"]["entry_point"] for k in ("sessionize", "nightly")] == \
        ["ebbtide-sessionize", "ebbtide-nightly"]
    assert all(t["max_retries"] >= 1 for t in tasks.values())
    assert job["email_notifications"]["on_failure"] and job["max_concurrent_runs"] == 1
    args = build_parser().parse_args(["nightly", "--as-of", "2026-11-08", "--lag-days", "1"])
    assert args.as_of.isoformat() == "2026-11-08" and args.lag_days == 1


def test_training_job_is_weekly_on_a_gpu_ml_runtime_in_single_user_mode(bundle):
    root, jobs = bundle
    job = jobs["ebbtide_train_weekly"]
    fields = job["schedule"]["quartz_cron_expression"].split()
    assert fields[5] in ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "1", "7")
    cluster = job["job_clusters"][0]["new_cluster"]
    runtime = root["variables"]["gpu_runtime"]["default"] if "${var.gpu_runtime}" == cluster["spark_version"] \
        else cluster["spark_version"]
    assert "gpu-ml" in runtime
    assert cluster["data_security_mode"] == "SINGLE_USER"
    assert cluster["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    assert any("train.use_gpu=true" in p for t in job["tasks"] for p in t["python_wheel_task"]["parameters"])


def test_backfill_job_takes_a_date_range(bundle):
    _, jobs = bundle
    job = jobs["ebbtide_backfill"]
    assert "schedule" not in job and job["max_concurrent_runs"] == 1
    assert {p["name"] for p in job["parameters"]} == {"from_date", "to_date"}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.py"))))
def test_notebooks_install_the_wheel_and_stay_connect_safe(path):
    source = open(path).read()
    assert source.startswith("# Databricks notebook source")
    assert re.search(r"^# MAGIC %pip install \{wheel\}$", source, re.M)
    assert "dbutils.library.restartPython()" in source
    assert 'dbutils.widgets.text("wheel"' in source
    assert "dbutils.jobs.taskValues.set(" in source
    code = "\n".join(line.split("#")[0] for line in source.splitlines())     # comments and MAGIC cells out
    assert "sparkContext" not in code and "date.today" not in code and "datetime.now()" not in code
    ast.parse(source)          # MAGIC lines are comments: the rest is valid Python
    if "run_date" in source or "as_of" in source:
        assert "utc_today()" in source
