"""python -m main_job: the main job (see main_job.main)."""

import sys

from main_job.main import main

sys.exit(main())
