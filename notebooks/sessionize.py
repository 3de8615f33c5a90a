# Databricks notebook source
# MAGIC %md
# MAGIC # ebbtide: sessionize raw logs into Delta tables
# MAGIC Thin notebook: all logic lives in the `ebbtide` wheel (`make package`; upload `dist/*.whl` to a volume).
# MAGIC Dates are UTC. Runs on standard (shared) access mode and serverless: no `spark.sparkContext` on this path.

# COMMAND ----------

dbutils.widgets.text("wheel", "/Volumes/main/ebbtide/artifacts/ebbtide-0.1.0-py3-none-any.whl")  # noqa: F821
dbutils.widgets.text("conf", "databricks")  # noqa: F821  a packaged environment or a YAML path on a volume
dbutils.widgets.text("run_date", "")  # noqa: F821  YYYY-MM-DD (UTC); empty: yesterday in UTC
dbutils.widgets.text("to_date", "")  # noqa: F821  last date of a range; empty: run_date only
dbutils.widgets.text("overrides", "")  # noqa: F821  comma-separated KEY=VALUE, e.g. sessionize.input=/Volumes/...
wheel = dbutils.widgets.get("wheel")  # noqa: F821

# COMMAND ----------

# MAGIC %pip install {wheel}

# COMMAND ----------

dbutils.library.restartPython()  # noqa: F821  the fresh interpreter imports the installed wheel

# COMMAND ----------

import datetime as dt

from ebbtide.cli import open_pipeline, utc_today
from ebbtide.config import load_config
from ebbtide.sessionize import Sessionizer

w = dbutils.widgets  # noqa: F821
cfg = load_config(w.get("conf"), [o.strip() for o in w.get("overrides").split(",") if o.strip()])
first = dt.date.fromisoformat(w.get("run_date")) if w.get("run_date") else utc_today() - dt.timedelta(days=1)
last = dt.date.fromisoformat(w.get("to_date")) if w.get("to_date") else first

# COMMAND ----------

spark, storage = open_pipeline(cfg)  # reuses the notebook's session; engine spark (Delta is built in)
reports = Sessionizer(spark, cfg, storage).run_range(first, last)
for report in reports:
    print(report.line())

# COMMAND ----------

# For the next task of a job (e.g. notebooks/nightly.py reads run_date from here).
dbutils.jobs.taskValues.set("run_date", last.isoformat())  # noqa: F821
dbutils.jobs.taskValues.set("events_kept", sum(r.kept for r in reports))  # noqa: F821
dbutils.jobs.taskValues.set("quarantined", sum(r.quarantined for r in reports))  # noqa: F821
