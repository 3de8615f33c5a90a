"""spark-submit entry point for `ebbtide generate` (all logic lives in lib/ebbtide).

    spark-submit --packages io.delta:delta-spark_2.13:4.0.1 \
      --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension \
      --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog \
      jobs/generate.py --conf cluster
"""

import sys

from ebbtide.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("generate"))
