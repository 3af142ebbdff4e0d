"""Workflows: one trigger, many steps across channels and time (docs/workflows.md).

`definition` validates what a client PUTs; `steps` decides what a run does at its current step;
`store` keeps workflows, versions and runs; `engine` advances due runs (timers in PostgreSQL);
`api` is the HTTP surface the gateway mounts.
"""
