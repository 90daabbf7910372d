"""Rule check_builder: connect to the builder, check it, and say in one line what it has."""

from repo2singularity import builders
from repo2singularity.step import run_step
from repo2singularity.tools import say

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

run_step("check_builder", lambda: say(builders.from_config(snakemake.params.builder, snakemake.log[0]).readiness()))
