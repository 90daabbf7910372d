"""The Slurm job's entry (not a rule's script): serve_jupyter.py NODE_FILE -- COMMAND...
picks the address and port on the compute node, then becomes the Jupyter server."""

import sys

from repo2singularity.launchers.slurm import serve

serve(sys.argv[1], sys.argv[3:])
