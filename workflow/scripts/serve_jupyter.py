"""The Slurm job's entry (not a rule's script):
serve_jupyter.py NODE_FILE [--unpack RUNTIME SIF CHECKSUM SANDBOX LOG RECEIPT WORK_FOLDER] -- COMMAND...
unpacks the sandbox when asked, picks the address and port on the compute node, then becomes the
Jupyter server."""

import sys

from repo2singularity.launchers.slurm import serve
from repo2singularity.step import StepError

node_file, options = sys.argv[1], sys.argv[2 : sys.argv.index("--")]
try:
    serve(node_file, sys.argv[sys.argv.index("--") + 1 :], unpack=options[1:8] if options[:1] == ["--unpack"] else None)
except StepError as error:
    # the job's log is what the launch rule shows when the job ends early: one line there
    sys.exit(f"serve_jupyter: {error}")
