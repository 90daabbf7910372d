"""The build service (issue 17): an HTTP front to this project's own workflow for many users.

One class per job: `settings` (the YAML, checked against workflow/schemas/service.schema.yaml),
`accounts` (users and their hashed tokens), `build_request` (what a client asked, checked),
`git_access` (a repository's credentials kept off command lines; ref -> commit), `queue` (builds
by commit, their events, limits and order), `runner` (one Snakemake run per build), `api` and
`web` (Tornado handlers), `app` (the server) and `cli` (`repo2singularity-service`).
"""
