"""Ray Serve: schemas, auth, the served model, one deployment class per stage, the ingress, the app."""
