"""spark-submit entry point for `ebbtide evaluate`: all logic lives in the ebbtide package. The spark-submit line
(wheel zip on --py-files, packed env on --archives, Delta packages) is in README, "Deploying"."""

import sys

from ebbtide.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("evaluate"))
