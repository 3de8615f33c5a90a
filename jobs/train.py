"""spark-submit entry point for `ebbtide train` (all logic lives in lib/ebbtide).

    spark-submit --packages io.delta:delta-spark_2.13:4.0.1 ... jobs/train.py --conf cluster
"""

import sys

from ebbtide.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
