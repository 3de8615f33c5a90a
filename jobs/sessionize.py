"""spark-submit entry point for `ebbtide sessionize` (all logic lives in lib/ebbtide).

    spark-submit --packages io.delta:delta-spark_2.13:4.0.1 \
      --conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension \
      --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog \
      jobs/sessionize.py --conf cluster --date 2026-11-01
"""

import sys

from ebbtide.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("sessionize"))
