"""The journey across three hosts (login node, builder over SSH, Slurm compute node), as root."""
