"""python -m ray_app.train: a Ray Train run (see ray_app.train.driver)."""

import sys

from ray_app.train.driver import main

sys.exit(main())
