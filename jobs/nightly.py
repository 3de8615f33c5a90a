"""spark-submit entry point for `ebbtide nightly` (all logic lives in lib/ebbtide).

    spark-submit --packages io.delta:delta-spark_2.13:4.0.1 ... jobs/nightly.py --conf cluster --as-of 2026-11-07
"""

import sys

from ebbtide.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("nightly"))
