"""The main job: prepare, train (or tune), compare, serve and start the demo, in one command."""
