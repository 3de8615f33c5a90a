# Databricks notebook source
# MAGIC %md
# MAGIC # ebbtide: train the interest models and evaluate them
# MAGIC Thin notebook over the `ebbtide` wheel, for a GPU cluster on an ML runtime in **single-user (dedicated)
# MAGIC access mode** (TorchDistributor needs the classic Spark API). Set `train.use_gpu=true` and
# MAGIC `train.num_processes` to the number of GPUs. The model is not served until someone promotes it.

# COMMAND ----------

dbutils.widgets.text("wheel", "/Volumes/main/ebbtide/artifacts/ebbtide-0.1.0-py3-none-any.whl")  # noqa: F821
dbutils.widgets.text("conf", "databricks")  # noqa: F821
dbutils.widgets.text("overrides", "")  # noqa: F821  e.g. train.num_processes=4,train.use_gpu=true
dbutils.widgets.dropdown("promote", "false", ["false", "true"])  # noqa: F821  promote the new nightly.model
wheel = dbutils.widgets.get("wheel")  # noqa: F821

# COMMAND ----------

# MAGIC %pip install {wheel}

# COMMAND ----------

dbutils.library.restartPython()  # noqa: F821

# COMMAND ----------

from ebbtide.cli import open_pipeline
from ebbtide.config import load_config
from ebbtide.evaluate import evaluate_all
from ebbtide.promotion import promote
from ebbtide.train import train_models

w = dbutils.widgets  # noqa: F821
cfg = load_config(w.get("conf"), [o.strip() for o in w.get("overrides").split(",") if o.strip()])
spark, storage = open_pipeline(cfg)
artifacts = train_models(cfg, storage)
result = evaluate_all(cfg, storage, artifacts)
print(open(result["report"]).read())

# COMMAND ----------

served = artifacts.get(cfg.nightly.model)
if w.get("promote") == "true" and served is not None:
    promote(cfg.train.output, cfg.nightly.model, served.name, note="notebooks/train_evaluate")
dbutils.jobs.taskValues.set("artifacts", {name: str(path) for name, path in artifacts.items()})  # noqa: F821
dbutils.jobs.taskValues.set("report", str(result["report"]))  # noqa: F821
