"""Pin a serve config to one checkpoint file and its sha256.

    python -m ray_app.serve.pin runs/ray/NAME --config ray_app/serve/config.yaml   # rewrite the pin
    python -m ray_app.serve.pin runs/ray/NAME                                      # print it

A run folder is followed to the model.pt its best_checkpoint.json names, once, here; the config
then names that file and its digest in the `user_config` of each model deployment (`checkpoint:`
and `sha256:`), and every replica serves those bytes or refuses to start. Only those lines
change, comments and all, so the config's history is the history of what was served: a rollback
is deploying the previous version of the file (`serve deploy`, or `kubectl apply` of the
RayService rendered from it), which the replicas take in place.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from models.files import sha256_file


def pin(checkpoint: str | Path) -> tuple[Path, str]:
    """A checkpoint file or a run folder -> (the model file, its sha256)."""
    from ray_app.serve.served_model import resolve_checkpoint

    file = resolve_checkpoint(checkpoint)
    return file, sha256_file(file)


def pin_config_text(text: str, file: str, sha256: str) -> str:
    """`text` (a serve config) with every `user_config` pin (its `checkpoint:` and `sha256:` lines)
    naming `file` and `sha256`; the rest untouched."""
    checkpoint = re.compile(r"^(?P<indent>[ \t]+)checkpoint:[^\n]*\n(?P=indent)sha256:[^\n]*$", re.M)
    if len(checkpoint.findall(text)) != 2:
        raise ValueError("expected the two model deployments' user_config, each `checkpoint:` then `sha256:`")
    # Quoted: a path may hold YAML's special characters, and a digest of digits only would be a number.
    return checkpoint.sub(
        lambda m: f"{m['indent']}checkpoint: {json.dumps(str(file))}\n{m['indent']}sha256: '{sha256}'", text
    )


def main(argv=None) -> int:
    from ray_app.serve.served_model import ServingSetupError

    p = argparse.ArgumentParser(prog="python -m ray_app.serve.pin", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a model.pt or a Ray Train run folder")
    p.add_argument("--config", type=Path, help="the serve config to rewrite (default: print the two lines)")
    a = p.parse_args(argv)
    try:
        file, digest = pin(a.checkpoint)
        if a.config is None:
            print(f"checkpoint: {file}\ncheckpoint_sha256: {digest}")
            return 0
        a.config.write_text(pin_config_text(a.config.read_text(), str(file), digest))
    except (ServingSetupError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.config}: serves {file} (sha256 {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
