"""repo2singularity's library: what the rules' scripts (one per rule, beside this package) call.

- config, repository, naming, manifest: what to build, checked, and refs resolved to commits
- image, runtime: repo2docker's command and receipt, the container runtime's commands
- builders/: where the Docker and SIF steps run (this machine, a host over SSH), one file each
- launchers/: where Jupyter runs (this machine, a Slurm job), one file each
- ssh_transport: an SSH connection with commands, streams, resume and keepalive
- step, tools, files, processes: what every step shares
- jupyter, servers, slurm, retention, summary: the launch, its records, prune and the summary
"""

PROGRAM = "repo2singularity"
