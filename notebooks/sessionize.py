# Databricks notebook source
# MAGIC %md
# MAGIC # ebbtide: sessionize raw logs into Delta tables
# MAGIC Thin notebook: all logic lives in the `ebbtide` package (install the wheel on the cluster or `%pip install`).
# MAGIC Tables are Unity Catalog names `catalog.schema.table` from `conf/databricks.yaml`.

# COMMAND ----------

dbutils.widgets.text("conf", "databricks")  # noqa: F821  (dbutils exists on Databricks)
dbutils.widgets.text("run_date", "")  # noqa: F821
dbutils.widgets.text("to_date", "")  # noqa: F821
dbutils.widgets.text("overrides", "")  # noqa: F821  e.g. sessionize.input=/Volumes/main/raw/events

# COMMAND ----------

import datetime as dt

from ebbtide.cli import open_pipeline
from ebbtide.config import load_config
from ebbtide.sessionize import Sessionizer

w = dbutils.widgets  # noqa: F821
overrides = [o.strip() for o in w.get("overrides").split(",") if o.strip()]
cfg = load_config(w.get("conf"), overrides)
first = dt.date.fromisoformat(w.get("run_date")) if w.get("run_date") else dt.date.today() - dt.timedelta(days=1)
last = dt.date.fromisoformat(w.get("to_date")) if w.get("to_date") else first

# COMMAND ----------

spark, storage = open_pipeline(cfg)  # reuses the notebook's session; engine spark (Delta is built in)
reports = Sessionizer(spark, cfg, storage).run_range(first, last)
for report in reports:
    print(report.line())

# COMMAND ----------

display(spark.createDataFrame([r.as_dict() for r in reports]))  # noqa: F821
