# Databricks notebook source
# MAGIC %md
# MAGIC # ebbtide: nightly interest embeddings and top-K recommendations
# MAGIC Thin notebook over the `ebbtide` wheel. `as_of` is a UTC date (empty: yesterday in UTC). Nightly serves the
# MAGIC promoted model (`ebbtide promote`), refuses a date whose sessionized data is missing or stale unless
# MAGIC `allow_stale` is true, and runs on standard access mode / serverless (no `spark.sparkContext`).

# COMMAND ----------

dbutils.widgets.text("wheel", "/Volumes/main/ebbtide/artifacts/ebbtide-0.1.0-py3-none-any.whl")  # noqa: F821
dbutils.widgets.text("conf", "databricks")  # noqa: F821
dbutils.widgets.text("as_of", "")  # noqa: F821  YYYY-MM-DD (UTC); empty: the sessionize task's run_date, else yesterday
dbutils.widgets.dropdown("allow_stale", "false", ["false", "true"])  # noqa: F821
dbutils.widgets.text("overrides", "")  # noqa: F821  e.g. nightly.top_k=50
wheel = dbutils.widgets.get("wheel")  # noqa: F821

# COMMAND ----------

# MAGIC %pip install {wheel}

# COMMAND ----------

dbutils.library.restartPython()  # noqa: F821

# COMMAND ----------

import datetime as dt

from ebbtide.cli import open_pipeline, utc_today
from ebbtide.config import load_config
from ebbtide.nightly import Nightly

w = dbutils.widgets  # noqa: F821
overrides = [o.strip() for o in w.get("overrides").split(",") if o.strip()]
if w.get("allow_stale") == "true":
    overrides.append("nightly.require_fresh=false")
cfg = load_config(w.get("conf"), overrides)
upstream = dbutils.jobs.taskValues.get(taskKey="sessionize", key="run_date", default="", debugValue="")  # noqa: F821
as_of = dt.date.fromisoformat(w.get("as_of") or upstream or (utc_today() - dt.timedelta(days=1)).isoformat())

# COMMAND ----------

spark, storage = open_pipeline(cfg)
report = Nightly(spark, cfg, storage).run(as_of)
print(report.line())

# COMMAND ----------

dbutils.jobs.taskValues.set("as_of", as_of.isoformat())  # noqa: F821
dbutils.jobs.taskValues.set("model_version", report.model_version)  # noqa: F821
dbutils.jobs.taskValues.set("active_users", report.active_users)  # noqa: F821
dbutils.jobs.taskValues.set("recommendations", report.recommendations)  # noqa: F821
