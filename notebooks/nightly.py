# Databricks notebook source
# MAGIC %md
# MAGIC # ebbtide: nightly interest embeddings and top-K recommendations
# MAGIC Thin notebook over the `ebbtide` package; schedule it as a Databricks job with `as_of` = yesterday.

# COMMAND ----------

dbutils.widgets.text("conf", "databricks")  # noqa: F821
dbutils.widgets.text("as_of", "")  # noqa: F821
dbutils.widgets.text("overrides", "")  # noqa: F821  e.g. nightly.top_k=50

# COMMAND ----------

import datetime as dt

from ebbtide.cli import open_pipeline
from ebbtide.config import load_config
from ebbtide.nightly import Nightly

w = dbutils.widgets  # noqa: F821
cfg = load_config(w.get("conf"), [o.strip() for o in w.get("overrides").split(",") if o.strip()])
as_of = dt.date.fromisoformat(w.get("as_of")) if w.get("as_of") else dt.date.today() - dt.timedelta(days=1)
spark, storage = open_pipeline(cfg)
print(Nightly(spark, cfg, storage).run(as_of).line())
