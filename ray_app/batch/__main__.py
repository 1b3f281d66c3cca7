"""python -m ray_app.batch: recommendations for every user (see ray_app.batch.job)."""

import sys

from ray_app.batch.job import main

sys.exit(main())
