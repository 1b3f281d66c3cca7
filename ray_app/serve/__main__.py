"""python -m ray_app.serve: deploy the Serve app (see ray_app.serve.app)."""

import sys

from ray_app.serve.app import main

sys.exit(main())
