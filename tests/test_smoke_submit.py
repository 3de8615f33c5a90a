"""CI smoke test of the deployment path: `make package`, then `spark-submit --master local[2]` of every stage from a
directory outside the repository, on the embedded engine, the way the README tells a user to run it.

Two interpreters stand in for a cluster, both built from the project's dependencies but *without* ebbtide:
* the driver of sessionize and nightly has the wheel pip-installed (as a cluster library or `%pip install`
  would); the driver of train and evaluate has nothing but `--py-files ebbtide-<v>.zip` (conf/*.yaml read from
  inside the zip);
* every executor Python worker (PYSPARK_PYTHON) has only `--py-files`: nightly's mapInPandas runs there, so
  it passes only if the zip reaches the executors.
Checks: the master spark-submit set (and its driver memory) is the one used, although the config says otherwise;
the tables, the promoted model and the report are written.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BIN = os.path.dirname(sys.executable)
D = [dt.date(2026, 11, 1) + dt.timedelta(days=i) for i in range(2)]


def _venv(path, with_wheel: str | None = None) -> str:
    """A bare venv that sees the project's third-party packages (a .pth line) but not ebbtide."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
    site = subprocess.run([f"{path}/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "project-deps.pth"), "w") as fh:
        fh.write(sysconfig.get_path("purelib") + "\n")   # a path line: that folder's own .pth files stay unread
    if with_wheel:
        subprocess.run([f"{BIN}/pip", "--python", f"{path}/bin/python", "install", "-q", "--no-deps", with_wheel],
                       check=True)
    return f"{path}/bin/python"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    dist = work / "dist"
    subprocess.run(["make", "-s", "-C", ROOT, "package", f"DIST={dist}"], check=True, capture_output=True)
    wheel = glob.glob(str(dist / "ebbtide-*-py3-none-any.whl"))[0]
    zipped = glob.glob(str(dist / "ebbtide-*.zip"))[0]
    bare = _venv(str(work / "executor-env"))
    driver = _venv(str(work / "driver-env"), with_wheel=wheel)
    site = work / "site"
    site.mkdir()
    (site / "smoke.yaml").write_text(textwrap.dedent(f"""\
        env: smoke
        spark: {{master: "local[*]", ui_enabled: false, log_level: ERROR, shuffle_partitions: 4,
                 driver_memory: 3g}}
        storage: {{engine: rs, root: {site}/tables, user_buckets: 2}}
        generate: {{out: {site}/raw, users: 80, items: 60, categories: 4, days: 2, start_date: {D[0]},
                    users_per_chunk: 80}}
        sessionize: {{input: {site}/raw}}
        train: {{output: {site}/models, models: [decay_pool], dim: 8, max_len: 10, epochs: 1, batch_size: 64,
                 split: leave_one_out}}
        evaluate: {{output: {site}/report}}
        nightly: {{top_k: 5, batch_size: 64}}
        """))
    return {"site": site, "dist": dist, "zip": zipped, "bare": bare, "driver": driver}


def _submit(d, job: str, *args: str, driver_python: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK_", "PYTHONPATH"))}
    env.update(PYSPARK_PYTHON=d["bare"], PYSPARK_DRIVER_PYTHON=driver_python)
    cmd = [f"{BIN}/spark-submit", "--master", "local[2]", "--driver-memory", "1g", "--py-files", d["zip"],
           str(d["dist"] / "jobs" / f"{job}.py"), "--conf", str(d["site"] / "smoke.yaml"), *args]
    done = subprocess.run(cmd, cwd=d["site"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{job} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    # spark-submit's PythonRunner merges the driver's stderr into its stdout: the log lines are there.
    assert "spark master local[2] from spark-submit (driver memory 1g)" in done.stdout, done.stdout[-3000:]
    return done


def test_artifacts_carry_the_package_and_its_environments(deployed):
    import zipfile

    names = zipfile.ZipFile(deployed["zip"]).namelist()
    assert {"ebbtide/conf/local.yaml", "ebbtide/conf/cluster.yaml", "ebbtide/conf/databricks.yaml",
            "ebbtide/nightly.py"} <= set(names)
    assert subprocess.run([deployed["bare"], "-c", "import ebbtide"], capture_output=True).returncode != 0, \
        "the executor interpreter must not see the repository's ebbtide"
    out = subprocess.run([deployed["driver"], "-c", "import ebbtide.config as c; print(c.__file__); "
                          "print(c.load_config('cluster').env)"], cwd=deployed["site"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert "site-packages" in out[0] and ROOT not in out[0] and out[1] == "cluster"


def test_every_stage_runs_under_spark_submit_from_the_artifacts(deployed):
    from ebbtide.readers import read_table

    d, site = deployed, deployed["site"]
    conf = ["--conf", str(site / "smoke.yaml")]
    ebbtide = os.path.join(os.path.dirname(d["driver"]), "ebbtide")          # the wheel's console script
    subprocess.run([ebbtide, *conf, "generate"], cwd=site, check=True, capture_output=True)
    done = _submit(d, "sessionize", "--date", str(D[0]), "--to", str(D[1]), driver_python=d["driver"])
    assert "ignored: spark-submit set --master local[2]" in done.stdout     # the config said local[*]
    _submit(d, "train", driver_python=d["bare"])
    promoted = subprocess.run([ebbtide, *conf, "promote", "decay_pool", "latest"], cwd=site, capture_output=True,
                              text=True, check=True)
    assert promoted.stdout.startswith("promoted decay_pool ")
    done = _submit(d, "nightly", "--as-of", str(D[1]), driver_python=d["driver"])
    assert f"nightly {D[1]} model " in done.stdout
    _submit(d, "evaluate", driver_python=d["bare"])

    tables = site / "tables"
    assert len(read_table(str(tables / "events"))) > 100
    recs = read_table(str(tables / "user_recommendations"))
    assert set(recs["as_of"].astype(str)) == {str(D[1])} and len(recs) > 0
    assert set(recs["source"]) <= {"model", "popular", "new_item"}
    assert len(read_table(str(tables / "user_interest"))) == recs["user_id"].nunique()
    assert (site / "models" / "decay_pool" / "PROMOTED.json").exists()
    assert (site / "report" / "report.md").exists()
    refused = subprocess.run([ebbtide, *conf, "nightly", "--as-of", str(D[1] + dt.timedelta(days=5))], cwd=site,
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "no sessionized data" in refused.stderr
