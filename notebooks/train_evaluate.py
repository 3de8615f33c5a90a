# Databricks notebook source
# MAGIC %md
# MAGIC # ebbtide: train the interest models and evaluate them
# MAGIC Thin notebook over the `ebbtide` package. On a GPU cluster set `train.use_gpu=true` and
# MAGIC `train.num_processes` to the number of GPUs: TorchDistributor runs DDP (NCCL) in barrier mode.

# COMMAND ----------

dbutils.widgets.text("conf", "databricks")  # noqa: F821
dbutils.widgets.text("overrides", "")  # noqa: F821  e.g. train.num_processes=4,train.use_gpu=true

# COMMAND ----------

from ebbtide.cli import open_pipeline
from ebbtide.config import load_config
from ebbtide.evaluate import evaluate_all
from ebbtide.train import train_models

w = dbutils.widgets  # noqa: F821
cfg = load_config(w.get("conf"), [o.strip() for o in w.get("overrides").split(",") if o.strip()])
spark, storage = open_pipeline(cfg)
artifacts = train_models(cfg, storage)
result = evaluate_all(cfg, storage, artifacts)
print(open(result["report"]).read())
