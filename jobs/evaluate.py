"""spark-submit entry point for `ebbtide evaluate` (all logic lives in the ebbtide package).

From the artifacts of `make package` (README, "Deploying"), from any directory:

    spark-submit --master yarn --driver-memory 8g \
      --packages io.delta:delta-spark_2.13:4.0.1 \
      --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension \
      --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog \
      --archives ebbtide-env.tar.gz#environment --conf spark.pyspark.python=./environment/bin/python \
      --py-files ebbtide-0.1.0.zip \
      jobs/evaluate.py --conf cluster
"""

import sys

from ebbtide.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evaluate"))
